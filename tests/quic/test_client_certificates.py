"""Finding 2 of issue #13: ``--require-certificate`` holds on QUIC as it does on TLS.

A broker started with ``--cafile CA --require-certificate`` must accept only clients that
present a certificate issued by CA for client authentication, whichever transport they use.
Before the fix, QUIC clients with no certificate, or a self-signed one, got CONNACK 0x00.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.certs import CertPaths, issue_client_cert, make_lab_certs
from client.client import Client, ClientError

from .conftest import REPO_ROOT, QBroker, free_tcp_port, free_udp_port, subprocess_env

pytestmark = pytest.mark.timeout(60)
TRANSPORTS = ("tls", "quic")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPaths]:
    root = tmp_path_factory.mktemp("pki")
    return {"lab": make_lab_certs(root / "lab"), "other": make_lab_certs(root / "other")}


@pytest.fixture(scope="module")
def strict_broker(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, CertPaths]
) -> Iterator[QBroker]:
    work = tmp_path_factory.mktemp("strict")
    lab = pki["lab"]
    broker = QBroker(
        ca=str(lab.ca_cert),
        cert=str(lab.server_cert),
        key=str(lab.server_key),
        log_path=work / "broker.log",
        ports={t: free_tcp_port() for t in ("tcp", "tls", "mptcp")} | {"quic": free_udp_port()},
        extra_args=["--cafile", str(lab.ca_cert), "--require-certificate"],
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def _client(broker: QBroker, transport: str, cert: tuple[Path, Path] | None) -> Client:
    return Client(
        "127.0.0.1", broker.port(transport), transport=transport, cafile=broker.ca,
        certfile=str(cert[0]) if cert else None, keyfile=str(cert[1]) if cert else None,
        reconnect=False, connect_timeout=5.0, client_id=f"cert-{transport}",
    )  # fmt: skip


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_certificate_from_the_ca_is_accepted(
    strict_broker: QBroker, pki: dict[str, CertPaths], transport: str
) -> None:
    cert = issue_client_cert(pki["lab"], f"sensor-{transport}")
    async with _client(strict_broker, transport, cert) as client:
        await client.subscribe("certs/ok", qos=1)
        await client.publish("certs/ok", b"signed", qos=1)
        message = await client.next_message(timeout=5)
        assert message.payload == b"signed"


def _bad_certificates(pki: dict[str, CertPaths]) -> dict[str, tuple[Path, Path] | None]:
    other = pki["other"]
    lab = pki["lab"]
    return {
        "none": None,
        "self-signed": (other.ca_cert, other.ca_key),
        "another CA": issue_client_cert(other, "intruder"),
        "not for clients": (lab.server_cert, lab.server_key),  # serverAuth only
    }


@pytest.mark.parametrize("case", ["none", "self-signed", "another CA", "not for clients"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_without_a_valid_certificate_gets_no_session(
    strict_broker: QBroker, pki: dict[str, CertPaths], transport: str, case: str
) -> None:
    cert = _bad_certificates(pki)[case]
    client = _client(strict_broker, transport, cert)
    with pytest.raises((ClientError, ConnectionError, OSError, TimeoutError)) as caught:
        await client.connect()
        # TLS 1.3 clients finish their side of the handshake before the server's verdict
        # arrives, so a refused certificate may surface at the first exchange instead.
        await client.publish("certs/bad", b"should not pass", qos=1)
    await client.disconnect()
    assert not client.connected
    if transport == "quic":  # QUIC carries the TLS alert's reason to the client
        assert "certificate" in str(caught.value)


def test_qmig_pub_presents_its_certificate_with_cert_and_key(
    strict_broker: QBroker, pki: dict[str, CertPaths]
) -> None:
    cert, key = issue_client_cert(pki["lab"], "cli-sensor")
    base = [sys.executable, "-m", "qmig", "pub", "-h", "127.0.0.1", "-p",
            str(strict_broker.port("quic")), "--cafile", strict_broker.ca, "-t", "certs/cli",
            "-m", "hello", "-q", "1"]  # fmt: skip

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                              text=True, timeout=30)  # fmt: skip

    signed = run([*base, "--cert", str(cert), "--key", str(key)])
    assert signed.returncode == 0, signed.stderr
    unsigned = run(base)
    assert unsigned.returncode != 0
    assert "certificate" in unsigned.stderr
