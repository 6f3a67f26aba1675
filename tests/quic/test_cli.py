"""``qmig pub`` and ``qmig sub`` as subprocesses, over QUIC and TCP, with mosquitto's flags."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from broker.certs import make_lab_certs

from .conftest import HOST, QBroker, free_tcp_port, free_udp_port, subprocess_env
from .helpers import collect, make_client, qmig_cmd, uid

RUN_TIMEOUT = 10.0
MOSQ_ERR_TIMEOUT = 27  # mosquitto_sub's exit status when -W expires


def conn_args(broker: QBroker, transport: str) -> list[str]:
    return [
        "-h", HOST, "-p", str(broker.port(transport)), "--transport", transport,
        "--cafile", broker.ca,
    ]  # fmt: skip


class Sub:
    """A running ``qmig sub`` whose stdout lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = RUN_TIMEOUT) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            err = await self._stderr()
            raise AssertionError(f"qmig sub ended (rc {self.proc.returncode}): {err}")
        return raw.decode().rstrip("\n")

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            return (await asyncio.wait_for(self.proc.stderr.read(), 2)).decode()
        return ""

    async def finish(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
        """Wait for exit; (status, rest of stdout, stderr)."""
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()


async def spawn(args: Sequence[str], stdin: bytes | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *qmig_cmd(*args),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def run(args: Sequence[str], stdin: bytes | None = None,
              timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:  # fmt: skip
    proc = await spawn(args, stdin)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    finally:
        await stop(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def subscriber(args: Sequence[str]) -> AsyncIterator[Sub]:
    proc = await spawn(["sub", *args])
    try:
        yield Sub(proc)
    finally:
        await stop(proc)


async def set_ready_marker(broker: QBroker, root: str) -> None:
    async with make_client(broker, "tcp") as c:
        await c.publish(f"{root}/ready", b"r", qos=1, retain=True, timeout=5)


async def clear_retained(broker: QBroker, topic: str) -> None:
    async with make_client(broker, "tcp") as c:
        await c.publish(topic, b"", qos=1, retain=True, timeout=5)


@pytest.mark.parametrize(
    ("transport", "version"),
    [("quic", "mqttv5"), ("quic", "mqttv311"), ("tcp", "mqttv5"), ("tcp", "mqttv311")],
)
async def test_pub_to_sub(qbroker: QBroker, transport: str, version: str) -> None:
    """``qmig sub -C 3 -v -q 1`` prints what ``qmig pub -q 1`` sends, then exits 0."""
    root = uid("cli/")
    await set_ready_marker(qbroker, root)
    sub_args = [*conn_args(qbroker, transport), "-V", version, "-t", f"{root}/#", "-q", "1",
                "-C", "3", "-v"]  # fmt: skip
    try:
        async with subscriber(sub_args) as sub:
            assert await sub.line() == f"{root}/ready r"
            for n, qos in ((1, "1"), (2, "2")):
                pub_args = [*conn_args(qbroker, transport), "-V", version,
                            "-t", f"{root}/data", "-m", f"hello {n}", "-q", qos]  # fmt: skip
                rc, out, err = await run(["pub", *pub_args])
                assert (rc, out, err) == (0, "", "")
            assert await sub.line() == f"{root}/data hello 1"
            assert await sub.line() == f"{root}/data hello 2"
            rc, rest, err = await sub.finish()
            assert (rc, rest) == (0, ""), err
    finally:
        await clear_retained(qbroker, f"{root}/ready")


async def test_pub_lines_from_stdin(qbroker: QBroker) -> None:
    """``qmig pub -l`` publishes each stdin line as one message, in order (QUIC, QoS 1)."""
    topic = uid("lines/")
    lines = [f"line {n}" for n in range(5)] + ["", "last"]
    async with make_client(qbroker, "quic") as sub:
        await sub.subscribe(topic, qos=1)
        rc, _, err = await run(
            ["pub", *conn_args(qbroker, "quic"), "-t", topic, "-l", "-q", "1"],
            stdin="".join(f"{line}\n" for line in lines).encode(),
        )
        assert (rc, err) == (0, "")
        got = await collect(sub, len(lines))
    assert [m.payload.decode() for m in got] == lines
    assert all(m.qos == 1 for m in got)


async def test_retain_and_wait_timeout(qbroker: QBroker) -> None:
    """``pub -r`` over QUIC is read by a later ``sub`` over TCP; ``pub -r -n`` clears it,
    after which ``sub -W 1`` gets nothing and exits with mosquitto's timeout status."""
    topic = uid("retained/")
    rc, _, err = await run(["pub", *conn_args(qbroker, "quic"), "-t", topic, "-m", "kept",
                            "-r", "-q", "1"])  # fmt: skip
    assert (rc, err) == (0, "")
    rc, out, err = await run(["sub", *conn_args(qbroker, "tcp"), "-t", topic, "-C", "1", "-v"])
    assert (rc, out, err) == (0, f"{topic} kept\n", "")
    rc, _, err = await run(["pub", *conn_args(qbroker, "quic"), "-t", topic, "-n", "-r",
                            "-V", "mqttv311"])  # fmt: skip
    assert (rc, err) == (0, "")
    started = time.monotonic()
    rc, out, err = await run(["sub", *conn_args(qbroker, "quic"), "-t", topic, "-W", "1"])
    elapsed = time.monotonic() - started
    assert (rc, out) == (MOSQ_ERR_TIMEOUT, ""), err
    assert 1.0 <= elapsed < 8.0


async def test_sub_persistent_session(qbroker: QBroker) -> None:
    """``sub -c -i ID -x 60`` over QUIC resumes its session and gets what it missed."""
    client_id = uid("cli-persist-")
    topic = uid("persist/")
    session = ["-c", "-i", client_id, "-x", "60", "-q", "1", "-t", topic]
    rc, out, _ = await run(["sub", *conn_args(qbroker, "quic"), *session, "-W", "0.5"])
    assert (rc, out) == (MOSQ_ERR_TIMEOUT, "")
    async with make_client(qbroker, "tcp") as pub:
        for n in range(3):
            await pub.publish(topic, f"missed {n}".encode(), qos=1, timeout=5)
    rc, out, err = await run(["sub", *conn_args(qbroker, "quic"), *session, "-C", "3"])
    assert (rc, out) == (0, "missed 0\nmissed 1\nmissed 2\n"), err
    async with make_client(qbroker, "quic", client_id=client_id):  # end the session
        pass


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_unreachable_broker(transport: str) -> None:
    """Nothing listening: a non-zero exit and one clear line on stderr, promptly."""
    port = free_udp_port() if transport == "quic" else free_tcp_port()
    started = time.monotonic()
    rc, out, err = await run(["pub", "-h", HOST, "-p", str(port), "--transport", transport,
                              "--insecure", "-t", "x", "-m", "y"])  # fmt: skip
    assert rc != 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmig pub: cannot reach"), err
    assert f"{HOST}:{port} over {transport}" in lines[0]
    if transport == "quic":  # the ICMP port unreachable ends the handshake at once
        assert "refused" in lines[0].lower()
    assert time.monotonic() - started < 8.0


async def test_wrong_ca_refused(qbroker: QBroker, tmp_path: Path) -> None:
    """QUIC verifies the broker's certificate: another CA makes ``qmig sub`` fail cleanly."""
    other = make_lab_certs(tmp_path / "other")
    args = ["-h", HOST, "-p", str(qbroker.port("quic")), "--cafile", str(other.ca_cert)]
    rc, out, err = await run(["sub", *args, "-t", "x", "-C", "1"])
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmig sub: "), err


async def test_missing_message_is_usage_error() -> None:
    rc, _, err = await run(["pub", "-h", HOST, "-t", "x"])
    assert rc == 2
    assert "one of the arguments -m/--message -l/--stdin-line -n/--null-message" in err
