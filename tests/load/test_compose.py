"""compose/compose.yaml: up, telemetry flows from every sensor to the monitor, down, nothing left.

Needs root Podman, podman-compose and the broker image (``make image``); skipped otherwise.
Its names (project ``qmig-compose``) and network (198.18.60.0/24) are its own, apart from the
migration lab's, so it may run while the lab is up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "compose.yaml"
PROJECT = "qmig-compose"
IMAGE = os.environ.get("QMIG_IMAGE", "localhost/qmig-broker:latest")
SENSORS = ("quic-1", "quic-2", "tcp-1")
MONITOR = "qmig-compose-monitor"


def _podman_compose() -> list[str] | None:
    exe = Path(sys.executable).with_name("podman-compose")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("podman-compose")
    return [found] if found else None


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root Podman"
    if shutil.which("podman") is None:
        return "podman is not installed"
    if _podman_compose() is None:
        return "podman-compose is not installed (pip install -e '.[load]')"
    if subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True,
                      timeout=30).returncode != 0:  # fmt: skip
        return f"no broker image {IMAGE} (make image)"
    return None


def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [*(_podman_compose() or []), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def leftovers() -> list[str]:
    """Containers, networks and volumes of the compose project still on the machine."""
    found = []
    for cmd in (["podman", "ps", "-a", "--format", "{{.Names}}"],
                ["podman", "network", "ls", "--format", "{{.Name}}"],
                ["podman", "volume", "ls", "--format", "{{.Name}}"]):  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        found += [f"{cmd[1]} {name}" for name in out.split() if name.startswith(PROJECT)]
    return found


def monitor_saw() -> dict[str, set[int]]:
    """Sequence numbers the monitor printed, per sensor."""
    logs = subprocess.run(["podman", "logs", MONITOR], capture_output=True, text=True,
                          timeout=30).stdout  # fmt: skip
    seen: dict[str, set[int]] = {}
    for sensor, seq in re.findall(r'^telemetry/(\S+) \{.*"seq":(\d+)', logs, re.M):
        seen.setdefault(sensor, set()).add(int(seq))
    return seen


@pytest.mark.timeout(150)
def test_compose_up_telemetry_flows_down_leaves_nothing() -> None:
    why = _why_not()
    if why:
        pytest.skip(why)
    compose("down", "-v")  # what a crashed earlier run left
    try:
        up = compose("up", "-d")
        assert up.returncode == 0, up.stderr[-2000:]
        seen: dict[str, set[int]] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            seen = monitor_saw()
            if all(len(seen.get(s, ())) >= 3 for s in SENSORS):
                break
            time.sleep(1)
        assert all(len(seen.get(s, ())) >= 3 for s in SENSORS), f"monitor saw {seen}"
    finally:
        down = compose("down", "-v")
    assert down.returncode == 0, down.stderr[-2000:]
    assert leftovers() == []
