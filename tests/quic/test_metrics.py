"""``qmig broker --metrics-port``: Prometheus text over HTTP, figures that follow the clients.

A broker process with every transport on loopback and its metrics endpoint; real qmig
clients connect over TCP and QUIC, publish, subscribe, leave a persistent session with
queued messages behind and send a MIGRATION_TRIGGER; every step is checked by scraping
``/metrics`` over HTTP and parsing it with prometheus-client's own parser.  The broker's
``--orchestrator-url`` points at a closed port: the trigger is accepted, its forwarding
fails, and both show in the metrics.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.certs import make_lab_certs

from .conftest import HOST, QBroker, free_tcp_port, free_udp_port
from .helpers import make_client, uid

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
TOKEN = "metrics-test-trigger-token-0123456789abcdef"


@pytest.fixture(scope="module")
def mbroker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QBroker]:
    work = tmp_path_factory.mktemp("metrics")
    certs = make_lab_certs(work / "certs")
    token_file = work / "orchestrator.token"
    token_file.write_text(TOKEN + "\n")
    metrics_port = free_tcp_port()
    ports = {"tcp": free_tcp_port(), "tls": free_tcp_port(), "mptcp": free_tcp_port(),
             "quic": free_udp_port(), "metrics": metrics_port}  # fmt: skip
    closed = f"http://{HOST}:{free_tcp_port()}"  # nobody listens there
    args = ["--metrics-port", str(metrics_port), "--orchestrator-url", closed,
            "--orchestrator-token-file", str(token_file)]  # fmt: skip
    broker = QBroker(
        ca=str(certs.ca_cert),
        cert=str(certs.server_cert),
        key=str(certs.server_key),
        log_path=work / "broker.log",
        ports=ports,
        extra_args=args,
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def scrape(broker: QBroker) -> Samples:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    url = f"http://{HOST}:{broker.port('metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def eventually(
    broker: QBroker, check: Callable[[Samples], bool], timeout: float = 5.0
) -> Samples:
    """Scrape until ``check(samples)`` holds; the last samples (fails with them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, broker)
        if check(samples):
            return samples
        if loop.time() > deadline:
            raise AssertionError(f"metrics never matched: {samples}")
        await asyncio.sleep(0.05)


async def test_metrics_follow_connections_messages_queues_and_triggers(mbroker: QBroker) -> None:
    before = await asyncio.to_thread(scrape, mbroker)
    assert value(before, "qmig_connections", transport="quic") == 0
    assert value(before, "qmig_migration_state", state="serving") == 1
    assert value(before, "qmig_migration_freeze_seconds_count") == 0
    assert value(before, "qmig_migrations_total", outcome="restored") == 0
    assert ("qmig_process_resident_memory_bytes", ()) in before

    topic = uid("metrics/")
    quic = make_client(mbroker, "quic", client_id=uid("mq-"))
    tcp = make_client(mbroker, "tcp", client_id=uid("mt-"))
    offline = make_client(mbroker, "tcp", client_id=uid("mo-"), clean_start=False,
                          session_expiry=300)  # fmt: skip
    async with quic, tcp:
        await quic.subscribe(topic, 1)
        async with offline:
            await offline.subscribe(topic, 1)
        connected = await eventually(
            mbroker,
            lambda s: (
                value(s, "qmig_connections", transport="quic") == 1
                and value(s, "qmig_connections", transport="tcp") == 1
            ),
        )
        assert value(connected, "qmig_connections_accepted_total") >= 3
        assert value(connected, "qmig_quic_paths", state="validated") >= 1
        for i in range(5):
            await tcp.publish(topic, f"m{i}", qos=1)
        for _ in range(5):
            await quic.next_message(5)
        after = await eventually(
            mbroker,
            lambda s: value(s, "qmig_queued_messages") >= 5,  # for the offline session
        )
        assert (
            value(after, "qmig_publish_received_total")
            - value(before, "qmig_publish_received_total")
            == 5
        )
        assert value(after, "qmig_messages_sent_total") > value(before, "qmig_messages_sent_total")
        assert value(after, "qmig_queued_bytes") > 0
        assert value(after, "qmig_sessions") >= 3

        await quic.request_migration("edge-b")
        asked = await eventually(
            mbroker,
            lambda s: value(s, "qmig_migration_triggers_forwarded_total", result="failed") == 1,
        )
        assert value(asked, "qmig_migration_triggers_total", result="accepted") == 1
        assert value(asked, "qmig_migration_triggers_forwarded_total", result="sent") == 0
    gone = await eventually(
        mbroker, lambda s: value(s, "qmig_connections", transport="quic") == 0
        and value(s, "qmig_connections", transport="tcp") == 0,
    )  # fmt: skip
    assert value(gone, "qmig_queued_messages") >= 5  # the session outlives its connection
    # Failing to forward was logged once, with the reason, not once per trigger.
    assert mbroker.log().count("not forwarded to the orchestrator") == 1


def test_metrics_listen_on_loopback_by_default(mbroker: QBroker) -> None:
    port = mbroker.port("metrics")
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in mbroker.log()
