"""Finding 9 of issue #13: the control API's token must be strong, guesses are slowed, and
a broker exposed without a login says so.

- A token shorter than 32 characters (or of a handful of characters) is refused at start-up,
  from a file or from $QMIG_CONTROL_TOKEN, with a ConfigError that says what to do.
- Without a token the broker generates one into a 0600 file, and ``qmig ctl`` finds it.
- Each wrong token from an address waits longer for its answer than the one before, and
  guesses on parallel connections wait in line; refusals make one log line a minute.
- One WARNING line when the broker listens beyond loopback with anonymous clients allowed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from broker.config import BrokerConfig, ConfigError
from broker.control import ControlError, ControlServer
from broker.server import BrokerServer, Listener
from migration.control import control_request

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "t0ken-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _env(runtime: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QMIG_CONTROL_TOKEN", "QMIG_POOL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


@pytest.mark.parametrize("weak", ["x", "s3cret", "a" * 40, "ab" * 20])
def test_a_weak_token_is_refused_at_start(
    weak: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QMIG_CONTROL_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(weak + "\n")
    with pytest.raises(ConfigError, match=r"control token from .*token (is|uses)"):
        BrokerConfig(control_port=5000, control_token_file=str(token_file)).validate()
    monkeypatch.setenv("QMIG_CONTROL_TOKEN", weak)
    with pytest.raises(ConfigError, match=r"QMIG_CONTROL_TOKEN.*token_urlsafe"):
        BrokerConfig(control_port=5000, control_token=weak).validate()
    with pytest.raises(ValueError, match="token"):
        ControlServer(None, HOST, 0, weak)  # type: ignore[arg-type]
    BrokerConfig(control_port=5000, control_token=TOKEN).validate()  # a strong one is fine


def test_a_weak_token_stops_the_broker_with_one_line(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "broker", "--host", HOST, "--tcp-port", "0",
         "--tls-port", "0", "--mptcp-port", "0", "--quic-port", "0",
         "--control-port", str(_free_port()), "--control-token-file", str(token_file)],
        cwd=REPO_ROOT, env=_env(tmp_path / "run"), capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 2
    assert "3 characters long, at least 32" in done.stderr and "Traceback" not in done.stderr


def test_a_generated_token_works_with_qmig_ctl(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    port = _free_port()
    log_path = tmp_path / "broker.log"
    cmd = [sys.executable, "-m", "qmig", "broker", "--host", HOST, "--tcp-port", str(_free_port()),
           "--tls-port", "0", "--mptcp-port", "0", "--quic-port", "0", "--sys-interval", "0",
           "--control-port", str(port)]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(runtime), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while "qmig broker: ready" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        token_file = runtime / "qmig" / f"control-{port}.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in log_path.read_text()
        assert str(token_file) in log_path.read_text()  # the log says where it is
        ctl = [sys.executable, "-m", "qmig", "ctl", "--port", str(port), "status"]
        done = subprocess.run(ctl, cwd=REPO_ROOT, env=_env(runtime), capture_output=True,
                              text=True, timeout=15)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert '"state": "serving"' in done.stdout
        done = subprocess.run(ctl, cwd=REPO_ROOT, env=_env(tmp_path / "elsewhere"),
                              capture_output=True, text=True, timeout=15)  # fmt: skip
        assert done.returncode == 1 and "no token" in done.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_a_named_token_file_that_is_missing_is_generated(tmp_path: Path) -> None:
    token_file = tmp_path / "secrets" / "control.token"
    config = BrokerConfig(host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=0,
                          sys_interval=0, control_port=_free_port(),
                          control_token_file=str(token_file)).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        status = await control_request(HOST, config.control_port, token, "status")
        assert status["state"] == "serving"
    finally:
        await server.stop()
    again = BrokerConfig(control_port=config.control_port, control_token_file=str(token_file))
    assert again.validate().control_token == token  # the next start reads it


async def _timed(port: int, token: str) -> tuple[float, Any]:
    started = time.monotonic()
    try:
        result: Any = await control_request(HOST, port, token, "status", timeout=10.0)
    except ControlError as exc:
        result = exc
    return time.monotonic() - started, result


@pytest.fixture
async def control() -> Any:
    config = BrokerConfig(host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=0,
                          sys_interval=0, control_port=_free_port(),
                          control_token=TOKEN).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        yield config.control_port
    finally:
        await server.stop()


async def test_each_wrong_token_waits_longer(
    control: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmig.control")
    waits = []
    for _ in range(3):
        wait, result = await _timed(control, "wrong-" + uuid.uuid4().hex)
        assert isinstance(result, ControlError) and str(result) == "unauthorized"
        waits.append(wait)
    assert waits[2] >= 0.2, waits  # the third guess in a row waits (0.4 s here)
    assert waits[1] > waits[0]
    _, status = await _timed(control, TOKEN)
    assert status["state"] == "serving"  # the right token still gets in
    refusals = [r for r in caplog.records if "wrong or missing token" in r.getMessage()]
    assert len(refusals) == 1  # once per window, not per guess


async def test_guesses_in_parallel_wait_in_line(control: int) -> None:
    guesses = [_timed(control, "wrong-" + uuid.uuid4().hex) for _ in range(3)]
    waits = sorted(wait for wait, _ in await asyncio.gather(*guesses))
    assert waits[-1] >= 0.6, waits  # 0.1 + 0.2 + 0.4 s, one after the other


def test_an_exposed_anonymous_broker_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    def warnings(**settings: Any) -> list[str]:
        server = BrokerServer(BrokerConfig(sys_interval=0, **settings).validate())
        server.listeners["tcp"] = Listener("tcp", server.config.host, 1883)  # not opened
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qmig.broker"):
            server._warn_if_exposed()
        return [r.getMessage() for r in caplog.records]

    (line,) = warnings()  # the defaults: 0.0.0.0, anonymous allowed
    assert "0.0.0.0" in line and "anonymous" in line and "--password-file" in line
    assert warnings(host="127.0.0.1") == []
    assert warnings(host="::1") == []
    assert warnings(allow_anonymous=False) == []
