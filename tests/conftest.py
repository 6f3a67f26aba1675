"""Shared fixtures: the broker under test (qmig or mosquitto) as a real process.

``QMIG_TEST_BROKER=qmig|mosquitto`` picks the broker (default ``qmig``).
``broker`` is one session-wide process; ``start_broker(**extra)`` starts a
dedicated one with extra options (``max_packet_size=1024``, ``password_file=F``,
``acl_file=F``, ``max_keepalive=10``, ``redirect="host:port"``).  The tail of the
broker log is attached to the report of every failing test that used it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # make ``import brokers`` work however pytest imports us
    sys.path.insert(0, _TESTS_DIR)

from brokers import (  # noqa: E402
    BrokerFactory,
    BrokerProcess,
    LabCerts,
    broker_kind,
    make_certs,
    start_broker_process,
)

LOG_TAIL_LINES = 60


@pytest.fixture(scope="session")
def broker_kind_name() -> str:
    return broker_kind()


@pytest.fixture(scope="session")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> LabCerts:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def broker(
    broker_kind_name: str, lab_certs: LabCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """The session-wide broker (TCP + TLS listeners on free loopback ports)."""
    proc = start_broker_process(broker_kind_name, tmp_path_factory.mktemp("broker"), lab_certs)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def start_broker(
    broker_kind_name: str, lab_certs: LabCerts, tmp_path: Path
) -> Iterator[BrokerFactory]:
    factory = BrokerFactory(broker_kind_name, lab_certs, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def _brokers_used_by(item: pytest.Item) -> list[BrokerProcess]:
    found: list[BrokerProcess] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, BrokerProcess):
            found.append(value)
        elif isinstance(value, BrokerFactory):
            found.extend(value.started)
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for proc in _brokers_used_by(item):
            report.sections.append(
                (f"broker log tail ({proc.describe()})", proc.log_tail(LOG_TAIL_LINES))
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("interop") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(30))
