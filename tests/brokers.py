"""Broker processes for the interoperability tests.

The broker under test is selected with the ``QMIG_TEST_BROKER`` environment
variable: ``qmig`` (default) runs ``python -m qmig broker ...``; ``mosquitto``
runs ``/usr/sbin/mosquitto -c <generated config>`` so the suite itself can be
validated against a reference broker.

Every broker listens on loopback only, on free ports found by binding port 0,
with a plain TCP listener and a TLS listener.  Its stderr goes to a log file
whose tail is attached to failing test reports (see ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
KINDS = ("qmig", "mosquitto")
_READY_RE = re.compile(r"\bready\b", re.IGNORECASE)


class BrokerStartError(RuntimeError):
    """The broker process did not become ready."""


class UnsupportedOption(RuntimeError):
    """The selected broker cannot be configured with the requested option."""


def broker_kind() -> str:
    """The broker selected by ``QMIG_TEST_BROKER`` (default ``qmig``)."""
    kind = os.environ.get("QMIG_TEST_BROKER", "qmig").strip().lower() or "qmig"
    if kind not in KINDS:
        raise ValueError(f"QMIG_TEST_BROKER must be one of {KINDS}, not {kind!r}")
    return kind


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Terminate by PID, wait, kill if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)


def free_port(host: str = HOST) -> int:
    """A currently free TCP port on ``host`` (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class LabCerts:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=30,
    )


def _openssl_lab_certs(out_dir: Path) -> LabCerts:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost (openssl CLI)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = out_dir / "ca.key", out_dir / "ca.pem"
    key, csr, cert = out_dir / "server.key", out_dir / "server.csr", out_dir / "server.pem"
    ext = out_dir / "server.ext"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-subj", "/CN=qmig interop test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(ca_key), "-out", str(ca_cert),
        cwd=out_dir,
    )  # fmt: skip
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr),
        cwd=out_dir,
    )  # fmt: skip
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
        cwd=out_dir,
    )  # fmt: skip
    return LabCerts(ca_cert, cert, key)


def make_certs(out_dir: Path) -> LabCerts:
    """CA + server certificate for the TLS listener.

    Uses the project's ``broker.certs.make_lab_certs`` when that module exists,
    otherwise falls back to the openssl CLI.
    """
    if importlib.util.find_spec("broker.certs") is not None:
        from broker.certs import make_lab_certs  # type: ignore[import-not-found,unused-ignore]

        paths = make_lab_certs(out_dir)
        return LabCerts(Path(paths.ca_cert), Path(paths.server_cert), Path(paths.server_key))
    return _openssl_lab_certs(out_dir)


# --------------------------------------------------------------------------- processes


@dataclass
class BrokerProcess:
    """A running broker: what tests need to reach it, plus diagnostics."""

    kind: str
    workdir: Path
    certs: LabCerts
    extra: dict[str, Any] = field(default_factory=dict)
    host: str = HOST
    tcp_port: int = 0
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    argv: list[str] = field(default_factory=list)
    stopped: bool = False  # True once stop() was called: not running is then expected

    @property
    def cafile(self) -> str:
        return str(self.certs.ca_cert)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def describe(self) -> str:
        return (
            f"{self.kind} pid={self.pid} tcp={self.host}:{self.tcp_port} "
            f"tls={self.host}:{self.tls_port} extra={self.extra} log={self.log_path}"
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> BrokerProcess:
        last_error: Exception | None = None
        self.stopped = False
        for attempt in range(3):  # a free port may be grabbed by someone else meanwhile
            self.tcp_port, self.tls_port = free_port(self.host), free_port(self.host)
            while self.tls_port == self.tcp_port:
                self.tls_port = free_port(self.host)
            self.log_path = self.workdir / f"{self.kind}-{self.tcp_port}-{attempt}.log"
            self.argv = self._command()
            log = self.log_path.open("wb")
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            finally:
                log.close()
            try:
                self._wait_ready()
                return self
            except BrokerStartError as exc:
                last_error = exc
                self.stop()
                self.stopped = False
        raise BrokerStartError(f"{last_error}") from last_error

    def crashed(self) -> bool:
        """The process exited although nobody asked it to stop."""
        return self.proc is not None and not self.stopped and self.proc.poll() is not None

    def stop(self) -> None:
        self.stopped = True
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self.proc = proc  # keep returncode/pid visible for diagnostics

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerStartError(
                    f"{self.kind} exited with {self.proc.returncode} before ready "
                    f"({' '.join(self.argv)})\n--- log tail ---\n{self.log_tail()}"
                )
            if self._is_ready():
                return
            time.sleep(0.05)
        raise BrokerStartError(
            f"{self.kind} not ready after {READY_TIMEOUT:.0f}s ({' '.join(self.argv)})"
            f"\n--- log tail ---\n{self.log_tail()}"
        )

    def _is_ready(self) -> bool:
        if self.kind == "qmig" and not _READY_RE.search(self.log_text()):
            return False
        return all(_port_accepts(self.host, p) for p in (self.tcp_port, self.tls_port))

    # -- command lines ---------------------------------------------------------------

    def _command(self) -> list[str]:
        if self.kind == "qmig":
            return self._qmig_command()
        return [_mosquitto_binary(), "-c", str(self._write_mosquitto_conf())]

    def _qmig_command(self) -> list[str]:
        argv = [
            sys.executable, "-m", "qmig", "broker",
            "--host", self.host,
            "--tcp-port", str(self.tcp_port),
            "--tls-port", str(self.tls_port),
            "--mptcp-port", "0",
            "--quic-port", "0",  # default 14567/udp would clash between concurrent brokers
            "--cert", str(self.certs.server_cert),
            "--key", str(self.certs.server_key),
            "--sys-interval", "1",
            "--log-level", "DEBUG",
        ]  # fmt: skip
        for key, value in self.extra.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False and value is not None:
                argv += [flag, str(value)]
        return argv

    def _write_mosquitto_conf(self) -> Path:
        lines = [
            "per_listener_settings false",
            "persistence false",
            "sys_interval 1",
            "log_dest stderr",
            "log_type all",
            "connection_messages true",
            "log_timestamp true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # as root mosquitto would drop to user "mosquitto", who cannot read the
            # private pytest temp dir holding the certificates and generated files
            lines.append("user root")
        extra = dict(self.extra)
        if "password_file" in extra:
            lines.append(f"password_file {extra.pop('password_file')}")
            lines.append("allow_anonymous false")
        else:
            lines.append("allow_anonymous true")
        for key in ("acl_file", "max_packet_size", "max_keepalive"):
            if key in extra:
                lines.append(f"{key} {extra.pop(key)}")
        if extra:
            raise UnsupportedOption(f"mosquitto fixture cannot map options {sorted(extra)}")
        lines += [
            f"listener {self.tcp_port} {self.host}",
            f"listener {self.tls_port} {self.host}",
            f"certfile {self.certs.server_cert}",
            f"keyfile {self.certs.server_key}",
        ]
        conf = self.workdir / f"mosquitto-{self.tcp_port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf


def _mosquitto_binary() -> str:
    for candidate in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if candidate and Path(candidate).exists():
            return candidate
    raise BrokerStartError("mosquitto binary not found")


def _port_accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def mosquitto_supports(option: str) -> bool:
    return option in {"password_file", "acl_file", "max_packet_size", "max_keepalive"}


def start_broker_process(kind: str, workdir: Path, certs: LabCerts, **extra: Any) -> BrokerProcess:
    """Start a broker and wait until it is ready; raises BrokerStartError otherwise."""
    if kind == "mosquitto":
        unsupported = [k for k in extra if not mosquitto_supports(k)]
        if unsupported:
            raise UnsupportedOption(f"mosquitto fixture cannot map options {unsupported}")
    workdir.mkdir(parents=True, exist_ok=True)
    return BrokerProcess(kind=kind, workdir=workdir, certs=certs, extra=dict(extra)).start()


class BrokerFactory:
    """``start_broker(**extra)``: a dedicated broker for tests needing special config."""

    def __init__(self, kind: str, certs: LabCerts, workdir: Path) -> None:
        self.kind = kind
        self.certs = certs
        self.workdir = workdir
        self.started: list[BrokerProcess] = []

    def __call__(self, **extra: Any) -> BrokerProcess:
        try:
            proc = start_broker_process(
                self.kind, self.workdir / f"b{len(self.started)}", self.certs, **extra
            )
        except UnsupportedOption as exc:
            pytest.skip(f"{self.kind}: {exc}")
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()
