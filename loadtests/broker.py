"""A qmig broker as a subprocess on loopback, and locust as a subprocess, for the load drivers.

Both run as their own processes on purpose: the broker is what is measured (one
single-threaded Python process, as deployed), and locust monkey-patches the standard library
at import, which a driver that also runs subprocesses and timers must not inherit.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
REPO_ROOT = LOCUSTFILE.parent.parent


class LoadTestError(RuntimeError):
    """A broker or locust process did not start or did not end as it should."""


def free_port(kind: int = socket.SOCK_STREAM, host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    """Soft open-file limit up to the hard one: a thousand clients need a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; by this PID only."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class LoopbackBroker:
    """``python -m qmig broker`` on 127.0.0.1 with QUIC and TCP on free ports and fresh certs."""

    workdir: Path | None = None
    host: str = HOST
    extra_args: tuple[str, ...] = ()
    quic_port: int = 0
    tcp_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def cafile(self) -> str:
        assert self.workdir is not None
        return str(self.workdir / "certs" / "ca.crt")

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "broker.log"

    def start(self, timeout: float = 20.0) -> LoopbackBroker:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qmig-load-")
            self.workdir = Path(self._tmp.name)
        certs = self.workdir / "certs"
        if not (certs / "server.crt").exists():
            from broker.certs import make_lab_certs

            make_lab_certs(certs, hosts=["localhost", self.host])
        self.quic_port = self.quic_port or free_port(socket.SOCK_DGRAM, self.host)
        self.tcp_port = self.tcp_port or free_port(socket.SOCK_STREAM, self.host)
        cmd = [sys.executable, "-m", "qmig", "broker", "--host", self.host,
               "--tcp-port", str(self.tcp_port), "--tls-port", "0", "--mptcp-port", "0",
               "--quic-port", str(self.quic_port), "--cert", str(certs / "server.crt"),
               "--key", str(certs / "server.key"), "--sys-interval", "0",
               *self.extra_args]  # fmt: skip
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it; closed below
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO_ROOT,
                                         preexec_fn=raise_nofile)  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready" in self.log_path.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise LoadTestError(f"the broker did not start: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LoopbackBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()


def locust_command(
    *,
    host: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    quic_port: int,
    tcp_port: int,
    cafile: str = "",
    user_classes: tuple[str, ...] = (),
    msg_rate: float = 1.0,
    qos: int = 1,
    csv_prefix: str | Path | None = None,
    html: str | Path | None = None,
    trace_file: str | Path | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The headless ``locust`` command line for the telemetry users."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--host", host,
           "--quic-port", str(quic_port), "--tcp-port", str(tcp_port),
           "--msg-rate", str(msg_rate), "--qos", str(qos), "--only-summary"]  # fmt: skip
    if cafile:
        cmd += ["--cafile", cafile]
    if csv_prefix:
        cmd += ["--csv", str(csv_prefix), "--csv-full-history"]
    if html:
        cmd += ["--html", str(html)]
    if trace_file:
        cmd += ["--trace-file", str(trace_file)]
    return [*cmd, *extra, *user_classes]


def locust_env() -> dict[str, str]:
    """The environment for a locust child: the repo importable from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class LocustRun:
    """One headless locust child: start, wait until its users are connected, end, read trace.

    ``wrap`` prefixes the command (``ip netns exec qmig-cl`` for the lab).  Its output goes
    to ``<prefix>.log``; the trace to ``<prefix>-trace.json``.
    """

    def __init__(self, cmd: list[str], prefix: Path, trace: Path,
                 wrap: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.prefix = prefix
        self.trace_path = trace
        self.ready_path = trace.with_name(trace.name + ".ready")
        self.log_path = prefix.with_name(prefix.name + ".log")
        for stale in (trace, self.ready_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([*wrap, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                         env=locust_env(), preexec_fn=raise_nofile)  # fmt: skip

    def wait_ready(self, timeout: float) -> dict[str, object]:
        """Block until every spawned user is connected (locust writes ``<trace>.ready``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                with contextlib.suppress(ValueError):
                    return dict(json.loads(self.ready_path.read_text()))
            if self.proc.poll() is not None:
                raise LoadTestError(f"locust ended early (exit {self.proc.returncode}): "
                                    f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.1)
        raise LoadTestError(f"locust's users were not connected within {timeout:g} s")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LoadTestError(f"locust did not finish in {timeout:g} s; see "
                                f"{self.log_path}") from None  # fmt: skip

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: locust stops its users (they drain), writes its reports and exits."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)

    def trace(self) -> dict[str, object] | None:
        try:
            return dict(json.loads(self.trace_path.read_text()))
        except (OSError, ValueError):
            return None

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
