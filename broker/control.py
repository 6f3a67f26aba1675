"""The broker's control API server: how the edge host's orchestrator drives a live migration.

A TCP listener speaking newline-delimited JSON, one request per line, several per
connection::

    {"token": "...", "cmd": "prepare", "dest": "198.18.2.2:14567"}
    {"token": "...", "cmd": "pre-checkpoint", "reference": "198.18.2.2:1883"}
    {"token": "...", "cmd": "pre-checkpoint", "reference": "...", "provisional": 60}
    {"token": "...", "cmd": "restored", "address": "198.18.2.2:14567"}
    {"token": "...", "cmd": "commit"}
    {"token": "...", "cmd": "rollback"}
    {"token": "...", "cmd": "status"}

and each gets ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.

Why TCP and not a unix socket: CRIU dumps and restores a listening TCP socket bound to a
wildcard or to the container's address, so the API survives the move with the rest of the
broker, while a unix socket would need its path to exist on the destination.  Who may talk
to it is limited twice: by where it listens (loopback by default, reached with
``docker exec ... qmig ctl``; or the container address published on the host's loopback
only) and by a shared token of at least ``MIN_TOKEN_LENGTH`` characters, compared in
constant time.  Without one the broker generates a token into its token file (mode 0600;
by default :func:`default_token_file`, where ``qmig ctl`` looks too).  A wrong token ends the
connection, and its answer is held back longer with every failure of that address and of
everybody (:class:`~broker.throttle.FailureBackoff`), one at a time, so guessing is slow;
refusals are logged once a minute.

CRIU refuses to dump established TCP connections unless told to, so ``qmig ctl`` uses one
connection per request and idle connections are closed after ``IDLE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quicmig.frames import Address

from .provisional import MAX_PROVISIONAL_SECONDS
from .throttle import FailureBackoff, LogWindow

if TYPE_CHECKING:
    from .migration_api import MigrationAPI

log = logging.getLogger("qmig.control")

MAX_REQUEST = 64 * 1024  # one request line, newline included
MAX_REPLY = 4 * 1024 * 1024  # status carries the trigger log: allow more than a request
IDLE_TIMEOUT = 60.0
TOKEN_ENV = "QMIG_CONTROL_TOKEN"
DEFAULT_HOST = "127.0.0.1"
# A token must be hard to guess: 32 characters of hex are 128 bits, token_urlsafe(32) 256.
MIN_TOKEN_LENGTH = 32
MIN_TOKEN_DISTINCT = 8  # different characters; refuses "aaaa..." and "abab..."
REFUSAL_LOG_WINDOW = 60.0  # seconds: refused requests make one log line per window

# cmd -> (required fields, optional fields), besides "token" and "cmd".
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("dest",), ()),
    "pre-checkpoint": ((), ("reference", "provisional")),
    "restored": (("address",), ()),
    "commit": ((), ()),
    "rollback": ((), ("address",)),
    "status": ((), ()),
}


class ControlError(Exception):
    """A control request that failed; the text is the server's error or why it was unreachable."""


class BadRequest(Exception):
    """The request is malformed; answered with an error, the connection stays open."""


def read_token_file(path: str | Path, what: str = "control token") -> str:
    """The token in ``path``, surrounding whitespace (a trailing newline) removed."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ControlError(f"cannot read {what} file {path}: {reason}") from exc
    if not token:
        raise ControlError(f"{what} file {path} is empty")
    return token


def token_weakness(token: str) -> str | None:
    """Why ``token`` is too easy to guess, or None if it is long and varied enough."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"is {len(token)} characters long, at least {MIN_TOKEN_LENGTH} are needed"
    if len(set(token)) < MIN_TOKEN_DISTINCT:
        return f"uses fewer than {MIN_TOKEN_DISTINCT} different characters"
    return None


def default_token_file(port: int) -> Path:
    """Where the broker keeps the token it generates for control port ``port``, and where
    ``qmig ctl --port PORT`` looks without a token: ``$XDG_RUNTIME_DIR/qmig/`` (per user,
    memory only), else ``~/.qmig/``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    base = Path(runtime) / "qmig" if runtime else Path(os.path.expanduser("~")) / ".qmig"
    return base / f"control-{port}.token"


def generate_token_file(path: str | Path) -> str:
    """A new random token written to ``path`` (created with mode 0600, its directory 0700
    if missing); if ``path`` appeared meanwhile, the token in it."""
    p = Path(path)
    token = secrets.token_urlsafe(32)
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token_file(p)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ControlError(f"cannot create control token file {p}: {reason}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}


def _address(field: str, value: Any) -> Address:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string like 198.18.2.2:14567")
    try:
        return Address.parse(value)
    except ValueError as exc:
        raise BadRequest(f"bad {field} {value!r}: {exc}") from exc


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line as a JSON object; :class:`BadRequest` says what is wrong with it."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"not JSON ({exc})") from None
    if not isinstance(request, dict):
        raise BadRequest("expected a JSON object")
    return request


def check_arguments(cmd: str, request: dict[str, Any]) -> dict[str, Any]:
    """The checked arguments of a known ``cmd`` (addresses parsed), or :class:`BadRequest`."""
    required, optional = COMMANDS[cmd]
    args = {k: v for k, v in request.items() if k not in ("token", "cmd")}
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise BadRequest(f"unexpected field(s) {', '.join(unknown)}")
    missing = [name for name in required if name not in args]
    if missing:
        raise BadRequest(f"missing field(s) {', '.join(missing)}")
    if cmd == "prepare":
        return {"dest": _address("dest", args["dest"])}
    if cmd == "pre-checkpoint":
        reference = args.get("reference")
        if reference is not None and (not isinstance(reference, str) or not reference.strip()):
            raise BadRequest("reference must be a non-empty string such as host:port")
        provisional = args.get("provisional")
        if provisional is not None and (
            isinstance(provisional, bool)
            or not isinstance(provisional, int | float)
            or not 0 < provisional <= MAX_PROVISIONAL_SECONDS
        ):
            raise BadRequest(f"provisional must be a number of seconds in (0, "
                             f"{MAX_PROVISIONAL_SECONDS:g}]")  # fmt: skip
        return {"reference": reference, "provisional": provisional}
    if cmd in ("restored", "rollback") and "address" in args:
        return {"address": _address("address", args["address"])}
    return {}


class ControlServer:
    """Serves :class:`MigrationAPI` to whoever holds the token; requests run one at a time."""

    def __init__(self, api: MigrationAPI, host: str, port: int, token: str) -> None:
        if not token:
            raise ValueError("the control API needs a token: without one anyone could move it")
        weakness = token_weakness(token)
        if weakness:
            raise ValueError(f"the control API token {weakness}")
        self.api = api
        self.host = host
        self.port = port
        self._token = token.encode("utf-8")
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()  # the migration steps must not interleave
        self._handlers: set[asyncio.Task[None]] = set()
        # Wrong tokens: answers held back, one at a time, longer with every failure.
        self._backoff = FailureBackoff()
        self._refusing = asyncio.Lock()
        self._refusals = LogWindow(REFUSAL_LOG_WINDOW)

    @property
    def address(self) -> tuple[str, int] | None:
        if self._server is None or not self._server.sockets:
            return None
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound address (``port`` 0 picks a free one)."""
        self._server = await asyncio.start_server(
            self._serve_client, self.host, self.port, limit=MAX_REQUEST, reuse_address=True
        )
        address = self.address
        assert address is not None
        return address

    async def stop(self) -> None:
        """Stop listening and drop open control connections."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    # ------------------------------------------------------------------ connections
    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        peer_host = str(peer[0]) if peer else "?"
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except ValueError:  # the line outgrew the reader's limit
                    await self._reply(writer, _error(f"request longer than {MAX_REQUEST} bytes"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply, keep_open = await self._answer(line, peer_text, peer_host)
                await self._reply(writer, reply)
                if not keep_open:
                    break
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, default=str).encode("utf-8") + b"\n")
        await writer.drain()

    async def _answer(self, line: bytes, peer: str, host: str) -> tuple[dict[str, Any], bool]:
        """The reply to one request line, and whether the connection stays open."""
        try:
            request = parse_request(line)
        except BadRequest as exc:
            return _error(f"bad request: {exc}"), True
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8"), self._token
        ):
            await self._refuse(peer, host)
            return _error("unauthorized"), False
        self._backoff.succeeded(host)
        cmd = request.get("cmd")
        if cmd not in COMMANDS:
            known = ", ".join(COMMANDS)
            return _error(f"unknown command {cmd!r}; known: {known}"), True
        try:
            call = self._command(cmd, check_arguments(cmd, request))
        except BadRequest as exc:
            return _error(f"{cmd}: {exc}"), True
        log.info("control API: %s from %s", cmd, peer)
        async with self._lock:
            try:
                result = await call()
            except Exception as exc:
                log.exception("control API: %s failed", cmd)
                return _error(f"{cmd} failed: {type(exc).__name__}: {exc}"), True
        # After pre-checkpoint nothing TCP may stay open: CRIU would refuse the dump.
        return {"ok": True, "result": result}, cmd != "pre-checkpoint"

    async def _refuse(self, peer: str, host: str) -> None:
        """A wrong or missing token: hold the answer back, longer with each failure of this
        address (and of everybody), and one refusal after the other, so that guesses from
        many connections wait in line too."""
        loop = asyncio.get_running_loop()
        delay = self._backoff.failed(host, loop.time())
        held = self._refusals.hit(loop.time())
        if held is not None:
            log.warning(
                "control API: refused %s: wrong or missing token (%d more refused since the "
                "last such line; answers wait up to %g s)",
                peer, held, self._backoff.cap,
            )  # fmt: skip
        async with self._refusing:
            await asyncio.sleep(delay)

    def _command(self, cmd: str, args: dict[str, Any]) -> Callable[[], Any]:
        """The coroutine function that runs ``cmd`` with arguments from check_arguments."""
        api = self.api
        if cmd == "prepare":
            return lambda: _now(api.prepare, args["dest"])
        if cmd == "pre-checkpoint":
            return lambda: api.pre_checkpoint(args.get("reference"),
                                              provisional=args.get("provisional"))  # fmt: skip
        if cmd == "commit":
            return lambda: _now(api.commit)
        if cmd == "restored":
            return lambda: api.restored(args["address"])
        if cmd == "rollback":
            return lambda: api.rollback(args.get("address"))
        return lambda: _now(api.status)


async def _now(func: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    return func(*args)
