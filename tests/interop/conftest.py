"""Fixtures for the interop suite: a per-test pool of real clients, broker health."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from brokers import BrokerFactory, BrokerProcess

from .clients import ClientPool


@pytest.fixture
def clients() -> Iterator[ClientPool]:
    """Creates paho / mosquitto_sub / raw clients and closes all of them after the test."""
    pool = ClientPool()
    try:
        yield pool
    finally:
        pool.close_all()


@pytest.fixture(autouse=True)
def _broker_health(request: pytest.FixtureRequest) -> Iterator[None]:
    """Restart the shared broker if an earlier test crashed it (so one crash does not fail
    every later test), and fail a test during which a broker it used died."""
    if "broker" in request.fixturenames:
        shared = request.getfixturevalue("broker")
        if isinstance(shared, BrokerProcess) and not shared.alive():
            crashed_log = shared.log_path
            shared.start()
            print(f"shared broker was dead (log {crashed_log}); restarted: {shared.describe()}")
    yield
    used: list[BrokerProcess] = []
    for value in getattr(request.node, "funcargs", {}).values():
        if isinstance(value, BrokerProcess):
            used.append(value)
        elif isinstance(value, BrokerFactory):
            used.extend(value.started)
    for proc in used:
        if proc.crashed():
            pytest.fail(
                f"broker died during the test (exit {proc.proc.returncode}): "
                f"{proc.describe()}\n{proc.log_tail(60)}"
            )
