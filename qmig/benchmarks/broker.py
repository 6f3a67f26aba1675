"""``qmig bench broker``: qmig (over TCP, QUIC, QUIC bridge), amqtt and mosquitto side by side.

Every figure is measured on a freshly started broker process, with the load generator of
:mod:`qmig.benchmarks.loadgen` running in separate processes, over a bounded window that
follows a discarded warm-up.  CPU of the broker and of each load-generator process is taken
from ``psutil`` over that same window, so a report can say who was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .brokers import (
    ALL_BROKER_NAMES,
    BROKER_NAMES,
    HOST,
    BrokerUnavailable,
    RunningBroker,
    start_broker,
    version_of,
)
from .loadgen import Worker, raise_nofile

TESTS = ("qos0", "qos1", "qos1-persistent", "fanout", "latency", "connect", "rss")
"""qos1-persistent: the QoS 1 test with persistent sessions (clean session 0), so a durable
broker journals every message queued or in flight to the subscriber (issue #18)."""
_SATURATED_PCT = 85.0
_NOISY_PCT = 20.0
_GO_LEAD_S = 0.3


@dataclass
class Settings:
    duration: float = 5.0
    warmup: float = 1.0
    rss_clients: int = 1000
    fanout_subscribers: int = 10
    fanout_processes: int = 2
    window: int = 100
    latency_rate: float = 200.0
    connect_processes: int = 4  # load-generator processes at most; connectors share them
    # Issue #16: connect+subscribe with this many connectors at once (a fleet coming back
    # after an outage); the first count is also connect_subscribe_s, the historical figure.
    connectors: tuple[int, ...] = (4, 16, 64)
    resume: bool = False  # QUIC: also measure connectors resuming their TLS sessions
    flood_read_interval_s: float = 0.001
    # Slow brokers (amqtt) take QoS 0 floods in faster than they deliver and queue the rest;
    # 1-to-1 tests wait for that backlog so "lost" means lost, fan-out only reports it.
    drain_max_s: float = 30.0
    fanout_drain_max_s: float = 2.0
    log_dir: Path = Path(tempfile.gettempdir())

    def deadline_s(self) -> float:
        """Hard lifetime of a worker: start-up, warm-up, window, drain and some slack."""
        return 30.0 + self.warmup + self.duration + self.drain_max_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per test (default 5, or 1 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="discarded seconds before each window (default 1, 0.3 with --quick)",
    )
    parser.add_argument(
        "--brokers",
        default=",".join(BROKER_NAMES),
        help="comma-separated brokers to compare (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        default=",".join(TESTS),
        help="comma-separated tests to run (default: %(default)s)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="connected clients for the RSS test (default 1000, 100 with --quick)",
    )
    parser.add_argument(
        "--connectors",
        default="4,16,64",
        help="comma-separated counts of concurrent connectors for the connect test "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="connect test over QUIC: also measure reconnects that resume their TLS session "
        "from the broker's session ticket",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 1 s per test and 100 clients for RSS"
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the JSON report to PATH, or to stdout without PATH",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="where broker and worker logs go (default: a temporary folder)",
    )


def _settings(args: argparse.Namespace, log_dir: Path) -> Settings:
    quick = bool(args.quick)
    return Settings(
        duration=args.duration if args.duration is not None else (1.0 if quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.3 if quick else 1.0),
        rss_clients=args.clients if args.clients is not None else (100 if quick else 1000),
        connectors=_counts(args.connectors),
        resume=bool(args.resume),
        log_dir=log_dir,
    )


def _counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(c) for c in str(text).split(",") if c.strip())
    if not counts or min(counts) < 1:
        raise SystemExit(f"--connectors wants positive counts, got {text!r}")
    return counts


# --------------------------------------------------------------------------- measuring


def _go(s: Settings) -> dict[str, Any]:
    start = time.monotonic() + _GO_LEAD_S
    warm_end = start + s.warmup
    return {"cmd": "go", "start": start, "warm_end": warm_end, "stop": warm_end + s.duration}


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for label, p in procs.items():
        try:
            t = p.cpu_times()
            out[label] = t.user + t.system
        except psutil.Error:
            out[label] = math.nan
    return out


def _machine_seconds() -> dict[str, float]:
    """System-wide CPU seconds: process time, interrupt time (loopback TCP runs much of its
    work in softirq), and time the hypervisor stole from this VM."""
    t = psutil.cpu_times()
    return {
        "process": t.user + t.nice + t.system,
        "irq_softirq": getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0),
        "steal": getattr(t, "steal", 0.0),
    }


def _cpu_window(go: dict[str, Any], procs: dict[str, psutil.Process]) -> dict[str, Any]:
    """CPU% (of one core) of each process over the measured window, and who saturates.

    ``other_processes`` is process time on the machine that none of ours used: on a shared
    box it tells whether a figure was squeezed by someone else's work.
    """
    _sleep_until(go["warm_end"])
    t0, c0, m0 = time.monotonic(), _cpu_seconds(procs), _machine_seconds()
    _sleep_until(go["stop"])
    t1, c1, m1 = time.monotonic(), _cpu_seconds(procs), _machine_seconds()
    wall = t1 - t0
    pct = {k: round(100 * (c1[k] - c0[k]) / wall, 1) for k in procs}
    ours = sum(v for v in pct.values() if not math.isnan(v))
    machine = {k: 100 * (m1[k] - m0[k]) / wall for k in m0}
    others = max(0.0, round(machine["process"] - ours, 1))
    extra = {
        "other_processes": others,
        "irq_softirq": round(machine["irq_softirq"], 1),
        "steal": round(machine["steal"], 1),
    }
    busy = ours + sum(extra.values())
    return {**pct, **extra, "saturates": _saturation(pct, others, busy)}


def _saturation(pct: dict[str, float], others: float, busy: float) -> str:
    """Name the process near 100% of a core, and say when the whole machine is full."""
    busiest = max(pct, key=lambda k: pct[k] if not math.isnan(pct[k]) else -1)
    total = busy
    cores = psutil.cpu_count() or 1
    parts = []
    if pct[busiest] >= _SATURATED_PCT:
        parts.append(f"{busiest} ({pct[busiest]:.0f}% of a core)")
    else:
        parts.append(f"none (busiest: {busiest} {pct[busiest]:.0f}%)")
    if total >= 0.9 * 100 * cores:
        parts.append(f"all {cores} cores busy ({total:.0f}%)")
    if others >= _NOISY_PCT:
        parts.append(f"other processes used {others:.0f}%")
    return "; ".join(parts)


def _spec(role: str, b: RunningBroker, s: Settings, **kw: Any) -> dict[str, Any]:
    return {
        "role": role,
        "host": HOST,
        "port": b.port,
        "transport": b.transport,
        "deadline_s": s.deadline_s(),
        "drain_max_s": s.drain_max_s,
        "drain_idle_s": 1.0,
        **kw,
    }


def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(n, parts))
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def _pubsub(
    b: RunningBroker,
    s: Settings,
    *,
    qos: int,
    subscribers: int = 1,
    sub_processes: int = 1,
    rate: float | None = None,
    persistent: bool = False,
) -> dict[str, Any]:
    """One publisher process against subscriber process(es) on one topic; ``persistent``:
    every client's session outlives its connection (clean session 0)."""
    topic = "bench/t"
    latency = rate is not None
    workers: list[Worker] = []
    try:
        subs = []
        for k, n in enumerate(_split(subscribers, sub_processes)):
            # Only QoS 0 floods batch their reads: QoS 1 acks and latency need prompt reads.
            interval = s.flood_read_interval_s if qos == 0 and not latency else 0.0
            spec = _spec(
                "sub",
                b,
                s,
                topic=topic,
                qos=qos,
                connections=n,
                client_id=f"bench-sub{k}",
                latency=latency,
                read_interval_s=interval,
                persistent=persistent,
            )
            if subscribers > 1:
                spec["drain_max_s"] = s.fanout_drain_max_s
            subs.append(Worker(f"{b.name}-sub{k}", spec, s.log_dir))
            workers.append(subs[-1])
        for w in subs:
            w.expect("ready", 30)
        mode = "rate" if latency else ("flood" if qos == 0 else "window")
        pub = Worker(
            f"{b.name}-pub",
            _spec(
                "pub",
                b,
                s,
                topic=topic,
                qos=qos,
                mode=mode,
                window=s.window,
                rate=rate,
                client_id="bench-pub",
                persistent=persistent,
            ),
            s.log_dir,
        )
        workers.append(pub)
        pub.expect("ready", 30)
        go = _go(s)
        for w in workers:
            w.send(go)
        procs = {"broker": b.ps, **b.helper_ps(), "publisher": psutil.Process(pub.pid)}
        for k, w in enumerate(subs):
            procs["subscriber" if len(subs) == 1 else f"subscriber{k + 1}"] = psutil.Process(w.pid)
        cpu = _cpu_window(go, procs)
        wait = s.drain_max_s + 15
        pub_res = pub.expect("result", wait)
        for w in subs:
            w.send({"cmd": "sent", "n": pub_res["sent"]})
        sub_res = [w.expect("result", wait) for w in subs]
    finally:
        for w in workers:
            w.stop()
    unique = [u for r in sub_res for u in r["unique"]]
    return {
        "rate": sum(r["rate"] for r in sub_res),
        "sent": pub_res["sent"],
        "received": sum(r["received"] for r in sub_res),
        "lost": sum(max(0, pub_res["sent"] - u) for u in unique),
        "duplicates": sum(r["duplicates"] for r in sub_res),
        "latency_ms": sub_res[0].get("latency_ms"),
        "cpu": cpu,
    }


def _connect_rate(
    b: RunningBroker, s: Settings, connectors: int, resume: bool = False
) -> dict[str, Any]:
    """``connectors`` back-to-back connect+subscribe loops, spread over a few processes."""
    workers = []
    try:
        for k, n in enumerate(_split(connectors, s.connect_processes)):
            spec = _spec("connsub", b, s, client_id=f"bench-cs{k}", connectors=n, resume=resume)
            workers.append(Worker(f"{b.name}-connsub{connectors}-{k}", spec, s.log_dir))
        for w in workers:
            w.expect("ready", 30)
        go = _go(s)
        for w in workers:
            w.send(go)
        procs = {"broker": b.ps, **b.helper_ps()}
        procs.update({f"client{k + 1}": psutil.Process(w.pid) for k, w in enumerate(workers)})
        cpu = _cpu_window(go, procs)
        res = [w.expect("result", s.drain_max_s + 15) for w in workers]
    finally:
        for w in workers:
            w.stop()
    rate = sum(r["rate"] for r in res)
    count = sum(r["count"] for r in res)
    out = {
        "rate": rate,
        "connections": count,
        "failures": sum(r["failures"] for r in res),
        "errors": [e for r in res for e in r["errors"]][:3],
        "cpu": cpu,
        # Broker CPU seconds over the window / connections in it (issue #16's figure).
        "broker_cpu_ms_per_connection": (
            cpu["broker"] / 100 / rate * 1000 if rate > 0 and math.isfinite(cpu["broker"]) else None
        ),
    }
    if resume:
        out["resumed"] = sum(r.get("resumed", 0) for r in res)
    return out


def _rss(b: RunningBroker, s: Settings) -> dict[str, Any]:
    time.sleep(1.0)  # let start-up allocations settle before calling it idle
    idle = b.rss_mb()
    spec = _spec("hold", b, s, clients=s.rss_clients, client_id="bench-hold")
    spec["deadline_s"] += 60 + s.rss_clients / 50
    w = Worker(f"{b.name}-hold", spec, s.log_dir)
    try:
        ready = w.expect("ready", 60 + s.rss_clients / 50)
        time.sleep(1.0)
        loaded = b.rss_mb()
        w.send({"cmd": "stop"})
        res = w.expect("result", 30)
    finally:
        w.stop()
    return {
        "idle_mb": idle,
        "loaded_mb": loaded,
        "connected": ready["connected"],
        "alive_at_stop": res["alive_at_stop"],
        "errors": ready["errors"],
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_one(name: str, s: Settings, tests: list[str]) -> dict[str, Any]:
    """All requested tests against one broker, each on a fresh broker process."""
    out: dict[str, Any] = {
        "available": True,
        "version": version_of(name),
        "cpu": {},
        "lost": {},
        "errors": {},
    }
    for test in tests:
        if test == "rss" and name == "qmig-bridge":
            continue  # the bridge's RSS would be the bridge's, not the broker's: skipped
        try:
            b = start_broker(name, s.log_dir / name)
        except BrokerUnavailable as exc:
            if test == tests[0]:
                _log(f"[{name}] unavailable: {exc}")
                return {"available": False, "reason": str(exc), "version": out["version"]}
            out["errors"][test] = f"broker did not start: {exc}"
            continue
        try:
            _run_test(name, test, b, s, out)
        except Exception as exc:
            out["errors"][test] = f"{type(exc).__name__}: {exc}"
            _log(f"[{name}] {test}: FAILED {out['errors'][test]}")
        finally:
            if not b.alive():
                out["errors"].setdefault(test, f"broker exited with code {b.proc.returncode}")
            b.stop()
    if not out["errors"]:
        del out["errors"]
    return _rounded(out)


def _rounded(out: dict[str, Any]) -> dict[str, Any]:
    """Keep only meaningful digits: rates to 1 msg/s, times to 1 µs, memory to 10 kB."""
    for key in ("qos0_msg_s", "qos1_msg_s", "fanout_deliveries_s", "connect_subscribe_s"):
        if isinstance(out.get(key), float) and math.isfinite(out[key]):
            out[key] = round(out[key], 1)
    for key in ("rss_idle_mb", "rss_1000_clients_mb", "rss_delta_mb", "rss_per_1000_clients_mb"):
        if isinstance(out.get(key), float):
            out[key] = round(out[key], 2)
    for key in ("connect", "connect_resumed"):
        for fig in (out.get(key) or {}).values():
            if isinstance(fig.get("rate"), float):
                fig["rate"] = round(fig["rate"], 1)
            if isinstance(fig.get("broker_cpu_ms_per_connection"), float):
                fig["broker_cpu_ms_per_connection"] = round(fig["broker_cpu_ms_per_connection"], 3)
    lat = out.get("latency_ms") or {}
    for key in ("p50", "p99", "max"):
        if isinstance(lat.get(key), float) and math.isfinite(lat[key]):
            lat[key] = round(lat[key], 3)
    return out


def _run_test(name: str, test: str, b: RunningBroker, s: Settings, out: dict[str, Any]) -> None:
    if test in ("qos0", "qos1", "qos1-persistent", "fanout", "latency"):
        r = _pubsub(
            b,
            s,
            qos=1 if test.startswith("qos1") else 0,
            subscribers=s.fanout_subscribers if test == "fanout" else 1,
            sub_processes=s.fanout_processes if test == "fanout" else 1,
            rate=s.latency_rate if test == "latency" else None,
            persistent=test == "qos1-persistent",
        )
        out.setdefault("messages", {})[test] = {
            k: r[k] for k in ("sent", "received", "lost", "duplicates")
        }
    if test == "qos0":
        out["qos0_msg_s"], out["lost"]["qos0"], out["cpu"]["qos0"] = r["rate"], r["lost"], r["cpu"]
        _log(
            f"[{name}] qos0: {r['rate']:,.0f} msg/s, lost {r['lost']}; "
            f"saturates: {r['cpu']['saturates']}"
        )
    elif test == "qos1":
        out["qos1_msg_s"], out["lost"]["qos1"], out["cpu"]["qos1"] = r["rate"], r["lost"], r["cpu"]
        out["qos1_duplicates"] = r["duplicates"]
        _log(
            f"[{name}] qos1: {r['rate']:,.0f} msg/s, lost {r['lost']}; "
            f"saturates: {r['cpu']['saturates']}"
        )
    elif test == "qos1-persistent":
        out["qos1_persistent_msg_s"], out["lost"][test] = r["rate"], r["lost"]
        out["cpu"][test] = r["cpu"]
        _log(
            f"[{name}] qos1, persistent sessions: {r['rate']:,.0f} msg/s, lost {r['lost']}; "
            f"saturates: {r['cpu']['saturates']}"
        )
    elif test == "fanout":
        out["fanout_deliveries_s"], out["cpu"]["fanout"] = r["rate"], r["cpu"]
        # Not "lost": the fan-out drain is capped short, so this may still be queued.
        out["messages"]["fanout"]["undelivered_at_end"] = out["messages"]["fanout"].pop("lost")
        _log(f"[{name}] fanout: {r['rate']:,.0f} deliveries/s; saturates: {r['cpu']['saturates']}")
    elif test == "latency":
        out["latency_ms"], out["lost"]["latency"] = r["latency_ms"], r["lost"]
        out["cpu"]["latency"] = r["cpu"]
        lat = r["latency_ms"]
        _log(
            f"[{name}] latency: p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} "
            f"max {lat['max']:.3f} ms ({lat['samples']} samples)"
        )
    elif test == "connect":
        kinds = [("connect", False)]
        if s.resume and b.transport == "quic":
            kinds.append(("connect_resumed", True))
        for key, resume in kinds:
            figures = out.setdefault(key, {})
            for n in s.connectors:
                r = _connect_rate(b, s, n, resume)
                figures[str(n)] = {
                    k: r[k]
                    for k in ("rate", "connections", "broker_cpu_ms_per_connection", "resumed")
                    if k in r
                }
                out["cpu"][f"{key}_{n}"] = r["cpu"]
                if r["failures"]:
                    out.setdefault("connect_failures", {})[f"{key}_{n}"] = {
                        "count": r["failures"],
                        "examples": r["errors"],
                    }
                cost = r["broker_cpu_ms_per_connection"]
                _log(
                    f"[{name}] {key.replace('_', ' ')} x{n}: {r['rate']:,.0f}/s, broker "
                    f"{'n/a' if cost is None else f'{cost:.2f}'} ms CPU per connection "
                    f"({r['failures']} failures"
                    + (f", {r['resumed']} resumed" if resume else "")
                    + f"); saturates: {r['cpu']['saturates']}"
                )
        first = out["connect"][str(s.connectors[0])]
        out["connect_subscribe_s"] = first["rate"]
        out["cpu"]["connect"] = out["cpu"][f"connect_{s.connectors[0]}"]
    elif test == "rss":
        r = _rss(b, s)
        out["rss_idle_mb"], out["rss_1000_clients_mb"] = r["idle_mb"], r["loaded_mb"]
        out["rss_delta_mb"] = r["loaded_mb"] - r["idle_mb"]
        out["rss_clients"] = r["connected"]
        if r["connected"]:  # issue #16's figure, whatever --clients was
            out["rss_per_1000_clients_mb"] = out["rss_delta_mb"] * 1000 / r["connected"]
        if r["connected"] < s.rss_clients or r["alive_at_stop"] < r["connected"]:
            out["errors"]["rss"] = (
                f"{r['connected']}/{s.rss_clients} connected, "
                f"{r['alive_at_stop']} alive at the end: {r['errors']}"
            )
        _log(
            f"[{name}] rss: idle {r['idle_mb']:.1f} MB, {r['connected']} clients "
            f"{r['loaded_mb']:.1f} MB"
        )


# --------------------------------------------------------------------------- reporting

# The goals of issue #2: at least 5x amqtt on every throughput figure, at least 30k QoS 0
# msg/s, p99 latency at most 1.5 ms, and no QoS 1 message lost.
_THROUGHPUT = ("qos0_msg_s", "qos1_msg_s", "fanout_deliveries_s", "connect_subscribe_s")
THROUGHPUT_RATIO = 5.0
QOS0_FLOOR = 30_000
P99_CEILING_MS = 1.5
# Issue #3: the same over QUIC (load generator speaking MQTT over QUIC to qmig).
QUIC_QOS0_FLOOR = 15_000
QUIC_P99_CEILING_MS = 1.5
PERSISTENCE_COST = 0.30  # issue #18


def _figure(res: dict[str, Any], key: str) -> float | None:
    if key.count(":") == 2:  # "connect:16:rate": one connector count's figure
        kind, n, field = key.split(":")
        value = ((res.get(kind) or {}).get(n) or {}).get(field)
        return value if isinstance(value, int | float) else None
    if key.startswith("latency_"):
        lat = res.get("latency_ms") or {}
        return lat.get(key.removeprefix("latency_").removesuffix("_ms"))
    value = res.get(key)
    return value if isinstance(value, int | float) else None


def _goals(brokers: dict[str, Any]) -> dict[str, Any]:
    """Each goal with its target, qmig's figure, amqtt's where it is the yardstick, and met."""
    q, a = brokers.get("qmig", {}), brokers.get("amqtt", {})
    goals: dict[str, Any] = {}
    for key in _THROUGHPUT:
        qv, av = _figure(q, key), _figure(a, key)
        ratio = round(qv / av, 3) if qv is not None and av else None
        goals[key] = {
            "target": f"qmig >= {THROUGHPUT_RATIO:g}x amqtt",
            "qmig": qv,
            "amqtt": av,
            "ratio": ratio,
            "met": None if ratio is None else ratio >= THROUGHPUT_RATIO,
        }
    qos0 = _figure(q, "qos0_msg_s")
    goals["qos0_floor"] = {
        "target": f">= {QOS0_FLOOR} msg/s",
        "qmig": qos0,
        "met": None if qos0 is None else qos0 >= QOS0_FLOOR,
    }
    p99 = _figure(q, "latency_p99_ms")
    goals["latency_p99_ms"] = {
        "target": f"<= {P99_CEILING_MS} ms",
        "qmig": p99,
        "met": None if p99 is None else p99 <= P99_CEILING_MS,
    }
    lost = (q.get("lost") or {}).get("qos1")
    goals["qos1_lost"] = {"target": "0", "qmig": lost, "met": None if lost is None else lost == 0}
    qq = brokers.get("qmig-quic", {})
    qos0 = _figure(qq, "qos0_msg_s")
    goals["quic_qos0_floor"] = {
        "target": f">= {QUIC_QOS0_FLOOR} msg/s",
        "qmig-quic": qos0,
        "met": None if qos0 is None else qos0 >= QUIC_QOS0_FLOOR,
    }
    p99 = _figure(qq, "latency_p99_ms")
    goals["quic_latency_p99_ms"] = {
        "target": f"<= {QUIC_P99_CEILING_MS} ms",
        "qmig-quic": p99,
        "met": None if p99 is None else p99 <= QUIC_P99_CEILING_MS,
    }
    # Issue #18: the durable store in its default (batch) mode costs at most 30 % of QoS 1.
    plain, durable = brokers.get("qmig", {}), brokers.get("qmig-persist", {})
    for key in ("qos1_msg_s", "qos1_persistent_msg_s"):
        pv, dv = _figure(plain, key), _figure(durable, key)
        kept = round(dv / pv, 3) if pv and dv is not None else None
        goals[f"persistence_cost_{key}"] = {
            "target": f"qmig-persist >= {1 - PERSISTENCE_COST:.0%} of qmig",
            "qmig": pv,
            "qmig-persist": dv,
            "ratio": kept,
            "met": None if kept is None else kept >= 1 - PERSISTENCE_COST,
        }
    return goals


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model,
        "logical_cpus": psutil.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


_ROWS: list[tuple[str, str, str]] = [
    # label, figure key, format
    ("QoS 0 msg/s (1→1)", "qos0_msg_s", "{:,.0f}"),
    ("QoS 1 msg/s (1→1, window 100)", "qos1_msg_s", "{:,.0f}"),
    ("  persistent sessions", "qos1_persistent_msg_s", "{:,.0f}"),
    ("Fan-out deliveries/s (1→10)", "fanout_deliveries_s", "{:,.0f}"),
    ("Latency p50 ms (200 msg/s)", "latency_p50_ms", "{:.3f}"),
    ("Latency p99 ms", "latency_p99_ms", "{:.3f}"),
    ("Latency max ms", "latency_max_ms", "{:.3f}"),
    ("Connect+subscribe /s", "connect_subscribe_s", "{:,.0f}"),
    ("RSS idle MB", "rss_idle_mb", "{:.1f}"),
    ("RSS with N clients MB", "rss_1000_clients_mb", "{:.1f}"),
    ("RSS delta MB", "rss_delta_mb", "{:.1f}"),
    ("RSS per 1000 idle clients MB", "rss_per_1000_clients_mb", "{:.1f}"),
]


def render_table(report: dict[str, Any], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(report["brokers"])
    table = Table(
        title=f"qmig bench broker — {report['duration_s']:g} s per test, "
        f"{report['machine']['logical_cpus']} CPUs"
    )
    table.add_column("figure", no_wrap=True)
    for n in names:
        table.add_column(n, justify="right")
    show_ratio = "qmig" in names and "amqtt" in names
    if show_ratio:
        table.add_column("qmig/amqtt", justify="right")
    res = report["brokers"]

    def cell(n: str, key: str, fmt: str) -> str:
        if not res[n].get("available", False):
            return "—"
        v = _figure(res[n], key)
        return "n/a" if v is None else fmt.format(v)

    table.add_row(
        "status",
        *[
            ("ok" if res[n].get("available") else f"unavailable: {res[n].get('reason', '')}")
            for n in names
        ],
        *([""] if show_ratio else []),
    )
    rows = list(_ROWS)
    at = rows.index(("Connect+subscribe /s", "connect_subscribe_s", "{:,.0f}"))
    rows[at : at + 1] = _connect_rows(report)
    for label, key, fmt in rows:
        ratio = ""
        if show_ratio:
            qv, av = _figure(res["qmig"], key), _figure(res["amqtt"], key)
            ratio = f"{qv / av:.2f}x" if qv is not None and av else "n/a"
        if key == "rss_1000_clients_mb":
            clients = {res[n].get("rss_clients") for n in names if res[n].get("available")}
            label = f"RSS with {'/'.join(str(c) for c in clients if c) or 'N'} clients MB"
        table.add_row(label, *[cell(n, key, fmt) for n in names], *([ratio] if show_ratio else []))
    table.add_row(
        "Lost qos0 / qos1 / persistent / latency",
        *[
            " / ".join(
                str((res[n].get("lost") or {}).get(t, "-"))
                for t in ("qos0", "qos1", "qos1-persistent", "latency")
            )
            if res[n].get("available")
            else "—"
            for n in names
        ],
        *([""] if show_ratio else []),
    )
    for test in ("qos0", "qos1", "fanout", "connect"):
        cpus = [(res[n].get("cpu") or {}).get(test) for n in names]
        if not any(cpus):
            continue
        table.add_row(
            f"CPU % {test} (broker/loadgen)",
            *[_cpu_cell(c) for c in cpus],
            *([""] if show_ratio else []),
        )
        table.add_row(
            f"  {test} saturates",
            *[(c or {}).get("saturates", "—") for c in cpus],
            *([""] if show_ratio else []),
        )
    Console(file=file, width=max(120, 48 + 30 * len(names))).print(table)
    print(
        "CPU % is of one core: broker / load-generator processes (publisher first); "
        "'other' is load from processes outside the benchmark.",
        file=file,
    )
    errors = {n: r["errors"] for n, r in res.items() if r.get("errors")}
    for n, errs in errors.items():
        for test, msg in errs.items():
            print(f"{n} {test}: {msg}", file=file)


def _connect_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Connect+subscribe rates and broker CPU per connection, per connector count."""
    counts = report["settings"].get("connect_connectors") or []
    resumed = any(r.get("connect_resumed") for r in report["brokers"].values())
    rows = []
    for kind, label in (("connect", "Connect+subscribe"), ("connect_resumed", "  resumed")):
        if kind == "connect_resumed" and not resumed:
            continue
        for n in counts:
            rows.append((f"{label} /s ({n} connectors)", f"{kind}:{n}:rate", "{:,.0f}"))
        for n in counts:
            rows.append(
                (
                    f"{label} broker CPU ms/conn ({n})",
                    f"{kind}:{n}:broker_cpu_ms_per_connection",
                    "{:.2f}",
                )
            )
    return rows or [("Connect+subscribe /s", "connect_subscribe_s", "{:,.0f}")]


def _cpu_cell(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return "—"
    loadgen = [
        f"{v:.0f}"
        for k, v in cpu.items()
        if k not in ("broker", "bridge", "saturates", "other_processes", "irq_softirq", "steal")
    ]
    other = cpu.get("other_processes") or 0
    text = f"{cpu['broker']:.0f} / {'+'.join(loadgen)}"
    if "bridge" in cpu:
        text += f" (bridge {cpu['bridge']:.0f})"
    return text + (f" (+{other:.0f} other)" if other >= 5 else "")


# --------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    tests = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [b for b in brokers if b not in ALL_BROKER_NAMES] + [t for t in tests if t not in TESTS]
    if bad or not brokers or not tests:
        print(
            f"unknown or missing broker/test names: {bad}; "
            f"brokers: {ALL_BROKER_NAMES}, tests: {TESTS}",
            file=sys.stderr,
        )
        return 2
    tmp = None
    if args.log_dir:
        log_dir = Path(args.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qmig-bench-")
        log_dir = Path(tmp.name)
    s = _settings(args, log_dir)
    # Children (brokers, workers) inherit this limit: 1,000 clients need >1,000 descriptors.
    raise_nofile(2 * s.rss_clients + 1024)
    machine = machine_info()
    results: dict[str, Any] = {}
    try:
        for name in brokers:
            _log(f"[{name}] benchmarking: {', '.join(tests)}")
            results[name] = bench_one(name, s, tests)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {
        "machine": machine,
        "duration_s": s.duration,
        "warmup_s": s.warmup,
        "settings": {
            "rss_clients": s.rss_clients,
            "fanout_subscribers": s.fanout_subscribers,
            "qos1_window": s.window,
            "latency_rate_msg_s": s.latency_rate,
            "connect_concurrency": s.connectors[0],
            "connect_connectors": list(s.connectors),
            "connect_processes": s.connect_processes,
            "connect_resume": s.resume,
            "payload_bytes": 64,
            "protocol": "MQTT 3.1.1",
        },
        "brokers": results,
        "goals": _goals(results),
    }
    text = json.dumps(_finite(report), indent=2, allow_nan=False)
    if args.json == "-":
        render_table(report, sys.stderr)
        print(text)
    else:
        if args.json:
            Path(args.json).write_text(text + "\n")
        render_table(report, sys.stdout)
    noisy = [
        f"{n} {t}"
        for n, r in results.items()
        for t, c in (r.get("cpu") or {}).items()
        if (c.get("other_processes") or 0) >= _NOISY_PCT
    ]
    if noisy:
        _log(
            f"warning: other processes used >= {_NOISY_PCT:.0f}% of a core during: "
            f"{', '.join(noisy)}; those figures may be low, rerun on a quiet machine"
        )
    return 0 if any(r.get("available") for r in results.values()) else 1


def _finite(obj: Any) -> Any:
    """NaN and infinities become null, so the report stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmig bench broker", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
