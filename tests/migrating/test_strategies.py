"""The client Follower's decisions, without sockets."""

from __future__ import annotations

import itertools

import pytest

from quicmig.follower import Follower, Strategy
from quicmig.frames import Address, ServerMigration

HERE = Address("198.18.1.2", 14567)
THERE = Address("198.18.2.2", 14567)


def _probe_times(follower: Follower, until: float, step: float) -> list[float]:
    """When the follower probes, ticked every ``step`` s from 0 to ``until``."""
    probes, now = [], 0.0
    while now < until:
        if follower.due_probes(now):
            probes.append(now)
        now = round(now + step, 3)
    return probes


@pytest.mark.parametrize("strategy", [Strategy.PROACTIVE, Strategy.REACTIVE])
def test_a_notice_naming_the_current_address_calls_the_move_off(strategy: Strategy) -> None:
    """Rollback: SERVER_MIGRATION(here) after SERVER_MIGRATION(there) stops all probing."""
    follower = Follower(strategy, current=HERE)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    follower.on_silence(now=0.1)  # reactive starts probing on loss, proactive already does
    assert follower.probing and follower.due_probes(0.2) == [THERE]
    follower.on_server_migration(ServerMigration(2, HERE), now=0.3)
    assert not follower.probing and follower.due_probes(0.4) == []
    follower.on_silence(now=0.5)  # silence now is loss on the current path, not a move
    assert not follower.probing
    assert follower.announced == HERE


def test_a_stale_stay_notice_is_ignored() -> None:
    follower = Follower(Strategy.PROACTIVE, current=HERE)
    follower.on_server_migration(ServerMigration(3, THERE), now=0.0)
    follower.on_server_migration(ServerMigration(2, HERE), now=0.1)  # older sequence
    assert follower.probing and follower.announced == THERE


def test_announce_from_where_the_connection_already_is_starts_no_probing() -> None:
    """The restored broker's retransmissions may move us before SERVER_MIGRATED arrives.

    Probing the current address then would never end in a new validation, and a stale
    probing window made the client ignore the next migration's announce.
    """
    from quicmig.frames import PoolMigrationAddress, ServerMigrated

    follower = Follower(Strategy.ANNOUNCE, current=HERE)
    follower.on_pool(PoolMigrationAddress(0, (HERE, THERE)), now=0.0)
    follower.current = THERE  # the QUIC layer validated THERE already
    follower.on_server_migrated(ServerMigrated(1, THERE), THERE, now=0.1)
    assert not follower.probing
    follower.on_server_migrated(ServerMigrated(2, HERE), HERE, now=5.0)  # the move back
    assert follower.probing and follower.due_probes(5.0) == [HERE]


def test_an_announced_move_is_probed_through_a_freeze_of_a_minute_and_slowly_after_5_s() -> None:
    """10,000 clients freeze a broker for tens of seconds.  The announced destination is
    probed until the broker answers there (up to two minutes): at 0.1 s for 5 s, then
    doubling to 5 s, so a long freeze neither ends the probing nor floods the destination
    (7,500 clients at 0.1 s are 75,000 padded datagrams a second)."""
    follower = Follower(Strategy.PROACTIVE, current=HERE)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    probes = _probe_times(follower, until=60.0, step=0.005)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(probes)]
    assert max(g for a, g in zip(probes, gaps, strict=False) if a < 4.9) == pytest.approx(
        0.1, abs=0.011
    )
    late = [g for a, g in zip(probes, gaps, strict=False) if a >= 15.0]
    assert late and set(late) == {5.0}  # still probing at 60 s, every 5 s
    assert len(probes) < 110, len(probes)  # a 60 s freeze: ~90 challenges, not 600
    assert follower.expecting_move(59.0)
    assert follower.heard_from(THERE, 60.0)
    follower.on_validated(THERE, 60.01)
    assert not follower.expecting_move(60.02)  # arrived


def test_a_move_announced_but_never_made_stops_being_expected() -> None:
    """The allowance for an announced move is bounded: a notice whose move never came
    (the ANNOUNCE client moved elsewhere, or nothing happened) expires."""
    follower = Follower(Strategy.ANNOUNCE, current=HERE)
    assert not follower.expecting_move(0.0)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    assert follower.expecting_move(119.0)
    assert not follower.expecting_move(120.0)


def test_a_pool_client_probes_on_suspicion_for_a_minute_only() -> None:
    """Never told of a move, a pool client's silence may be a dead broker: its probing (and
    the client's allowance for it) lasts a minute, half an announced move's."""
    from quicmig.frames import PoolMigrationAddress

    follower = Follower(Strategy.POOL, current=HERE)
    follower.on_pool(PoolMigrationAddress(0, (HERE, THERE)), now=0.0)
    follower.on_silence(now=1.0)
    assert follower.expecting_move(60.0) and follower.due_probes(60.9) == [THERE]
    assert follower.due_probes(61.0) == [] and not follower.expecting_move(61.0)


def test_a_late_notice_from_the_destination_itself_starts_probing_at_once() -> None:
    """The broker's SERVER_MIGRATION was lost before the freeze; the thawed broker resends
    it from the destination, over a path the client knows from an earlier move.  The
    silence that makes a reactive client probe is over by then (it was handled while the
    client knew no destination), so waiting for another one left it deaf for good."""
    follower = Follower(Strategy.REACTIVE, current=HERE)
    follower.on_silence(now=0.1)  # the freeze: nothing announced, nothing to probe
    assert not follower.probing
    follower.on_server_migration(ServerMigration(1, THERE), now=0.5, source=THERE)
    assert follower.probing and follower.due_probes(0.5) == [THERE]
    # From the current address it is a notice like any other: wait for silence.
    other = Follower(Strategy.REACTIVE, current=HERE)
    other.on_server_migration(ServerMigration(1, THERE), now=0.5, source=HERE)
    assert not other.probing


def test_probes_are_spaced_by_the_quic_layers_floor() -> None:
    """A path with a long round trip: challenges go no faster than the floor allows."""
    follower = Follower(Strategy.PROACTIVE, current=HERE, probe_interval=0.02)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    assert follower.due_probes(0.0, min_interval=0.1) == [THERE]
    assert follower.due_probes(0.05, min_interval=0.1) == []
    assert follower.due_probes(0.1, min_interval=0.1) == [THERE]
    assert follower.due_probes(0.12) == []  # without a floor: probe_interval (next at 0.2)
    assert follower.next_timer() == pytest.approx(0.2)


def test_hearing_from_a_probed_address_challenges_it_at_once() -> None:
    follower = Follower(Strategy.PROACTIVE, current=HERE)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    assert follower.due_probes(0.0) == [THERE]  # the first probe; the next is due at 0.02
    assert not follower.heard_from(HERE, 0.005)  # not a target
    assert follower.heard_from(THERE, 0.005)  # the broker is back there: probe now
    assert not follower.heard_from(THERE, 0.006, min_interval=0.01)  # the QUIC layer's floor
    assert follower.due_probes(0.02) == []  # rescheduled from the early probe


def test_a_broker_heard_back_gets_time_to_answer_not_a_challenge_per_datagram() -> None:
    """1,000 clients each challenging every datagram of a thawing broker swamped it: its
    answers came too late for aioquic (it remembers five challenges) and extra
    interruption reached seconds.  Heard back, the client waits for the answer: 0.2 s,
    doubling per further challenge up to 1.6 s, and the periodic probes hold off too."""
    follower = Follower(Strategy.PROACTIVE, current=HERE)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    assert follower.due_probes(0.0) == [THERE]
    assert follower.heard_from(THERE, 1.0)  # the thaw: challenge at once
    challenges = [1.0]
    now = 1.0
    while now < 6.0:
        now = round(now + 0.001, 3)
        if follower.heard_from(THERE, now) or follower.due_probes(now):  # a datagram a ms
            challenges.append(now)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(challenges)]
    assert gaps == pytest.approx([0.2, 0.4, 0.8, 1.6, 1.6], abs=0.002), gaps
    # A new probing window (the next move) starts from the short wait again.
    follower.on_validated(THERE, 6.0)
    follower.on_server_migration(ServerMigration(2, HERE), now=10.0)
    assert follower.heard_from(HERE, 10.0) and not follower.heard_from(HERE, 10.1)
    assert follower.heard_from(HERE, 10.2)


def test_probing_backs_off_during_a_long_freeze() -> None:
    """Every 20 ms for half a second, then doubling to 0.1 s (and from 5 s on to 5 s): a 7 s
    freeze costs about 75 padded challenges, not 350; a datagram from the probed address
    still wins at once."""
    follower = Follower(Strategy.PROACTIVE, current=HERE)
    follower.on_server_migration(ServerMigration(1, THERE), now=0.0)
    probes = _probe_times(follower, until=7.0, step=0.001)
    early = [t for t in probes if t < 0.5]
    assert len(early) >= 24  # the first half second at the full rate
    gaps = [b - a for a, b in itertools.pairwise(probes) if a < 4.9]
    assert max(gaps) == pytest.approx(0.1, abs=0.002)  # then doubling, from 5 s on
    assert len(probes) < 80, len(probes)
    assert follower.heard_from(THERE, 7.0)  # the broker is back: challenge now
    # A new migration starts at the full rate again.
    follower.on_validated(THERE, 7.01)
    follower.on_server_migration(ServerMigration(2, HERE), now=20.0)
    assert follower.due_probes(20.0) == [HERE]
    assert follower.next_timer() == pytest.approx(20.02)
