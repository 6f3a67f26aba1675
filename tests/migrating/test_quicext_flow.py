"""The opt-in bounded receive window of MigratingQuicConnection, without sockets.

Two aioquic connections exchange datagrams by hand on a simulated clock: a server (the
broker's role) sends on the client's stream; the client (the bridge's QUIC leg) bounds
its window and pauses the stream as the bridge does when its TCP client stops reading.
The sender must block on flow control then, and carry on after the resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from broker.certs import CertPaths, make_lab_certs
from client.transports import quic_configuration
from quicmig.connection import MigratingQuicConnection

CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.1", 14567)
WINDOW = 64 << 10
STEP = 0.002  # simulated seconds per exchange round (about one round trip per two)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_lab_certs(Path(tmp_path_factory.mktemp("flow-certs")))


class Pair:
    """A client and a server connection joined by a lossless in-memory path."""

    def __init__(self, certs: CertPaths, window: int | None) -> None:
        client_config = quic_configuration(str(certs.ca_cert), server_name="localhost")
        if window is not None:
            client_config.max_stream_data = window  # as open_stream(receive_window=...) does
        self.client = MigratingQuicConnection.adopt(QuicConnection(configuration=client_config), 0)
        self.client.receive_window = window
        server_config = QuicConfiguration(
            is_client=False, alpn_protocols=["mqtt"], max_data=16 << 20, max_stream_data=8 << 20
        )
        server_config.load_cert_chain(str(certs.server_cert), str(certs.server_key))
        self.server = QuicConnection(
            configuration=server_config,
            original_destination_connection_id=self.client.original_destination_connection_id,
        )
        self.now = 0.0
        self.received = 0  # stream bytes handed to the client application
        self.drop_from_client = 0  # datagrams from the client to lose next
        self.client.connect(SERVER_ADDR, now=self.now)
        self.run(0.1)
        self.sid = self.client.get_next_available_stream_id()
        self.client.send_stream_data(self.sid, b"CONNECT")
        self.run(0.05)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += STEP
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(self.now)
            for data, _ in self.client.datagrams_to_send(self.now):
                if self.drop_from_client:
                    self.drop_from_client -= 1
                    continue
                self.server.receive_datagram(data, CLIENT_ADDR, self.now)
            for data, _ in self.server.datagrams_to_send(self.now):
                self.client.receive_datagram(data, SERVER_ADDR, self.now)
            while (event := self.client.next_event()) is not None:
                if isinstance(event, StreamDataReceived) and event.stream_id == self.sid:
                    self.received += len(event.data)
            while self.server.next_event() is not None:
                pass

    def server_backlog(self) -> int:
        """What the broker's high-water logic counts: unacknowledged + unsent stream bytes."""
        sender = self.server._streams[self.sid].sender
        return int(sender._buffer_stop - sender._buffer_start)

    def client_limit(self) -> int:
        return int(self.client._streams[self.sid].max_stream_data_local)


def test_paused_stream_holds_the_sender_to_one_window(certs: CertPaths) -> None:
    pair = Pair(certs, WINDOW)
    pair.server.send_stream_data(pair.sid, b"a" * (512 << 10))
    pair.run(0.5)
    assert pair.received == 512 << 10  # not paused: the window keeps moving
    assert pair.client_limit() <= pair.received + WINDOW  # bounded, not doubled

    pair.client.pause_receiving(pair.sid)
    before = pair.received
    pair.server.send_stream_data(pair.sid, b"b" * (1 << 20))
    pair.run(0.5)
    stalled = pair.received
    assert stalled - before <= WINDOW  # only the credit granted before the pause
    pair.run(0.5)
    assert pair.received == stalled  # and nothing more, however long it waits
    assert pair.server_backlog() >= (1 << 20) - WINDOW  # the broker would pause the client

    pair.client.resume_receiving(pair.sid)
    pair.run(1.0)
    assert pair.received == (512 << 10) + (1 << 20)
    assert pair.server_backlog() == 0


def test_lost_credit_is_sent_again(certs: CertPaths) -> None:
    """The MAX_STREAM_DATA that resumes a paused stream is lost: it goes again, the
    transfer completes (it would stall for good otherwise)."""
    pair = Pair(certs, WINDOW)
    pair.client.pause_receiving(pair.sid)
    pair.server.send_stream_data(pair.sid, b"c" * (256 << 10))
    pair.run(0.3)
    assert pair.received <= WINDOW
    pair.client.resume_receiving(pair.sid)
    pair.drop_from_client = 1
    pair.run(2.0)
    assert pair.drop_from_client == 0
    assert pair.received == 256 << 10


def test_default_keeps_aioquic_windows(certs: CertPaths) -> None:
    """Without ``receive_window`` (broker, qmig's clients) pausing changes nothing."""
    pair = Pair(certs, None)
    pair.client.pause_receiving(pair.sid)
    pair.server.send_stream_data(pair.sid, b"d" * (1 << 20))
    pair.run(0.5)
    assert pair.received == 1 << 20
    assert pair.client_limit() >= 8 << 20  # the configured window, doubled as it is used
