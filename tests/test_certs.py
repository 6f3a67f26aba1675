"""Lab certificates: a real TLS handshake over loopback verified against the generated CA."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509

from broker.certs import CertPaths, issue_client_cert, make_lab_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_lab_certs(tmp_path_factory.mktemp("pki"))


def _serve_once(ctx: ssl.SSLContext, family: int, host: str) -> tuple[int, threading.Thread, list]:
    """A one-connection TLS echo server on loopback; returns its port."""
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    seen: list = []

    def run() -> None:
        with srv:
            try:
                conn, _ = srv.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.append(tls.getpeercert())
                    tls.sendall(tls.recv(64))
            except (OSError, ssl.SSLError) as exc:
                seen.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread, seen


def _server_ctx(certs: CertPaths) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    return ctx


@pytest.mark.parametrize(
    ("family", "addr", "server_hostname"),
    [
        (socket.AF_INET, "127.0.0.1", "localhost"),
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
    ],
)
def test_handshake_verified_against_ca(
    certs: CertPaths, family: int, addr: str, server_hostname: str
) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 loopback")
    try:
        port, thread, _ = _serve_once(_server_ctx(certs), family, addr)
    except OSError:
        pytest.skip(f"cannot bind {addr}")
    client = ssl.create_default_context(cafile=str(certs.ca_cert))
    with (
        socket.create_connection((addr, port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(b"ping")
        assert tls.recv(64) == b"ping"
    thread.join(10)


def test_handshake_fails_for_other_ca_and_wrong_name(certs: CertPaths, tmp_path: Path) -> None:
    other = make_lab_certs(tmp_path / "other")
    for cafile, name in ((other.ca_cert, "localhost"), (certs.ca_cert, "example.test")):
        port, thread, _ = _serve_once(_server_ctx(certs), socket.AF_INET, "127.0.0.1")
        client = ssl.create_default_context(cafile=str(cafile))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client.wrap_socket(raw, server_hostname=name)
        thread.join(10)


def test_client_certificate_accepted_by_requiring_server(certs: CertPaths) -> None:
    cert, key = issue_client_cert(certs, "sensor-1")
    server = _server_ctx(certs)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(certs.ca_cert)
    port, thread, seen = _serve_once(server, socket.AF_INET, "127.0.0.1")
    client = ssl.create_default_context(cafile=str(certs.ca_cert))
    client.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"hi")
        assert tls.recv(64) == b"hi"
    thread.join(10)
    subject = dict(x[0] for x in seen[0]["subject"])
    assert subject["commonName"] == "sensor-1"


def test_files_and_permissions(certs: CertPaths) -> None:
    for key in (certs.server_key, certs.ca_key):
        assert key.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_idempotent_and_reuses_ca_for_new_hosts(tmp_path: Path) -> None:
    first = make_lab_certs(tmp_path)
    before = {p: p.read_bytes() for p in (first.ca_cert, first.server_cert, first.server_key)}
    again = make_lab_certs(tmp_path)
    assert {p: p.read_bytes() for p in before} == before and again == first

    make_lab_certs(tmp_path, hosts=["localhost", "198.18.1.2"])
    assert first.ca_cert.read_bytes() == before[first.ca_cert]  # CA kept, still trusted
    assert first.server_cert.read_bytes() != before[first.server_cert]

    first.server_key.write_text("garbage")  # broken files are replaced
    make_lab_certs(tmp_path, hosts=["localhost", "198.18.1.2"])
    assert b"PRIVATE KEY" in first.server_key.read_bytes()

    make_lab_certs(tmp_path, overwrite=True)
    assert first.ca_cert.read_bytes() != before[first.ca_cert]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_openssl_verifies_server_purpose(certs: CertPaths) -> None:
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(certs.ca_cert),
            "-purpose",
            "sslserver",
            str(certs.server_cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.interop
@pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto not installed",
)
def test_mosquitto_serves_and_clients_verify(certs: CertPaths, tmp_path: Path) -> None:
    """Mosquitto loads the files; mosquitto_pub --cafile and paho verify the chain."""
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
        f"cafile {certs.ca_cert}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mosquitto exited: {proc.stderr.read() if proc.stderr else ''}")
                threading.Event().wait(0.05)
        if shutil.which("mosquitto_pub"):
            pub = subprocess.run(
                [
                    "mosquitto_pub",
                    "-h",
                    "localhost",
                    "-p",
                    str(port),
                    "--cafile",
                    str(certs.ca_cert),
                    "-t",
                    "t",
                    "-m",
                    "hi",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            assert pub.returncode == 0, pub.stderr

        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cert-test")
        client.tls_set(ca_certs=str(certs.ca_cert))
        assert client.connect("localhost", port, keepalive=10) == mqtt.MQTT_ERR_SUCCESS
        info = client.publish("t", b"x", qos=1)
        client.loop_start()
        info.wait_for_publish(timeout=10)
        assert info.is_published()
        client.disconnect()
        client.loop_stop()
    finally:
        proc.terminate()
        proc.wait(10)
