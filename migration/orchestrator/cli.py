"""``qmig orchestrate --inventory FILE``: run the orchestrator until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from broker.control import ControlError, generate_token_file, read_token_file, token_weakness

from .inventory import DEFAULT_API, Inventory, InventoryError, load
from .queue import StateError

TOKEN_ENV = "QMIG_ORCHESTRATOR_TOKEN"  # the operator token, instead of a file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--inventory", required=True, metavar="FILE", help="YAML inventory of edge hosts")
    add(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help=f"operator API (default: the inventory's orchestrator.api, else {DEFAULT_API})",
    )
    add(
        "--triggers",
        default=None,
        metavar="HOST:PORT",
        help="listener for brokers' triggers (default: the inventory's orchestrator.triggers, "
        "else none)",
    )
    add(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="queue, audit log, generated tokens (default: the inventory's "
        "orchestrator.state_dir, else ~/.qmig/orchestrator)",
    )
    add(
        "--token-file",
        default=None,
        metavar="FILE",
        help=f"operator token (or ${TOKEN_ENV}); generated (0600) into the state dir if absent",
    )
    add(
        "--trigger-token-file",
        default=None,
        metavar="FILE",
        help="token brokers send triggers with; generated into the state dir if absent",
    )
    add("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InventoryError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _token(path: str | None, fallback: Path, what: str, env: str | None = None) -> tuple[str, str]:
    """The token and where it came from; a missing file at ``fallback`` is generated."""
    try:
        if path:
            token, source = read_token_file(path, what), path
        elif env and os.environ.get(env, "").strip():
            token, source = os.environ[env].strip(), f"${env}"
        else:
            token, source = generate_token_file(fallback), str(fallback)
    except ControlError as exc:
        raise InventoryError(str(exc)) from exc
    weakness = token_weakness(token)
    if weakness:
        raise InventoryError(f"{what} from {source} {weakness}")
    return token, source


def run(args: argparse.Namespace) -> int:
    from .api import Api
    from .executor import executor_for
    from .service import Service

    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="qmig orchestrate: %(levelname)s %(message)s")  # fmt: skip
    try:
        inventory: Inventory = load(args.inventory)
        orch = inventory.orchestrator
        state_dir = Path(args.state_dir or orch.get("state_dir")
                         or Path.home() / ".qmig" / "orchestrator")  # fmt: skip
        listen = _address(args.listen or orch.get("api", DEFAULT_API), "--listen")
        triggers_text = args.triggers or orch.get("triggers")
        triggers = _address(triggers_text, "--triggers") if triggers_text else None
        service = Service(inventory, state_dir, executor_for(inventory))
        service.start()
    except (InventoryError, StateError) as exc:
        print(f"qmig orchestrate: error: {exc}", file=sys.stderr)
        return 2
    api = None
    try:
        token, token_source = _token(args.token_file or orch.get("token_file"),
                                     state_dir / "api.token", "orchestrator token",
                                     TOKEN_ENV)  # fmt: skip
        trigger, trigger_source = _token(args.trigger_token_file
                                         or orch.get("trigger_token_file"),
                                         state_dir / "trigger.token", "trigger token")  # fmt: skip
        api = Api(service, token, trigger)
        host, port = api.listen(*listen, triggers_only=False)
        where = f"api http://{host}:{port} (token {token_source})"
        if triggers is not None:
            thost, tport = api.listen(*triggers, triggers_only=True)
            where += f", triggers http://{thost}:{tport} (token {trigger_source})"
    except (InventoryError, OSError) as exc:
        if api is not None:
            api.close()
        service.stop()
        print(f"qmig orchestrate: error: {exc}", file=sys.stderr)
        return 2
    print(f"qmig orchestrate: ready; {where}; state {state_dir}", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    api.close()
    service.stop()
    return 0
