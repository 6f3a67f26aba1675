"""Run a scenario end to end: lab up, clients on, migrations under traffic, figures, lab down.

This is what ``make demo`` does, what the lab tests assert on and what the migration
benchmark repeats: one function, so the three always describe the same thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from migration.report import figures_by_migration
from migration.scenario import Scenario
from migration.workload import BrokerTarget, WorkloadSpec

from .lab import CLIENT_NS, Lab, lab_lock
from .live import Migration, MigrationFailed
from .net import LabError, netns_exec

READY_TIMEOUT = 60.0  # seconds for a workload to connect its clients, plus PER_CLIENT each
STOP_TIMEOUT = 30.0  # seconds after its drain to disconnect and write its result, plus the same
PER_CLIENT = 1 / 50  # seconds: a QUIC fleet's handshake (or close), all processes together


def workload_spec(lab: Lab, drain: float = 2.0, ledger: bool = False) -> WorkloadSpec:
    sc = lab.scenario
    target = BrokerTarget(lab.broker_host.address, sc.ports.as_dict(), lab.cafile)
    return WorkloadSpec(
        target,
        sc.clients,
        rate=sc.rate,
        qos=sc.qos,
        drain=drain,
        reconnect_delay=sc.reconnect_delay,
        ledger=ledger,
    ).validate()


class WorkloadProcess:
    """``python -m migration.workload`` inside the clients' namespace, stopped by its PID."""

    def __init__(self, spec: WorkloadSpec, workdir: Path, ns: str = CLIENT_NS,
                 wait: bool = True) -> None:  # fmt: skip
        self.spec_path = workdir / "workload-spec.json"
        self.out_path = workdir / "workload-result.json"
        self.log_path = workdir / "workload.log"
        self.spec_path.write_text(spec.to_json())
        self.drain = spec.drain
        self.clients = len(spec.clients)
        cmd = netns_exec(ns, sys.executable, "-m", "migration.workload",
                         "--spec", str(self.spec_path), "--out", str(self.out_path))  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        if wait:
            self.wait_ready()

    def wait_ready(self, deadline: float | None = None) -> None:
        """Until it prints READY (by ``deadline``, monotonic; default: its own clients')."""
        assert self.proc.stdout is not None
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if deadline is None:
            deadline = time.monotonic() + ready_timeout(self.clients)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline().decode().strip()
                if line == "READY":
                    return
                if not line and self.proc.poll() is not None:
                    break
        self.kill()
        raise LabError(f"the client workload did not start: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "(no output)"
        return "(no log)"

    def stop(self, timeout: float | None = None) -> dict[str, Any]:
        """SIGTERM, let it drain and write its result, return that result (by ``timeout``
        after the drain; default 30 s plus 1/50 s per client, each disconnecting)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if timeout is None:
            timeout = STOP_TIMEOUT + self.clients * PER_CLIENT
        try:
            self.proc.wait(timeout=self.drain + timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):  # its stacks into the log (faulthandler)
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
            self.kill()
            # RESULT.json is written atomically once the clients are done: a process stuck
            # after it (asyncio.run's executor shutdown, seen with 250 QUIC clients) lost
            # nothing of the run.
            if not self.out_path.exists():
                raise LabError("the client workload did not stop in time") from None
        finally:
            self._log.close()
        try:
            return dict(json.loads(self.out_path.read_text()))
        except (OSError, ValueError) as exc:
            raise LabError(f"the client workload left no result: {self._log_tail()}") from exc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()


def ready_timeout(clients: int) -> float:
    """How long ``clients`` may take to connect: 10,000 QUIC handshakes on two cores take
    a minute or more, on top of a workload's start."""
    return READY_TIMEOUT + clients * PER_CLIENT


class WorkloadGroup:
    """The clients of a scenario dealt round robin to ``processes`` workload processes,
    started together (each in its own directory) and merged into one result."""

    def __init__(self, spec: WorkloadSpec, workdir: Path, processes: int) -> None:
        self.procs: list[WorkloadProcess] = []
        try:
            for i in range(processes):
                part = dataclasses.replace(spec, clients=spec.clients[i::processes])
                sub = workdir / f"workload-{i}"
                sub.mkdir()
                self.procs.append(WorkloadProcess(part, sub, wait=False))
            deadline = time.monotonic() + ready_timeout(len(spec.clients))
            for proc in self.procs:
                proc.wait_ready(deadline)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> dict[str, Any]:
        for proc in self.procs:  # all at once: their drains overlap
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        results = [proc.stop() for proc in self.procs]
        merged = dict(results[0])
        merged["clients"] = [c for r in results for c in r["clients"]]
        return merged

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()


def run_scenario(
    scenario: Scenario,
    image: str,
    *,
    fail_at: dict[int, str] | None = None,
    methods: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    on_ready: Callable[[Lab], None] | None = None,
    on_lab: Callable[[Lab], None] | None = None,
    workdir: Path | None = None,
    ledger: bool = False,
) -> dict[str, Any]:
    """Bring the lab up, run the clients, do the scenario's migrations, tear it all down.

    ``fail_at`` maps a migration's index to the step made to fail ("transfer"/"restore").
    ``methods`` gives each migration its own method (default: the scenario's for all).
    ``on_ready`` is called once the clients run, before the first migration, and ``on_lab``
    after the last one, both while the lab is up (tests use them to look at the broker).
    ``workdir`` (an empty directory) keeps the workload's spec, logs and results.
    ``ledger``: the clients account in bounded memory (:mod:`migration.ledger`), for runs
    of hours.
    Returns ``{"scenario", "migrations": [...with per-client figures...], "clients": [raw
    workload traces]}``.
    """
    say = progress or (lambda message: None)
    lab = Lab(scenario)
    workload: WorkloadGroup | None = None
    migrations: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(lab_lock(say=say))
        tmp = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="qmig-run-"))
        try:
            say(f"lab up: {len(scenario.hosts)} edge hosts, link {scenario.link_rate}, "
                f"loss {scenario.loss:g} %")  # fmt: skip
            lab.up(image)
            # Under loss, retransmissions (paho's especially) need longer to settle.
            drain = 6.0 if scenario.loss else 2.0
            spec = workload_spec(lab, drain, ledger)
            workload = WorkloadGroup(spec, Path(tmp), scenario.processes)
            levels = "/".join(str(q) for q in sorted({spec.qos_of(c) for c in spec.clients}))
            doing = (f"publishing {scenario.rate:g} msg/s each at QoS {levels}" if scenario.rate
                     else f"idle (connected, subscribed at QoS {levels})")  # fmt: skip
            say(f"{len(scenario.clients)} clients {doing}")
            if on_ready is not None:
                on_ready(lab)
            time.sleep(scenario.settle)
            for index, dest in enumerate(scenario.migrations):
                if dest == lab.broker_host.name and migrations:
                    # An earlier move rolled back, so the list is off by one: retry the move
                    # that failed, or go back where the broker came from.
                    last = migrations[-1]
                    dest = last["from"] if last.get("ok") else last["to"]
                method = methods[index] if methods else scenario.method
                migration = Migration(lab, dest, fail_at=(fail_at or {}).get(index),
                                      method=method, progress=say)  # fmt: skip
                try:
                    outcome = migration.run()
                except MigrationFailed as exc:
                    outcome = exc.outcome
                    say(str(exc))
                time.sleep(scenario.settle)
                migration.first_client_packet()
                outcome["freeze_at"], outcome["resume_at"] = _window(outcome["timeline"])
                migrations.append(outcome)
            if on_lab is not None:
                on_lab(lab)
            result = workload.stop()
            workload = None
        finally:
            if workload is not None:
                workload.kill()
            lab.down(quiet=True)
            say("lab down")
    rows = figures_by_migration(result["clients"], migrations)
    return {"scenario": scenario.name, "migrations": rows, "clients": result["clients"]}


def _window(timeline: dict[str, float]) -> tuple[float, float]:
    """The broker's frozen span: its own view if it reported one, else the orchestrator's."""
    if "frozen" in timeline and "thawed" in timeline:
        return timeline["frozen"], timeline["thawed"]
    start = timeline.get("freeze_start", timeline["trigger"])
    end = timeline.get("resumed", timeline.get("rolled_back", time.time()))
    return start, end
