"""The state loader against a real broker on loopback: sessions and retained messages stay."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.config import BrokerConfig
from broker.server import BrokerServer
from migration.state_load import check_state, client_id, load_state

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def broker() -> AsyncIterator[tuple[BrokerServer, int]]:
    port = _free_port()
    config = BrokerConfig(host="127.0.0.1", tcp_port=port, tls_port=0, mptcp_port=0,
                          quic_port=0, sys_interval=0).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop()


@pytest.mark.timeout(60)
async def test_load_leaves_offline_sessions_and_retained_messages(
    broker: tuple[BrokerServer, int],
) -> None:
    server, port = broker
    result = await load_state("127.0.0.1", port, 300, payload=300)
    assert result.ok, result.errors
    assert (result.sessions, result.retained) == (300, 300)
    assert server.broker.store.session_count() == 300  # the publishers kept no session
    for _ in range(100):  # the broker notices the last disconnects a moment later
        if not [c for c in server.broker.connections if c.client_id.startswith("load")]:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the loader's connections stayed open")
    check = await check_state("127.0.0.1", port, 300)
    assert check.ok, check
    assert check.retained == 300 and check.sessions_present == check.sessions_checked == 20
    # The check resumed sessions but left them as they were: still offline, still kept.
    assert server.broker.store.session_count() == 300
    again = await check_state("127.0.0.1", port, 300)
    assert again.ok, again


@pytest.mark.timeout(30)
async def test_check_fails_where_the_state_is_missing(broker: tuple[BrokerServer, int]) -> None:
    _, port = broker
    check = await check_state("127.0.0.1", port, 50, quiet=0.3)
    assert not check.ok
    assert check.retained == 0 and check.sessions_present == 0


@pytest.mark.timeout(60)
async def test_command_line_loads_then_checks(broker: tuple[BrokerServer, int]) -> None:
    server, port = broker

    async def run(*extra: str) -> tuple[int, dict[str, object]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "migration.state_load", "--host", "127.0.0.1",
            "--port", str(port), "--sessions", "120", *extra, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, json.loads(out.decode().strip().splitlines()[-1] or err)

    code, loaded = await run()
    assert code == 0 and loaded["ok"] and loaded["sessions"] == 120, loaded
    assert server.broker.store.session_count() == 120
    code, checked = await run("--check")
    assert code == 0 and checked["retained"] == 120, checked
    assert client_id(7) == "load-00007"
