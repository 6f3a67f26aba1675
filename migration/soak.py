"""Endurance (issue #18): hours of traffic with a live migration every minute.

``make soak DURATION=1h`` (``python -m migration.soak --duration 1h``) brings the container
lab up and runs 50 clients publishing 20 msg/s each to their own topic, 1,000 msg/s in all:
40 QUIC clients (ten per follow strategy) and 10 TCP clients (five qmig, five paho-mqtt),
half of each group at QoS 1 and half at QoS 2.  Every ``--interval`` seconds (60) the
broker is live-migrated to the next edge host in turn (A to B to C to A...), with the best
method the machine has (pre-copy where the kernel lets it, else cold).  The clients account
in bounded memory (:mod:`migration.ledger`), so an hour costs them what a minute does.

It prints, per migration, the method, the broker's freeze (its own view), lost and
duplicated messages and the QUIC clients that handshook again; the broker's RSS over time
(sampled from ``/proc`` every ``--sample`` seconds); and a verdict.  It fails (exit
status 1) on any lost message, any QoS 2 duplicate, any QUIC re-handshake, a migration
that rolled back, or RSS growth of more than ``--max-growth`` (10 %) from the end of the
warm-up (the first ``--warmup`` migrations) to the end of the run.  ``--json FILE`` keeps
every figure.  Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from migration.scenario import ClientSpec, Scenario

STRATEGIES = ("proactive", "reactive", "pool", "announce")
MIGRATION_TIME = 5.0  # seconds a move takes end to end, about: the rest of an interval is traffic


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h``, ``1h30m`` -> seconds."""
    number = r"(\d+(?:\.\d+)?)"
    parts = re.fullmatch(rf"\s*(?:{number}h)?\s*(?:{number}m)?\s*(?:{number}s?)?\s*", text)
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 300, 5m or 1h)")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


def soak_clients(
    quic_per_strategy: int = 10, tcp: int = 5, paho: int = 5
) -> tuple[ClientSpec, ...]:
    """The soak's clients: QUIC per strategy, qmig TCP and paho TCP; QoS 1 and 2 alternate."""
    specs: list[ClientSpec] = []
    for strategy in STRATEGIES:
        for i in range(quic_per_strategy):
            specs.append(ClientSpec(f"quic-{strategy}-{i:02d}", "quic", strategy, "qmig",
                                    qos=1 + i % 2))  # fmt: skip
    for i in range(tcp):
        specs.append(ClientSpec(f"tcp-{i:02d}", "tcp", "none", "qmig", qos=1 + i % 2))
    for i in range(paho):
        specs.append(ClientSpec(f"paho-{i:02d}", "tcp", "none", "paho", qos=1 + i % 2))
    return tuple(specs)


def rotation(scenario: Scenario, moves: int) -> list[str]:
    """Destinations A -> B -> C -> A ... starting after the scenario's start host."""
    names = [h.name for h in scenario.hosts]
    first = names.index(scenario.start)
    return [names[(first + 1 + i) % len(names)] for i in range(moves)]


# ---------------------------------------------------------------------- RSS
def broker_pids(marker: str) -> list[int]:
    """PIDs of lab brokers: ``python3 -m qmig broker`` with ``marker`` in its arguments."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-m", b"qmig", b"broker"] and marker.encode() in argv:
            pids.append(int(proc.name))
    return pids


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler:
    """Samples the broker's RSS every ``every`` seconds in a thread, until stopped.

    While a move has two brokers (the frozen source, the restored destination) a sample is
    skipped: which one is "the" broker is not clear, and neither is serving yet.
    """

    def __init__(self, marker: str, every: float) -> None:
        self.marker = marker
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (wall time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = broker_pids(self.marker)
            if len(pids) == 1:
                mb = rss_mb(pids[0])
                if mb is not None:
                    self.samples.append((time.time(), round(mb, 2)))
            self._stop.wait(self.every)


def rss_growth(
    samples: Sequence[tuple[float, float]], since: float, tail: int = 3
) -> dict[str, Any]:
    """RSS after the warm-up (median of the first ``tail`` samples from ``since``) against
    the end of the run (median of the last ``tail``); growth as a fraction."""
    after = [mb for t, mb in samples if t >= since]
    if len(after) < 2 * tail:
        return {"warm_mb": None, "end_mb": None, "growth": None, "samples": len(after)}
    warm = statistics.median(after[:tail])
    end = statistics.median(after[-tail:])
    return {"warm_mb": warm, "end_mb": end, "growth": round(end / warm - 1, 4),
            "samples": len(after), "max_mb": max(after)}  # fmt: skip


# ---------------------------------------------------------------------- figures
def migration_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per migration: where, how, the broker's freeze, and what the clients saw.

    No interruption figures: at 1,000 msg/s on a small machine the clients' processes fall
    behind while a move takes the CPU, so their delivery times lag the network by up to a
    second; ``make demo`` and ``qmig bench migration`` measure interruption with light
    clients.
    """
    qos = {c["name"]: c.get("qos") for c in result["clients"]}
    rows = []
    for index, migration in enumerate(result["migrations"], 1):
        clients = migration["clients"]
        quic = [c for c in clients if c["transport"] == "quic"]
        rows.append({
            "move": index,
            "to": migration.get("to"),
            "method": migration.get("method"),
            "ok": bool(migration.get("ok", False)),
            "quic_unacknowledged": migration.get("quic_unacknowledged"),
            "downtime_ms": migration.get("downtime_ms"),
            "lost": sum(c["lost"] for c in clients),
            "duplicates_qos1": sum(c["duplicates"] for c in clients if qos[c["name"]] == 1),
            "duplicates_qos2": sum(c["duplicates"] for c in clients if qos[c["name"]] == 2),
            "quic_rehandshakes": sum(c["reconnects"] for c in quic),
            "tcp_reconnects": sum(c["reconnects"] for c in clients if c["transport"] != "quic"),
            "resume_at": migration.get("resume_at"),
        })  # fmt: skip
    return rows


def verdict(rows: Sequence[dict[str, Any]], rss: dict[str, Any], max_growth: float) -> list[str]:
    """What failed (empty: the soak passed)."""
    failures = []
    for key, what in (("lost", "messages lost"), ("duplicates_qos2", "QoS 2 duplicates"),
                      ("quic_rehandshakes", "QUIC re-handshakes")):  # fmt: skip
        total = sum(r[key] for r in rows)
        if total:
            failures.append(f"{total} {what}")
    rolled = [r["move"] for r in rows if not r["ok"]]
    if rolled:
        failures.append(f"migrations {rolled} rolled back")
    growth = rss.get("growth")
    if growth is None:
        failures.append("too few RSS samples after the warm-up to judge growth")
    elif growth > max_growth:
        failures.append(f"broker RSS grew {growth:.1%} after the warm-up (limit {max_growth:.0%})")
    return failures


def print_report(console: Console, rows: list[dict[str, Any]], rss: dict[str, Any],
                 samples: list[tuple[float, float]], failures: list[str]) -> None:  # fmt: skip
    table = Table(title="qmig soak: one row per live migration")
    for column in ("#", "to", "method", "frozen ms", "lost", "dup QoS 1", "dup QoS 2",
                   "QUIC re-handshakes", "TCP reconnects"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in rows:
        method = str(r["method"]) + ("" if r["ok"] else " (rolled back)")
        table.add_row(str(r["move"]), str(r["to"]), method, _num(r["downtime_ms"]),
                      str(r["lost"]), str(r["duplicates_qos1"]), str(r["duplicates_qos2"]),
                      str(r["quic_rehandshakes"]), str(r["tcp_reconnects"]))  # fmt: skip
    console.print(table)
    if samples:
        start = samples[0][0]
        step = max(1, len(samples) // 12)
        series = ", ".join(f"{(t - start) / 60:.0f} min {mb:.1f}" for t, mb in samples[::step])
        console.print(f"broker RSS (MB) over time: {series}")
    growth = "-" if rss.get("growth") is None else format(rss["growth"], ".1%")
    console.print(f"RSS after warm-up {_num(rss.get('warm_mb'), 1)} MB, at the end "
                  f"{_num(rss.get('end_mb'), 1)} MB, growth {growth}")  # fmt: skip
    downtimes = [r["downtime_ms"] for r in rows if r["downtime_ms"] is not None]
    if downtimes:
        console.print(f"frozen: median {statistics.median(downtimes):.0f} ms, "
                      f"max {max(downtimes):.0f} ms over {len(rows)} migrations")  # fmt: skip
    if failures:
        console.print("[red]soak FAILED: " + "; ".join(failures) + "[/]")
    else:
        console.print("[green]soak passed: 0 lost, 0 QoS 2 duplicates, 0 QUIC re-handshakes, "
                      "RSS bounded[/]")  # fmt: skip


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migration.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("1h"),
                        help="how long (300, 5m, 1h; default 1h)")  # fmt: skip
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between moves")
    parser.add_argument("--method", default="best", help="cold, precopy, postcopy or best")
    parser.add_argument("--rate", type=float, default=20.0, help="msg/s per client")
    parser.add_argument("--quic-per-strategy", type=int, default=10)
    parser.add_argument("--tcp", type=int, default=5, help="qmig TCP clients")
    parser.add_argument("--paho", type=int, default=5, help="paho-mqtt TCP clients")
    parser.add_argument("--warmup", type=int, default=None,
                        help="migrations before RSS counts (default: a fifth, >= 1)")  # fmt: skip
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 110)

    from migration.image import ensure_image
    from migration.lab.lab import BROKER_ETC
    from migration.lab.run import run_scenario

    moves = max(2, int(args.duration // args.interval))
    method = args.method
    if method == "best":
        from migration.lab.precopy import best_method

        method, how = best_method()
        console.print(f"method: {method} ({how})")
    base = Scenario.load("demo")
    scenario = base.replace(
        name="soak",
        clients=soak_clients(args.quic_per_strategy, args.tcp, args.paho),
        rate=args.rate,
        method=method,
        migrations=rotation(base, moves),
        settle=max(5.0, args.interval - MIGRATION_TIME),
        processes=2,
    )
    total = len(scenario.clients) * scenario.rate
    minutes = moves * args.interval / 60
    console.print(f"soak: {len(scenario.clients)} clients, {total:g} msg/s, {moves} migrations "
                  f"every {args.interval:g} s, about {minutes:.0f} min")  # fmt: skip
    sampler = RssSampler(f"{BROKER_ETC}/control.token", args.sample)
    from migration.image import ImageError
    from migration.lab.net import LabError

    try:
        image = ensure_image(Path(__file__).resolve().parents[1])
        result = run_scenario(scenario, image, progress=console.log, ledger=True,
                              on_ready=lambda lab: sampler.start(),
                              on_lab=lambda lab: sampler.stop())  # fmt: skip
    except (ImageError, LabError) as exc:
        console.print(f"[red]qmig soak: {exc}[/]")
        return 2
    finally:
        sampler.stop()
    rows = migration_rows(result)
    warmup = args.warmup if args.warmup is not None else max(1, moves // 5)
    warm_at = rows[min(warmup, len(rows)) - 1]["resume_at"] if rows else 0.0
    rss = rss_growth(sampler.samples, float(warm_at or 0.0))
    failures = verdict(rows, rss, args.max_growth)
    print_report(console, rows, rss, sampler.samples, failures)
    out = {"scenario": "soak", "clients": len(scenario.clients), "msg_per_s": total,
           "interval_s": args.interval, "method": method, "warmup_moves": warmup,
           "migrations": rows, "rss": rss, "rss_samples": sampler.samples,
           "failures": failures,
           "client_errors": {c["name"]: c["errors"][:5]
                             for c in result["clients"] if c.get("errors")}}  # fmt: skip
    print(json.dumps({k: v for k, v in out.items() if k != "rss_samples"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
