"""Issue #16's fleet run: many live QUIC clients through a real container migration.

``python -m migration.fleet [--scenario fleet] [--json reports/fleet.json]`` runs the
scenario (by default ``migration/scenarios/fleet.yaml``: 1,000 QUIC clients, 250 per
strategy, 1 QoS 1 msg/s each to its own topic) and, unless ``--no-baseline``, the same
migration with one client per strategy (the idle broker), then prints per migration: lost,
duplicates, second handshakes, extra interruption p50/p95/p99 per strategy, the broker's
RSS before the move, checkpoint size and downtime against the idle broker.
``--scenario fleet-idle`` holds 10,000 idle QUIC clients (rate 0: connected, subscribed,
silent) instead; they have no deliveries to time, so what shows of the move is how many
followed it and when each validated the new path.  Exit status 0 only if nothing was lost,
no QUIC client handshook twice and every QUIC client is still connected at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from measure import percentile


def summarize(migration: dict[str, Any]) -> dict[str, Any]:
    """One migration's fleet figures, from a row of report.figures_by_migration."""
    rows = migration["clients"]
    by: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by.setdefault(str(row.get("strategy") or row.get("transport")), []).append(row)
    strategies = {}
    for name, group in sorted(by.items()):
        extra = [float(r["extra_ms"]) for r in group if r.get("extra_ms") is not None]
        moved = [float(r["validated_after_resume_ms"]) for r in group
                 if r.get("validated_after_resume_ms") is not None]  # fmt: skip
        strategies[name] = {
            "clients": len(group),
            # QUIC: clients that validated the new path, and when after the resume (what
            # idle clients, which have no deliveries to time, show of the move).
            "followed": len(moved),
            **{f"validated_p{q}_ms": percentile(moved, q) for q in (50, 99)},
            "lost": sum(r["lost"] for r in group),
            "duplicates": sum(r["duplicates"] for r in group),
            "second_handshakes": sum(r["reconnects"] for r in group),
            "no_interruption_figure": len(group) - len(extra),
            **{f"extra_p{q}_ms": percentile(extra, q) for q in (50, 95, 99)},
            "extra_max_ms": max(extra) if extra else None,
        }
    return {
        "to": migration.get("ip_after"),
        "clients": len(rows),
        "lost": sum(r["lost"] for r in rows),
        "lost_clients": sum(1 for r in rows if r["lost"]),
        "duplicates": sum(r["duplicates"] for r in rows),
        "second_handshakes": sum(r["reconnects"] for r in rows),
        "broker_rss_mb": round(migration.get("broker_rss_bytes", 0) / 1e6, 1),
        "checkpoint_mb": round(migration.get("checkpoint_bytes", 0) / 1e6, 1),
        "transfer_mb": round(migration.get("transfer_bytes", 0) / 1e6, 1),
        "downtime_ms": migration.get("downtime_ms"),
        "quic_notified": migration.get("quic_notified"),
        "timeline_ms": {
            k: round((v - migration["timeline"]["trigger"]) * 1000)
            for k, v in sorted((migration.get("timeline") or {}).items(), key=lambda kv: kv[1])
        },
        "strategies": strategies,
    }


def recovery(clients: Sequence[dict[str, Any]], migration: dict[str, Any]) -> dict[str, Any]:
    """Per strategy, how long after the broker resumed each client got its first delivery
    of a message it had sent before the resume (p50/p95/p99 ms): the extra interruption at a
    rate too low (1 msg/s) for the gap between deliveries to measure it."""
    resume = migration["resume_at"]
    by: dict[str, list[float]] = {}
    for c in clients:
        got = {int(s) for s, t in c["received"] if t < resume}
        waiting = {int(s) for s, t in c["sent"] if t < resume and int(s) not in got}
        late = [t for s, t in c["received"] if t >= resume and int(s) in waiting]
        if waiting and late:
            by.setdefault(str(c["strategy"]), []).append((min(late) - resume) * 1000)
    return {st: {"clients": len(v), **{f"p{q}_ms": round(percentile(v, q) or 0, 1)
                                        for q in (50, 95, 99)}, "max_ms": round(max(v), 1)}
            for st, v in sorted(by.items())}  # fmt: skip


def stranded(clients: Sequence[dict[str, Any]], broker_host: str) -> int:
    """QUIC clients not on the broker's final address at the end: still holding a
    connection to where the broker was (not yet given up on) or not connected at all."""
    return sum(
        1 for c in clients
        if c.get("transport") == "quic"
        and (c.get("connected_at_end") is False
             or str(c.get("final_server", "")).rpartition(":")[0] != broker_host)
    )  # fmt: skip


def lost_detail(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The clients that lost messages or were lost: name, errors, connection events."""
    out = []
    lost_names = {r["name"] for m in result["migrations"] for r in m["clients"]
                  if r["lost"] or r["reconnects"]}  # fmt: skip
    for c in result["clients"]:
        if c["name"] in lost_names or c.get("errors"):
            out.append({k: c.get(k) for k in ("name", "strategy", "errors", "connections",
                                              "migrations", "final_server")})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from migration.image import ensure_image
    from migration.lab.run import run_scenario
    from migration.scenario import ClientSpec, Scenario

    parser = argparse.ArgumentParser(prog="python -m migration.fleet", description=__doc__)
    parser.add_argument("--scenario", default="fleet")
    parser.add_argument("--count", type=int, default=None, help="QUIC clients per strategy")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--settle", type=float, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--method", default=None, help="cold, precopy, postcopy, hybrid")
    parser.add_argument("--json", type=Path, default=None, help="write figures and detail")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the workload files")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    scenario = Scenario.load(args.scenario)
    if args.count is not None:
        strategies = sorted({c.strategy for c in scenario.clients})
        clients = tuple(
            s
            for st in strategies
            for s in ClientSpec.many(
                {"name": f"quic-{st}", "transport": "quic", "strategy": st, "count": args.count}
            )
        )
        scenario = scenario.replace(clients=clients)
    if args.settle is not None:
        scenario = scenario.replace(settle=args.settle)
    if args.method is not None:
        scenario = scenario.replace(method=args.method)
    if args.processes is not None:
        scenario = scenario.replace(processes=args.processes)
    image = ensure_image(Path(__file__).resolve().parents[1])
    out: dict[str, Any] = {"scenario": scenario.name, "clients": len(scenario.clients),
                           "processes": scenario.processes}  # fmt: skip
    if not args.no_baseline:
        idle = scenario.replace(
            processes=1,
            clients=tuple(
                ClientSpec(f"idle-{st}", "quic", st)
                for st in sorted({c.strategy for c in scenario.clients})
            ),
        )
        base = run_scenario(idle, image, progress=console.log)
        out["baseline"] = [summarize(m) for m in base["migrations"]]
    logs: list[str] = []

    def keep_logs(lab: Any) -> None:
        from migration.lab.lab import container_name

        logs.append(lab.podman.logs(container_name(lab.broker_host), tail=2000))

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=False)
    result = run_scenario(scenario, image, progress=console.log, on_lab=keep_logs,
                          workdir=args.workdir)  # fmt: skip
    out["broker_log"] = logs
    out["recovery"] = [recovery(result["clients"], m) for m in result["migrations"]]
    out["migrations"] = [summarize(m) for m in result["migrations"]]
    out["detail"] = lost_detail(result)
    out["not_connected_at_end"] = sum(1 for c in result["clients"]
                                      if c.get("connected_at_end") is False)  # fmt: skip
    moves = result["migrations"]
    if moves:
        out["quic_not_following_at_end"] = stranded(result["clients"], moves[-1]["ip_after"])
    text = json.dumps({k: v for k, v in out.items() if k not in ("detail", "broker_log")},
                      indent=1)  # fmt: skip
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    ok = (
        out["not_connected_at_end"] == 0
        and not out.get("quic_not_following_at_end")
        and all(m["lost"] == 0 and m["second_handshakes"] == 0 for m in out["migrations"])
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
