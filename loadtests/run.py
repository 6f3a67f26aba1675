"""``python -m loadtests.run``: a headless locust run against a loopback broker (make loadtest).

Starts ``qmig broker`` on 127.0.0.1 (free ports, fresh certificates) unless ``--host`` names
a running one, runs locust headless with the telemetry users, and leaves in ``--out``:

    locust-<stamp>_stats.csv, _stats_history.csv, _failures.csv, _exceptions.csv  (locust)
    locust-<stamp>.html                                                          (locust)
    locust-<stamp>-trace.json     every user's counts and series
    locust-<stamp>-summary.json   steady-state percentiles per transport

Exit status: locust's (1 when any request failed), 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from .broker import LoadTestError, LocustRun, LoopbackBroker, locust_command
from .report import failures, fmt, steady_state, table

USER_CLASSES = {"quic": ("QuicUser",), "tcp": ("TcpUser",), "both": ("QuicUser", "TcpUser")}


def run_locust(
    *,
    host: str,
    quic_port: int,
    tcp_port: int,
    cafile: str,
    users: int,
    spawn_rate: float,
    duration: float,
    msg_rate: float,
    qos: int,
    transport: str,
    prefix: Path,
    extra: tuple[str, ...] = (),
) -> tuple[int, dict[str, Any] | None]:
    """Run locust to the end; return its exit status and the trace (None if it left none)."""
    run = LocustRun(locust_cmd(host=host, quic_port=quic_port, tcp_port=tcp_port, cafile=cafile,
                               users=users, spawn_rate=spawn_rate, run_time=duration,
                               msg_rate=msg_rate, qos=qos, transport=transport, prefix=prefix,
                               extra=extra), prefix, trace_file(prefix))  # fmt: skip
    code = run.wait(duration + 120)
    return code, run.trace()


def trace_file(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + "-trace.json")


def locust_cmd(*, host: str, quic_port: int, tcp_port: int, cafile: str, users: int,
               spawn_rate: float, run_time: float, msg_rate: float, qos: int, transport: str,
               prefix: Path, extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """The locust command of one run whose files all start with ``prefix``."""
    return locust_command(
        host=host, users=users, spawn_rate=spawn_rate, run_time=f"{math.ceil(run_time)}s",
        quic_port=quic_port, tcp_port=tcp_port, cafile=cafile,
        user_classes=USER_CLASSES[transport], msg_rate=msg_rate, qos=qos,
        csv_prefix=prefix, html=prefix.with_suffix(".html"), trace_file=trace_file(prefix),
        extra=extra,
    )  # fmt: skip


def summary_rows(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for transport, s in summary.items():
        d, p = s["deliver_ms"], s["publish_ms"]
        rows.append([transport, f"{s['connected']}/{s['users']}", s["messages"], s["lost"],
                     s["late"], fmt(p["p50"]), fmt(p["p99"]), fmt(d["p50"]), fmt(d["p99"]),
                     fmt(d["max"])])  # fmt: skip
    return rows


HEADER = ("transport", "connected", "messages", "lost", "late", "puback p50", "puback p99",
          "deliver p50", "deliver p99", "deliver max")  # fmt: skip


_TIMESPAN = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration(text: str) -> float:
    """Seconds from ``90``/``90.5`` or locust's time format (``20s``, ``1m30s``, ``1h``).

    (locust.util.timespan parses the same format, but importing locust patches the
    interpreter with gevent, which this driver must not.)
    """
    text = text.strip().lower()
    with contextlib.suppress(ValueError):
        seconds = float(text)
        if seconds > 0:
            return seconds
        raise argparse.ArgumentTypeError(f"duration must be positive, not {text!r}")
    match = _TIMESPAN.fullmatch(text)
    if not text or match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give seconds (90) or 20s, 1m30s, 1h"
        )
    hours, minutes, seconds_text = match.groups()
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds_text or 0)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, not {text!r}")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split(
        "\n")[0])  # fmt: skip
    add = parser.add_argument
    add("--users", "-u", type=int, default=50, help="simulated devices (default 50)")
    add("--spawn-rate", "-r", type=float, default=None, help="users started per second")
    add("--duration", "-t", type=duration, default=30.0,
        help="how long the load runs: seconds, or 20s, 1m30s, 1h (default 30)")  # fmt: skip
    add("--rate", type=float, default=1.0, help="messages per second per user (default 1)")
    add("--qos", type=int, default=1, choices=(0, 1, 2))
    add("--transport", choices=sorted(USER_CLASSES), default="both")
    add("--host", default=None, help="a running broker (default: start one on loopback)")
    add("--quic-port", type=int, default=14567, help="with --host")
    add("--tcp-port", type=int, default=1883, help="with --host")
    add("--cafile", default="", help="with --host: the broker's CA (default: insecure QUIC)")
    add("--out", type=Path, default=Path("reports"), help="report directory (default reports/)")
    add("--name", default=None, help="file prefix (default locust-<time>)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / (args.name or time.strftime("locust-%Y%m%d-%H%M%S"))
    spawn = args.spawn_rate or min(float(args.users), 50.0)
    broker: LoopbackBroker | None = None
    try:
        if args.host is None:
            broker = LoopbackBroker().start()
            host, quic, tcp, ca = broker.host, broker.quic_port, broker.tcp_port, broker.cafile
        else:
            host, quic, tcp, ca = args.host, args.quic_port, args.tcp_port, args.cafile
        print(f"loadtest: {args.users} users ({args.transport}) at {args.rate:g} msg/s, QoS "
              f"{args.qos}, {args.duration:g} s against {host} (QUIC {quic}, TCP {tcp})",
              flush=True)  # fmt: skip
        code, trace = run_locust(host=host, quic_port=quic, tcp_port=tcp, cafile=ca,
                                 users=args.users, spawn_rate=spawn, duration=args.duration,
                                 msg_rate=args.rate, qos=args.qos, transport=args.transport,
                                 prefix=prefix)  # fmt: skip
    except LoadTestError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if broker is not None:
            broker.stop()
    if trace is None:
        print(f"loadtest: locust left no trace (exit {code}); see {prefix}.log", file=sys.stderr)
        return 2
    summary = steady_state(trace)
    (prefix.with_name(prefix.name + "-summary.json")).write_text(json.dumps(summary, indent=1))
    print(table(summary_rows(summary), HEADER))
    bad = failures(trace)
    if bad:
        print(f"loadtest: {len(bad)} failures, first: {bad[0][0]}: {bad[0][1]}")
    print(f"loadtest: reports in {prefix}_stats.csv, {prefix}.html; locust exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
