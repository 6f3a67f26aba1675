"""The ``qmig`` command: broker, lab certificates, password files, benchmarks and the demo.

Heavy modules (the broker, benchmarks, demo) are imported only by the subcommand that runs
them, so ``qmig certs`` or ``qmig passwd`` start fast and work even if those are missing.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from broker.config import ConfigError, add_broker_arguments, config_from_args

from . import __version__

Handler = Callable[[argparse.Namespace], int]


def _cmd_broker(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from broker.server import run  # configures logging from config.log_level

    return run(config)


def _cmd_certs(args: argparse.Namespace) -> int:
    from broker.certs import DEFAULT_HOSTS, make_lab_certs

    hosts = args.host or list(DEFAULT_HOSTS)
    paths = make_lab_certs(Path(args.out), hosts=hosts, days=args.days, overwrite=args.overwrite)
    for path in (paths.ca_cert, paths.server_cert, paths.server_key):
        print(path)
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    from broker.auth import add_user

    password = args.password
    if password is None:
        password = getpass.getpass(f"Password for {args.user}: ")
        if password != getpass.getpass("Reenter password: "):
            print("qmig passwd: passwords do not match", file=sys.stderr)
            return 1
    add_user(args.file, args.user, password)
    return 0


def _unavailable(what: str, reason: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        print(f"qmig: {what} is not available: {reason}", file=sys.stderr)
        return 1

    return handler


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from qmig.demo import run as demo_run
    except ImportError as exc:
        return _unavailable("demo", str(exc))(args)
    return demo_run(args)


# bench targets: name -> (help, module); a target's module is imported only when it runs.
BENCH_TARGETS = {
    "broker": ("broker throughput and latency benchmark", "qmig.benchmarks.broker"),
    "streams": ("head-of-line blocking: single vs multi-stream QUIC", "qmig.benchmarks.streams"),
    "strategies": ("client interruption of each migration strategy",
                   "qmig.benchmarks.strategies"),
    "abuse": ("adversarial probes: what each attack costs the broker", "qmig.benchmarks.abuse"),
    "migration": ("QUIC vs TCP/TLS/MPTCP through a live container migration",
                  "qmig.benchmarks.migration"),
    "freeze": ("cold vs pre-copy vs post-copy: downtime, total time, bytes, degradation",
               "qmig.benchmarks.freeze"),
}  # fmt: skip


def _add_bench(sub: argparse._SubParsersAction, wanted: str | None) -> None:
    """``qmig bench TARGET``: only the chosen target's module is imported (all when
    ``wanted`` is ``*``, for help and completion)."""
    bench = sub.add_parser("bench", help="run benchmarks")
    targets = bench.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (help_text, module_name) in BENCH_TARGETS.items():
        p = targets.add_parser(name, help=help_text)
        if wanted not in (name, "*"):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # accept whatever flags were meant for it, to reach the clear message below
            p.set_defaults(handler=_unavailable(f"bench {name}", str(exc)), accepts_extra=True)
            continue
        module.add_arguments(p)
        p.set_defaults(handler=module.run)


def _add_client_commands(sub: argparse._SubParsersAction, wanted: str | None) -> None:
    stubs = {"pub": "publish (mosquitto_pub flags, QUIC default)",
             "sub": "subscribe (mosquitto_sub flags, QUIC default)",
             "bridge": "carry plain MQTT clients from local TCP over QUIC"}  # fmt: skip
    parsers = {name: sub.add_parser(name, add_help=name == "bridge", help=text)
               for name, text in stubs.items()}  # fmt: skip
    if wanted not in (*stubs, "*"):
        return
    from client import bridge
    from client.cli import add_pub_arguments, add_sub_arguments, run_pub, run_sub

    add_pub_arguments(parsers["pub"])
    parsers["pub"].set_defaults(handler=run_pub)
    add_sub_arguments(parsers["sub"])
    parsers["sub"].set_defaults(handler=run_sub)
    bridge.add_arguments(parsers["bridge"])
    parsers["bridge"].set_defaults(handler=bridge.run)


def _add_lab_commands(sub: argparse._SubParsersAction, wanted: str | None) -> None:
    """The edge host's commands; the broker image leaves the lab out, so they may be absent."""
    lab = sub.add_parser("lab", help="the container lab: edge hosts, client namespace, link")
    migrate = sub.add_parser("migrate", help="live-migrate the broker container to another host")
    if wanted not in ("lab", "migrate", "*"):
        return
    try:
        from migration.lab.cli import (
            add_lab_arguments,
            add_migrate_arguments,
            run_lab,
            run_migrate,
        )
    except ImportError as exc:
        for p, what in ((lab, "lab"), (migrate, "migrate")):
            p.set_defaults(handler=_unavailable(what, str(exc)), accepts_extra=True)
        return
    add_lab_arguments(lab)
    lab.set_defaults(handler=run_lab)
    add_migrate_arguments(migrate)
    migrate.set_defaults(handler=run_migrate)


def _add_orchestrate(sub: argparse._SubParsersAction, wanted: str | None) -> None:
    p = sub.add_parser("orchestrate", help="move brokers between edge hosts when asked (service)")
    if wanted not in ("orchestrate", "*"):
        return
    try:
        from migration.orchestrator.cli import add_arguments, run
    except ImportError as exc:
        p.set_defaults(handler=_unavailable("orchestrate", str(exc)), accepts_extra=True)
        return
    add_arguments(p)
    p.set_defaults(handler=run)


def _words(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the command it names has its (heavy) modules imported,
    so ``qmig certs`` starts fast; without ``argv``, the full parser (tests, completion)."""
    words = _words(argv) if argv is not None else ["*", "*"]
    wanted = words[0] if words else None
    target = words[1] if wanted == "bench" and len(words) > 1 else ("*" if argv is None else None)
    parser = argparse.ArgumentParser(
        prog="qmig",
        description="MQTT broker and live-migration lab tools.",
    )
    parser.add_argument("--version", action="version", version=f"qmig {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("broker", help="run the MQTT broker")
    add_broker_arguments(p)
    p.set_defaults(handler=_cmd_broker)

    p = sub.add_parser("certs", help="create a lab CA and server certificate")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PEM files")
    p.add_argument(
        "--host",
        action="append",
        metavar="H",
        help="DNS name or IP for the certificate (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument("--overwrite", action="store_true", help="replace existing valid files")
    p.set_defaults(handler=_cmd_certs)

    p = sub.add_parser("passwd", help="add or update a user in a mosquitto-format password file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("user", metavar="USER")
    p.add_argument("-p", "--password", default=None, help="password (prompted if omitted)")
    p.set_defaults(handler=_cmd_passwd)

    _add_client_commands(sub, wanted)
    _add_bench(sub, target)

    p = sub.add_parser("ctl", help="drive a running broker's migration control API")
    if wanted in ("ctl", "*"):
        from migration.control import add_ctl_arguments, run_ctl

        add_ctl_arguments(p)
        p.set_defaults(handler=run_ctl)

    _add_lab_commands(sub, wanted)
    _add_orchestrate(sub, wanted)

    p = sub.add_parser("demo", help="live-migrate the broker container under traffic (the demo)")
    p.add_argument("--scenario", default="demo", help="scenario name or YAML file (default demo)")
    p.add_argument("--link-rate", default=None, help="checkpoint link rate, e.g. 10mbit")
    p.add_argument("--loss", type=float, default=None, help="client access-link loss in %%")
    p.add_argument("--method", default="best",
                   help="cold, precopy, postcopy or hybrid; best (default): precopy where this "
                   "machine can read the broker's memory, else cold")  # fmt: skip
    p.add_argument("--podman", choices=("shared", "per-host"), default=None,
                   help="per-host: each edge host its own Podman in its own netns; shared: "
                   "every edge host a pod of one Podman (default: the scenario's, "
                   "per-host)")  # fmt: skip
    p.add_argument("--report-dir", default="reports", help="where the JSON and PNG go")
    p.add_argument(
        "--transports",
        action="store_true",
        help="instead: the cross-transport check on loopback (no migration)",
    )
    p.add_argument(
        "--duration", type=float, default=5.0, help="--transports: seconds to publish (default 5)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="--transports: messages per second per transport (default 20)",
    )
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; configuration mistakes print one line and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"qmig: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
