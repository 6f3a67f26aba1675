"""The migration extension's wire format (sans-I/O): round trips, limits, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmig.frames import (
    MAX_POOL,
    TRANSPORT_PARAMETER,
    Address,
    FrameError,
    MigrationTrigger,
    PoolMigrationAddress,
    ServerMigrated,
    ServerMigration,
    decode,
    encode,
    encode_transport_parameter,
    find_transport_parameter,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.builds(Address, st.one_of(ipv4, ipv6), st.integers(1, 65535))
frames = st.one_of(
    st.builds(ServerMigration, st.integers(0, 2**62 - 1), addresses),
    st.builds(ServerMigrated, st.integers(0, 2**62 - 1), addresses),
    st.builds(
        PoolMigrationAddress,
        st.integers(0, 2**30),
        st.lists(addresses, min_size=1, max_size=MAX_POOL).map(tuple),
    ),
    st.builds(MigrationTrigger, st.integers(0, 2**30), st.text(max_size=60)),
)


@given(frames)
def test_every_frame_round_trips(frame: object) -> None:
    assert decode(encode(frame)) == frame  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_garbage_raises_only_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode(data)


@given(frames, st.data())
def test_truncated_frames_are_rejected(frame: object, data: st.DataObject) -> None:
    wire = encode(frame)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(FrameError):
        decode(wire[:cut])


def test_codepoints_are_private_use_high_varints() -> None:
    """The literature's 0x32-0x34 are too low; ours spell "qmig" in 8-byte varints."""
    wire = encode(ServerMigration(1, Address("198.18.2.2", 14567)))
    assert wire[0] >> 6 == 3  # two top bits 11: an eight-byte varint frame type
    assert int.from_bytes(b"qmig", "big") == TRANSPORT_PARAMETER


def test_address_parsing_and_socket_matching() -> None:
    a = Address.parse("198.18.2.2:14567")
    assert a.matches(("::ffff:198.18.2.2", 14567, 0, 0)) and a.matches(("198.18.2.2", 14567))
    assert not a.matches(("198.18.2.3", 14567))
    assert str(Address.parse("[2001:db8::1]:5")) == "[2001:db8::1]:5"
    for bad in ("198.18.2.2", "host:1", "198.18.2.2:0", "198.18.2.2:70000"):
        with pytest.raises(ValueError):
            Address.parse(bad)


def test_pool_limits_and_bad_family() -> None:
    with pytest.raises(ValueError):
        encode(PoolMigrationAddress(1, ()))
    wire = bytearray(encode(ServerMigration(1, Address("198.18.2.2", 1))))
    wire[8 + 1] = 5  # family byte after type (8) and sequence (1)
    with pytest.raises(FrameError):
        decode(bytes(wire))


def test_transport_parameter_is_found_among_others_and_ignored_when_absent() -> None:
    other = bytes([0x01, 0x02, 0x41, 0x00])  # max_idle_timeout
    assert find_transport_parameter(other + encode_transport_parameter(0b1011)) == 0b1011
    assert find_transport_parameter(other) is None
    assert find_transport_parameter(b"\xff") is None  # truncated: treated as absent
