"""``python -m loadtests.migrate``: live-migrate the broker container while locust users run.

In the container lab (``migration/lab``), under the machine's lab lock:

1. ``Lab.up``: edge hosts as pods, the broker container on the scenario's start host, the
   clients' namespace ``qmig-cl``;
2. locust, headless, *inside* ``qmig-cl`` (``ip netns exec``), ``--users`` telemetry users
   (QUIC users follow the broker with ``--follow``; TCP users are sent to the destination by
   the broker's DISCONNECT 0x9D and reconnect there), trusting the lab's CA;
3. once every user is connected and ``--settle`` seconds have passed, one
   ``Migration(lab, --to).run()`` (checkpoint, transfer over the shaped link, restore);
4. ``--after`` seconds later locust is stopped (its users drain) and the lab torn down.

The report (``<out>/migration-under-load-<stamp>.json`` plus locust's CSV/HTML) gives, per
transport, the interruption each user saw (distribution across users), the messages lost
(must be 0 at QoS 1) and late, and the latency spike around the freeze (per 250 ms of send
time), next to the migration's own timeline and downtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .broker import REPO_ROOT, LoadTestError, LocustRun
from .report import fmt, migration_impact, table
from .run import locust_cmd, trace_file


def say(message: str) -> None:
    print(f"migrate-under-load: {message}", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole experiment; returns the report (also written to disk)."""
    from migration.image import ensure_image
    from migration.lab.lab import CLIENT_NS, Lab, containers_unavailable, lab_lock
    from migration.lab.live import Migration, MigrationFailed
    from migration.lab.net import netns_exec
    from migration.scenario import Scenario

    reason = containers_unavailable()
    if reason:
        raise LoadTestError(f"containers unavailable: {reason}")
    image = args.image or ensure_image(REPO_ROOT)
    scenario = Scenario.load(args.scenario)
    lab = Lab(scenario)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = (args.out / time.strftime("migration-under-load-%Y%m%d-%H%M%S")).resolve()
    spawn = min(float(args.users), args.spawn_rate)
    locust: LocustRun | None = None
    outcome: dict[str, Any] = {}
    with lab_lock(say=say):
        try:
            say(f"lab up ({scenario.name}, image {image})")
            lab.up(image)
            broker = lab.broker_host
            ports = scenario.ports
            cmd = locust_cmd(
                host=broker.address, quic_port=ports.quic, tcp_port=ports.tcp,
                cafile=lab.cafile, users=args.users, spawn_rate=spawn,
                run_time=args.users / spawn + args.settle + args.after + 300,
                msg_rate=args.rate, qos=args.qos, transport=args.transport, prefix=prefix,
                extra=("--follow", args.follow, "--delivery-timeout", str(args.delivery_timeout)),
            )  # fmt: skip
            locust = LocustRun(cmd, prefix, trace_file(prefix),
                               wrap=tuple(netns_exec(CLIENT_NS)))  # fmt: skip
            ready = locust.wait_ready(args.users / spawn + 60)
            say(f"{ready['connected']}/{ready['users']} users connected to {broker.name} "
                f"({broker.address}); {args.rate:g} msg/s each, QoS {args.qos}")  # fmt: skip
            time.sleep(args.settle)
            migration = Migration(lab, args.to, progress=say)
            try:
                outcome = migration.run()
            except MigrationFailed as exc:
                outcome = exc.outcome
                say(f"migration failed: {exc}")
            time.sleep(args.after)
            migration.first_client_packet()
            say("stopping locust (users drain their messages in flight)")
            code = locust.stop(timeout=120)
        finally:
            if locust is not None:
                locust.kill()
            lab.down(quiet=True)
            say("lab down")
    trace = locust.trace() if locust is not None else None
    if trace is None:
        raise LoadTestError(f"locust left no trace: {locust.log_tail() if locust else ''}")
    report: dict[str, Any] = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "image": image,
        "locust_exit": code,
        "migration": outcome,
        "impact": migration_impact(trace, outcome["timeline"], after=args.after),
        "totals": trace["totals"],
        "files": {
            "trace": str(locust.trace_path),
            "html": str(prefix.with_suffix(".html")),
            "csv": f"{prefix}_stats.csv",
        },
    }
    path = prefix.with_name(prefix.name + ".json")
    path.write_text(json.dumps(report, indent=1, default=str))
    report["files"]["report"] = str(path)
    return report


HEADER = ("transport", "users", "interrupted", "interruption p50", "p90", "p99", "max",
          "worst latency p50", "max", "lost", "late")  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    m = report["migration"]
    say(f"migration {m.get('from')} -> {m.get('to')}: ok {m.get('ok', False)}, downtime "
        f"{m.get('downtime_ms')} ms, service gap {m.get('service_gap_ms')} ms, checkpoint "
        f"{(m.get('checkpoint_bytes') or 0) / 1e6:.1f} MB")  # fmt: skip
    rows = []
    for transport, t in report["impact"]["transports"].items():
        i, w = t["interruption_ms"], t["max_latency_ms"]
        rows.append([transport, t["users"], t["users_interrupted_over_100ms"], fmt(i["p50"]),
                     fmt(i["p90"]), fmt(i["p99"]), fmt(i["max"]), fmt(w["p50"]), fmt(w["max"]),
                     t["lost"], t["late"]])  # fmt: skip
    print(table(rows, HEADER))
    peak = max(report["impact"]["spike"], key=lambda r: r["p99"] or 0, default=None)
    if peak and peak["p99"] is not None:
        say(f"latency spike: p99 {fmt(peak['p99'])} ms, max {fmt(peak['max'])} ms for messages "
            f"sent {peak['t_s']:+.2f} s from the trigger")  # fmt: skip
    say(f"report: {report['files']['report']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.migrate",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    add = parser.add_argument
    add("--users", "-u", type=int, default=200, help="simulated devices (default 200)")
    add("--spawn-rate", type=float, default=50.0, help="users started per second")
    add("--rate", type=float, default=5.0, help="messages per second per user (default 5)")
    add("--qos", type=int, default=1, choices=(0, 1, 2))
    add("--transport", choices=("quic", "tcp", "both"), default="both")
    add("--follow", default="proactive", help="QUIC users' migration strategy")
    add("--to", default="edge-b", help="destination edge host (default edge-b)")
    add("--scenario", default="demo", help="lab scenario (default demo)")
    add("--settle", type=float, default=10.0, help="seconds of load before the migration")
    add("--after", type=float, default=15.0, help="seconds of load after it")
    add("--delivery-timeout", type=float, default=15.0, help="seconds before a message is lost")
    add("--image", default=None, help="broker image (default: build/reuse this checkout's)")
    add("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except LoadTestError as exc:
        say(f"error: {exc}")
        return 2
    print_report(report)
    lost = sum(t["lost"] for t in report["impact"]["transports"].values())
    return 0 if report["migration"].get("ok") and not (args.qos and lost) else 1


if __name__ == "__main__":
    sys.exit(main())
