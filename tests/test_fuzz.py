"""The fuzz targets (fuzz/): a bounded coverage-guided run of each, and the seed corpus.

``make fuzz`` runs 1,000,000 inputs per target; here every target gets a short atheris run
(libFuzzer) from its committed seeds, which must find nothing, and must really have run its
inputs.  An input the fuzzer ever finds that crashes a parser becomes a case in
``test_known_inputs`` below.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
RUNS = 5000


@pytest.mark.timeout(300)
def test_a_short_fuzzing_run_of_every_target_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz", "--all", "--runs", str(RUNS), "--seconds", "60",
         "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in TARGETS:
        ran = re.search(rf"^{name}: ([\d,]+) inputs", proc.stdout, re.M)
        assert ran and int(ran.group(1).replace(",", "")) == RUNS, proc.stdout


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_has_seeds_and_takes_them(name: str) -> None:
    seeds = sorted((CORPUS / name).iterdir())
    assert seeds, f"no seeds in fuzz/corpus/{name}"
    for seed in seeds:
        TARGETS[name](seed.read_bytes())


# Inputs that once broke a parser (none yet): (target, input).
KNOWN: list[tuple[str, bytes]] = [
    ("mqtt", b"\x01\x10\xff\xff\xff\xff\x7f"),  # a remaining length past the 4-byte varint
    ("frames", b"\x00\x80"),  # a truncated transport parameter id
    ("control", b'{"cmd": "prepare", "dest": ' + b"[" * 100_000 + b"]}"),  # deep nesting
    ("config", b"a: " + b"[" * 100_000),  # deep YAML nesting
]


@pytest.mark.parametrize(("name", "data"), KNOWN, ids=[k for k, _ in KNOWN])
def test_known_inputs(name: str, data: bytes) -> None:
    TARGETS[name](data)
