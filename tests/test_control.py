"""The migration control API against a real broker process: auth, errors and the three steps.

One broker subprocess serves the module (TCP, MPTCP and QUIC on free loopback ports, the
control API with a token file); every test leaves it serving again.  Each step is driven
over :func:`control_request` and ``qmig ctl``, and checked from the clients' side: paho sees
DISCONNECT/CONNACK 0x9D with the Server Reference, the MPTCP port refuses and comes back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.certs import make_lab_certs
from broker.control import MAX_REQUEST, ControlError
from client.client import Client
from migration.control import control_request

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-" + uuid.uuid4().hex
SERVER_MOVED = 0x9D
REFUSED_LOG = "wrong or missing token"
WAIT = 5.0


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QMIG_CONTROL_TOKEN", "QMIG_POOL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    log_path: Path
    token_file: Path
    ca: str
    tcp: int
    mptcp: int
    quic: int
    control: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ctl(self, cmd: str, **args: Any) -> dict[str, Any]:
        return await control_request(HOST, self.control, TOKEN, cmd, **args)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("control")
    certs = make_lab_certs(tmp / "certs")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    ports = {"tcp": _free_port(), "mptcp": _free_port(), "control": _free_port(),
             "quic": _free_port(socket.SOCK_DGRAM)}  # fmt: skip
    cmd = [
        sys.executable, "-m", "qmig", "broker", "--host", HOST,
        "--tcp-port", str(ports["tcp"]), "--tls-port", "0",
        "--mptcp-port", str(ports["mptcp"]), "--quic-port", str(ports["quic"]),
        "--cert", str(certs.server_cert), "--key", str(certs.server_key),
        "--control-port", str(ports["control"]), "--control-token-file", str(token_file),
        "--sys-interval", "0",
    ]  # fmt: skip
    log_path = tmp / "broker.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        b = Broker(proc, log_path, token_file, str(certs.ca_cert), **ports)
        deadline = time.monotonic() + 15
        while "qmig broker: ready" not in b.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"broker did not become ready:\n{b.log()[-3000:]}")
            time.sleep(0.05)
        assert f"control API on {HOST}:{ports['control']}" in b.log()
        assert TOKEN not in b.log()
        yield b
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _run_ctl(
    b: Broker, *args: str, token_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "qmig", "ctl", "--port", str(b.control),
           "--token-file", str(token_file or b.token_file), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=15)  # fmt: skip


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


class Paho:
    """A paho-mqtt v5 client on its own thread that records CONNACK and DISCONNECT."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"ctl-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.connacks: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.disconnects: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, rc, props: self.connacks.put((rc.value, props))
        self.client.on_disconnect = lambda _c, _u, _f, rc, props: self.disconnects.put(
            (rc.value, props)
        )

    def connect(self) -> tuple[int, Any]:
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        return self.connacks.get(timeout=WAIT)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def paho(port: int) -> Iterator[Paho]:
    client = Paho(port)
    try:
        yield client
    finally:
        client.close()


async def _raw(b: Broker) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, b.control)


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               line: bytes) -> dict[str, Any]:  # fmt: skip
    writer.write(line + b"\n")
    await writer.drain()
    reply = await asyncio.wait_for(reader.readline(), WAIT)
    assert reply, "the control API closed the connection"
    return json.loads(reply)


def _request(cmd: str, token: str | None = TOKEN, **args: Any) -> bytes:
    body: dict[str, Any] = {"cmd": cmd, **args}
    if token is not None:
        body["token"] = token
    return json.dumps(body).encode()


# --------------------------------------------------------------------------- tests
async def test_status_over_cli_and_client(broker: Broker) -> None:
    done = await asyncio.to_thread(_run_ctl, broker, "status")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "serving"
    assert set(status["listeners"]) == {"tcp", "mptcp", "quic"}
    assert status["listeners"]["mptcp"] == f"{HOST}:{broker.mptcp}"

    status = await broker.ctl("status")
    assert status["state"] == "serving" and "connections" in status


async def test_wrong_or_missing_token_is_refused_closed_and_logged(broker: Broker) -> None:
    with pytest.raises(ControlError, match=r"^unauthorized$"):
        await control_request(HOST, broker.control, "wrong", "status")
    reader, writer = await _raw(broker)
    try:
        reply = await _ask(reader, writer, _request("status", token=None))
        assert reply == {"ok": False, "error": "unauthorized"}
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed by the broker
    finally:
        writer.close()
    await asyncio.sleep(0.1)
    assert broker.log().count(REFUSED_LOG) == 1  # once a minute, however many are refused

    bad = broker.token_file.with_name("bad-token")
    bad.write_text("nope\n")
    done = await asyncio.to_thread(_run_ctl, broker, "status", token_file=bad)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == "qmig ctl: error: unauthorized"


async def test_bad_requests_get_errors_and_keep_the_connection(broker: Broker) -> None:
    reader, writer = await _raw(broker)
    try:
        reply = await _ask(reader, writer, b"{not json")
        assert not reply["ok"] and "not JSON" in reply["error"]
        reply = await _ask(reader, writer, b"[1, 2]")
        assert not reply["ok"] and "JSON object" in reply["error"]
        reply = await _ask(reader, writer, _request("launch"))
        assert not reply["ok"] and "unknown command 'launch'" in reply["error"]
        reply = await _ask(reader, writer, _request("prepare"))
        assert not reply["ok"] and "missing field(s) dest" in reply["error"]
        reply = await _ask(reader, writer, _request("prepare", dest="nowhere"))
        assert not reply["ok"] and "bad dest" in reply["error"]
        reply = await _ask(reader, writer, _request("status", verbose=True))
        assert not reply["ok"] and "unexpected field(s) verbose" in reply["error"]
        reply = await _ask(reader, writer, _request("status"))  # still usable
        assert reply["ok"] and reply["result"]["state"] == "serving"
        reply = await _ask(reader, writer, _request("status"))  # several per connection
        assert reply["ok"]
    finally:
        writer.close()

    reader, writer = await _raw(broker)
    try:
        reply = await _ask(reader, writer, b"x" * (MAX_REQUEST + 10))
        assert not reply["ok"] and "longer than" in reply["error"]
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
    finally:
        writer.close()
    with pytest.raises(ControlError, match="bad address"):
        await broker.ctl("restored", address="198.18.2.2:notaport")


async def test_prepare_tells_every_quic_client(broker: Broker) -> None:
    async with Client(HOST, broker.quic, transport="quic", cafile=broker.ca) as quic_client:
        assert quic_client.connected
        result = await broker.ctl("prepare", dest=f"127.0.0.3:{broker.quic}")
        assert result["quic_notified"] == 1
        assert result["destination"] == f"127.0.0.3:{broker.quic}"
        status = await broker.ctl("status")
        assert status["state"] == "prepared"
        assert status["connections"].get("quic") == 1
    result = await broker.ctl("rollback")
    assert result["state"] == "serving"
    assert (await broker.ctl("status"))["destination"] is None


async def test_pre_checkpoint_then_restored(broker: Broker) -> None:
    reference = f"{HOST}:{_free_port()}"
    assert _can_connect(broker.mptcp)
    with paho(broker.tcp) as moved:
        rc, _ = await asyncio.to_thread(moved.connect)
        assert rc == 0
        done = await asyncio.to_thread(_run_ctl, broker, "pre-checkpoint", reference)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["reference"] == reference and result["disconnected"] >= 1
        rc, props = await asyncio.to_thread(moved.disconnects.get, True, WAIT)
        assert rc == SERVER_MOVED
        assert props.ServerReference == reference
    try:
        # Every TCP-family listener is closed so that no established TCP socket can slip
        # into the checkpoint (CRIU would refuse it): a late client is refused and retries.
        assert not _can_connect(broker.tcp)
        assert not _can_connect(broker.mptcp)
        status = await broker.ctl("status")
        assert status["state"] == "checkpoint-ready"
        assert status["connections"].get("tcp", 0) == 0
        for kind in ("tcp", "mptcp"):
            assert status["listeners"][kind].endswith("(closed)")
    finally:
        result = await broker.ctl("restored", address=f"{HOST}:{broker.quic}")
    assert result == {"address": f"{HOST}:{broker.quic}", "quic_announced": 0, "freeze": None,
                      "provisional": False}  # fmt: skip
    assert _can_connect(broker.mptcp)
    with paho(broker.tcp) as back:
        rc, _ = await asyncio.to_thread(back.connect)
        assert rc == 0  # redirect cleared
    status = await broker.ctl("status")
    assert status["state"] == "serving" and status["history"][-1]["to"] == f"{HOST}:{broker.quic}"


async def test_rollback_after_pre_checkpoint(broker: Broker) -> None:
    reference = f"{HOST}:{_free_port()}"
    await broker.ctl("prepare", dest=f"127.0.0.3:{broker.quic}")
    await broker.ctl("pre-checkpoint", reference=reference)
    assert not _can_connect(broker.mptcp) and not _can_connect(broker.tcp)
    done = await asyncio.to_thread(_run_ctl, broker, "rollback", f"{HOST}:{broker.quic}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "state": "serving",
        "quic_told": 0,
        "freeze": None,
        "held_acks": 0,
        "held_qos2": 0,
        "held_qos2_bytes": 0,
    }
    status = await broker.ctl("status")
    assert status["history"][-1]["rolled_back_to"] == f"{HOST}:{broker.quic}"
    assert _can_connect(broker.mptcp)
    with paho(broker.tcp) as back:
        rc, _ = await asyncio.to_thread(back.connect)
        assert rc == 0


async def test_a_provisional_broker_acknowledges_over_quic_only_after_the_commit(
    broker: Broker,
) -> None:
    """Post-copy's commit point, end to end: after ``pre-checkpoint --provisional`` a QUIC
    client's QoS 1 message is delivered at once but not acknowledged, its QoS 2 message is
    neither; ``qmig ctl commit`` sends both acknowledgements and routes the QoS 2 one."""
    async with Client(HOST, broker.quic, transport="quic", cafile=broker.ca) as client:
        await client.subscribe("prov/#", qos=2)
        done = await asyncio.to_thread(_run_ctl, broker, "pre-checkpoint", "--provisional", "30")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["provisional"] is True
        try:
            qos1 = asyncio.create_task(client.publish("prov/1", b"one", qos=1))
            qos2 = asyncio.create_task(client.publish("prov/2", b"two", qos=2))
            first = await client.next_message(timeout=WAIT)
            assert (first.topic, first.payload) == ("prov/1", b"one")
            await asyncio.sleep(0.5)
            assert not qos1.done() and not qos2.done()  # nothing acknowledged
            status = await broker.ctl("status")
            assert status["provisional"]["held_acks"] >= 1
            assert status["provisional"]["held_qos2"] == 1
            with pytest.raises(TimeoutError):
                await client.next_message(timeout=0.3)  # QoS 2: not routed yet
            done = await asyncio.to_thread(_run_ctl, broker, "commit")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["held_qos2"] == 1
            await asyncio.wait_for(asyncio.gather(qos1, qos2), WAIT)
            second = await client.next_message(timeout=WAIT)
            assert (second.topic, second.payload) == ("prov/2", b"two")
            assert (await broker.ctl("status"))["provisional"] is None
        finally:
            await broker.ctl("rollback")
    with pytest.raises(ControlError, match="provisional must be"):
        await broker.ctl("pre-checkpoint", provisional=-1)
    with pytest.raises(ControlError, match="provisional must be"):
        await broker.ctl("pre-checkpoint", provisional=True)
    assert (await broker.ctl("status"))["state"] == "serving"


def test_config_reads_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.config import BrokerConfig, ConfigError, add_broker_arguments, config_from_args

    monkeypatch.delenv("QMIG_CONTROL_TOKEN", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    cfg = BrokerConfig(control_port=5000).validate()  # none: generated at start, here
    assert cfg.control_token is None
    assert cfg.control_token_file == str(tmp_path / "run" / "qmig" / "control-5000.token")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        BrokerConfig(control_port=5000, control_token_file=str(empty)).validate()
    with pytest.raises(ConfigError, match="cannot read control token file"):
        BrokerConfig(control_port=5000, control_token_file=str(tmp_path)).validate()  # a dir
    good = tmp_path / "token"
    token = "f1le-" + uuid.uuid4().hex
    good.write_text(token + "\n")
    cfg = BrokerConfig(control_port=5000, control_token_file=str(good)).validate()
    assert cfg.control_token == token and token not in repr(cfg)

    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    from_env = "env-" + uuid.uuid4().hex
    monkeypatch.setenv("QMIG_CONTROL_TOKEN", from_env)
    cfg = config_from_args(parser.parse_args(["--control-port", "5000"]))
    assert cfg.control_token == from_env
    cfg = config_from_args(parser.parse_args(["--control-port", "5000",
                                              "--control-token-file", str(good)]))  # fmt: skip
    assert cfg.control_token == token  # the file wins


async def test_the_broker_notices_its_own_freeze() -> None:
    """After pre-checkpoint the broker watches its clock: a stopped process sees the jump.

    A blocked event loop stands in for CRIU's freezer here (the container tests see the
    real one); what ``restored`` reports is the span the process did not run.
    """
    import time

    from broker.config import BrokerConfig
    from broker.server import BrokerServer
    from quicmig.frames import Address

    config = BrokerConfig(host=HOST, tcp_port=_free_port(), tls_port=0, mptcp_port=0,
                          quic_port=0, sys_interval=0).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        await server.migration.pre_checkpoint(None)
        await asyncio.sleep(0.05)  # the watch ticks quietly: no freeze yet
        assert server.migration.last_freeze is None
        before = time.time()
        time.sleep(0.4)  # the whole process stops, as under CRIU's freezer
        after = time.time()
        await asyncio.sleep(0.05)
        done = await server.migration.restored(Address(HOST, 14567))
        freeze = done["freeze"]
        assert freeze is not None
        assert before - 0.05 <= freeze["frozen_at"] <= before + 0.01
        assert after - 0.01 <= freeze["thawed_at"] <= after + 0.05
    finally:
        await server.stop()
