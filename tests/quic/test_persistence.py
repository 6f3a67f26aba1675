"""Issue #18: ``--persistence DIR`` keeps broker state across kill -9 and SIGTERM restarts.

Each test runs a qmig broker subprocess (all transports, a password file so that session
ownership is enforced) on a persistence directory, stops it by PID with SIGKILL or SIGTERM,
starts a new process on the same directory and ports, and checks with TCP and QUIC clients
that retained messages, a persistent session with its subscriptions and owner, and its
queued QoS 1 messages came back; in strict mode, that no acknowledged message was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.auth import add_user
from client.client import Client, ClientError
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import MQTT_5, Connack, Connect, Pubcomp, Publish, Pubrec, Pubrel
from mqttproto.reasons import ReasonCode

from .conftest import HOST, QBroker, free_tcp_port, free_udp_port
from .helpers import assert_quiet, collect, uid

pytestmark = pytest.mark.timeout(90)
TRANSPORTS = ("tcp", "quic")
SIGNALS = {"kill9": signal.SIGKILL, "sigterm": signal.SIGTERM}
USERS = {"bob": "builder", "alice": "wonderland", "admin": "root-of-trust"}


class Restartable(QBroker):
    def restart(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)  # by PID
        self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
        self.log_path = self.log_path.with_suffix(".next.log")
        self.start()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[object]:
    from broker.certs import make_lab_certs

    certs = make_lab_certs(tmp_path / "certs")
    passwd = tmp_path / "passwd"
    for user, password in USERS.items():
        add_user(passwd, user, password)
    started: list[Restartable] = []

    def make(*extra: str) -> Restartable:
        broker = Restartable(
            ca=str(certs.ca_cert),
            cert=str(certs.server_cert),
            key=str(certs.server_key),
            log_path=tmp_path / "broker.log",
            ports={t: free_tcp_port() for t in ("tcp", "tls", "mptcp")} | {"quic": free_udp_port()},
            extra_args=["--persistence", str(tmp_path / "store"), "--password-file", str(passwd),
                        "--sys-interval", "0", "--log-level", "INFO", *extra],
        )  # fmt: skip
        started.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in started:
            broker.stop()


def client(broker: QBroker, transport: str, user: str, client_id: str = "", **kw: object) -> Client:
    kw.setdefault("clean_start", not client_id)
    kw.setdefault("session_expiry", 3600 if client_id else 0)
    return Client(
        HOST, broker.port(transport), transport=transport, cafile=broker.ca,
        client_id=client_id, username=user, password=USERS[user], reconnect=False,
        connect_timeout=5.0, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("how", list(SIGNALS))
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_retained_sessions_and_queues_survive_a_restart(
    make_broker: object, transport: str, how: str
) -> None:
    broker = make_broker()  # type: ignore[operator]
    device = uid(f"bob-{transport}-")
    async with client(broker, transport, "bob", device) as bob:
        await bob.subscribe("bob/q", qos=1, subscription_id=5)
        await bob.subscribe("bob/other/+", qos=1)
    async with client(broker, transport, "admin") as admin:
        for n in range(1000):
            await admin.publish(f"keep/{n}", f"r{n}".encode(), qos=0, retain=True)
        for n in range(500):
            await admin.publish("bob/q", f"m{n}".encode(), qos=1)
    await asyncio.sleep(0.5)  # batch mode: commits every 0.1 s
    broker.restart(SIGNALS[how])

    # The session still belongs to bob: alice may not resume it.
    with pytest.raises(ClientError) as refused:
        async with client(broker, transport, "alice", device):
            pass
    assert refused.value.reason_code == ReasonCode.NOT_AUTHORIZED
    async with client(broker, transport, "bob", device) as bob:
        assert bob.session_present
        got = await collect(bob, 500, timeout=20)
        assert [m.payload for m in got] == [f"m{n}".encode() for n in range(500)]
        assert got[0].properties.get(0x0B) == [5]  # its subscription identifier
        await assert_quiet(bob)
        async with client(broker, transport, "admin") as admin:
            await admin.publish("bob/other/x", b"live", qos=1)
        (live,) = await collect(bob, 1)
        assert live.payload == b"live"  # the second subscription came back too
    async with client(broker, transport, "admin") as watcher:
        await watcher.subscribe("keep/#", qos=0)
        retained = await collect(watcher, 1000, timeout=20)
        assert sorted(m.payload for m in retained) == sorted(f"r{n}".encode() for n in range(1000))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_strict_mode_loses_no_acknowledged_message_on_kill9(
    make_broker: object, transport: str
) -> None:
    broker = make_broker("--persistence-sync", "strict")  # type: ignore[operator]
    device = uid(f"bob-{transport}-")
    async with client(broker, transport, "bob", device) as bob:
        await bob.subscribe("bob/q", qos=2)
    acked: list[bytes] = []
    admin = client(broker, transport, "admin")
    await admin.connect()

    async def one(n: int) -> None:
        payload = f"s{n}".encode()
        with contextlib.suppress(Exception):
            await admin.publish("bob/q", payload, qos=1 + n % 2, timeout=10)
            acked.append(payload)

    tasks = [asyncio.create_task(one(n)) for n in range(2000)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(acked) < 300 and loop.time() < deadline:
        await asyncio.sleep(0.005)
    broker.restart(signal.SIGKILL)  # in the middle of the flood
    await asyncio.wait(tasks, timeout=15)
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await admin.disconnect()
    assert 300 <= len(acked) < 2000, len(acked)
    async with client(broker, transport, "bob", device) as bob:
        assert bob.session_present
        got: set[bytes] = set()
        with contextlib.suppress(TimeoutError):
            while True:
                got.add((await bob.next_message(2.0)).payload)
    missing = set(acked) - got
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost"


def _packets(sock: socket.socket, reader: PacketReader, count: int) -> list[object]:
    out: list[object] = []
    while len(out) < count:
        data = sock.recv(65536)
        assert data, "connection closed"
        out.extend(reader.feed(data))
    return out


def _connect(port: int, client_id: str) -> tuple[socket.socket, PacketReader]:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.sendall(encode(Connect(client_id, MQTT_5, False, 60, "admin", USERS["admin"].encode(),
                                None, {0x11: 3600})))  # fmt: skip
    reader = PacketReader(MQTT_5)
    (connack,) = _packets(sock, reader, 1)
    assert isinstance(connack, Connack) and connack.reason_code == 0
    return sock, reader


@pytest.mark.parametrize("how", list(SIGNALS))
async def test_qos2_exactly_once_across_a_restart(make_broker: object, how: str) -> None:
    """Neither a completed outbound exchange nor a resent inbound PUBLISH is delivered twice."""
    broker = make_broker()  # type: ignore[operator]
    device = uid("bob-qos2-")
    async with client(broker, "tcp", "bob", device) as bob:
        await bob.subscribe("bob/x", qos=2)
        await bob.subscribe("bob/y", qos=2)
    async with client(broker, "quic", "admin") as admin:
        await admin.publish("bob/x", b"done-before", qos=2)
    async with client(broker, "tcp", "bob", device) as bob:
        (first,) = await collect(bob, 1)  # PUBREC/PUBREL/PUBCOMP completed by the client
        assert first.payload == b"done-before"
        await asyncio.sleep(0.3)
    # The publisher's exchange is half done when the broker goes: PUBREC received only.
    sock, reader = await asyncio.to_thread(_connect, broker.port("tcp"), "admin-raw")
    sock.sendall(encode(Publish("bob/y", b"once", 2, False, False, 9, {})))
    (rec,) = await asyncio.to_thread(_packets, sock, reader, 1)
    assert isinstance(rec, Pubrec) and rec.packet_id == 9
    await asyncio.sleep(0.5)
    broker.restart(SIGNALS[how])
    sock.close()
    sock, reader = await asyncio.to_thread(_connect, broker.port("tcp"), "admin-raw")
    sock.sendall(encode(Publish("bob/y", b"once", 2, False, True, 9, {})))  # DUP resend
    (rec,) = await asyncio.to_thread(_packets, sock, reader, 1)
    assert isinstance(rec, Pubrec) and rec.packet_id == 9
    sock.sendall(encode(Pubrel(9)))
    (comp,) = await asyncio.to_thread(_packets, sock, reader, 1)
    assert isinstance(comp, Pubcomp) and comp.packet_id == 9
    sock.close()
    async with client(broker, "tcp", "bob", device) as bob:
        assert bob.session_present
        (got,) = await collect(bob, 1)
        assert got.payload == b"once"
        await assert_quiet(bob, 1.0)  # no second "once", no "done-before" again


def _broker_exit(directory: Path) -> tuple[int, str]:
    import subprocess
    import sys

    from .conftest import REPO_ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, "-m", "qmig", "broker", "--host", HOST, "--tcp-port", "0",
         "--tls-port", "0", "--mptcp-port", "0", "--quic-port", "0",
         "--persistence", str(directory)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    return proc.returncode, proc.stderr


def test_broker_refuses_a_corrupt_or_busy_store(make_broker: object, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qmig.db").write_bytes(b"\x00garbage, not SQLite" * 500)
    code, err = _broker_exit(bad)
    assert code == 1 and "cannot start" in err and "qmig.db" in err, err
    assert (bad / "qmig.db").read_bytes().startswith(b"\x00garbage")  # left as it was
    make_broker()  # type: ignore[operator]  # holds tmp_path/store
    code, err = _broker_exit(tmp_path / "store")
    assert code == 1 and "in use by another broker" in err, err
