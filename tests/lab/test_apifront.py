"""An edge host's Podman API on the network (issue #17): mutual TLS in front of its socket.

The front (``python -m migration.lab.apifront``, a real process) stands before a unix-socket
HTTP server that answers as Podman's service does on ``/_ping`` and streams a large body as
a checkpoint export does; the lab's own Podman client (podman-py with the TLS adapter) is the
client.  Only a client with a certificate from the lab's Podman CA gets through; the client
only talks to a server with a certificate from that CA for the address it dialled.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.certs import CertPaths, issue_client_cert, issue_server_cert, make_lab_certs
from migration.lab.net import LabError
from migration.lab.podman import Api, ApiTls, _podman_client
from tests.brokers import free_port, stop_process

pytestmark = pytest.mark.timeout(60)

EXPORT = bytes(range(256)) * (24 * 1024)  # 6 MB, as a checkpoint export streams


class _Podmanish(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = b"OK" if self.path.endswith("/_ping") else EXPORT
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    lab = make_lab_certs(tmp_path / "lab", hosts=["localhost"])
    other = make_lab_certs(tmp_path / "other", hosts=["localhost"])
    return {
        "lab": lab,
        "other": other,
        "server": issue_server_cert(lab, "edge-a", ["127.0.0.1"]),
        "client": issue_client_cert(lab, "orchestrator"),
        "intruder": issue_client_cert(other, "intruder"),
    }


@pytest.fixture
def front(tmp_path: Path, pki: dict[str, Any]) -> Iterator[dict[str, Any]]:
    sock = tmp_path / "podman.sock"
    seen: list[str] = []
    handler = type("Handler", (_Podmanish,), {"seen": seen})
    server = _UnixHTTPServer(str(sock), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port("127.0.0.1")
    cert, key = pki["server"]
    log = tmp_path / "front.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "migration.lab.apifront", "--listen", f"127.0.0.1:{port}",
             "--socket", str(sock), "--cert", str(cert), "--key", str(key),
             "--ca", str(pki["lab"].ca_cert)],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        yield {"port": port, "seen": seen, "log": log}
    finally:
        stop_process(proc, timeout=10)
        server.shutdown()
        server.server_close()


def _tls(pki: dict[str, Any], client: str = "client", ca: str = "lab") -> ApiTls:
    cert, key = pki[client]
    return ApiTls(pki[ca].ca_cert, cert, key)


def test_the_orchestrators_certificate_reaches_podman(front: dict[str, Any],
                                                      pki: dict[str, Any]) -> None:  # fmt: skip
    client = _podman_client(Api(f"tcp://127.0.0.1:{front['port']}", _tls(pki)))
    assert client.ping() is True
    # a checkpoint-sized body streams through whole
    resp = client.api.get("/containers/broker/export", stream=True)
    digest, size = hashlib.sha256(), 0
    for chunk in resp.iter_content(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    assert (size, digest.hexdigest()) == (len(EXPORT), hashlib.sha256(EXPORT).hexdigest())
    assert front["seen"] == ["/v4.0.0/libpod/_ping", "/v4.0.0/libpod/containers/broker/export"]


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate",
                                 "a host's server certificate", "plain HTTP"])  # fmt: skip
def test_nobody_else_reaches_podman(front: dict[str, Any], pki: dict[str, Any], who: str) -> None:
    port = front["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        request = b"GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: x\r\n\r\n"
        if who == "plain HTTP":
            raw.sendall(request)
            try:
                answer = raw.recv(4096)
            except OSError:  # reset
                answer = b""
        else:
            ctx = ssl.create_default_context(cafile=str(pki["lab"].ca_cert))
            if who == "another CA's certificate":
                ctx.load_cert_chain(*pki["intruder"])
            if who == "a host's server certificate":  # same CA, but serverAuth only: a host
                ctx.load_cert_chain(*pki["server"])  # cannot drive another host's Podman
            try:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(request)  # TLS 1.3: the server judges the client after this
                    answer = tls.recv(4096)
            except (ssl.SSLError, OSError):
                answer = b""
    assert not answer.startswith(b"HTTP/"), answer
    time.sleep(0.2)
    assert front["seen"] == []  # not a byte reached Podman
    assert "apifront:" in front["log"].read_text()  # and the refusal is logged


def test_the_client_refuses_a_server_it_does_not_trust(front: dict[str, Any],
                                                       pki: dict[str, Any]) -> None:  # fmt: skip
    client = _podman_client(Api(f"tcp://127.0.0.1:{front['port']}", _tls(pki, ca="other")))
    with pytest.raises(Exception) as raised:
        client.api.get("/_ping")
    chain, exc = [], raised.value  # podman-py wraps what requests raised
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("CERTIFICATE_VERIFY_FAILED" in text for text in chain), chain
    assert front["seen"] == []


def test_a_podman_api_over_plain_tcp_is_refused() -> None:
    with pytest.raises(LabError, match="needs TLS"):
        _podman_client(Api("tcp://127.0.0.1:8888"))


def test_a_server_certificate_names_only_its_host(pki: dict[str, Any]) -> None:
    paths: CertPaths = pki["lab"]
    cert, _ = pki["server"]
    ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    from cryptography import x509

    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED
