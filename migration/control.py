"""The control API's client side: :func:`control_request` and ``qmig ctl``.

The server, the wire format (newline-delimited JSON with a token) and the token rules live
with the broker in :mod:`broker.control`; this is what the edge host's orchestrator (the
lab, the benchmarks, an operator's shell) uses to drive it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from broker.control import (
    DEFAULT_HOST,
    MAX_REPLY,
    TOKEN_ENV,
    ControlError,
    default_token_file,
    read_token_file,
)

__all__ = ["ControlError", "add_ctl_arguments", "control_request", "run_ctl"]


# ---------------------------------------------------------------------- client
async def control_request(
    host: str, port: int, token: str | None, cmd: str, *, timeout: float = 5.0, **args: Any
) -> dict[str, Any]:
    """Send one request and return its result; raises :class:`ControlError` on any failure."""
    request: dict[str, Any] = {"cmd": cmd, **args}
    if token is not None:
        request["token"] = token
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_REPLY)
            try:
                writer.write(json.dumps(request).encode("utf-8") + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlError(f"no answer from the control API at {where} in {timeout:g} s") from None
    except ValueError as exc:
        raise ControlError(f"reply from the control API at {where} is too long") from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        raise ControlError(f"cannot reach the control API at {where}: {reason}") from exc
    if not line:
        raise ControlError(f"the control API at {where} closed the connection without answering")
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"the control API at {where} answered with invalid JSON") from exc
    if not isinstance(reply, dict):
        raise ControlError(f"the control API at {where} answered with {type(reply).__name__}")
    if reply.get("ok") is True:
        result = reply.get("result")
        return result if isinstance(result, dict) else {"result": result}
    raise ControlError(str(reply.get("error") or "request failed without a reason"))


# ---------------------------------------------------------------------- qmig ctl
def add_ctl_arguments(parser: argparse.ArgumentParser) -> None:
    """``qmig ctl [--host H] [--port P] [--token-file F] COMMAND ...``."""
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"control API address (default {DEFAULT_HOST})"
    )
    parser.add_argument("--port", type=int, required=True, help="control API port")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help=f"file holding the token (default: ${TOKEN_ENV}, else the one "
        "the broker generated: $XDG_RUNTIME_DIR/qmig/control-PORT.token "
        "or ~/.qmig/control-PORT.token)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the answer (default 10)"
    )
    cmds = parser.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("prepare", help="send SERVER_MIGRATION (DEST) to every QUIC client")
    p.add_argument("dest", metavar="DEST", help="the broker's QUIC address after the move")
    p = cmds.add_parser(
        "pre-checkpoint", help="send TCP/TLS/MPTCP clients to REFERENCE, close the MPTCP listener"
    )
    p.add_argument(
        "reference",
        metavar="REFERENCE",
        nargs="?",
        default=None,
        help="server reference for MQTT 5 clients, e.g. 198.18.2.2:1883",
    )
    p.add_argument(
        "--provisional",
        metavar="SECONDS",
        type=float,
        default=None,
        help="post-copy: acknowledge nothing a rollback would forget until commit or "
        "rollback, or for SECONDS at most",
    )
    p = cmds.add_parser("restored", help="reopen listeners, announce ADDRESS to QUIC clients")
    p.add_argument("address", metavar="ADDRESS", help="the broker's QUIC address now")
    cmds.add_parser(
        "commit", help="post-copy: every page arrived; send what was held since pre-checkpoint"
    )
    p = cmds.add_parser("rollback", help="the move failed: undo prepare/pre-checkpoint")
    p.add_argument(
        "address",
        metavar="ADDRESS",
        nargs="?",
        default=None,
        help="where the broker serves now: QUIC clients are told to stay there",
    )
    cmds.add_parser("status", help="migration state, listeners and connections")


def run_ctl(args: argparse.Namespace) -> int:
    """Entry point of ``qmig ctl``: the result as JSON on stdout, or one error line and 1."""
    try:
        generated = default_token_file(args.port)
        if args.token_file:
            token = read_token_file(args.token_file)
        elif os.environ.get(TOKEN_ENV, "").strip():
            token = os.environ[TOKEN_ENV].strip()
        elif generated.exists():
            token = read_token_file(generated)
        else:
            raise ControlError(
                f"no token: give --token-file, set ${TOKEN_ENV}, or run qmig ctl as the user "
                f"whose broker generated {generated}"
            )
        fields = {
            "prepare": {"dest": getattr(args, "dest", None)},
            "pre-checkpoint": {
                "reference": getattr(args, "reference", None),
                "provisional": getattr(args, "provisional", None),
            },
            "restored": {"address": getattr(args, "address", None)},
            "rollback": {"address": getattr(args, "address", None)},
        }.get(args.ctl_command, {})
        fields = {k: v for k, v in fields.items() if v is not None or k == "reference"}
        result = asyncio.run(
            control_request(
                args.host, args.port, token, args.ctl_command, timeout=args.timeout, **fields
            )
        )
    except ControlError as exc:
        print(f"qmig ctl: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0
