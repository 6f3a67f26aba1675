"""Finding 8 of issue #13: MIGRATION_TRIGGER is accepted only from clients that may ask.

A broker in this process (QUIC on loopback) and real aioquic clients sending the frame with
``MigratingQuicConnection.trigger_migration``: before any MQTT CONNECT, from anonymous and
from unauthorized users the trigger is dropped and counted; from a user the ACL grants
``topic write $qmig/migrate`` it reaches the migration API.  A flood is rate-limited (a few
log lines, earlier triggers kept in status) and a line break in the hint cannot forge a log
line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from broker.auth import add_user
from broker.certs import CertPaths, make_lab_certs
from broker.config import BrokerConfig
from broker.migration_api import TRIGGER_BURST
from broker.server import BrokerServer
from client.client import Client, ClientError
from client.transports import QuicStreamProtocol, open_stream
from qmig.benchmarks.abuse.trigger_flood import send_triggers
from quicmig.frames import TRIGGER_OPERATOR

HOST = "127.0.0.1"
ACL = """\
user ops
topic write $qmig/migrate
topic readwrite #
user dev
topic readwrite #
"""
PASSWORDS = {"ops": "ops-secret", "dev": "dev-secret"}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_lab_certs(tmp_path_factory.mktemp("trigger-certs"))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "passwd"
    for user, password in PASSWORDS.items():
        add_user(pw, user, password)
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return {"password_file": str(pw), "acl_file": str(acl)}


Start = Callable[..., Any]


@pytest.fixture
async def start(certs: CertPaths) -> AsyncIterator[Start]:
    servers: list[BrokerServer] = []

    async def _start(**settings: Any) -> BrokerServer:
        config = BrokerConfig(
            host=HOST,
            tcp_port=0,
            tls_port=0,
            mptcp_port=0,
            quic_port=_free_udp_port(),
            cert=str(certs.server_cert),
            key=str(certs.server_key),
            sys_interval=0,
            **settings,
        ).validate()
        server = BrokerServer(config)
        await server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.stop()


def _client(server: BrokerServer, certs: CertPaths, user: str | None = None) -> Client:
    return Client(
        HOST,
        server.config.quic_port,
        transport="quic",
        cafile=str(certs.ca_cert),
        reconnect=False,
        client_id=f"trigger-{user or 'anonymous'}",
        username=user,
        password=PASSWORDS[user] if user else None,
    )


def _proto(client: Client) -> QuicStreamProtocol:
    proto = client._stream
    assert isinstance(proto, QuicStreamProtocol)
    return proto


async def _handled(server: BrokerServer, count: int) -> dict[str, int]:
    """Wait until the broker has handled ``count`` triggers in all; their counts."""
    api = server.migration
    for _ in range(200):
        counts = api.trigger_counts
        if sum(counts.values()) >= count:
            return dict(counts)
        await asyncio.sleep(0.01)
    raise AssertionError(f"the broker handled {api.trigger_counts} of {count} triggers")


@pytest.mark.parametrize("settings", [{}, {"allow_anonymous": False}], ids=["open", "closed"])
async def test_trigger_before_connect_is_ignored(
    start: Start, certs: CertPaths, files: dict[str, str], settings: dict[str, Any]
) -> None:
    if settings:
        settings = {"password_file": files["password_file"], **settings}
    server = await start(**settings)
    stream, closer = await open_stream(
        "quic",
        HOST,
        server.config.quic_port,
        lambda _d: None,
        lambda _e: None,
        cafile=str(certs.ca_cert),
    )
    assert isinstance(stream, QuicStreamProtocol)
    try:
        await send_triggers(stream, 5, "edge-b", timeout=5.0)  # handshake done, no CONNECT
        # old brokers kept these: the wait ends on either, the assertions tell which
        for _ in range(100):
            if server.migration.triggers or sum(
                getattr(server.migration, "trigger_counts", {"": 0}).values()
            ):
                break
            await asyncio.sleep(0.01)
        assert server.migration.triggers == []
        assert (await _handled(server, 5))["not_authorized"] == 5
        assert server.migration.status()["trigger_counts"]["accepted"] == 0
    finally:
        stream.close()
        await closer.__aexit__(None, None, None)  # type: ignore[attr-defined]


async def test_anonymous_and_unauthorized_triggers_are_ignored(
    start: Start, certs: CertPaths, files: dict[str, str]
) -> None:
    server = await start(**files)  # anonymous clients may connect, but the ACL gives them none
    for user in (None, "dev"):
        async with _client(server, certs, user) as client:
            assert client.connected
            await send_triggers(_proto(client), 2, "edge-b", timeout=5.0)
    counts = await _handled(server, 4)
    assert counts == {"accepted": 0, "not_authorized": 4, "rate_limited": 0}
    assert server.migration.status()["triggers"] == []


async def test_authorized_trigger_reaches_the_migration_api(
    start: Start, certs: CertPaths, files: dict[str, str]
) -> None:
    server = await start(**files, allow_anonymous=False)
    async with _client(server, certs, "ops") as client:
        await send_triggers(_proto(client), 1, "edge-b", timeout=5.0)
        await _handled(server, 1)
        (entry,) = server.migration.status()["triggers"]
    assert entry["client_id"] == "trigger-ops" and entry["username"] == "ops"
    assert entry["reason"] == 1 and entry["hint"] == "edge-b"
    assert server.migration.status()["trigger_counts"]["accepted"] == 1


async def test_without_an_acl_a_password_file_limits_triggers_to_logged_in_users(
    start: Start, certs: CertPaths, files: dict[str, str]
) -> None:
    server = await start(password_file=files["password_file"])
    for user in (None, "dev"):
        async with _client(server, certs, user) as client:
            await send_triggers(_proto(client), 1, "edge-b", timeout=5.0)
    counts = await _handled(server, 2)
    assert counts == {"accepted": 1, "not_authorized": 1, "rate_limited": 0}
    assert [t["username"] for t in server.migration.triggers] == ["dev"]


async def test_a_flood_is_rate_limited_and_keeps_earlier_triggers(
    start: Start, certs: CertPaths, files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    server = await start(**files)
    async with _client(server, certs, "ops") as genuine:
        await send_triggers(_proto(genuine), 1, "genuine", timeout=5.0)
        await _handled(server, 1)
    caplog.set_level(logging.INFO, logger="qmig.migration")
    caplog.clear()
    async with _client(server, certs, "ops") as flooder, _client(server, certs) as anonymous:
        await asyncio.gather(
            send_triggers(_proto(flooder), 3000, "edge-b", timeout=10.0),
            send_triggers(_proto(anonymous), 3000, "edge-b", timeout=10.0),
        )
        counts = await _handled(server, 6001)
    assert counts["accepted"] == 1 + TRIGGER_BURST  # the flooder's burst, then nothing
    assert counts["rate_limited"] == 3000 - TRIGGER_BURST and counts["not_authorized"] == 3000
    hints = [t["hint"] for t in server.migration.status()["triggers"]]
    assert hints[0] == "genuine" and len(hints) == 1 + TRIGGER_BURST
    lines = [r for r in caplog.records if r.name == "qmig.migration"]
    assert len(lines) <= TRIGGER_BURST + 2, [r.getMessage() for r in lines]


async def test_a_line_break_in_the_hint_cannot_forge_a_log_line(
    start: Start, certs: CertPaths, files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmig.migration")
    server = await start(**files)
    forged = "edge-b\nqmig broker: WARNING forged\r\x1b[2K"
    async with _client(server, certs, "ops") as client:
        await send_triggers(_proto(client), 1, forged, timeout=5.0)
        await _handled(server, 1)
    (entry,) = server.migration.triggers
    assert entry["hint"] == "edge-b\\nqmig broker: WARNING forged\\r\\x1b[2K"
    messages = [r.getMessage() for r in caplog.records if r.name == "qmig.migration"]
    assert any("edge-b\\nqmig broker" in m for m in messages), messages
    assert not any(c in m for m in messages for c in "\n\r\x1b")


async def test_a_client_asks_with_request_migration_and_the_broker_hears_it(
    start: Start, certs: CertPaths, files: dict[str, str]
) -> None:
    """The client library's sender, end to end: ``Client.request_migration`` over QUIC."""
    server = await start(**files, allow_anonymous=False)
    async with _client(server, certs, "ops") as client:
        await client.request_migration("edge-c")
        await _handled(server, 1)
    (entry,) = server.migration.status()["triggers"]
    assert entry["username"] == "ops" and entry["hint"] == "edge-c"
    assert entry["reason"] == TRIGGER_OPERATOR


async def test_qmig_pub_request_migration_sends_the_trigger(
    start: Start, certs: CertPaths, files: dict[str, str]
) -> None:
    server = await start(**files, allow_anonymous=False)
    argv = [sys.executable, "-m", "qmig", "pub", "-h", HOST, "-p", str(server.config.quic_port),
            "--cafile", str(certs.ca_cert), "-u", "ops", "-P", PASSWORDS["ops"],
            "--request-migration", "edge-b", "-t", "ops/x", "-m", "asked", "-q", "1"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    await _handled(server, 1)
    assert [t["hint"] for t in server.migration.status()["triggers"]] == ["edge-b"]


async def test_request_migration_needs_quic(start: Start, certs: CertPaths) -> None:
    server = await start()
    client = Client(HOST, server.config.quic_port, transport="quic", cafile=str(certs.ca_cert),
                    reconnect=False)  # fmt: skip
    with pytest.raises(ClientError, match="connected QUIC"):
        await client.request_migration("edge-b")  # not connected yet
