"""Post-copy's moving parts at the two ends of the checkpoint link (issue #15).

- :class:`PageServer`, at the source: ``criu page-server --lazy-pages -D <full dump>`` serves
  the pages the destination lacks from the ordinary checkpoint on local disk, so that dump
  stays whole and a failed lazy phase can roll back from it as a cold migration does;
- :class:`LazyRestore`, at the destination: arms the ``qmig-runc`` runtime wrapper (a
  one-shot control file) so that podman's next ``runc restore`` starts ``criu lazy-pages``
  in the link namespace and restores with ``--lazy-pages``; then watches that daemon, which
  exits once every page has arrived;
- :func:`postcopy_support`: whether this machine can do it, else the one-line reason.

Every process here is bounded by ``timeout`` and stopped by its PID (or its own session).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .net import LabError

RUNTIME = "qmig-runc"
RUNTIME_PATH = Path("/usr/local/libexec/qmig/qmig-runc")
RUNTIME_DROPIN = Path("/etc/containers/containers.conf.d/qmig-runtime.conf")
RUNTIME_DIR = Path(os.environ.get("QMIG_RUNTIME_DIR", "/run/qmig/runtime"))
CRIU_FEATURES = Path("/run/qmig/criu-features")
PIPE_MAX_NEEDED = 4 * 1024 * 1024
PAGE_SERVER_PORT = 7998


def runtime_installed() -> bool:
    """The wrapper runtime is installed and registered with podman (by setup-containers.sh)."""
    return os.access(RUNTIME_PATH, os.X_OK) and RUNTIME in _read(RUNTIME_DROPIN)


def postcopy_support() -> str | None:
    """None if post-copy can run here, else the one-line reason it cannot."""
    if not runtime_installed():
        return (f"post-copy unavailable: the {RUNTIME} runtime wrapper is not installed "
                "(as root run: make setup)")  # fmt: skip
    features = _read(CRIU_FEATURES)
    if "uffd=yes" not in features:
        proc = _run(["criu", "check", "--feature", "uffd-noncoop"])
        if proc is None or proc.returncode != 0:
            return "post-copy unavailable: this kernel has no userfaultfd for CRIU (uffd-noncoop)"
    try:
        pipe_max = int(_read(Path("/proc/sys/fs/pipe-max-size")).strip())
    except ValueError:
        pipe_max = 0
    if pipe_max < PIPE_MAX_NEEDED:
        return (f"post-copy unavailable: fs.pipe-max-size is {pipe_max}, CRIU's page server "
                f"needs {PIPE_MAX_NEEDED} (as root run: make setup)")  # fmt: skip
    return None


def hybrid_note() -> str:
    return ("hybrid runs as post-copy: CRIU's pre-copy rounds need memory dirty tracking, which "
            "this kernel lacks (qmig's content-based pre-copy is --method precopy)")  # fmt: skip


# ---------------------------------------------------------------------- source
class PageServer:
    """``criu page-server --lazy-pages`` on a full dump directory, listening on the link
    (from network namespace ``ns`` if given: the source host's, with per-host Podman)."""

    def __init__(self, images: Path, address: str, port: int, timeout: float,
                 log: Path, ns: str | None = None) -> None:  # fmt: skip
        self.address, self.port, self.log = address, port, log
        cmd = ["timeout", "-s", "KILL", str(int(timeout) + 1), "criu", "page-server",
               "--lazy-pages", "-D", str(images), "--address", address, "--port", str(port),
               "-o", str(log), "-v2"]  # fmt: skip
        if ns is not None:
            cmd = ["nsenter", f"--net=/run/netns/{ns}", *cmd]
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise LabError(f"cannot start criu page-server: {exc}") from exc

    def wait_listening(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _listening(self.address, self.port, self.proc.pid):
                return
            if self.proc.poll() is not None:
                raise LabError(f"criu page-server exited ({self.proc.returncode}): "
                               f"{_tail(self.log)}")  # fmt: skip
            time.sleep(0.005)
        raise LabError(f"criu page-server not listening within {timeout:g} s")

    def finished(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        _stop_session(self.proc.pid, self.proc)


# ---------------------------------------------------------------------- destination
@dataclass
class LazyResult:
    rc: int | None
    faults: int  # page faults the daemon served while the broker ran
    pages: int  # pages it copied in (faults and background)


class LazyRestore:
    """Arm the wrapper for one lazy restore and follow the ``criu lazy-pages`` it starts."""

    def __init__(self, state: Path, netns: str, address: str, port: int, timeout: float) -> None:
        self.state = state
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
        self.control = RUNTIME_DIR / "lazy-restore"
        line = f"/run/netns/{netns} {address} {port} {int(timeout)} {state}\n"
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(line)
        tmp.rename(self.control)

    def disarm(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()

    @property
    def pid(self) -> int | None:
        try:
            return int(_read(self.state / "pid").strip())
        except ValueError:
            return None

    def rc(self) -> int | None:
        text = _read(self.state / "rc").strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def daemon_pid(self) -> int | None:
        """The ``criu lazy-pages`` process itself (under the wrapper's shell and ``timeout``)."""
        pid = self.pid
        for _ in range(3):
            if pid is None:
                return None
            kids = _children(pid)
            if not kids:
                return None
            pid = kids[0]
            if _read(Path(f"/proc/{pid}/comm")).strip() == "criu":
                return pid
        return None

    def wait(self, deadline: float, abort: float | None = None) -> int:
        """Block until the daemon exits (its rc), or raise LabError at ``deadline``."""
        while time.monotonic() < deadline:
            rc = self.rc()
            if rc is not None:
                return rc
            if self.pid is not None and not Path(f"/proc/{self.pid}").exists():
                raise LabError("the lazy-pages daemon vanished without an exit code")
            time.sleep(0.02)
        raise LabError("not every page arrived before the deadline")

    def result(self) -> LazyResult:
        work = _read(self.state / "work").strip()
        log = _read(Path(work) / "lazy-pages.log") if work else ""
        faults = len(re.findall(r"#PF at ", log))
        pages = sum(int(m) for m in re.findall(r"UFFD transferred pages: \((\d+)/", log))
        return LazyResult(self.rc(), faults, pages)

    def log_tail(self) -> str:
        work = _read(self.state / "work").strip()
        return _tail(Path(work) / "lazy-pages.log") if work else _tail(self.state / "daemon.out")

    def stop(self) -> None:
        self.disarm()
        pid = self.pid
        if pid is not None:
            _stop_session(pid)


# ---------------------------------------------------------------------- helpers
def _listening(address: str, port: int, pid: int | None = None) -> bool:
    """Something listens on address:port, in the network namespace of ``pid`` (or ours)."""
    want = f"{_hex_ip(address)}:{port:04X}"
    anywhere = f"00000000:{port:04X}"
    table = Path(f"/proc/{pid}/net/tcp") if pid else Path("/proc/net/tcp")
    for line in _read(table).splitlines()[1:]:
        cols = line.split()
        if len(cols) > 3 and cols[3] == "0A" and cols[1] in (want, anywhere):
            return True
    return False


def _hex_ip(address: str) -> str:
    return "".join(f"{int(b):02X}" for b in reversed(address.split(".")))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        out += [int(p) for p in _read(task / "children").split()]
    return out


def _stop_session(pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGKILL the session (process group) led by ``pid``; reap it if it is our child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        return
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        if _read(Path(f"/proc/{pid}/stat")).split(")")[-1].split()[:1] == ["Z"]:
            return
        time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path) -> str:
    lines = _read(path).strip().splitlines()
    return " | ".join(line.strip() for line in lines[-3:]) or "(no log)"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
