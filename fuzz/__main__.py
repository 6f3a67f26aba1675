"""``python -m fuzz``: coverage-guided fuzzing of qmig's parsers with atheris (libFuzzer).

    python -m fuzz --all [--runs 1000000] [--seconds 600]   # every target, one process each
    python -m fuzz mqtt [--runs N] [--seconds S]            # one target, in this process

Seeds are read from ``fuzz/corpus/TARGET/`` (committed, small); what the fuzzer learns goes
to a scratch corpus under ``reports/fuzz/`` (or ``--work DIR``), and an input that crashes,
hangs (``-timeout``) or runs out of memory (``-rss_limit_mb``) is written there as
``crash-*``/``timeout-*``/``oom-*``: turn it into a regression test in tests/test_fuzz.py.
The exit status is 0 only if every target ran its inputs without a finding.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("mqtt", "frames", "control", "config")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def _one(name: str, runs: int, seconds: int, work: Path) -> int:
    import atheris

    with atheris.instrument_imports(include=["mqttproto", "quicmig", "broker"]):
        from fuzz.targets import TARGETS
    corpus = work / name / "corpus"
    artifacts = work / name / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0], f"-runs={runs}", f"-max_total_time={seconds}", "-timeout=10",
        "-rss_limit_mb=2048", "-max_len=4096", f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1", str(corpus), str(HERE / "corpus" / name),
    ]  # fmt: skip
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()
    return 0


def _all(names: list[str], runs: int, seconds: int, work: Path) -> int:
    failed = []
    for name in names:
        started = time.monotonic()
        cmd = [sys.executable, "-m", "fuzz", name, "--runs", str(runs), "--seconds", str(seconds),
               "--work", str(work)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            print(f"{name}: did not finish within {seconds + 120} s")
            failed.append(name)
            continue
        took = time.monotonic() - started
        done = _DONE.search(proc.stderr)
        findings = sorted(p.name for p in (work / name / "findings").glob("*") if p.is_file())
        if proc.returncode == 0 and done:
            n = int(done.group(1))
            print(f"{name}: {n:,} inputs in {took:.0f} s ({n / max(took, 1e-9):,.0f}/s), "
                  "no crash, hang or memory blow-up")  # fmt: skip
        else:
            tail = "\n    ".join(proc.stderr.strip().splitlines()[-15:])
            print(f"{name}: FINDING (exit {proc.returncode}); {findings or 'no artifact'}\n"
                  f"    {tail}")  # fmt: skip
            failed.append(name)
    if failed:
        print(f"fuzz: findings in {', '.join(failed)}; inputs under {work}/<target>/findings/")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", choices=[[], *NAMES], metavar="TARGET",
                        help=f"one of {', '.join(NAMES)} (run in this process)")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="every target, one process each")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--seconds", type=int, default=600, help="time limit per target")
    parser.add_argument("--work", type=Path, default=Path("reports/fuzz"),
                        help="scratch corpus and findings (default reports/fuzz)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.all or len(args.targets) != 1:
        return _all(list(args.targets or NAMES), args.runs, args.seconds, args.work.resolve())
    return _one(args.targets[0], args.runs, args.seconds, args.work.resolve())


if __name__ == "__main__":
    sys.exit(main())
