"""Headless locust smoke runs against a loopback broker: QUIC and TCP users, then 200 QUIC users.

locust monkey-patches the standard library at import, so it never runs inside pytest: every
run is a child process (stopped by its PID), and so is the bridge check.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.broker import LocustRun, LoopbackBroker
from loadtests.report import failures
from loadtests.run import locust_cmd, trace_file

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                       reason="locust is not installed (pip install -e '.[load]')"),
]  # fmt: skip


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackBroker]:
    with LoopbackBroker(workdir=tmp_path_factory.mktemp("load-broker")) as b:
        yield b


def run(broker: LoopbackBroker, out: Path, *, users: int, spawn: float, seconds: float,
        transport: str, rate: float) -> tuple[int, dict, dict[str, dict[str, str]]]:  # fmt: skip
    """One headless locust run to its end: exit status, trace, stats rows by request name."""
    prefix = out / f"smoke-{transport}-{users}"
    cmd = locust_cmd(host=broker.host, quic_port=broker.quic_port, tcp_port=broker.tcp_port,
                     cafile=broker.cafile, users=users, spawn_rate=spawn, run_time=seconds,
                     msg_rate=rate, qos=1, transport=transport, prefix=prefix,
                     extra=("--drain", "3"))  # fmt: skip
    locust = LocustRun(cmd, prefix, trace_file(prefix))
    try:
        code = locust.wait(seconds + 30)
    finally:
        locust.kill()
    trace = locust.trace()
    assert trace is not None, f"locust left no trace: {locust.log_tail(20)}"
    with open(f"{prefix}_stats.csv", newline="") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    assert Path(f"{prefix}.html").stat().st_size > 0
    return code, trace, stats


@pytest.mark.timeout(60)
def test_quic_and_tcp_users_publish_and_receive_without_failures(
    broker: LoopbackBroker, tmp_path: Path
) -> None:
    code, trace, stats = run(broker, tmp_path, users=6, spawn=6, seconds=5, transport="both",
                             rate=4)  # fmt: skip
    assert failures(trace) == []
    for name in ("quic:connect", "quic:publish", "quic:deliver",
                 "tcp:connect", "tcp:publish", "tcp:deliver"):  # fmt: skip
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, name
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    totals = trace["totals"]
    for transport in ("quic", "tcp"):
        t = totals[transport]
        assert t["users"] == 3 and t["lost"] == 0 and t["delivered"] == t["sent"] > 0
    assert code == 0


@pytest.mark.timeout(90)
def test_200_quic_users_share_one_asyncio_thread(broker: LoopbackBroker, tmp_path: Path) -> None:
    """200 users through the gevent/asyncio bridge (a thread pool wait stalls beyond 10)."""
    code, trace, stats = run(broker, tmp_path, users=200, spawn=100, seconds=9,
                             transport="quic", rate=1)  # fmt: skip
    assert failures(trace) == []
    quic = trace["totals"]["quic"]
    assert quic["users"] == 200 and quic["lost"] == 0
    assert sum(u["connected_at"] is not None for u in trace["users"]) == 200
    assert quic["delivered"] == quic["sent"] >= 200 * 4
    assert int(stats["quic:deliver"]["Failure Count"]) == 0
    assert code == 0


@pytest.mark.timeout(60)
def test_a_broker_that_dies_under_load_is_reported_as_failures(tmp_path: Path) -> None:
    """Failures are real: timeouts and undelivered messages count, and locust exits 1."""
    broker = LoopbackBroker(workdir=tmp_path / "dying").start()
    prefix = tmp_path / "dying-run"
    cmd = locust_cmd(
        host=broker.host,
        quic_port=broker.quic_port,
        tcp_port=broker.tcp_port,
        cafile=broker.cafile,
        users=4,
        spawn_rate=4,
        run_time=8,
        msg_rate=5,
        qos=1,
        transport="both",
        prefix=prefix,
        extra=("--ack-timeout", "1", "--delivery-timeout", "1", "--drain", "1"),
    )
    locust = LocustRun(cmd, prefix, trace_file(prefix))
    try:
        locust.wait_ready(20)
        time.sleep(1.5)
        assert broker.proc is not None
        broker.proc.kill()  # by its PID
        code = locust.wait(30)
    finally:
        locust.kill()
        broker.stop()
    trace = locust.trace()
    assert trace is not None
    kinds = {what for what, _ in failures(trace)}
    assert {"quic:publish", "quic:deliver"} <= kinds, kinds
    # paho notices a dead broker as a lost delivery or as the disconnect, whichever first.
    assert kinds & {"tcp:deliver", "tcp:disconnect", "tcp:publish"}, kinds
    assert code == 1


BRIDGE_CHECK = textwrap.dedent("""
    import locust  # monkey-patches, as in a real run
    import asyncio, time
    import gevent
    from loadtests.bridge import Bridge

    bridge = Bridge()

    async def work(i):
        await asyncio.sleep(0.2)
        return i

    started = time.perf_counter()
    greenlets = [gevent.spawn(bridge.run, work(i), 10) for i in range(300)]
    gevent.joinall(greenlets, timeout=10)
    assert [g.value for g in greenlets] == list(range(300)), "not every wait came back"
    assert time.perf_counter() - started < 3, "the waits did not overlap"

    try:
        bridge.run(asyncio.sleep(5), timeout=0.2)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no timeout")

    async def boom():
        raise ValueError("from the loop thread")

    try:
        bridge.run(boom(), 5)
    except ValueError as exc:
        assert "loop thread" in str(exc)

    lateness = []
    def ticker():
        for _ in range(50):
            t0 = time.perf_counter()
            gevent.sleep(0.01)
            lateness.append(time.perf_counter() - t0 - 0.01)
    ticking = gevent.spawn(ticker)
    busy = [gevent.spawn(bridge.run, work(i), 10) for i in range(200)]
    gevent.joinall([ticking, *busy], timeout=10)
    assert max(lateness) < 0.1, f"the hub stalled {max(lateness) * 1000:.0f} ms"
    print("ok")
""")


@pytest.mark.timeout(30)
def test_bridge_wakes_greenlets_from_the_loop_thread() -> None:
    proc = subprocess.run([sys.executable, "-c", BRIDGE_CHECK], capture_output=True, text=True,
                          timeout=25)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize(("text", "seconds"), [("20s", 20), ("1m30s", 90), ("1h", 3600),
                                               ("45", 45), ("2.5", 2.5)])  # fmt: skip
def test_loadtest_duration_takes_seconds_or_locusts_time_format(text: str, seconds: float) -> None:
    from loadtests.run import duration

    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "ten", "1x", "5m3h"])
def test_loadtest_duration_refuses_what_is_not_a_duration(text: str) -> None:
    import argparse

    from loadtests.run import duration

    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)
