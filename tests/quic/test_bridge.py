"""``qmig bridge``: plain MQTT clients on local TCP reach the broker over QUIC, and back.

mosquitto_pub/mosquitto_sub and paho (3.1.1 and 5) talk through the bridge to QUIC and TCP
clients of the broker; the broker sees each bridged client as a QUIC connection; closing the
TCP side closes that QUIC connection (and an abrupt close publishes the client's will).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from client.client import Client
from mqttproto.codec import PacketReader, encode
from mqttproto.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Will,
)

from .conftest import HOST, QBroker, stop_process, subprocess_env
from .helpers import (
    TIMEOUT,
    Paho,
    UdpRelay,
    assert_quiet,
    collect,
    make_client,
    qmig_cmd,
    quic_terminated,
    uid,
)

T = TypeVar("T")
READY_TIMEOUT = 15.0
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "mosquitto_sub"
needs_mosquitto = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto clients not installed",
)


@dataclass
class BridgeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_bridge(broker: QBroker, to_port: int, log_path: Path) -> Iterator[BridgeProcess]:
    """``qmig bridge`` from a free local TCP port to ``to_port`` (the broker's QUIC port)."""
    cmd = qmig_cmd("bridge", "--listen", f"{HOST}:0", "--to", f"{HOST}:{to_port}",
                   "--cafile", broker.ca)  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        ready = None
        while ready is None and time.monotonic() < deadline and proc.poll() is None:
            ready = re.search(r"listening tcp [\d.]+:(\d+) -> quic .*; ready", log_path.read_text())
            time.sleep(0.05)
        if ready is None:
            raise RuntimeError(f"qmig bridge did not become ready:\n{log_path.read_text()[-3000:]}")
        yield BridgeProcess(proc, int(ready.group(1)), log_path)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def bridge(qbroker: QBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    log_path = tmp_path_factory.mktemp("bridge") / "bridge.log"
    with run_bridge(qbroker, qbroker.port("quic"), log_path) as process:
        yield process


def client_id_connected_over(broker: QBroker, client_id: str, since: int = 0) -> str:
    """The transport the broker says ``client_id`` connected over (from its DEBUG log)."""
    found = broker.wait_log(rf"client {re.escape(client_id)} connected over (\w+) from", since)
    return found.group(1)


async def mosquitto(*args: str, timeout: float = 10.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ------------------------------------------------------------------------------ mosquitto
@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_pub_through_bridge(
    qbroker: QBroker, bridge: BridgeProcess, version: str
) -> None:
    """mosquitto_pub via the bridge reaches a QUIC and a TCP subscriber; it arrives as QUIC."""
    topic = uid("br-mpub/")
    client_id = uid("mpub-")
    since = qbroker.log_size()
    async with (
        make_client(qbroker, "quic") as q_sub,
        make_client(qbroker, "tcp") as t_sub,
    ):
        await q_sub.subscribe(topic, qos=2)
        await t_sub.subscribe(topic, qos=2)
        for qos in ("0", "1", "2"):
            rc, _, err = await mosquitto(
                MOSQUITTO_PUB, "-h", HOST, "-p", str(bridge.port), "-V", version,
                "-i", client_id, "-t", topic, "-m", f"via bridge q{qos}", "-q", qos,
            )  # fmt: skip
            assert rc == 0, err
        for sub in (q_sub, t_sub):
            got = await collect(sub, 3)
            assert [(m.payload, m.qos) for m in got] == [
                (f"via bridge q{q}".encode(), q) for q in (0, 1, 2)
            ]
    assert client_id_connected_over(qbroker, client_id, since) == "quic"


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_sub_through_bridge(
    qbroker: QBroker, bridge: BridgeProcess, version: str
) -> None:
    """mosquitto_sub via the bridge gets messages from QUIC and TCP publishers, in order."""
    root = uid("br-msub/")
    client_id = uid("msub-")
    since = qbroker.log_size()
    async with make_client(qbroker, "quic") as q_pub, make_client(qbroker, "tcp") as t_pub:
        # A retained marker: its arrival shows mosquitto_sub's subscription is in place.
        await q_pub.publish(f"{root}/ready", b"r", qos=1, retain=True, timeout=5)
        proc = await asyncio.create_subprocess_exec(
            MOSQUITTO_SUB, "-h", HOST, "-p", str(bridge.port), "-V", version,
            "-i", client_id, "-t", f"{root}/#", "-q", "2", "-C", "4", "-v",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert first.decode() == f"{root}/ready r\n"
            await q_pub.publish(f"{root}/quic", b"from quic 1", qos=1, timeout=5)
            await t_pub.publish(f"{root}/tcp", b"from tcp", qos=2, timeout=5)
            await q_pub.publish(f"{root}/quic", b"from quic 2", qos=2, timeout=5)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await q_pub.publish(f"{root}/ready", b"", qos=1, retain=True, timeout=5)
    assert proc.returncode == 0, err
    assert out.decode().splitlines() == [
        f"{root}/quic from quic 1",
        f"{root}/tcp from tcp",
        f"{root}/quic from quic 2",
    ]
    assert client_id_connected_over(qbroker, client_id, since) == "quic"


# ------------------------------------------------------------------------------ paho
@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5], ids=["v311", "v5"])
async def test_paho_through_bridge(qbroker: QBroker, bridge: BridgeProcess, version: int) -> None:
    """paho via the bridge publishes to QUIC/TCP clients and receives their messages."""
    root = uid("br-paho/")
    since = qbroker.log_size()
    paho = Paho(bridge.port, version)
    try:
        await asyncio.to_thread(paho.connect)
        assert client_id_connected_over(qbroker, paho.client_id, since) == "quic"
        await asyncio.to_thread(paho.subscribe, f"{root}/to-paho", 2)
        async with (
            make_client(qbroker, "quic", version=version) as quic,
            make_client(qbroker, "tcp", version=version) as tcp,
        ):
            await quic.subscribe(f"{root}/from-paho", qos=2)
            await tcp.subscribe(f"{root}/from-paho", qos=2)
            for qos in (0, 1, 2):
                await asyncio.to_thread(paho.publish, f"{root}/from-paho", f"p{qos}".encode(), qos)
            for sub in (quic, tcp):
                got = await collect(sub, 3)
                assert [(m.payload, m.qos) for m in got] == [(b"p0", 0), (b"p1", 1), (b"p2", 2)]
            await quic.publish(f"{root}/to-paho", b"hi from quic", qos=2, timeout=5)
            await tcp.publish(f"{root}/to-paho", b"hi from tcp", qos=1, timeout=5)
            first = await asyncio.to_thread(paho.get)
            second = await asyncio.to_thread(paho.get)
            # paho hands a QoS 2 message over at PUBREL, so the QoS 1 one may come first.
            assert sorted([(first.payload, first.qos), (second.payload, second.qos)]) == [
                (b"hi from quic", 2), (b"hi from tcp", 1),
            ]  # fmt: skip
    finally:
        await asyncio.to_thread(paho.close)


async def test_paho_session_through_bridge(qbroker: QBroker, bridge: BridgeProcess) -> None:
    """A persistent paho session (clean session 0) carried over the bridge resumes."""
    topic = uid("br-sess/")
    client_id = uid("paho-sess-")
    paho = Paho(bridge.port, MQTT_3_1_1, client_id=client_id, clean_session=False)
    try:
        await asyncio.to_thread(paho.connect)
        await asyncio.to_thread(paho.subscribe, topic, 1)
    finally:
        await asyncio.to_thread(paho.close)
    async with make_client(qbroker, "quic") as pub:
        for n in range(3):
            await pub.publish(topic, f"queued {n}".encode(), qos=1, timeout=5)
    again = Paho(bridge.port, MQTT_3_1_1, client_id=client_id, clean_session=False)
    try:
        await asyncio.to_thread(again.connect)
        assert again.session_present
        got = [await asyncio.to_thread(again.get) for _ in range(3)]
        assert [m.payload for m in got] == [b"queued 0", b"queued 1", b"queued 2"]
    finally:
        await asyncio.to_thread(again.close)


# ------------------------------------------------------------------------------ closing
async def raw_connect(port: int, client_id: str, will: Will | None, version: int = MQTT_5
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(encode(Connect(client_id, version, True, 30, will=will), version))
    await writer.drain()
    connack = await asyncio.wait_for(reader.readexactly(2), 5)
    assert connack[0] == 0x20, connack
    body = await asyncio.wait_for(reader.readexactly(connack[1]), 5)
    assert body[1] == 0, f"CONNACK refused: {body!r}"
    return reader, writer


@pytest.mark.parametrize("abort", [True, False], ids=["reset", "fin"])
async def test_abrupt_tcp_close_publishes_will(
    qbroker: QBroker, bridge: BridgeProcess, abort: bool
) -> None:
    """Closing the TCP side without DISCONNECT closes the QUIC connection: the will goes out."""
    will_topic = uid("br-will/")
    client_id = uid("will-")
    since = qbroker.log_size()
    async with (
        make_client(qbroker, "quic") as q_sub,
        make_client(qbroker, "tcp") as t_sub,
    ):
        await q_sub.subscribe(will_topic, qos=1)
        await t_sub.subscribe(will_topic, qos=1)
        _, writer = await raw_connect(bridge.port, client_id, Will(will_topic, b"gone", qos=1))
        assert client_id_connected_over(qbroker, client_id, since) == "quic"
        if abort:
            writer.transport.abort()
        else:
            writer.close()
        for sub in (q_sub, t_sub):
            msg = await sub.next_message(5)
            assert (msg.topic, msg.payload) == (will_topic, b"gone")
        await qbroker.await_log(rf"publishing the will of {re.escape(client_id)}", since)
        await quic_terminated(qbroker, client_id, since, timeout=5)


async def test_disconnect_lost_on_the_quic_leg_is_resent(qbroker: QBroker, tmp_path: Path) -> None:
    """DISCONNECT then close at once, and the datagram carrying it is lost on the QUIC leg:
    the bridge still delivers it before closing, so the broker publishes no will."""
    will_topic = uid("br-lost/")
    relay = await UdpRelay(qbroker.port("quic")).start()
    try:
        with run_bridge(qbroker, relay.port, tmp_path / "bridge.log") as lossy:
            async with make_client(qbroker, "tcp") as watcher:
                await watcher.subscribe(will_topic, qos=1)
                _, writer = await raw_connect(lossy.port, uid("lost-"),
                                              Will(will_topic, b"should not", qos=1))  # fmt: skip
                await asyncio.sleep(0.2)  # the bridge's delayed ACK of the CONNACK has gone
                relay.drop_from_client = 1
                writer.write(b"\xe0\x00")  # DISCONNECT
                writer.close()
                await assert_quiet(watcher, 1.5)
                assert relay.dropped_from_client == 1
    finally:
        relay.close()


async def test_clean_disconnect_closes_quic_without_will(
    qbroker: QBroker, bridge: BridgeProcess
) -> None:
    """DISCONNECT then close through the bridge: no will, and the QUIC connection ends."""
    will_topic = uid("br-nowill/")
    client_id = uid("nowill-")
    since = qbroker.log_size()
    async with make_client(qbroker, "quic") as q_sub:
        await q_sub.subscribe(will_topic, qos=1)
        reader, writer = await raw_connect(
            bridge.port, client_id, Will(will_topic, b"should not"), MQTT_3_1_1
        )
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
        # The broker closes after DISCONNECT; the bridge passes that on as EOF.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await quic_terminated(qbroker, client_id, since, timeout=5)
        await assert_quiet(q_sub, 0.3)
    assert f"publishing the will of {client_id}" not in qbroker.log_since(since)
    assert f"client {client_id} taken over" not in qbroker.log_since(since)


async def test_broker_close_reaches_tcp_client(qbroker: QBroker, bridge: BridgeProcess) -> None:
    """Garbage through the bridge: the broker closes that QUIC connection, the bridge closes
    the TCP client; the bridge keeps serving others."""
    since = qbroker.log_size()
    reader, writer = await asyncio.open_connection(HOST, bridge.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    await qbroker.await_log(r"closing .*\(quic\): the first packet must be CONNECT", since)
    paho = Paho(bridge.port, MQTT_5)
    try:
        await asyncio.to_thread(paho.connect)
    finally:
        await asyncio.to_thread(paho.close)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_bridge_releases_quic_sockets(qbroker: QBroker, bridge: BridgeProcess) -> None:
    """Every bridged client's UDP socket is closed after it goes (no descriptor leak)."""

    def open_fds() -> int:
        return len(os.listdir(f"/proc/{bridge.proc.pid}/fd"))

    async def one_client(n: int) -> None:
        reader, writer = await raw_connect(bridge.port, uid(f"fd{n}-"), None, MQTT_3_1_1)
        if n % 2:
            writer.write(b"\xe0\x00")  # DISCONNECT, then the broker closes
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
        writer.close()

    before = open_fds()
    await asyncio.gather(*(one_client(n) for n in range(10)))
    deadline = time.monotonic() + 5
    while open_fds() > before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert open_fds() <= before, f"{open_fds() - before} descriptors left open by the bridge"


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5], ids=["v311", "v5"])
async def test_disconnect_then_close_at_once(
    qbroker: QBroker, bridge: BridgeProcess, version: int
) -> None:
    """DISCONNECT immediately followed by closing the socket (as mosquitto_pub does): the
    DISCONNECT still reaches the broker, so the will is discarded."""
    will_topic = uid("br-quick/")
    async with make_client(qbroker, "tcp") as watcher:
        await watcher.subscribe(will_topic, qos=1)
        for n in range(5):
            _, writer = await raw_connect(
                bridge.port, uid(f"quick{n}-"), Will(will_topic, b"must not"), version
            )
            writer.write(b"\xe0\x00")
            writer.close()
        await assert_quiet(watcher, 0.5)


# ------------------------------------------------------------------------------ back-pressure
RSS_BOUND = 64 << 20  # growth of the bridge's resident memory allowed under a flood
# What the bridge may hold for one slow reader is about 1 MiB of TCP buffer plus a 1 MiB
# receive window; without flow control it took all the broker sent (some 8 MiB/s here).
SLOW_READER_RSS_BOUND = 16 << 20


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """Samples a process's RSS every 50 ms while running; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = rss(pid)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await asyncio.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.base


class RawMqtt:
    """A bare MQTT 5 client on a non-blocking socket: it reads only when the test says so."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = PacketReader(version=MQTT_5)
        self.inbox: list[Packet] = []

    @classmethod
    async def connect(cls, port: int, client_id: str, rcvbuf: int | None = None) -> RawMqtt:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect(), so the window the peer sees is small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, port)), 5)
        except BaseException:
            sock.close()
            raise
        raw = cls(sock)
        await raw.send(Connect(client_id, MQTT_5, True, 60))
        connack = await raw.expect(Connack)
        assert connack.reason_code == 0, connack
        return raw

    async def send(self, *packets: Packet) -> None:
        data = b"".join(encode(p, MQTT_5) for p in packets)
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read(self, timeout: float = TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), timeout)
        if not data:
            raise ConnectionError("the bridge closed the connection")
        self.inbox.extend(self.reader.feed(data))

    async def expect(self, kind: type[T], timeout: float = TIMEOUT) -> T:
        """The next packet, which must be a ``kind``."""
        while not self.inbox:
            await self.read(timeout)
        packet = self.inbox.pop(0)
        assert isinstance(packet, kind), packet
        return packet

    async def subscribe(self, topic: str, qos: int) -> None:
        await self.send(Subscribe(1, [Subscription(topic, qos)]))
        suback = await self.expect(Suback)
        assert suback.reason_codes == [qos], suback

    def close(self) -> None:
        self.sock.close()


async def flood(
    port: int, topic: str, seconds: float, size: int = 16 << 10, rate: float | None = None
) -> int:
    """Publish QoS 0 to ``topic`` as fast as the connection takes it (or at ``rate`` bytes
    per second); the bytes written."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(encode(Connect(uid("flood-"), MQTT_5, True, 60), MQTT_5))
        assert (await asyncio.wait_for(reader.readexactly(2), 5))[0] == 0x20
        batch = encode(Publish(topic, b"f" * size, 0), MQTT_5) * 8
        loop = asyncio.get_running_loop()
        start = loop.time()
        written = 0
        while loop.time() < start + seconds:
            writer.write(batch)
            written += len(batch)
            await writer.drain()
            if rate is not None:
                await asyncio.sleep(max(0.0, written / rate - (loop.time() - start)))
        return written
    finally:
        writer.transport.abort()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
async def test_slow_subscriber_holds_back_the_broker(
    qbroker: QBroker, bridge: BridgeProcess
) -> None:
    """A client behind the bridge stops reading during a QoS 0 flood: the bridge's memory
    stays bounded (the broker feels the slow reader through QUIC flow control and drops
    QoS 0 for it), and once it reads again it gets every QoS 1 message published meanwhile
    and new messages (its connection survived)."""
    root = uid("br-slow/")
    client_id = uid("slow-")
    since = qbroker.log_size()
    sub = await RawMqtt.connect(bridge.port, client_id, rcvbuf=4096)
    try:
        await sub.subscribe(f"{root}/#", qos=1)
        expected = [f"q1 {n}".encode() for n in range(50)]
        async with make_client(qbroker, "tcp") as pub:

            async def publish_qos1() -> None:
                for payload in expected:
                    await pub.publish(f"{root}/q1", payload, qos=1, timeout=5)
                    await asyncio.sleep(0.06)

            # 40 MiB/s is more than the broker sends over one QUIC connection, but leaves
            # it the time to send (an unbounded flood keeps it busy reading).
            with PeakRss(bridge.proc.pid) as memory:  # the subscriber reads nothing meanwhile
                flooded, _ = await asyncio.gather(
                    flood(qbroker.port("tcp"), f"{root}/flood", 4.0, 64 << 10, 40 << 20),
                    publish_qos1(),
                )
            assert flooded > 8 * SLOW_READER_RSS_BOUND  # the flood was worth holding back
            assert memory.growth < SLOW_READER_RSS_BOUND, (
                f"bridge RSS grew {memory.growth >> 20} MiB"
            )
            await qbroker.await_log(rf"client {re.escape(client_id)} .*not reading", since)

            got: list[bytes] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while len(got) < len(expected) and loop.time() < deadline:
                await sub.read()
                for packet in sub.inbox:
                    if isinstance(packet, Publish) and packet.qos == 1:
                        assert packet.packet_id is not None
                        await sub.send(Puback(packet.packet_id))
                        got.append(packet.payload)
                sub.inbox.clear()
            assert got == expected  # none lost, none twice, in order

            await pub.publish(f"{root}/after", b"still there", qos=0)
            while True:
                packet = await sub.expect(Publish)
                if packet.topic == f"{root}/after":
                    assert packet.payload == b"still there"
                    break
    finally:
        sub.close()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
async def test_flooding_publisher_is_held_back(qbroker: QBroker, bridge: BridgeProcess) -> None:
    """A client floods QoS 0 through the bridge: the bridge stops reading it rather than
    buffering without bound, and a QoS 1 subscriber behind the same bridge keeps getting
    its messages during the flood."""
    root = uid("br-flood/")
    expected = [f"q1 {n}".encode() for n in range(20)]
    sub = Client(HOST, bridge.port, transport="tcp", client_id=uid("flood-sub-"))
    async with sub, make_client(qbroker, "tcp") as pub:
        await sub.subscribe(f"{root}/q1", qos=1)
        loop = asyncio.get_running_loop()
        arrived: list[tuple[float, bytes]] = []

        async def receive() -> None:
            while len(arrived) < len(expected):
                message = await sub.next_message(10)
                arrived.append((loop.time(), message.payload))

        async def publish_qos1() -> None:
            for payload in expected:
                await pub.publish(f"{root}/q1", payload, qos=1, timeout=5)
                await asyncio.sleep(0.08)

        receiver = loop.create_task(receive())
        try:
            with PeakRss(bridge.proc.pid) as memory:
                flood_start = loop.time()
                flooded, _ = await asyncio.gather(
                    flood(bridge.port, f"{root}/flood", 2.0), publish_qos1()
                )
                flood_end = loop.time()
            await asyncio.wait_for(receiver, 10)
        finally:
            receiver.cancel()
    assert flooded > 8 << 20  # the flood went through
    assert memory.growth < RSS_BOUND, f"bridge RSS grew {memory.growth >> 20} MiB"
    assert [payload for _, payload in arrived] == expected
    during = [t for t, _ in arrived if flood_start <= t <= flood_end]
    assert len(during) >= len(expected) // 2, "the subscriber starved during the flood"
