"""``python -m loadtests.limits``: how many users one broker holds before p99 passes 100 ms.

For each transport, user counts are stepped up (doubling from ``--start``) against a fresh
loopback broker, each user publishing ``--rate`` msg/s (default 1) at QoS 1 to its own topic,
until a step fails: p99 of the end-to-end delivery latency or of the PUBACK round trip above
``--threshold-ms`` in the steady state (the connection storm left out), any lost message, any
failure, or a user that could not connect.  Then the gap between the last good and the first
failed count is bisected ``--bisect`` times.  The broker's and locust's CPU are sampled over
the steady state, since on a small machine the load generator can be what saturates first,
and so is the rest of the machine's CPU use ("others"), which other work sharing it adds.

Writes ``<out>/limits-<stamp>.json`` and prints one row per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from measure.cpu import CpuSampler, PidGroups

from .broker import LoadTestError, LocustRun, LoopbackBroker
from .report import fmt, steady_state, table
from .run import locust_cmd, trace_file

WARMUP = 3.0  # seconds after every user is connected before the steady state is measured


@dataclass
class Step:
    transport: str
    users: int
    connected: int = 0
    messages: int = 0
    lost: int = 0
    failures: int = 0
    deliver_p50: float | None = None
    deliver_p99: float | None = None
    publish_p99: float | None = None
    broker_cpu: float | None = None  # percent of one core, over the steady state
    locust_cpu: float | None = None
    others_cpu: float | None = None  # everything else on the machine meanwhile
    ok: bool = False
    why: str = ""


def wait_quiet(busy_below: float, patience: float, say: Any = print) -> float:
    """Wait (up to ``patience`` s) until the rest of the machine is nearly idle.

    On a shared machine other work takes the cores the broker and locust need, and the
    latency measured is then the scheduler's.  Returns the machine's busy percent (of all
    cores) when the step starts.
    """
    deadline = time.monotonic() + patience
    busy = psutil.cpu_percent(interval=2.0)
    while busy >= busy_below and time.monotonic() < deadline:
        say(f"  (machine {busy:.0f}% busy: waiting for it to quieten)")
        busy = psutil.cpu_percent(interval=5.0)
    return busy


def measure(transport: str, users: int, args: argparse.Namespace, out: Path) -> Step:
    """One step: a fresh broker, ``users`` users, ``args.measure`` seconds of steady state."""
    step = Step(transport, users)
    if args.quiet_below:
        wait_quiet(args.quiet_below, args.patience)
    spawn = min(float(users), args.spawn_rate)
    prefix = out / f"limits-{transport}-{users}"
    with LoopbackBroker() as broker:
        run_time = users / spawn + args.connect_slack + WARMUP + args.measure + 5
        cmd = locust_cmd(host=broker.host, quic_port=broker.quic_port, tcp_port=broker.tcp_port,
                         cafile=broker.cafile, users=users, spawn_rate=spawn,
                         run_time=run_time, msg_rate=args.rate, qos=args.qos,
                         transport=transport, prefix=prefix)  # fmt: skip
        run = LocustRun(cmd, prefix, trace_file(prefix))
        try:
            run.wait_ready(users / spawn + args.connect_slack + 30)
            time.sleep(WARMUP)
            assert broker.proc is not None
            sampler = CpuSampler(PidGroups({"broker": broker.proc.pid, "locust": run.proc.pid}))
            sampler.start()
            time.sleep(args.measure)
            sampler.stop()
            cpu = sampler.percent()
            measured_until = time.time()
            run.stop()
        except LoadTestError as exc:
            run.kill()
            step.why = str(exc)
            return step
    trace = run.trace()
    if trace is None:
        step.why = f"no trace: {run.log_tail()}"
        return step
    s = steady_state(trace, warmup=WARMUP, until=measured_until)[transport]
    step.connected = s["connected"]
    step.messages = s["messages"]
    step.lost = s["lost"] + s["late"]
    step.failures = s["failures"]
    step.deliver_p50 = s["deliver_ms"]["p50"]
    step.deliver_p99 = s["deliver_ms"]["p99"]
    step.publish_p99 = s["publish_ms"]["p99"]
    step.broker_cpu, step.locust_cpu = cpu.get("broker"), cpu.get("locust")
    step.others_cpu = cpu.get("others")
    problems = []
    if step.connected < users:
        problems.append(f"{users - step.connected} users not connected")
    if step.lost:
        problems.append(f"{step.lost} messages lost or late")
    if step.failures:
        problems.append(f"{step.failures} failures")
    for name, value in (("deliver", step.deliver_p99), ("puback", step.publish_p99)):
        if value is None or value > args.threshold_ms:
            problems.append(f"{name} p99 {fmt(value)} ms")
    step.ok = not problems
    step.why = "; ".join(problems)
    return step


def find_limit(transport: str, args: argparse.Namespace, out: Path,
               say: Any = print) -> tuple[int, list[Step]]:  # fmt: skip
    """The largest user count that passed, and every step measured on the way."""
    steps: list[Step] = []

    def run(users: int) -> bool:
        step = measure(transport, users, args, out)
        steps.append(step)
        say(row(step))
        return step.ok

    good, bad = 0, None
    users = args.start
    while users <= args.max:
        if run(users):
            good = users
            users *= 2
        else:
            bad = users
            break
    if bad is not None:
        lo, hi = good, bad
        for _ in range(args.bisect):
            if hi - lo <= max(10, hi // 20):
                break
            mid = (lo + hi) // 2 // 10 * 10 or (lo + hi) // 2
            if run(mid):
                lo = mid
            else:
                hi = mid
        good = lo
    return good, steps


HEADER = ("transport", "users", "ok", "msgs", "deliver p50", "deliver p99", "puback p99",
          "broker cpu", "locust cpu", "others cpu", "why not")  # fmt: skip


def row(step: Step) -> str:
    cells = [step.transport, step.users, "yes" if step.ok else "no", step.messages,
             fmt(step.deliver_p50), fmt(step.deliver_p99), fmt(step.publish_p99),
             fmt(step.broker_cpu, "%"), fmt(step.locust_cpu, "%"), fmt(step.others_cpu, "%"),
             step.why]  # fmt: skip
    return "  ".join(str(c) for c in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.limits",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    add = parser.add_argument
    add("--transport", default="quic,tcp", help="comma-separated: quic, tcp (default both)")
    add("--start", type=int, default=100, help="first user count (default 100)")
    add("--max", type=int, default=6400, help="largest user count tried (default 6400)")
    add("--bisect", type=int, default=3, help="bisection steps after the doubling (default 3)")
    add("--rate", type=float, default=1.0, help="messages per second per user (default 1)")
    add("--qos", type=int, default=1, choices=(0, 1, 2))
    add("--threshold-ms", type=float, default=100.0, help="p99 limit (default 100 ms)")
    add("--measure", type=float, default=20.0, help="steady-state seconds per step")
    add("--spawn-rate", type=float, default=50.0, help="users started per second")
    add("--connect-slack", type=float, default=10.0, help="seconds allowed beyond spawning")
    add(
        "--quiet-below",
        type=float,
        default=0.0,
        metavar="PERCENT",
        help="before each step wait until the machine is under PERCENT busy (shared machines)",
    )
    add("--patience", type=float, default=600.0, help="longest such wait, seconds")
    add("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    out = args.out / time.strftime("limits-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()},
                              "machine": {"cpus": psutil.cpu_count()}, "limits": {},
                              "steps": []}  # fmt: skip
    print("  ".join(HEADER), flush=True)
    for transport in [t.strip() for t in args.transport.split(",") if t.strip()]:
        limit, steps = find_limit(transport, args, out, say=lambda line: print(line, flush=True))
        result["limits"][transport] = limit
        result["steps"] += [asdict(s) for s in steps]
        (out / "limits.json").write_text(json.dumps(result, indent=1))
    print()
    print(
        table(
            [
                [t, n, f"p99 <= {args.threshold_ms:g} ms at {args.rate:g} msg/s, QoS {args.qos}"]
                for t, n in result["limits"].items()
            ],
            ("transport", "users", "criterion"),
        )
    )
    print(f"limits: details in {out / 'limits.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
