"""Issue #16: a reconnecting QUIC client resumes its TLS session from a session ticket.

The broker runs in-process so the tests can see, for each connection, whether its handshake
was a PSK (resumed) one (``tls.session_resumed`` on the broker's side) and what its ticket
store holds.  Resumption must not weaken authentication: with ``require_certificate`` a
ticket that was not issued after a verified client certificate is never honoured (aioquic
asks for no certificate in a PSK handshake), and MQTT CONNECT still authenticates.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.tls import CipherSuite, SessionTicket

from broker.auth import add_user
from broker.certs import CertPaths, issue_client_cert
from broker.config import BrokerConfig, ConfigError
from broker.server import BrokerServer
from client.client import Client, ClientError
from quicmig.tickets import ENTRY_OVERHEAD, TicketStore

from .conftest import HOST

pytestmark = pytest.mark.timeout(60)


def _client(server: BrokerServer, pki: CertPaths, **kwargs: Any) -> Client:
    return Client(
        HOST, server.config.quic_port, transport="quic", cafile=str(pki.ca_cert),
        reconnect=False, connect_timeout=5.0, **kwargs,
    )  # fmt: skip


def _resumed(server: BrokerServer, client_id: str) -> bool:
    """Whether the broker's live QUIC connection of ``client_id`` had a PSK handshake."""
    for protocol in server.quic_protocols:
        conn = protocol.conn
        if conn is not None and conn.client_id == client_id and not protocol._closing:
            return bool(protocol._quic.tls.session_resumed)
    raise AssertionError(f"no live QUIC connection for {client_id}")


async def _round_trip(client: Client, topic: str) -> None:
    await client.subscribe(topic, qos=1)
    await client.publish(topic, b"hello", qos=1)
    assert (await client.next_message(timeout=5)).payload == b"hello"


async def test_a_reconnecting_client_resumes_its_session(
    make_broker: Callable[..., Any], pki: CertPaths
) -> None:
    server = await make_broker()
    client = _client(server, pki, client_id="resume-1")
    await client.connect()
    assert not _resumed(server, "resume-1")  # the first handshake is a full one
    await client.disconnect()
    assert client.session_ticket is not None

    await client.connect()  # the same device, after an outage
    try:
        assert _resumed(server, "resume-1")
        await client.publish("resume/1", b"acked", qos=1)
    finally:
        await client.disconnect()

    # A new Client object (a restarted device process) resumes with the ticket it kept.
    again = _client(server, pki, client_id="resume-2", session_ticket=client.session_ticket)
    async with again:
        assert _resumed(server, "resume-2")
        await _round_trip(again, "resume/2")
    assert server.quic_tickets is not None
    assert server.quic_tickets.counts["resumed"] == 2


async def test_tickets_are_single_use(make_broker: Callable[..., Any], pki: CertPaths) -> None:
    server = await make_broker()
    first = _client(server, pki, client_id="once-1")
    async with first:
        pass
    ticket = first.session_ticket
    async with _client(server, pki, client_id="once-2", session_ticket=ticket):
        assert _resumed(server, "once-2")
    async with _client(server, pki, client_id="once-3", session_ticket=ticket):
        assert not _resumed(server, "once-3")  # replayed: a full handshake instead


async def test_resumption_off_with_no_tickets(
    make_broker: Callable[..., Any], pki: CertPaths
) -> None:
    server = await make_broker(quic_tickets=0)
    client = _client(server, pki, client_id="off-1")
    async with client:
        pass
    assert client.session_ticket is None and server.quic_tickets is None
    async with client:
        assert not _resumed(server, "off-1")


async def test_mqtt_authentication_applies_on_a_resumed_connection(
    make_broker: Callable[..., Any], pki: CertPaths, tmp_path: Path
) -> None:
    passwords = tmp_path / "passwords"
    add_user(passwords, "device", "s3cret")
    server = await make_broker(password_file=str(passwords), allow_anonymous=False)
    good = _client(server, pki, client_id="auth-1", username="device", password="s3cret")
    async with good:
        pass
    assert good.session_ticket is not None
    store = server.quic_tickets
    assert store is not None
    resumed = store.counts["resumed"]
    for username, password in (("device", "wrong"), (None, None)):
        bad = _client(
            server, pki, client_id="auth-2", username=username, password=password,
            session_ticket=good.session_ticket,
        )  # fmt: skip
        try:
            with pytest.raises(ClientError, match="refused"):
                await bad.connect()
        finally:
            await bad.disconnect()
        assert store.counts["resumed"] == resumed + 1  # TLS resumed, MQTT still refused
        resumed += 1
        good.session_ticket = bad.session_ticket or good.session_ticket


async def test_resumption_requires_a_certified_ticket_when_certificates_are_required(
    make_broker: Callable[..., Any], pki: CertPaths
) -> None:
    """A ticket issued without a client certificate never admits a client to a broker
    that requires one, even from the same ticket store (e.g. tickets issued before
    --require-certificate was set)."""
    open_broker = await make_broker()
    strict = await make_broker(cafile=str(pki.ca_cert), require_certificate=True)
    shared = open_broker.quic_tickets
    strict.quic_tickets = shared  # the protocols read the server's store per connection
    anonymous = _client(open_broker, pki, client_id="nocert-1")
    async with anonymous:
        pass
    ticket = anonymous.session_ticket
    assert ticket is not None and shared is not None and ticket.ticket in shared

    intruder = _client(strict, pki, client_id="nocert-2", session_ticket=ticket)
    with pytest.raises(ClientError):
        await intruder.connect()
    assert shared.counts["refused"] == 1 and shared.counts["resumed"] == 0
    assert not any(p.conn is not None for p in strict.quic_protocols)

    # A client with a certificate from the CA resumes, and keeps doing so.
    cert = issue_client_cert(pki, "resumer")
    device = _client(strict, pki, client_id="cert-1", certfile=str(cert[0]), keyfile=str(cert[1]))
    async with device:
        assert not _resumed(strict, "cert-1")
    async with device:
        assert _resumed(strict, "cert-1")
    # Without its certificate but with the certified ticket it is the same TLS session
    # (the ticket's secret proves it): still admitted; the ticket cannot outlive the cert.
    entry = shared._entries[device.session_ticket.ticket]  # type: ignore[union-attr]
    assert entry.certified
    not_after = datetime.datetime.fromtimestamp(
        Path(cert[0]).stat().st_mtime, datetime.UTC
    ) + datetime.timedelta(days=826)
    assert entry.ticket.not_valid_after <= not_after


# ---------------------------------------------------------------------- the store itself
def _ticket(n: int, when: datetime.datetime, lifetime: float = 86_400.0) -> SessionTicket:
    return SessionTicket(
        age_add=n, cipher_suite=CipherSuite.AES_128_GCM_SHA256, not_valid_before=when,
        not_valid_after=when + datetime.timedelta(seconds=lifetime), resumption_secret=b"s" * 32,
        server_name="broker", ticket=n.to_bytes(64, "big"), other_extensions=[(57, b"x" * 90)],
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


def test_the_store_is_bounded_in_count() -> None:
    clock = Clock()
    store = TicketStore(max_tickets=3, now=clock)
    for n in range(5):
        store.add(_ticket(n, clock.now))
    assert len(store) == 3 and store.counts["evicted"] == 2
    assert store.take(_ticket(0, clock.now).ticket) is None  # the oldest went first
    assert store.take(_ticket(4, clock.now).ticket) is not None
    assert store.take(_ticket(4, clock.now).ticket) is None  # single use


def test_the_store_is_bounded_in_bytes() -> None:
    clock = Clock()
    size = TicketStore.size_of(_ticket(0, clock.now))
    assert size > ENTRY_OVERHEAD
    store = TicketStore(max_bytes=10 * size, now=clock)
    for n in range(25):
        store.add(_ticket(n, clock.now))
    assert len(store) == 10 and store.bytes <= 10 * size
    assert all(e.ticket.other_extensions == [] for e in store._entries.values())


def test_tickets_expire() -> None:
    clock = Clock()
    store = TicketStore(lifetime=60, now=clock)
    store.add(_ticket(1, clock.now))  # aioquic's own lifetime (a day) is cut to 60 s
    clock.now += datetime.timedelta(seconds=30)
    store.add(_ticket(2, clock.now))
    clock.now += datetime.timedelta(seconds=31)
    assert store.take(_ticket(1, clock.now).ticket) is None
    assert store.counts["expired"] == 1 and len(store) == 1
    assert store.take(_ticket(2, clock.now).ticket) is not None
    # A certificate that ends sooner ends its ticket sooner.
    store.add(_ticket(3, clock.now), certified=True, not_after=clock.now)
    assert store.take(_ticket(3, clock.now).ticket, certified_only=True) is None


def test_uncertified_tickets_are_refused_when_certificates_are_required() -> None:
    clock = Clock()
    store = TicketStore(now=clock)
    store.add(_ticket(1, clock.now), certified=False)
    store.add(_ticket(2, clock.now), certified=True)
    assert store.take(_ticket(1, clock.now).ticket, certified_only=True) is None
    assert store.take(_ticket(2, clock.now).ticket, certified_only=True) is not None
    assert store.counts["refused"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quic_tickets": -1}, "quic_tickets must be"),
        ({"quic_ticket_bytes": -1}, "quic_ticket_bytes must be"),
        ({"quic_ticket_lifetime": 0.0}, "quic_ticket_lifetime must be"),
        ({"quic_ticket_lifetime": 8 * 86_400.0}, "quic_ticket_lifetime must be"),
    ],
)
def test_bad_ticket_options_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerConfig(**options).validate()
