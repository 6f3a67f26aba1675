"""A qmig broker subprocess with TCP, TLS, MPTCP and QUIC listeners on free loopback ports.

``qbroker`` is module-scoped: each test module gets its own broker, started with
``--log-level DEBUG`` and its stderr written to a log file that tests can search
(``QBroker.wait_log``).  The process is always stopped by PID in a finalizer; the tail
of its log is printed when it fails to start and attached to failing test reports.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.certs import CertPaths, make_lab_certs
from broker.config import BrokerConfig
from broker.server import BrokerServer
from tests.brokers import stop_process

HOST = "127.0.0.1"
READY_TIMEOUT = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL = 60


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A lab CA and server certificate for the module's in-process brokers."""
    return make_lab_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def make_broker(pki: CertPaths) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process QUIC brokers (``quic_port`` default: a free one); all stopped after."""
    started: list[BrokerServer] = []

    async def start(quic_port: int | None = None, **options: Any) -> BrokerServer:
        config = BrokerConfig(
            host=HOST, tcp_port=0, tls_port=0, mptcp_port=0,
            quic_port=quic_port or free_udp_port(), cert=str(pki.server_cert),
            key=str(pki.server_key), sys_interval=0, **options,
        ).validate()  # fmt: skip
        server = BrokerServer(config)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def subprocess_env() -> dict[str, str]:
    """The environment for ``python -m qmig ...``: the repo importable, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class QBroker:
    ca: str
    cert: str
    key: str
    log_path: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)  # more ``qmig broker`` options
    _log_file: object = field(default=None, repr=False)

    def port(self, transport: str) -> int:
        return self.ports[transport]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "qmig", "broker", "--host", HOST,
            "--tcp-port", str(self.ports["tcp"]), "--tls-port", str(self.ports["tls"]),
            "--mptcp-port", str(self.ports["mptcp"]), "--quic-port", str(self.ports["quic"]),
            "--cert", self.cert, "--key", self.key, "--log-level", "DEBUG", *self.extra_args,
        ]  # fmt: skip
        log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_file = log_file
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if "qmig broker: ready" in self.log():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        print(f"qmig broker did not become ready; log tail:\n{tail}", file=sys.stderr)
        raise RuntimeError(f"qmig broker did not become ready:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ log
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        return len(self.log())

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_since(self, offset: int) -> str:
        return self.log()[offset:]

    def wait_log(self, pattern: str, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log after offset ``since``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_since(since))
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{pattern!r} not in the broker log within {timeout} s; tail:\n"
                    f"{self.log_tail(30)}"
                )
            time.sleep(0.05)

    async def await_log(self, pattern: str, since: int = 0, timeout: float = 5.0) -> str:
        """Async :meth:`wait_log` for tests that run on the event loop."""
        import asyncio

        regex = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = regex.search(self.log_since(since))
            if found is not None:
                return found.group(0)
            if loop.time() >= deadline:
                raise AssertionError(
                    f"{pattern!r} not in the broker log within {timeout} s; tail:\n"
                    f"{self.log_tail(30)}"
                )
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def qbroker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QBroker]:
    """A qmig broker with every transport on free loopback ports, for one test module."""
    work = tmp_path_factory.mktemp("qbroker")
    certs = make_lab_certs(work / "certs")
    ports = {
        "tcp": free_tcp_port(),
        "tls": free_tcp_port(),
        "mptcp": free_tcp_port(),
        "quic": free_udp_port(),
    }
    broker = QBroker(
        ca=str(certs.ca_cert),
        cert=str(certs.server_cert),
        key=str(certs.server_key),
        log_path=work / "broker.log",
        ports=ports,
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        broker = getattr(item, "funcargs", {}).get("qbroker")
        if isinstance(broker, QBroker):
            alive = "running" if broker.alive() else "NOT running"
            report.sections.append((f"qmig broker log tail ({alive})", broker.log_tail()))
