"""``qmig lab up|down|status`` and ``qmig migrate --to HOST``: the lab from the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from migration.scenario import METHODS, PODMAN_MODES, Scenario, ScenarioError

from .net import LabError


def _scenario(args: argparse.Namespace) -> Scenario:
    scenario = Scenario.load(args.scenario)
    if getattr(args, "link_rate", None):
        scenario = scenario.replace(link_rate=args.link_rate)
    if getattr(args, "loss", None) is not None:
        scenario = scenario.replace(loss=args.loss)
    if getattr(args, "podman", None):
        scenario = scenario.replace(podman=args.podman)
    return scenario


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="lab_action", metavar="ACTION", required=True)
    p = actions.add_parser("up", help="create edge hosts, client netns and link; start the broker")
    p.add_argument("--scenario", default="demo", help="scenario name or YAML file (default demo)")
    p.add_argument("--link-rate", default=None, help="checkpoint link rate, e.g. 10mbit")
    p.add_argument("--loss", type=float, default=None, help="client access-link loss in %%")
    p.add_argument("--image", default=None, help="broker image (default: build/reuse qmig's)")
    p.add_argument("--podman", choices=PODMAN_MODES, default=None,
                   help="per-host: each edge host its own Podman in its own netns (default); "
                        "shared: every edge host a pod of this machine's Podman")  # fmt: skip
    p = actions.add_parser("down", help="remove everything the lab made")
    p.add_argument("--scenario", default="demo", help=argparse.SUPPRESS)
    p = actions.add_parser("status", help="where the broker runs, what exists (JSON)")
    p.add_argument("--scenario", default="demo", help=argparse.SUPPRESS)


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, metavar="HOST", help="destination edge host")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    parser.add_argument("--scenario", default="demo", help=argparse.SUPPRESS)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="cold (default), precopy (live rounds, dirty pages found by content), postcopy "
        "(lazy pages), hybrid (here: post-copy)",
    )
    parser.add_argument(
        "--fail-at",
        choices=("transfer", "restore", "lazy-pages"),
        default=None,
        help="make that step fail for real, to see the rollback",
    )


def run_lab(args: argparse.Namespace) -> int:
    from .lab import lab_lock

    if args.lab_action in ("up", "down"):
        with lab_lock(say=lambda m: print(f"qmig lab: {m}", file=sys.stderr)):
            return _run_lab(args)
    return _run_lab(args)


def _run_lab(args: argparse.Namespace) -> int:
    from .lab import Lab, containers_unavailable

    try:
        lab = Lab(_scenario(args))
        if args.lab_action == "down":
            removed = lab.down()
            print(f"qmig lab: down ({len(removed)} objects removed)")
            return 0
        if args.lab_action == "status":
            print(json.dumps(lab.status(), indent=2, default=str))
            return 0
        reason = containers_unavailable()
        if reason:
            print(f"qmig lab: containers unavailable: {reason}", file=sys.stderr)
            return 1
        image = args.image or _image()
        state = lab.up(image)
        host = lab.scenario.host(state.broker_host)
        print(
            f"qmig lab: up; broker on {host.name} at {host.address} (image {image}); "
            f"clients run in netns qmig-cl; CA {lab.cafile}; inventory "
            f"{lab.state_dir / 'inventory.yaml'} (qmig orchestrate --inventory)"
        )
        return 0
    except (LabError, ScenarioError) as exc:
        print(f"qmig lab: error: {exc}", file=sys.stderr)
        return 1


def _image() -> str:
    from pathlib import Path

    from migration.image import ensure_image

    return ensure_image(Path(__file__).resolve().parents[2])


def run_migrate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .lab import Lab
    from .live import Migration, MigrationFailed, precopy_support
    from .postcopy import hybrid_note

    console = Console(stderr=True)
    try:
        lab = Lab(_scenario(args))
        if lab.state is None:
            raise LabError("the lab is not up (run `qmig lab up`)")
        method = args.method or lab.scenario.method
        note = precopy_support()
        if method == "hybrid" and note:
            console.print(f"[dim]{hybrid_note()}[/dim]")
        elif note and method in ("cold", "precopy"):
            console.print(f"[dim]{note}[/dim]")
        with console.status("migrating…") as status:

            def progress(step: str) -> None:
                console.log(step)
                status.update(step)

            migration = Migration(lab, args.to, fail_at=args.fail_at, method=method,
                                  progress=progress)  # fmt: skip
            try:
                outcome: dict[str, Any] = migration.run()
            except MigrationFailed as exc:
                if args.json:
                    print(json.dumps(exc.outcome, default=str))
                console.print(f"[red]qmig migrate: {exc}[/red]")
                return 1
        import time

        time.sleep(1.0)  # let clients speak to the new address before asking when they did
        migration.first_client_packet()
        if args.json:
            print(json.dumps(outcome, default=str))
        else:
            _print_timeline(console, outcome)
        return 0
    except (LabError, ScenarioError) as exc:
        print(f"qmig migrate: error: {exc}", file=sys.stderr)
        return 1


def _print_timeline(console: Any, outcome: dict[str, Any]) -> None:
    from rich.table import Table

    timeline = outcome["timeline"]
    t0 = timeline["trigger"]
    table = Table(title=f"{outcome['from']} ({outcome['ip_before']}) -> "
                        f"{outcome['to']} ({outcome['ip_after']})")  # fmt: skip
    table.add_column("event")
    table.add_column("t (ms)", justify="right")
    for event, at in sorted(timeline.items(), key=lambda kv: kv[1]):
        table.add_row(event, f"{(at - t0) * 1000:.0f}")
    console.print(table)
    if outcome.get("clients"):
        clients = Table(title="clients back at the new address (broker's view)")
        for column in ("client", "transport", "ms after thaw"):
            clients.add_column(column)
        for c in outcome["clients"]:
            clients.add_row(c["client_id"], c["transport"], f"{c['after_thaw_ms']:.1f}")
        console.print(clients)
    console.print(
        f"{outcome.get('method', 'cold')}: downtime (freeze to resume): "
        f"{outcome.get('downtime_ms')} ms; all pages after {outcome.get('total_ms')} ms; "
        f"checkpoint {outcome.get('checkpoint_bytes', 0) / 1e6:.1f} MB; "
        f"{outcome.get('link_bytes', 0) / 1e6:.2f} MB on the link"
    )
