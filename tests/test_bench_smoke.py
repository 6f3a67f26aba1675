"""Smoke test of ``qmig bench broker``: every figure comes out and messages really flow.

It runs the whole benchmark in quick mode against mosquitto only (a fixed, independent
reference), so it checks the load generator and the report, never anyone's speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

FIGURES = (
    "qos0_msg_s",
    "qos1_msg_s",
    "fanout_deliveries_s",
    "connect_subscribe_s",
    "rss_1000_clients_mb",
    "rss_idle_mb",
)


@pytest.mark.timeout(300)
def test_quick_bench_against_mosquitto(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmig.benchmarks.broker",
            "--quick",
            "--brokers",
            "mosquitto",
            "--json",
            "--log-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["duration_s"] == 1.0
    assert {"machine", "brokers", "goals"} <= report.keys()
    mosq = report["brokers"]["mosquitto"]
    assert mosq["available"], mosq
    assert not mosq.get("errors"), mosq["errors"]

    for key in FIGURES:
        assert isinstance(mosq[key], int | float), (key, mosq.get(key))
    for key in ("qos0_msg_s", "qos1_msg_s", "fanout_deliveries_s", "connect_subscribe_s"):
        assert mosq[key] > 0, key
    assert mosq["rss_idle_mb"] > 0
    assert mosq["rss_1000_clients_mb"] >= mosq["rss_idle_mb"] * 0.5
    assert mosq["rss_clients"] == 100

    lat = mosq["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]

    for test in ("qos0", "qos1", "fanout", "latency"):
        counts = mosq["messages"][test]
        assert counts["sent"] > 0 and counts["received"] > 0, (test, counts)
    assert mosq["lost"]["qos1"] == 0
    assert mosq["messages"]["qos1"]["received"] >= mosq["messages"]["qos1"]["sent"]

    for test in ("qos0", "qos1", "fanout", "connect"):
        cpu = mosq["cpu"][test]
        assert cpu["broker"] >= 0 and cpu["saturates"], (test, cpu)


def _aioquic_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("aioquic") is None


@pytest.mark.timeout(120)
@pytest.mark.skipif(_aioquic_missing(), reason="aioquic is not installed")
def test_quick_bench_qmig_over_quic(tmp_path: Path) -> None:
    """qmig over QUIC: every pub/sub figure comes out and messages flow; never asserts speed."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmig.benchmarks.broker",
            "--quick",
            "--brokers",
            "qmig-quic",
            "--only",
            "qos0,qos1,latency,connect",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--json",
            "--log-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    quic = report["brokers"]["qmig-quic"]
    assert quic["available"], quic
    assert not quic.get("errors"), quic["errors"]
    for key in ("qos0_msg_s", "qos1_msg_s", "connect_subscribe_s"):
        assert isinstance(quic[key], int | float) and quic[key] > 0, (key, quic.get(key))
    lat = quic["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    for test in ("qos0", "qos1", "latency"):
        counts = quic["messages"][test]
        assert counts["sent"] > 0 and counts["received"] > 0, (test, counts)
    assert quic["lost"]["qos1"] == 0
    assert {"quic_qos0_floor", "quic_latency_p99_ms"} <= report["goals"].keys()


@pytest.mark.timeout(150)
@pytest.mark.skipif(_aioquic_missing(), reason="aioquic is not installed")
def test_connect_figures_per_connector_count(tmp_path: Path) -> None:
    """Issue #16: connect+subscribe at each connector count, with the broker's CPU per
    connection, in the JSON and the table; over QUIC, resumed reconnects as well."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmig.benchmarks.broker",
            "--quick",
            "--brokers",
            "qmig,qmig-quic",
            "--only",
            "connect",
            "--connectors",
            "1,2,3",
            "--resume",
            "--duration",
            "0.5",
            "--warmup",
            "0.3",
            "--json",
            "--log-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["settings"]["connect_connectors"] == [1, 2, 3]
    for name in ("qmig", "qmig-quic"):
        res = report["brokers"][name]
        assert res["available"] and not res.get("errors"), res
        assert set(res["connect"]) == {"1", "2", "3"}, res["connect"]
        for fig in res["connect"].values():
            assert fig["rate"] > 0 and fig["connections"] > 0, fig
            assert fig["broker_cpu_ms_per_connection"] > 0, fig
        assert res["connect_subscribe_s"] == res["connect"]["1"]["rate"]
    quic = report["brokers"]["qmig-quic"]
    assert set(quic["connect_resumed"]) == {"1", "2", "3"}
    for fig in quic["connect_resumed"].values():
        assert 0 < fig["resumed"] <= fig["connections"], fig  # every one after the first
    assert "connect_resumed" not in report["brokers"]["qmig"]  # TCP has nothing to resume
    for n in (1, 2, 3):
        assert f"Connect+subscribe /s ({n} connectors)" in proc.stderr
        assert f"broker CPU ms/conn ({n})" in proc.stderr


@pytest.mark.timeout(150)
def test_persistent_session_figure_journals_its_sessions(tmp_path: Path) -> None:
    """Issue #18: QoS 1 with persistent sessions against the durable broker, beside the plain
    one, with the persistence cost as a goal; the store really held those sessions."""
    import sqlite3

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmig.benchmarks.broker",
            "--quick",
            "--brokers",
            "qmig,qmig-persist",
            "--only",
            "qos1,qos1-persistent",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--json",
            "--log-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    for name in ("qmig", "qmig-persist"):
        res = report["brokers"][name]
        assert res["available"] and not res.get("errors"), res
        assert res["qos1_persistent_msg_s"] > 0 and res["lost"]["qos1-persistent"] == 0, res
    for key in ("qos1_msg_s", "qos1_persistent_msg_s"):
        goal = report["goals"][f"persistence_cost_{key}"]
        assert goal["ratio"] is not None and goal["ratio"] > 0, goal
    assert "persistent sessions" in proc.stderr
    sessions = []  # per durable broker (one per test), after it stopped
    for db in sorted(tmp_path.rglob("qmig.db")):
        with sqlite3.connect(db) as conn:
            sessions.append({row[0] for row in conn.execute("SELECT client_id FROM sessions")})
    assert sorted(sessions, key=len) == [set(), {"bench-pub", "bench-sub0-0"}], sessions
