"""``qmig orchestrate`` as a process: its HTTP API, tokens, queue across restarts, metrics.

The inventory is a lab's whose lab is not up, so every move the orchestrator starts fails
at once ("the lab is not up") and is recorded as failed: the queue is held with
``/v1/pause`` where a test needs jobs to stay queued.  Each orchestrator process is stopped
by its PID (SIGTERM, or SIGKILL for the crash) and its state directory is the test's.  The
trigger test runs a real broker and a real QUIC client: the client's MIGRATION_TRIGGER
reaches the orchestrator through the broker's ``--orchestrator-url``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.certs import make_lab_certs
from broker.config import BrokerConfig
from broker.server import BrokerServer
from client.client import Client
from migration.lab.lab import Lab
from migration.scenario import Scenario

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class Orchestrator:
    """One ``qmig orchestrate`` process on free loopback ports."""

    def __init__(self, inventory: Path, state: Path) -> None:
        self.state = state
        self.log_path = state.parent / f"orchestrate-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmig", "orchestrate", "--inventory", str(inventory),
             "--state-dir", str(state), "--listen", f"{HOST}:0", "--triggers", f"{HOST}:0"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = re.search(r"ready; api (http://\S+) .*triggers (http://\S+)", self.log())
            if found:
                self.url, self.trigger_url = found.group(1), found.group(2)
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise AssertionError(f"qmig orchestrate not ready: {self.log()}")
        if self.proc.poll() is not None:
            self._log.close()
            raise AssertionError(f"qmig orchestrate exited: {self.log()}")
        self.token = (state / "api.token").read_text().strip()
        self.trigger_token = (state / "trigger.token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(
        self, verb: str, path: str, body: dict[str, Any] | None = None,
        token: str | None = "operator", base: str | None = None,
    ) -> tuple[int, Any]:  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if token is not None:
            value = {"operator": self.token, "trigger": self.trigger_token}.get(token, token)
            headers["Authorization"] = f"Bearer {value}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request((base or self.url) + path, data=data, method=verb,
                                         headers=headers)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode()
        return status, text if path == "/metrics" else json.loads(text)

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, body
        return body

    def wait_job(self, job_id: int, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}")
            if job["state"] not in ("queued", "running"):
                return dict(job)
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} still {job['state']}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    """The demo lab's inventory, with its lab (not up) under the test's directory; the
    orchestrator generates both its tokens (the lab's broker has none here)."""
    path = Lab(Scenario.load("demo"), tmp_path / "lab").write_inventory()
    data = yaml.safe_load(path.read_text())
    del data["orchestrator"]
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def orchestrators(inventory: Path, tmp_path: Path) -> Iterator[list[Orchestrator]]:
    started: list[Orchestrator] = []
    yield started
    for orch in started:
        orch.stop()


@pytest.fixture
def orch(inventory: Path, tmp_path: Path, orchestrators: list[Orchestrator]) -> Orchestrator:
    orchestrators.append(Orchestrator(inventory, tmp_path / "state"))
    return orchestrators[-1]


def test_every_request_needs_the_token(orch: Orchestrator) -> None:
    status, body = orch.call("GET", "/v1/status", token=None)
    assert status == 401 and body == {"error": "unauthorized"}
    assert orch.call("GET", "/v1/status", token="x" * 43)[0] == 401
    assert orch.call("GET", "/metrics", token=None)[0] == 401
    # The brokers' token sends triggers, and nothing else.
    status, body = orch.call("POST", "/v1/migrate", {"to": "edge-b"}, token="trigger")
    assert status == 403, body
    assert orch.call("GET", "/v1/status")[0] == 200
    # The trigger listener serves only POST /v1/triggers, whatever the token.
    assert orch.call("GET", "/v1/status", base=orch.trigger_url)[0] == 404
    assert "refused 127.0.0.1: wrong or missing token" in orch.log()
    # Tokens were generated, strong and private.
    for name in ("api.token", "trigger.token"):
        path = orch.state / name
        assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_text().strip()) >= 32


def test_status_hosts_and_one_migration_per_broker(orch: Orchestrator) -> None:
    assert orch.call("POST", "/v1/pause")[0] == 200
    status, body = orch.call("POST", "/v1/migrate", {"to": "edge-b"})
    assert status == 202 and body["job"]["dest"] == "edge-b" and body["job"]["id"] == 1
    status, body = orch.call("POST", "/v1/migrate", {"to": "edge-c", "broker": "lab"})
    assert status == 409 and body["error"] == "busy"
    assert orch.call("POST", "/v1/migrate", {"to": "edge-z"})[0] == 404
    assert orch.call("POST", "/v1/migrate", {"to": "edge-b", "method": "warp"})[0] == 400
    assert orch.call("POST", "/v1/migrate", {})[0] == 400
    status_ = orch.get("/v1/status")
    assert status_["brokers"]["lab"] == {"host": "edge-a", "busy": True}
    assert [j["id"] for j in status_["queue"]] == [1] and status_["paused"]
    hosts = {h["name"]: h for h in orch.get("/v1/hosts")["hosts"]}
    assert hosts["edge-a"]["brokers"] == ["lab"] and hosts["edge-b"]["address"] == "198.18.2.2"
    assert hosts["edge-b"]["link"]["address"] == "198.18.24.6"  # its own checkpoint link
    # Draining the broker's host while it is busy: marked, nothing queued twice.
    status, body = orch.call("POST", "/v1/drain", {"host": "edge-b"})
    assert status == 202 and [d["kind"] for d in body["decisions"]] == ["drain"]
    assert orch.get("/v1/hosts")["hosts"][1]["draining"]
    metrics = orch.get("/metrics")
    assert 'qmig_orchestrator_decisions_total{kind="refused",reason="busy"} 1.0' in metrics
    assert "qmig_orchestrator_queued 1.0" in metrics and "qmig_orchestrator_paused 1.0" in metrics
    # Resumed: the move runs, fails (no lab), and says why; the broker is free again.
    assert orch.call("POST", "/v1/resume")[0] == 200
    job = orch.wait_job(1)
    assert job["state"] == "failed" and "the lab is not up" in job["outcome"]["error"]
    assert not orch.get("/v1/status")["brokers"]["lab"]["busy"]
    history = orch.get("/v1/history?limit=20")["history"]
    kinds = [e["kind"] for e in history if "kind" in e]
    assert kinds[-3:] == ["resume", "started", "failed"]
    (outcome,) = [e["outcome"] for e in history if "outcome" in e]  # the figures, logged
    assert outcome["ok"] is False and "the lab is not up" in outcome["error"]


def test_the_queue_survives_a_crash_and_a_second_instance_is_refused(
    inventory: Path, tmp_path: Path, orchestrators: list[Orchestrator]
) -> None:
    state = tmp_path / "state"
    first = Orchestrator(inventory, state)
    orchestrators.append(first)
    first.call("POST", "/v1/pause")
    assert first.call("POST", "/v1/migrate", {"to": "edge-c"})[0] == 202
    # A second orchestrator on the same state would run moves alongside: it refuses.
    second = subprocess.run(
        [sys.executable, "-m", "qmig", "orchestrate", "--inventory", str(inventory),
         "--state-dir", str(state), "--listen", f"{HOST}:0"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert second.returncode == 2 and f"another orchestrator uses {state}" in second.stderr
    first.stop(signal.SIGKILL)  # a crash: no goodbye written

    again = Orchestrator(inventory, state)
    orchestrators.append(again)
    status = again.get("/v1/status")
    assert [(j["id"], j["dest"], j["state"]) for j in status["queue"]] == [(1, "edge-c", "queued")]
    assert status["paused"] and status["brokers"]["lab"]["busy"]
    assert again.call("POST", "/v1/migrate", {"to": "edge-b"})[0] == 409  # still one per broker
    history = again.get("/v1/history?limit=50")["history"]
    assert ("reloaded", 1) in [(e.get("kind"), e.get("job")) for e in history]
    again.call("POST", "/v1/resume")
    assert again.wait_job(1)["state"] == "failed"  # ran after the restart (no lab to move)
    # The audit log is append-only JSON lines: both lives of the orchestrator are in it.
    lines = (state / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r.get("kind") for r in records].count("start") == 2
    assert records[-1]["kind"] == "failed"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def test_a_clients_trigger_reaches_the_orchestrator_through_its_broker(
    orch: Orchestrator, tmp_path: Path
) -> None:
    orch.call("POST", "/v1/pause")  # keep the job queued, to look at it
    certs = make_lab_certs(tmp_path / "certs")
    config = BrokerConfig(
        host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=_free_udp_port(),
        cert=str(certs.server_cert), key=str(certs.server_key), sys_interval=0, name="lab",
        orchestrator_url=orch.trigger_url,
        orchestrator_token_file=str(orch.state / "trigger.token"),
    ).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        client = Client(HOST, config.quic_port, transport="quic", cafile=str(certs.ca_cert),
                        client_id="asker", reconnect=False)  # fmt: skip
        async with client:
            asked = time.time()
            await client.request_migration("198.18.3.2")  # edge-c's address
            for _ in range(200):
                queue = (await asyncio.to_thread(orch.get, "/v1/status"))["queue"]
                if queue:
                    break
                await asyncio.sleep(0.02)
        heard = time.time()
        assert server.migration.forwarder is not None
        assert server.migration.forwarder.counts["sent"] == 1
    finally:
        await server.stop()
    (job,) = queue
    assert (job["reason"], job["dest"], job["by"]) == ("trigger", "edge-c", "client asker")
    assert asked <= job["requested_at"] <= job["created_at"] <= heard
    history = orch.get("/v1/history?limit=10")["history"]
    (trigger,) = [e["trigger"] for e in history if "trigger" in e]
    assert trigger["client_id"] == "asker" and trigger["hint"] == "198.18.3.2"
    # A second ask right after: heard, judged (one trigger-made move per cooldown), and
    # not an HTTP error for the broker.
    status, body = orch.call("POST", "/v1/triggers", {"broker": "lab", "hint": "edge-b"},
                             token="trigger", base=orch.trigger_url)  # fmt: skip
    assert status == 200 and body["decision"]["reason"] == "cooldown"


def test_a_flood_of_idle_connections_costs_bounded_threads(orch: Orchestrator) -> None:
    from migration.orchestrator.api import MAX_REQUESTS

    host, port = orch.trigger_url.removeprefix("http://").rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(MAX_REQUESTS)]
    ask = {"broker": "lab", "hint": "nowhere"}
    try:
        time.sleep(0.3)
        # The trigger listener is full: one more request is closed without an answer ...
        with pytest.raises(OSError):
            orch.call("POST", "/v1/triggers", ask, token="trigger", base=orch.trigger_url)
        # ... and the operator's listener, another one, is not held up by it.
        assert orch.call("GET", "/v1/status")[0] == 200
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the slots come back as the idle connections end
        try:
            status, body = orch.call("POST", "/v1/triggers", ask, token="trigger",
                                     base=orch.trigger_url)  # fmt: skip
            break
        except OSError:
            assert time.monotonic() < deadline, "the trigger listener never recovered"
            time.sleep(0.1)
    assert status == 200 and body["decision"]["reason"] == "no_match"
    assert "requests in progress; closing new connections" in orch.log()


def test_a_schedule_moves_the_broker_on_time(
    inventory: Path, tmp_path: Path, orchestrators: list[Orchestrator]
) -> None:
    data = yaml.safe_load(inventory.read_text())
    data["policies"] = {"schedule": [{"broker": "lab", "every": 0.5,
                                      "hosts": ["edge-a", "edge-b"]}]}  # fmt: skip
    inventory.write_text(yaml.safe_dump(data))
    orch = Orchestrator(inventory, tmp_path / "state")
    orchestrators.append(orch)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        history = orch.get("/v1/history?limit=50")["history"]
        kinds = [(e.get("kind"), e.get("reason")) for e in history]
        if ("failed", "schedule") in kinds:
            break
        time.sleep(0.1)
    assert ("queued", "schedule") in kinds and ("started", "schedule") in kinds, kinds
    (job,) = [e for e in history if e.get("kind") == "queued"][:1]
    assert job["host"] == "edge-b" and job["by"] == "schedule"


def test_a_bad_inventory_or_state_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "inv.yaml"
    bad.write_text("hosts: {edge-a: {podman: 'http://x', address: 1.2.3.4, link: l}}\n"
                   "brokers: {}\n")  # fmt: skip
    for inventory in (bad, tmp_path / "missing.yaml"):
        run = subprocess.run(
            [sys.executable, "-m", "qmig", "orchestrate", "--inventory", str(inventory),
             "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert run.returncode == 2
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith("qmig orchestrate: error: ") and str(inventory) in line


async def test_pre_checkpoint_waits_for_a_trigger_on_its_way_to_the_orchestrator(
    tmp_path: Path,
) -> None:
    """No connection to the orchestrator may be open when CRIU dumps the broker: an
    orchestrator that takes 0.5 s to answer holds pre-checkpoint back until it has."""
    import http.server
    import threading

    answered: list[float] = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.5)
            answered.append(time.monotonic())
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    slow = http.server.ThreadingHTTPServer((HOST, 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    token = tmp_path / "trigger.token"
    token.write_text("abcdefghijklmnopqrstuvwxyz0123456789\n")
    certs = make_lab_certs(tmp_path / "certs")
    config = BrokerConfig(
        host=HOST, tcp_port=0, tls_port=0, mptcp_port=0, quic_port=_free_udp_port(),
        cert=str(certs.server_cert), key=str(certs.server_key), sys_interval=0,
        orchestrator_url=f"http://{HOST}:{slow.server_address[1]}",
        orchestrator_token_file=str(token),
    ).validate()  # fmt: skip
    server = BrokerServer(config)
    await server.start()
    try:
        client = Client(HOST, config.quic_port, transport="quic", cafile=str(certs.ca_cert),
                        client_id="asker", reconnect=False)  # fmt: skip
        async with client:
            await client.request_migration("edge-b")
            forwarder = server.migration.forwarder
            assert forwarder is not None
            for _ in range(100):  # the broker has accepted it and started the POST
                if server.migration.trigger_counts["accepted"]:
                    break
                await asyncio.sleep(0.01)
            assert not answered
            await server.migration.pre_checkpoint(None, grace=2.0)
            done = time.monotonic()
            assert answered and answered[0] <= done, (answered, forwarder.counts)
            assert forwarder.counts["sent"] == 1, forwarder.counts
            await server.migration.rollback(None)
    finally:
        await server.stop()
        slow.shutdown()
        slow.server_close()
