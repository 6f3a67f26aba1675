"""The probing floor is taken when probing starts, not from samples that span the freeze."""

from __future__ import annotations

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from quicmig.connection import MigratingQuicConnection
from quicmig.follower import Follower, Strategy
from quicmig.frames import Address, ServerMigration


def test_freeze_spanning_rtt_samples_do_not_stretch_the_floor() -> None:
    follower = Follower(Strategy.PROACTIVE, current=Address("198.18.1.2", 14567))
    quic = MigratingQuicConnection.adopt(
        QuicConnection(configuration=QuicConfiguration(is_client=True)),
        Strategy.PROACTIVE.advertised, follower,
    )  # fmt: skip
    loss = quic._loss
    loss._rtt_initialized = True
    loss._rtt_smoothed = loss._rtt_latest = 0.002  # a LAN
    follower.on_server_migration(ServerMigration(1, Address("198.18.2.2", 14567)), now=0.0)
    floor = quic._probe_spacing()
    assert floor == 2 * 0.002 / 4
    # After the thaw the broker acknowledges packets sent before a 1 s freeze.
    loss._rtt_latest = 1.0
    loss._rtt_smoothed = 0.127
    assert quic._probe_spacing() == floor
    # The next migration window measures again.
    follower.on_validated(Address("198.18.2.2", 14567), now=1.1)
    follower.on_server_migration(ServerMigration(2, Address("198.18.3.2", 14567)), now=5.0)
    loss._rtt_latest = loss._rtt_smoothed = 0.004
    assert quic._probe_spacing() == 2 * 0.004 / 4
