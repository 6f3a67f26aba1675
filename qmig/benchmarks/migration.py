"""``qmig bench migration``: QUIC against TCP, TLS and MPTCP through the same live migration.

Every run is one :func:`~migration.lab.run.run_scenario` of the ``compare`` scenario in the
container lab: the broker container moves edge-a -> edge-b once while every *variant* is a
client of that same run, so all of them live through the same checkpoint and the same freeze:

- ``quic-proactive``, ``quic-reactive``, ``quic-pool-K``, ``quic-announce``: qmig's QUIC
  client following the broker with that strategy; ``K`` is where the destination stands in
  the broker's address pool (the pool is the broker's, so K rotates over the runs of a cell);
- ``tcp-paho``, ``tls-paho``: paho-mqtt 2.x (MQTT 5, session expiry 600 s), sent away with
  DISCONNECT 0x9D + Server Reference before the checkpoint; ``tcp``, ``mptcp``: qmig's own
  client likewise (MPTCP: an IPPROTO_MPTCP socket; CRIU cannot dump MPTCP, so it reconnects).
  All reconnecting clients retry 50 ms after the loss, then doubling to a 0.5 s cap.

The matrix is checkpoint-link rate x client access-link loss x broker state (idle, or N
persistent sessions with N retained messages loaded before the migration and checked after
it) x repeats.  Per run and variant: interruption (largest delivery gap spanning the freeze),
extra (interruption minus the broker's own freeze-to-resume), re-establishment (resume to the
QUIC path validated / the TCP CONNACK), messages lost and duplicated, reconnects; per run:
freeze, checkpoint bytes (raw and on the wire) and CPU time (see :class:`CpuSampler`).
Medians and p95 are over the runs of a cell (p95: linear interpolation between ranks).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from measure import percentile
from measure.cpu import CpuSampler, Proc, netns_inode

SCENARIO = "compare"
DESTINATION = "edge-b"
VARIANTS = ("quic-proactive", "quic-reactive", "quic-pool", "quic-announce",
            "tcp-paho", "tls-paho", "tcp", "mptcp")  # fmt: skip
QUICK_VARIANTS = ("quic-proactive", "quic-pool", "tcp-paho", "tcp", "mptcp")
LINKS = ("1gbit", "100mbit", "10mbit")
LOSSES = (0.0, 1.0, 3.0)
STATES = ("idle", "loaded")
SESSIONS = 1000
POOL_POSITIONS = (1, 2, 3)
REPEATS = 6  # a multiple of 3: every pool position gets as many runs
HEADLINE = ("tcp-paho", "quic-proactive")  # numerator (falls back to "tcp"), denominator
BASELINE = ("100mbit", 0.0)  # the cell the per-variant plot and the headline use first
REESTABLISH_WINDOW = 1.0  # seconds after the resume in which broker/client CPU is counted
LOAD_TIMEOUT = 120.0


# --------------------------------------------------------------------------- settings
@dataclass
class Settings:
    links: tuple[str, ...] = LINKS
    losses: tuple[float, ...] = LOSSES
    states: tuple[str, ...] = STATES
    variants: tuple[str, ...] = VARIANTS
    repeats: int = REPEATS
    pool_positions: tuple[int, ...] = POOL_POSITIONS
    sessions: int = SESSIONS
    rate: float | None = None  # messages/s per client; None: the scenario's
    settle: float | None = None  # seconds before and after the move; None: the scenario's
    # Reconnecting clients' retry schedule (first, max seconds); None: the scenario's.
    reconnect_delay: tuple[float, float] | None = None
    scenario: str = SCENARIO
    quick: bool = False
    method: str = "cold"  # how the broker's memory moves (qmig bench freeze compares them)

    def cells(self) -> list[tuple[str, float, str]]:
        return [(link, loss, state) for state in self.states for link in self.links
                for loss in self.losses]  # fmt: skip

    def state_label(self, state: str) -> str:
        return "idle" if state == "idle" else f"{self.sessions} sessions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke subset: link 100mbit, no loss, idle, "
                        f"{', '.join(QUICK_VARIANTS)}, 1 run")  # fmt: skip
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the JSON results to PATH, or to stdout without PATH",
    )
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"runs per cell (default {REPEATS}; 1 with --quick); the pool "
                        "position rotates over them")  # fmt: skip
    parser.add_argument("--report-dir", default=None, metavar="DIR",
                        help="write JSON, CSV, PNG plots and summary.md there (default "
                        "reports/bench-migration, none with --quick)")  # fmt: skip
    parser.add_argument(
        "--links", default=None, help=f"checkpoint link rates (default {','.join(LINKS)})"
    )
    parser.add_argument(
        "--losses", default=None, help="client access-link loss in percent (default 0,1,3)"
    )
    parser.add_argument("--states", default=None, help="broker states: idle, loaded (default both)")
    parser.add_argument(
        "--sessions",
        type=int,
        default=SESSIONS,
        help=f"sessions and retained messages of the loaded state ({SESSIONS})",
    )
    parser.add_argument(
        "--variants", default=None, help=f"clients to compare (default {','.join(VARIANTS)})"
    )
    parser.add_argument("--pool-positions", default=None,
                        help="destination's place(s) in the broker's pool, rotated over the "
                        "runs of a cell (default 1,2,3; 1 with --quick)")  # fmt: skip
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="messages per second per client (default: the scenario's, 100)",
    )
    parser.add_argument(
        "--retry",
        default=None,
        metavar="FIRST,MAX",
        help="reconnecting clients' retry schedule in seconds: first retry "
        "after FIRST, doubling up to MAX (default: the scenario's, 0.05,0.5); "
        "FIRST=MAX retries at a fixed interval",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds of traffic before and after the move (default 2)",
    )
    parser.add_argument(
        "--method",
        default="cold",
        help="how the broker's memory moves: cold (default), precopy, postcopy, hybrid "
        "(`qmig bench freeze` compares the methods themselves)",
    )


def _csv(text: str | None, default: Sequence[Any], kind: Callable[[str], Any] = str) -> tuple:
    if text is None:
        return tuple(default)
    return tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Raises ValueError on a value that makes no sense."""
    from migration.lab.net import parse_rate

    quick = bool(args.quick)
    s = Settings(
        links=_csv(args.links, ("100mbit",) if quick else LINKS),
        losses=_csv(args.losses, (0.0,) if quick else LOSSES, float),
        states=_csv(args.states, ("idle",) if quick else STATES),
        variants=_csv(args.variants, QUICK_VARIANTS if quick else VARIANTS),
        repeats=args.repeats if args.repeats is not None else (1 if quick else REPEATS),
        pool_positions=_csv(args.pool_positions, (1,) if quick else POOL_POSITIONS, int),
        sessions=args.sessions, rate=args.rate, settle=args.settle, quick=quick,
        method=args.method,
    )  # fmt: skip
    from migration.scenario import METHODS

    if s.method not in METHODS:
        raise ValueError(f"methods are {', '.join(METHODS)}")
    if args.retry is not None:
        delays = _csv(args.retry, (), float)
        if len(delays) != 2 or not 0 < delays[0] <= delays[1]:
            raise ValueError("--retry is FIRST,MAX seconds with 0 < FIRST <= MAX")
        s.reconnect_delay = (delays[0], delays[1])
    for link in s.links:
        if parse_rate(link) <= 0:
            raise ValueError(f"link rate {link!r}")
    if not all(0 <= x < 100 for x in s.losses):
        raise ValueError("loss is a percentage in [0, 100)")
    if not set(s.states) <= set(STATES):
        raise ValueError(f"states are {', '.join(STATES)}")
    unknown = set(s.variants) - set(VARIANTS)
    if unknown or not s.variants:
        raise ValueError(f"variants are {', '.join(VARIANTS)} (not {sorted(unknown)})")
    if s.repeats < 1 or s.sessions < 1 or not s.links or not s.losses or not s.states:
        raise ValueError("--repeats and --sessions must be >= 1, the lists non-empty")
    if not s.pool_positions or not all(1 <= p <= 3 for p in s.pool_positions):
        raise ValueError("pool positions are 1, 2 or 3")
    return s


# --------------------------------------------------------------------------- one run
def pool_order(hosts: Sequence[str], dest: str, position: int) -> tuple[str, ...]:
    """Host names with ``dest`` at ``position`` (1-based), the others in their order."""
    others = [h for h in hosts if h != dest]
    index = min(max(position, 1), len(hosts)) - 1
    return (*others[:index], dest, *others[index:])


def variant_name(client: str, pool_position: int | None) -> str:
    return f"{client}-{pool_position}" if client == "quic-pool" and pool_position else client


class LabGroups:
    """The lab's CPU groups for :class:`measure.cpu.CpuSampler`.

    - ``broker``: every process in the edge hosts' pod network namespaces (the broker, and
      CRIU's restore work done inside the restored task);
    - ``clients``: every process in the clients' namespace (the workload: all variants);
    - ``machinery``: the podman API service (with the runc and CRIU dump processes it reaps)
      and the lab containers' conmon processes (with the runc and CRIU restore they reap).
    """

    groups: tuple[str, ...] = ("broker", "clients", "machinery")

    def __init__(self, pod_netns: set[int], client_netns: int | None,
                 service_pid: int | None) -> None:  # fmt: skip
        self.pod_netns = pod_netns
        self.client_netns = client_netns
        self.service_pid = service_pid

    def classify(self, procs: Mapping[int, Proc]) -> dict[int, str]:
        out: dict[int, str] = {}
        parents: set[int] = set()
        for pid, proc in procs.items():
            if pid == self.service_pid:
                out[pid] = "machinery"
                continue
            ns = proc.netns
            if ns is None:
                continue
            if ns in self.pod_netns:
                out[pid] = "broker"
                ppid = proc.ppid
                if ppid is not None and ppid > 1:
                    parents.add(ppid)
            elif ns == self.client_netns:
                out[pid] = "clients"
        for pid in parents - set(out):
            if pid in procs and procs[pid].comm == "conmon":
                out[pid] = "machinery"
        return out


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class RunHooks:
    """``on_ready``/``on_lab`` of one run: load the state, sample CPU, check the state."""

    def __init__(self, settings: Settings, state: str, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.state = state
        self.say = say
        self.sampler: CpuSampler | None = None
        self.self_cpu0 = 0.0
        self.info: dict[str, Any] = {}

    def _in_clients(self, *args: str, timeout: float = LOAD_TIMEOUT) -> dict[str, Any]:
        from migration.lab.lab import CLIENT_NS
        from migration.lab.net import netns_exec

        cmd = netns_exec(CLIENT_NS, sys.executable, "-m", "migration.state_load", *args)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[2])  # fmt: skip
        try:
            return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {"ok": False, "errors": [proc.stderr.strip()[-300:] or "no output"]}

    def ready(self, lab: Any) -> None:
        from migration.lab.lab import CLIENT_NS, pod_name
        from migration.lab.net import run

        sc = lab.scenario
        host = lab.broker_host.address
        # MPTCP's path manager in the clients' namespace: accept extra subflows/addresses.
        run(["ip", "-n", CLIENT_NS, "mptcp", "limits", "set", "subflows", "2",
             "add_addr_accepted", "2"], check=False)  # fmt: skip
        ss = run(["ip", "netns", "exec", CLIENT_NS, "ss", "-HM"], check=False)
        self.info["mptcp_sockets"] = len([x for x in ss.stdout.splitlines() if x.strip()])
        if self.state == "loaded":
            n = self.settings.sessions
            t0 = time.monotonic()
            loaded = self._in_clients("--host", host, "--port", str(sc.ports.tcp),
                                      "--sessions", str(n))  # fmt: skip
            self.info["state_load"] = loaded
            self.say(f"state: {n} sessions + {n} retained messages loaded in "
                     f"{time.monotonic() - t0:.1f} s")  # fmt: skip
            if not loaded.get("ok"):
                raise RuntimeError(f"loading the broker state failed: {loaded.get('errors')}")
        pods = {netns_inode(f"/proc/{lab.podman_at(h).pod_infra_pid(pod_name(h))}/ns/net")
                for h in sc.hosts}  # fmt: skip
        client_ns = netns_inode(f"/run/netns/{CLIENT_NS}")
        service = lab.state.service_pid if lab.state else None
        self.sampler = CpuSampler(LabGroups({p for p in pods if p is not None}, client_ns, service))
        self.self_cpu0 = _self_cpu()
        self.sampler.start()

    def done(self, lab: Any) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.info["orchestrator_cpu_s"] = max(
                0.0, _self_cpu() - self.self_cpu0 - self.sampler.own_cpu_s
            )
        if self.state == "loaded":
            n = self.settings.sessions
            check = self._in_clients("--host", lab.broker_host.address, "--port",
                                     str(lab.scenario.ports.tcp), "--sessions", str(n),
                                     "--check")  # fmt: skip
            try:
                check["broker_sessions"] = int(lab.control("status")["sessions"])
            except Exception as exc:  # the figure is a cross-check, not the verdict
                check["broker_sessions_error"] = str(exc)
            self.info["state_check"] = check
            self.say(
                f"state after the move: {check.get('retained')} of {n} retained, "
                f"{check.get('sessions_present')}/{check.get('sessions_checked')} sampled "
                f"sessions present, broker holds {check.get('broker_sessions')} sessions"
            )

    def cpu(self, trigger: float, resume: float) -> dict[str, float | None]:
        """CPU (ms): the migration's machinery over the run; broker and clients from the
        trigger to ``REESTABLISH_WINDOW`` s after the resume."""
        s = self.sampler
        if s is None or not s.series:
            return {"machinery": None, "broker": None, "clients": None}
        until = resume + REESTABLISH_WINDOW
        machinery = s.total("machinery") + self.info.get("orchestrator_cpu_s", 0.0)
        return {"machinery": round(machinery * 1000, 1),
                "broker": round(s.between(trigger, until, "broker") * 1000, 1),
                "clients": round(s.between(trigger, until, "clients") * 1000, 1)}  # fmt: skip


def _reestablish(client: dict[str, Any], trigger: float, resume: float) -> float | None:
    """ms from the broker's resume to the client's path validated / CONNACK after the move."""
    if client.get("transport") == "quic":
        times = [r["validated_at"] for r in client.get("migrations") or ()
                 if r.get("validated_at") and r["validated_at"] >= trigger]  # fmt: skip
        times += [t for t, _ in client.get("moves") or () if t and t >= trigger]
    else:
        times = [t for e, t, *_ in client.get("connections") or ()
                 if e == "connected" and t >= trigger]  # fmt: skip
    return round((min(times) - resume) * 1000, 1) if times else None


def _notice(client: dict[str, Any], trigger: float) -> float | None:
    """ms from the trigger until the client learned the destination (QUIC frame / DISCONNECT)."""
    if client.get("transport") == "quic":
        times = [r["learned_at"] for r in client.get("migrations") or ()
                 if r.get("learned_at") and r["learned_at"] >= trigger]  # fmt: skip
    else:
        times = [t for e, t, *_ in client.get("connections") or ()
                 if e == "lost" and t >= trigger]  # fmt: skip
    return round((min(times) - trigger) * 1000, 1) if times else None


def summarize_run(result: dict[str, Any], pool_position: int | None,
                  variants: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """One run_scenario result -> the migration's figures and one row per variant."""
    (move,) = result["migrations"]
    timeline = move.get("timeline") or {}
    trigger = float(timeline.get("trigger", move["freeze_at"]))
    raw = {c["name"]: c for c in result["clients"]}
    rows = []
    for fig in move["clients"]:
        if fig["name"] not in variants:
            continue
        client = raw.get(fig["name"], {})
        rows.append({
            "variant": variant_name(fig["name"], pool_position),
            "transport": fig.get("transport"), "library": client.get("library", "qmig"),
            "interruption_ms": fig.get("interruption_ms"), "extra_ms": fig.get("extra_ms"),
            "reestablish_ms": _reestablish(client, trigger, move["resume_at"]),
            "notice_ms": _notice(client, trigger),
            "lost": fig.get("lost", 0), "duplicates": fig.get("duplicates", 0),
            "reconnects": fig.get("reconnects", 0),
            "errors": len(client.get("errors") or ()),
            "error_samples": list(client.get("errors") or ())[:2],
            "connections": [e[:2] for e in client.get("connections") or ()
                            if len(e) >= 2 and e[1] >= trigger - 1.0][:6],
        })  # fmt: skip
    migration = {k: move.get(k) for k in ("ok", "downtime_ms", "service_gap_ms",
                                          "checkpoint_bytes", "transfer_bytes",
                                          "transfer_mbit_s", "failed_at", "error")}  # fmt: skip
    timeline = move.get("timeline") or {}
    migration["timeline"] = {k: timeline[k] for k in FREEZE_BOUNDS if k in timeline}
    return {"migration": migration, "variants": rows, "trigger": trigger,
            "resume_at": move["resume_at"]}  # fmt: skip


def run_cell_once(settings: Settings, link: str, loss: float, state: str, repeat: int,
                  image: str, say: Callable[[str], None],
                  raw_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One lab run of one cell; never raises for a failed run (``ok`` False, ``error``).

    With ``raw_dir``, run_scenario's whole result (every client's traces) is kept there as
    ``<link>-<loss>-<state>-<repeat>.json.gz``."""
    from migration.lab.run import run_scenario
    from migration.scenario import Scenario

    base = Scenario.load(settings.scenario)
    clients = tuple(c for c in base.clients if c.name in settings.variants)
    position = None
    if "quic-pool" in settings.variants:
        position = settings.pool_positions[repeat % len(settings.pool_positions)]
    changes: dict[str, Any] = {"link_rate": link, "loss": loss, "clients": clients,
                               "migrations": (DESTINATION,), "method": settings.method}  # fmt: skip
    if position is not None:
        changes["pool_order"] = pool_order([h.name for h in base.hosts], DESTINATION, position)
    if settings.rate is not None:
        changes["rate"] = settings.rate
    if settings.settle is not None:
        changes["settle"] = settings.settle
    if settings.reconnect_delay is not None:
        changes["reconnect_delay"] = settings.reconnect_delay
    scenario = base.replace(**changes)
    hooks = RunHooks(settings, state, say)
    record: dict[str, Any] = {
        "link": link, "link_mbit": _mbit(link), "loss": loss,
        "state": settings.state_label(state), "repeat": repeat, "pool_position": position,
        "rate": scenario.rate, "reconnect_delay_s": list(scenario.reconnect_delay),
        "method": settings.method,
        "started": time.time(),
    }  # fmt: skip
    try:
        result = run_scenario(scenario, image, progress=say, on_ready=hooks.ready,
                              on_lab=hooks.done)  # fmt: skip
        if raw_dir is not None:
            raw_dir.mkdir(parents=True, exist_ok=True)
            name = f"{link}-{loss:g}-{state}-{repeat}.json.gz"
            record["raw"] = f"raw/{name}"
            with gzip.open(raw_dir / name, "wt") as f:
                json.dump(result, f, default=str)
        summary = summarize_run(result, position, settings.variants)
    except Exception as exc:  # one failed run must not lose the others' numbers
        say(f"run failed: {type(exc).__name__}: {exc}")
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}", variants=[],
                      migration={}, cpu_ms={}, **hooks.info)  # fmt: skip
        return record
    record.update(hooks.info)
    record["migration"] = summary["migration"]
    record["variants"] = summary["variants"]
    record["cpu_ms"] = hooks.cpu(summary["trigger"], summary["resume_at"])
    mig = summary["migration"]
    check = hooks.info.get("state_check")
    if not mig.get("ok"):
        record.update(ok=False, error=mig.get("error") or "the migration failed")
    elif check is not None and not check.get("ok"):
        record.update(ok=False, error=f"the broker state did not survive: {check}")
    elif _freeze_misread(mig):
        record.update(
            ok=False,
            error=f"the broker's own freeze ({mig['downtime_ms']} ms) lies "
            "outside the checkpoint and restore calls (service gap "
            f"{mig['service_gap_ms']} ms): its freeze watch saw another stall, so "
            "interruption - freeze is meaningless",
        )
    else:
        record["ok"] = True
    return record


# The orchestrator's marks that bound the broker's own freeze reading: it froze after the
# checkpoint call began and before the dump was done, and thawed after the transfer and
# before the restore call returned.
FREEZE_BOUNDS = ("freeze_start", "dump_done", "transfer_done", "resumed", "frozen", "thawed")
FREEZE_SLACK = 0.05  # s: the broker's ticker and the control calls


def _freeze_misread(migration: dict[str, Any]) -> bool:
    """The broker times its freeze itself (a 5 ms ticker); a CPU stall of the broker before
    the checkpoint can be taken for it.  The orchestrator's marks bound the true freeze: a
    reading outside them is a misread.  (Podman may take seconds between the checkpoint call
    and the actual freeze; that is no misread, and the broker serves QUIC clients meanwhile.)
    Without the marks, the service gap (checkpoint call to serving again) bounds it above."""
    t = migration.get("timeline") or {}
    if all(k in t for k in FREEZE_BOUNDS):
        return not (t["freeze_start"] - FREEZE_SLACK <= t["frozen"] <= t["dump_done"]
                    + FREEZE_SLACK and t["transfer_done"] - FREEZE_SLACK <= t["thawed"]
                    <= t["resumed"] + FREEZE_SLACK)  # fmt: skip
    down, gap = migration.get("downtime_ms"), migration.get("service_gap_ms")
    return bool(down and gap and down < 0.5 * gap)


def _mbit(link: str) -> float:
    from migration.lab.net import parse_rate

    return parse_rate(link) / 1e6


# --------------------------------------------------------------------------- aggregation
def _stat(values: Iterable[float | None]) -> dict[str, float | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"median": None, "p95": None}
    p95 = percentile(xs, 95)
    return {"median": round(statistics.median(xs), 1), "p95": round(p95, 1) if p95 else p95}


def _variant_key(name: str) -> tuple[int, str]:
    base = "quic-pool" if name.startswith("quic-pool") else name
    return (VARIANTS.index(base) if base in VARIANTS else len(VARIANTS), name)


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, link, loss, state): medians and p95 over the runs that went well
    (a failed run is counted in ``failed_runs``; its figures stay in the raw runs only)."""
    groups: dict[tuple[str, str, float, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    failed: dict[tuple[str, float, str], int] = {}
    for run in runs:
        cell = (run["link"], float(run["loss"]), run["state"])
        if not run.get("ok"):  # counted, and kept in "runs", but not in the statistics
            failed[cell] = failed.get(cell, 0) + 1
            continue
        for row in run.get("variants") or ():
            groups.setdefault((row["variant"], *cell), []).append((run, row))
    results: list[dict[str, Any]] = []
    for (variant, link, loss, state), items in groups.items():
        rows = [r for _, r in items]
        runs_ = [run for run, _ in items]
        mig = [run.get("migration") or {} for run in runs_]
        cpu = [run.get("cpu_ms") or {} for run in runs_]
        results.append({
            "variant": variant, "link": link, "loss": loss, "state": state,
            "transport": rows[0].get("transport"), "library": rows[0].get("library"),
            "runs": len(rows),
            "interruption_ms": _stat(r["interruption_ms"] for r in rows),
            "extra_ms": _stat(r["extra_ms"] for r in rows),
            "reestablish_ms": _stat(r.get("reestablish_ms") for r in rows),
            "notice_ms": _stat(r.get("notice_ms") for r in rows),
            "lost": sum(int(r.get("lost") or 0) for r in rows),
            "duplicates": sum(int(r.get("duplicates") or 0) for r in rows),
            "reconnects": sum(int(r.get("reconnects") or 0) for r in rows),
            "unrecovered": sum(1 for r in rows if r["interruption_ms"] is None),
            "freeze_ms": _stat(m.get("downtime_ms") for m in mig),
            "freeze_lag_ms": _stat(freeze_lag_ms(m) for m in mig),
            "checkpoint_bytes": _stat(m.get("checkpoint_bytes") for m in mig)["median"],
            "transfer_bytes": _stat(m.get("transfer_bytes") for m in mig)["median"],
            "cpu_ms": {k: _stat(c.get(k) for c in cpu)["median"]
                       for k in ("machinery", "broker", "clients")},
            "failed_runs": failed.get((link, loss, state), 0),
        })  # fmt: skip
    results.sort(key=lambda r: (_state_rank(r["state"]), -_mbit(r["link"]), r["loss"],
                                _variant_key(r["variant"])))  # fmt: skip
    return results


def freeze_lag_ms(migration: dict[str, Any]) -> float | None:
    """From the checkpoint call to the broker's actual freeze: TCP clients, sent away just
    before the call, are out of service for it; QUIC clients are served until the freeze."""
    t = migration.get("timeline") or {}
    if "frozen" not in t or "freeze_start" not in t:
        return None
    return round((t["frozen"] - t["freeze_start"]) * 1000, 1)


def _state_rank(label: str) -> int:
    return 0 if label == "idle" else 1


def _cell_rows(results: Sequence[dict[str, Any]], link: str, loss: float,
               state: str) -> dict[str, dict[str, Any]]:  # fmt: skip
    return {r["variant"]: r for r in results
            if r["link"] == link and r["loss"] == loss and r["state"] == state}  # fmt: skip


def headline(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """TCP reconnect / QUIC proactive: extra interruption (and whole interruption) ratios."""
    cells = sorted({(r["link"], r["loss"], r["state"]) for r in results},
                   key=lambda c: (_state_rank(c[2]), c[1], -_mbit(c[0])))  # fmt: skip
    per_cell = []
    for link, loss, state in cells:
        rows = _cell_rows(results, link, loss, state)
        usable = [rows[v] for v in (HEADLINE[0], "tcp")
                  if v in rows and rows[v]["extra_ms"]["median"] is not None]  # fmt: skip
        num = usable[0] if usable else None
        den = rows.get(HEADLINE[1])
        if not num or not den:
            continue
        ratio: dict[str, Any] = {
            "link": link,
            "loss": loss,
            "state": state,
            "numerator": num["variant"],
            "denominator": den["variant"],
        }
        for key in ("extra_ms", "interruption_ms"):
            a, b = num[key]["median"], den[key]["median"]
            ratio[key] = {
                "numerator": a,
                "denominator": b,
                "ratio": round(a / b, 2) if a is not None and b else None,
            }
        per_cell.append(ratio)
    if not per_cell:
        return {"cells": []}
    base = next((c for c in per_cell if (c["link"], c["loss"]) == BASELINE
                 and c["state"] == "idle"), per_cell[0])  # fmt: skip
    extra = [c["extra_ms"]["ratio"] for c in per_cell if c["extra_ms"]["ratio"] is not None]
    return {"baseline": base, "cells": per_cell,
            "extra_ratio_range": [min(extra), max(extra)] if extra else None}  # fmt: skip


def build_report(settings: Settings, runs: list[dict[str, Any]],
                 elapsed: float) -> dict[str, Any]:  # fmt: skip
    results = aggregate(runs)
    from client.client import RECONNECT_ATTEMPT_TIMEOUT
    from migration.scenario import Scenario
    from migration.workload import SESSION_EXPIRY

    return {
        "results": results,
        "headline": headline(results),
        "settings": {
            **asdict(settings),
            "destination": DESTINATION,
            "reconnect_delay_s": list(
                settings.reconnect_delay or Scenario.load(settings.scenario).reconnect_delay
            ),
            "reconnect_attempt_timeout_s": RECONNECT_ATTEMPT_TIMEOUT,
            "session_expiry_s": SESSION_EXPIRY,
            "cpu_window_after_resume_s": REESTABLISH_WINDOW,
        },
        "machine": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
        },
        "elapsed_s": round(elapsed, 1),
        "runs": runs,
    }


# --------------------------------------------------------------------------- files
CSV_FIELDS = ("variant", "link", "loss", "state", "transport", "library", "runs",
              "interruption_median_ms", "interruption_p95_ms", "extra_median_ms",
              "extra_p95_ms", "reestablish_median_ms", "reestablish_p95_ms",
              "notice_median_ms", "lost", "duplicates", "reconnects", "unrecovered",
              "freeze_median_ms", "freeze_lag_median_ms", "checkpoint_bytes", "transfer_bytes",
              "cpu_machinery_ms", "cpu_broker_ms", "cpu_clients_ms", "failed_runs")  # fmt: skip
RUN_FIELDS = ("link", "loss", "state", "repeat", "pool_position", "ok", "variant", "transport",
              "library", "interruption_ms", "extra_ms", "reestablish_ms", "notice_ms", "lost",
              "duplicates", "reconnects", "downtime_ms", "freeze_lag_ms", "checkpoint_bytes",
              "transfer_bytes",
              "cpu_machinery_ms", "cpu_broker_ms", "cpu_clients_ms")  # fmt: skip


def results_csv(results: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        flat = {k: r.get(k) for k in CSV_FIELDS if k in r}
        for key in ("interruption", "extra", "reestablish"):
            flat[f"{key}_median_ms"] = r[f"{key}_ms"]["median"]
            flat[f"{key}_p95_ms"] = r[f"{key}_ms"]["p95"]
        flat["notice_median_ms"] = r["notice_ms"]["median"]
        flat["freeze_median_ms"] = r["freeze_ms"]["median"]
        flat["freeze_lag_median_ms"] = (r.get("freeze_lag_ms") or {}).get("median")
        for k in ("machinery", "broker", "clients"):
            flat[f"cpu_{k}_ms"] = r["cpu_ms"][k]
        writer.writerow(flat)
    return out.getvalue()


def runs_csv(runs: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, RUN_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        common = {k: run.get(k) for k in ("link", "loss", "state", "repeat", "pool_position",
                                          "ok")}  # fmt: skip
        common.update(
            {
                k: (run.get("migration") or {}).get(k)
                for k in ("downtime_ms", "checkpoint_bytes", "transfer_bytes")
            }
        )
        common["freeze_lag_ms"] = freeze_lag_ms(run.get("migration") or {})
        common.update({f"cpu_{k}_ms": (run.get("cpu_ms") or {}).get(k)
                       for k in ("machinery", "broker", "clients")})  # fmt: skip
        for row in run.get("variants") or ():
            writer.writerow({**common, **row})
    return out.getvalue()


def _baseline_cell(results: Sequence[dict[str, Any]]) -> tuple[str, float]:
    cells = {(r["link"], r["loss"]) for r in results}
    if BASELINE in cells:
        return BASELINE
    return min(cells, key=lambda c: (c[1], abs(math.log10(_mbit(c[0]) / 100))))


def plot_report(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """interruption_by_variant.png, interruption_vs_link.png, interruption_vs_loss.png."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if not results:
        return paths
    states = sorted({r["state"] for r in results}, key=_state_rank)
    variants = sorted({r["variant"] for r in results}, key=_variant_key)
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    link0, loss0 = _baseline_cell(results)

    # 1. per variant in the baseline cell: interruption on top, extra below (median, p95)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.1 * len(variants) + 2), 8.0),
                             sharex=True, layout="constrained")  # fmt: skip
    width = 0.8 / len(states)
    for ax, key in zip(axes, ("interruption_ms", "extra_ms"), strict=True):
        for j, state in enumerate(states):
            rows = _cell_rows(results, link0, loss0, state)
            shown = [v for v in variants if v in rows and rows[v][key]["median"] is not None]
            xs = [variants.index(v) + (j - (len(states) - 1) / 2) * width for v in shown]
            meds = [rows[v][key]["median"] for v in shown]
            errs = [
                max(0.0, (rows[v][key]["p95"] or m) - m) for v, m in zip(shown, meds, strict=True)
            ]
            bars = ax.bar(xs, meds, width * 0.95, yerr=[[0] * len(errs), errs], capsize=3,
                          color=[colors[v] for v in shown], alpha=1.0 if j == 0 else 0.55,
                          label=state, hatch=None if j == 0 else "//")  # fmt: skip
            for bar, med in zip(bars, meds, strict=True):
                ax.annotate(f"{med:.0f}", (bar.get_x() + bar.get_width() / 2, med),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                            textcoords="offset points")  # fmt: skip
            freeze = next((rows[v]["freeze_ms"]["median"] for v in shown), None)
            if key == "interruption_ms" and freeze is not None:
                ax.axhline(freeze, color="black", ls="--" if j == 0 else ":", lw=0.9,
                           label=f"broker freeze, {state} ({freeze:.0f} ms)")  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if key == "interruption_ms" else "upper left")
    axes[0].set_ylabel("interruption (ms), median; whisker p95")
    axes[1].set_ylabel("extra = interruption - freeze (ms)")
    axes[1].set_xticks(range(len(variants)), variants, rotation=25, ha="right")
    axes[0].set_title(f"Per variant, checkpoint link {link0}, loss {loss0:g} %")
    path = out_dir / "interruption_by_variant.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    # 2./3. against link rate (at loss0) and against loss (at link0)
    for name, xkey, fixed, xlabel in (
        ("interruption_vs_link.png", "link", ("loss", loss0), "checkpoint link rate (Mbit/s)"),
        ("interruption_vs_loss.png", "loss", ("link", link0), "client access-link loss (%)"),
    ):  # fmt: skip
        fig, axes = plt.subplots(2, len(states), figsize=(6.0 * len(states), 7.5),
                                 squeeze=False, layout="constrained")  # fmt: skip
        for col, state in enumerate(states):
            state_rows = [r for r in results if r["state"] == state and r[fixed[0]] == fixed[1]]
            xs_all = sorted({_mbit(r["link"]) if xkey == "link" else r["loss"] for r in state_rows})
            for row_i, key in enumerate(("interruption_ms", "extra_ms")):
                ax = axes[row_i][col]
                for v in variants:
                    pts = sorted((_mbit(r["link"]) if xkey == "link" else r["loss"],
                                  r[key]["median"], r[key]["p95"])
                                 for r in state_rows if r["variant"] == v
                                 and r[key]["median"] is not None)  # fmt: skip
                    if pts:
                        x, med, p95 = zip(*pts, strict=True)
                        ax.plot(x, med, "o-", color=colors[v], label=v, ms=4)
                        ax.fill_between(x, med, [p or m for p, m in zip(p95, med, strict=True)],
                                        color=colors[v], alpha=0.08)  # fmt: skip
                if key == "interruption_ms":
                    fr = sorted({(_mbit(r["link"]) if xkey == "link" else r["loss"],
                                  r["freeze_ms"]["median"]) for r in state_rows
                                 if r["freeze_ms"]["median"] is not None})  # fmt: skip
                    if fr:
                        ax.plot(*zip(*fr, strict=True), "k--", lw=1, label="broker freeze")
                if xkey == "link" and xs_all:
                    ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(
                    (
                        "interruption"
                        if key == "interruption_ms"
                        else "extra (interruption - freeze)"
                    )
                    + " ms, median"
                )
                ax.set_title(
                    f"{state}, {fixed[0]} {fixed[1]:g}{' %' if fixed[0] == 'loss' else ''}"
                    if fixed[0] == "loss"
                    else f"{state}, link {fixed[1]}"
                )
                ax.grid(alpha=0.3)
            axes[0][col].legend(fontsize=7)
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{round(value) or 0}{unit}"  # no "-0"
    return f"{value}{unit}"


def _retry_text(delay: Sequence[float]) -> str:
    first, cap = (x * 1000 for x in delay)
    if first == cap:
        return f"retry every {first:g} ms after the loss"
    return f"retry {first:g} ms after the loss, doubling to {cap:g} ms"


def _lag_text(row: dict[str, Any]) -> str:
    lag = (row.get("freeze_lag_ms") or {}).get("median")
    return "" if lag is None else f", starting {_fmt(lag)} ms after the checkpoint call"


def summary_markdown(report: dict[str, Any], images: Sequence[str]) -> str:
    """The report's README: headline, setup, one table per cell, method, images."""
    s = report["settings"]
    results = report["results"]
    head = report["headline"]
    runs = report["runs"]
    rate = runs[0]["rate"] if runs else None
    lines = ["# qmig bench migration: QUIC vs TCP / TLS / MPTCP through a live container migration",
             ""]  # fmt: skip
    base = head.get("baseline")
    if base:
        e, i = base["extra_ms"], base["interruption_ms"]
        lines += [
            f"**Headline** (link {base['link']}, loss {base['loss']:g} %, {base['state']}): "
            f"{base['numerator']} (reconnect) / {base['denominator']}: extra interruption "
            f"{_fmt(e['numerator'])} / {_fmt(e['denominator'])} ms = **{_fmt_ratio(e['ratio'])}**"
            f"; whole interruption {_fmt(i['numerator'])} / {_fmt(i['denominator'])} ms = "
            f"{_fmt_ratio(i['ratio'])}.",
        ]  # fmt: skip
        if head.get("extra_ratio_range"):
            lo, hi = head["extra_ratio_range"]
            lines += ["", f"Over all {len(head['cells'])} cells the extra-interruption ratio "
                          f"ranges from {lo:g}x to {hi:g}x."]  # fmt: skip
    if report.get("note"):
        lines += ["", str(report["note"])]
    failed = sum(1 for r in runs if not r.get("ok"))
    lost = sum(r["lost"] for r in results)
    dups = sum(r["duplicates"] for r in results)
    lines += [
        "",
        f"{len(runs)} lab runs ({failed} failed), {len(results)} result rows; "
        f"{lost} messages lost, {dups} duplicated in all.  Machine: kernel "
        f"{report['machine']['kernel']}, {report['machine']['cpus']} CPUs, Python "
        f"{report['machine']['python']}; {report['elapsed_s']:g} s.",
        "",
        "## Setup",
        "",
        f"- One lab run per repeat and cell: scenario `{s['scenario']}`, the broker container "
        f"moves edge-a -> {s['destination']} once (Podman + CRIU, cold: checkpoint, gzip over "
        "the shaped checkpoint link, restore); every variant is a client of that same run, so "
        "all share one migration and one freeze.",
        f"- Matrix: checkpoint link {', '.join(s['links'])} x client access-link loss "
        f"{', '.join(f'{x:g} %' for x in s['losses'])} (nftables, both ways) x broker state "
        f"{', '.join(s['states'])} (loaded: {s['sessions']} persistent sessions, each "
        f"subscribed, + {s['sessions']} retained messages of 256 B, checked after the move) "
        f"x {s['repeats']} repeats.",
        f"- Each client publishes QoS 1 to its own topic at {_fmt(rate)} msg/s and is "
        "subscribed to it: every message crosses the migration twice.",
        f"- Reconnecting clients (paho-mqtt 2.x and qmig's client): DISCONNECT 0x9D with a "
        f"Server Reference (the destination host) right after the QUIC clients get "
        f"SERVER_MIGRATION, {_retry_text(s['reconnect_delay_s'])}, each attempt at most "
        f"{s['reconnect_attempt_timeout_s']:g} s; session expiry {s['session_expiry_s']} s, "
        "clean start only the first time.",
        f"- quic-pool-K: the destination is K-th in the broker's address pool; K rotates over "
        f"{s['pool_positions']} across the repeats of a cell (so each K has fewer runs).",
        "",
        "## Results",
        "",
        "Interruption: largest gap between deliveries that spans the broker's freeze; extra: "
        "interruption minus that freeze; re-est.: broker resume -> QUIC path validated or "
        "TCP CONNACK; notice: migration trigger -> the client learns the destination "
        "(TCP: the DISCONNECT; QUIC: SERVER_MIGRATION, but for pool the silence that starts "
        "its probing and for announce the broker speaking from its new address). "
        "Times in ms, median / p95 over runs; lost and dup summed over runs.",
    ]
    cells = []
    for r in results:
        cell = (r["link"], r["loss"], r["state"])
        if cell not in cells:
            cells.append(cell)
    for link, loss, state in cells:
        rows = list(_cell_rows(results, link, loss, state).values())
        rows.sort(key=lambda r: _variant_key(r["variant"]))
        r0 = rows[0]
        ck = r0["checkpoint_bytes"]
        tr = r0["transfer_bytes"]
        lines += [
            "",
            f"### link {link}, loss {loss:g} %, {state}",
            "",
            f"Broker freeze {_fmt(r0['freeze_ms']['median'])} / {_fmt(r0['freeze_ms']['p95'])} "
            f"ms{_lag_text(r0)}; checkpoint {_mb(ck)} ({_mb(tr)} on the link); CPU: migration "
            f"machinery {_fmt(r0['cpu_ms']['machinery'])} ms, broker "
            f"{_fmt(r0['cpu_ms']['broker'])} ms, clients {_fmt(r0['cpu_ms']['clients'])} ms"
            + (f"; **{r0['failed_runs']} failed run(s)**" if r0["failed_runs"] else "") + ".",
            "",
            "| variant | runs | interruption | extra | re-est. | notice | lost | dup | reconn |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in rows:

            def mp(key: str, r: dict[str, Any] = r) -> str:
                return f"{_fmt(r[key]['median'])} / {_fmt(r[key]['p95'])}"

            never = f" ({r['unrecovered']} never)" if r["unrecovered"] else ""
            lines.append(f"| {r['variant']} | {r['runs']} | {mp('interruption_ms')}{never} | "
                         f"{mp('extra_ms')} | {mp('reestablish_ms')} | "
                         f"{_fmt(r['notice_ms']['median'])} | {r['lost']} | {r['duplicates']} "
                         f"| {r['reconnects']} |")  # fmt: skip
    lines += [
        "",
        "Files: results.json (everything, each run included), results.csv (these rows), "
        "runs.csv (one row per run and variant), raw/*.json.gz (each run's client traces "
        "and migration timeline, as run_scenario returned them).",
    ]
    lines += ["", "## Plots", ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    lines += ["", "## Method notes", "", *METHOD_NOTES, ""]
    return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:g}x"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f} MB"


MPTCP_MAKE_BEFORE_BREAK = (
    "A make-before-break MPTCP variant is not possible without a kernel change: MPTCP moves "
    "a connection between paths, never between hosts.  A subflow opened to the destination "
    "before the checkpoint (MP_JOIN, or after an ADD_ADDR) carries the connection's token "
    "and must reach the kernel that holds the connection's keys and data sequence numbers; "
    "at the destination no such connection exists yet, so the join is reset.  Moving that "
    "state is what CRIU cannot do: it refuses MPTCP sockets outright, and the kernel has no "
    "repair mode for MPTCP like the TCP_REPAIR that CRIU's TCP support relies on.  It would "
    "take MPTCP socket repair in the kernel plus CRIU support; the restored broker could then "
    "accept a subflow at its new address, as a QUIC server validates a new path."
)

METHOD_NOTES = [
    "- **CPU time** is per run, shared by all variants (one broker, one client process): "
    "*machinery* = the podman API service plus the lab containers' conmon processes, each "
    "with the runc and CRIU processes they reaped (checkpoint and restore), plus the "
    "orchestrator (control calls, gzip, sending the checkpoint, the receiver process); "
    "*broker* = the processes in the edge hosts' pods and *clients* = the workload process, "
    f"both from the trigger to {REESTABLISH_WINDOW:g} s after the resume (they also serve "
    "the steady traffic meanwhile).  Sampled from /proc every 100 ms (the sampler's own CPU "
    "excluded), so the last 100 ms of a process that exits may be missed.",
    "- **Duplicates** are QoS 1 at-least-once redeliveries: paho resends every "
    "unacknowledged PUBLISH (DUP) after reconnecting, and the broker routes the copies it had "
    "already received before the disconnect.",
    "- **TCP's extra interruption** has three parts: its outage starts at the DISCONNECT, "
    "before the freeze (pre-checkpoint drains the TCP-family connections, and CRIU then takes "
    "a moment to freeze); after the resume it waits for its next retry (the capped backoff "
    "has reached 0.5 s during a freeze of a second or more: 0-0.5 s); then TCP (+TLS) and "
    "MQTT handshakes and the session's backlog.  QUIC clients keep their connection: the "
    "proactive one validates the new path within about one RTT of the resume.",
    "- **MPTCP**: the clients open IPPROTO_MPTCP sockets (the clients' namespace's path "
    "manager allows 2 subflows and 2 announced addresses, `ip mptcp limits`), but CRIU "
    "cannot dump MPTCP sockets, listening or established, so the broker closes them before "
    "the checkpoint and MPTCP clients reconnect like TCP ones.  " + MPTCP_MAKE_BEFORE_BREAK,
    "- **Fallback**: a reconnecting client whose referenced server stays unreachable for "
    "5 s also tries the server it came from (a rolled-back move): paho-mqtt (through the "
    "lab's connect hook) and qmig's client race both addresses on every attempt from then "
    "on, on the same retry schedule, so a freeze longer than 5 s costs them no detour.",
]


def write_report_dir(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json, results.csv, runs.csv, the PNGs and summary.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv",
             "runs_csv": out_dir / "runs.csv", "summary": out_dir / "summary.md"}  # fmt: skip
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths["csv"].write_text(results_csv(report["results"]))
    paths["runs_csv"].write_text(runs_csv(report["runs"]))
    images = plot_report(report["results"], out_dir)
    for image in images:
        paths[image.stem] = image
    paths["summary"].write_text(summary_markdown(report, [str(p) for p in images]))
    return paths


# --------------------------------------------------------------------------- command
def _log(msg: str) -> None:
    print(f"qmig bench migration: {msg}", file=sys.stderr, flush=True)


def render_table(report: dict[str, Any], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qmig bench migration: one live migration, every variant through it")
    for col in ("variant", "link", "loss", "state", "runs", "interrupt med/p95", "extra med/p95",
                "re-est. med", "lost", "dup", "freeze med"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("variant", "link", "state")
                         else "right", no_wrap=True)  # fmt: skip
    for r in report["results"]:
        i, e = r["interruption_ms"], r["extra_ms"]
        table.add_row(r["variant"], r["link"], f"{r['loss']:g}", r["state"], str(r["runs"]),
                      f"{_fmt(i['median'])}/{_fmt(i['p95'])}",
                      f"{_fmt(e['median'])}/{_fmt(e['p95'])}",
                      _fmt(r["reestablish_ms"]["median"]),
                      f"[red]{r['lost']}[/red]" if r["lost"] else "0", str(r["duplicates"]),
                      _fmt(r["freeze_ms"]["median"]))  # fmt: skip
    Console(file=file, width=140).print(table)
    base = report["headline"].get("baseline")
    if base:
        print(f"Headline: {base['numerator']} / {base['denominator']} extra interruption = "
              f"{_fmt_ratio(base['extra_ms']['ratio'])} (link {base['link']}, loss "
              f"{base['loss']:g} %, {base['state']})", file=file)  # fmt: skip


@dataclass
class Outcome:
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def run_bench(settings: Settings, image: str, report_dir: Path | None,
              say: Callable[[str], None] = _log) -> Outcome:  # fmt: skip
    """Every cell x repeat as one lab run; the report (and its directory if asked)."""
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    cells = settings.cells()
    total = len(cells) * settings.repeats
    for link, loss, state in cells:
        for repeat in range(settings.repeats):
            n = len(runs) + 1
            label = f"[{n}/{total}] link {link}, loss {loss:g} %, {settings.state_label(state)}"
            say(f"{label}, repeat {repeat + 1}/{settings.repeats}")
            record = run_cell_once(settings, link, loss, state, repeat, image,
                                   lambda m: say(f"  {m}"),
                                   raw_dir=report_dir / "raw" if report_dir else None)  # fmt: skip
            runs.append(record)
            worst = max((v["extra_ms"] or 0 for v in record["variants"]), default=None)
            say(
                f"  -> {'ok' if record['ok'] else 'FAILED'}: freeze "
                f"{_fmt(record['migration'].get('downtime_ms'))} ms, worst extra "
                f"{_fmt(worst)} ms, lost {sum(v['lost'] for v in record['variants'])}"
            )
    report = build_report(settings, runs, time.monotonic() - started)
    outcome = Outcome(report)
    if report_dir is not None:
        outcome.paths = write_report_dir(report, report_dir)
    return outcome


def complete(report: dict[str, Any], settings: Settings) -> list[str]:
    """What is missing or wrong: every variant in every cell, every run ok, nothing lost."""
    problems = []
    for run in report["runs"]:
        if not run.get("ok"):
            problems.append(f"run {run['link']}/{run['loss']:g}/{run['state']}/{run['repeat']} "
                            f"failed: {run.get('error')}")  # fmt: skip
    for link, loss, state in settings.cells():
        rows = _cell_rows(report["results"], link, float(loss), settings.state_label(state))
        bases = {"quic-pool" if v.startswith("quic-pool") else v for v in rows}
        for v in settings.variants:
            if v not in bases:
                problems.append(f"{v} missing at {link}/{loss:g}/{state}")
        for v, r in rows.items():
            if r["lost"]:
                problems.append(f"{v} lost {r['lost']} at {link}/{loss:g}/{state}")
            if r["unrecovered"]:
                problems.append(f"{v} never recovered in {r['unrecovered']} run(s)")
    return problems


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        _log(f"bad value: {exc}")
        return 2
    from migration.lab.lab import containers_unavailable

    reason = containers_unavailable()
    if reason:
        _log(f"containers unavailable: {reason}")
        return 2
    from migration.image import ensure_image

    report_dir = (Path(args.report_dir) if args.report_dir
                  else None if settings.quick else Path("reports/bench-migration"))  # fmt: skip
    image = ensure_image(Path(__file__).resolve().parents[2])
    outcome = run_bench(settings, image, report_dir)
    report = outcome.report
    text = json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2, default=str)
    if args.json == "-":
        render_table(report, sys.stderr)
        print(text)
    else:
        if args.json:
            Path(args.json).write_text(text + "\n")
        render_table(report, sys.stdout)
    if outcome.paths:
        _log(f"report: {outcome.paths['summary']}")
    problems = complete(report, settings)
    for problem in problems:
        _log(problem)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmig bench migration", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
