"""Give the broker state worth migrating: N persistent sessions and N retained messages.

``python -m migration.state_load --host H --port P --sessions 1000`` (in the lab: inside the
clients' namespace, ``ip netns exec qmig-cl ...``) connects N MQTT 5 clients over TCP with
qmig's :class:`~client.client.Client`, ``load-00000`` ..., each with session expiry 3600 s and
a QoS 1 subscription to its own topic ``load/<i>/cmd``, then disconnects them: the broker
keeps N offline sessions.  Alongside, a few publisher connections pipeline N retained QoS 1
messages ``load/<i>/state`` (``--payload`` bytes each).  Sessions are made ``--concurrency``
at a time; 1,000 sessions take about a second on loopback.

``--check`` instead verifies that the state is (still) there, e.g. after a migration: one
subscriber to ``load/+/state`` must receive all N retained messages, and a sample of the
sessions must come back with session present (and stay, with the same expiry).  Both modes
print one JSON line; the exit status is 0 when the load or the check succeeded, 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from client.client import Client, ClientError

SESSION_EXPIRY = 3600
PREFIX = "load"
PAYLOAD = 256  # bytes per retained message
CONCURRENCY = 64
PUBLISHERS = 4  # connections that publish the retained messages
CHECK_SAMPLE = 20  # sessions reconnected by --check
TIMEOUT = 10.0


@dataclass
class LoadResult:
    sessions: int
    retained: int
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class CheckResult:
    expected: int
    retained: int
    sessions_checked: int
    sessions_present: int
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.errors and self.retained >= self.expected
                and self.sessions_present == self.sessions_checked)  # fmt: skip


def client_id(i: int, prefix: str = PREFIX) -> str:
    return f"{prefix}-{i:05d}"


def _client(host: str, port: int, cid: str, *, clean: bool, transport: str,
            cafile: str | None) -> Client:  # fmt: skip
    return Client(host, port, transport=transport, client_id=cid, clean_start=clean,
                  session_expiry=SESSION_EXPIRY, keep_alive=60, cafile=cafile,
                  reconnect=False, connect_timeout=TIMEOUT)  # fmt: skip


async def load_state(host: str, port: int, sessions: int, *, retained: int | None = None,
                     payload: int = PAYLOAD, prefix: str = PREFIX,
                     concurrency: int = CONCURRENCY, transport: str = "tcp",
                     cafile: str | None = None) -> LoadResult:  # fmt: skip
    """Create ``sessions`` offline sessions and ``retained`` (default: as many) retained
    messages on the broker at host:port."""
    retained = sessions if retained is None else retained
    start = time.monotonic()
    errors: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def session(i: int) -> None:
        async with gate:
            client = _client(host, port, client_id(i, prefix), clean=True,
                             transport=transport, cafile=cafile)  # fmt: skip
            try:
                await client.connect()
                await client.subscribe(f"{prefix}/{i}/cmd", qos=1, timeout=TIMEOUT)
            except (ClientError, OSError, TimeoutError) as exc:
                errors.append(f"session {i}: {exc or type(exc).__name__}")
            finally:
                await client.disconnect()

    async def publisher(k: int) -> None:
        body = bytes(j % 251 for j in range(payload))
        client = _client(host, port, f"{prefix}-publisher-{k}", clean=True,
                         transport=transport, cafile=cafile)  # fmt: skip
        client.session_expiry = 0  # nothing to keep once its messages are retained
        try:
            await client.connect()
            await asyncio.gather(*(
                client.publish(f"{prefix}/{i}/state", body, qos=1, retain=True, timeout=TIMEOUT)
                for i in range(k, retained, PUBLISHERS)
            ))  # fmt: skip
        except (ClientError, OSError, TimeoutError) as exc:
            errors.append(f"publisher {k}: {exc or type(exc).__name__}")
        finally:
            await client.disconnect()

    await asyncio.gather(*(session(i) for i in range(sessions)),
                         *(publisher(k) for k in range(min(PUBLISHERS, retained))))  # fmt: skip
    del errors[20:]
    return LoadResult(sessions, retained, round(time.monotonic() - start, 3), errors)


async def check_state(host: str, port: int, expected: int, *, sessions: int | None = None,
                      prefix: str = PREFIX, sample: int = CHECK_SAMPLE, quiet: float = 1.0,
                      transport: str = "tcp",
                      cafile: str | None = None) -> CheckResult:  # fmt: skip
    """Count the retained ``prefix/+/state`` messages and resume a sample of the sessions."""
    start = time.monotonic()
    errors: list[str] = []
    seen: set[str] = set()
    reader = _client(host, port, f"{prefix}-check", clean=True, transport=transport,
                     cafile=cafile)  # fmt: skip
    reader.session_expiry = 0
    try:
        await reader.connect()
        await reader.subscribe(f"{prefix}/+/state", qos=1, timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while len(seen) < expected and time.monotonic() < deadline:
            try:
                message = await reader.next_message(timeout=quiet)
            except TimeoutError:
                break  # nothing more for a while: whatever was retained has arrived
            if message.retain:
                seen.add(message.topic)
    except (ClientError, OSError) as exc:
        errors.append(f"retained: {exc or type(exc).__name__}")
    finally:
        await reader.disconnect()

    total = expected if sessions is None else sessions
    picks = sorted({round(j * (total - 1) / max(1, sample - 1)) for j in range(sample)}
                   if total else set())  # fmt: skip
    present = 0
    for i in picks:
        client = _client(host, port, client_id(i, prefix), clean=False, transport=transport,
                         cafile=cafile)  # fmt: skip
        try:
            await client.connect()
            present += bool(client.session_present)
        except (ClientError, OSError) as exc:
            errors.append(f"session {i}: {exc or type(exc).__name__}")
        finally:
            await client.disconnect()
    return CheckResult(expected, len(seen), len(picks), present,
                       round(time.monotonic() - start, 3), errors)  # fmt: skip


def _as_json(result: LoadResult | CheckResult) -> str:
    data: dict[str, Any] = asdict(result)
    data["ok"] = result.ok
    return json.dumps(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migration.state_load",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--sessions", type=int, default=1000, help="persistent sessions (1000)")
    parser.add_argument(
        "--retained",
        type=int,
        default=None,
        help="retained messages (default: as many as sessions)",
    )
    parser.add_argument("--payload", type=int, default=PAYLOAD, help="bytes per retained one")
    parser.add_argument("--prefix", default=PREFIX, help="client id and topic prefix (load)")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--check",
        action="store_true",
        help="verify the sessions and retained messages are there instead",
    )
    args = parser.parse_args(argv)
    if args.sessions < 0 or args.concurrency < 1 or args.payload < 0:
        parser.error("--sessions and --payload must be >= 0, --concurrency >= 1")
    retained = args.sessions if args.retained is None else args.retained
    result: LoadResult | CheckResult
    if args.check:
        result = asyncio.run(check_state(args.host, args.port, retained, sessions=args.sessions,
                                         prefix=args.prefix))  # fmt: skip
    else:
        result = asyncio.run(load_state(args.host, args.port, args.sessions, retained=retained,
                                        payload=args.payload, prefix=args.prefix,
                                        concurrency=args.concurrency))  # fmt: skip
    print(_as_json(result), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
