"""A deliberately tiny raw-socket MQTT client for the few cases real clients cannot do.

Real clients always answer keep-alive pings and always close politely; the
will / keep-alive tests need a client that *stops talking* or *drops the TCP
connection* without a DISCONNECT at an exactly known moment.  This module only
encodes CONNECT / DISCONNECT and decodes the fixed header plus the CONNACK and
DISCONNECT reason codes; it is independent of the project's own codec on
purpose (it is the oracle, not the thing under test).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, DISCONNECT = 1, 2, 3, 14

# property identifiers used here (MQTT 5 §2.2.2.2)
SESSION_EXPIRY_INTERVAL = 0x11
WILL_DELAY_INTERVAL = 0x18


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(data)) + data


def _props(props: dict[int, int]) -> bytes:
    body = b"".join(bytes([pid]) + struct.pack("!I", value) for pid, value in props.items())
    return _varint(len(body)) + body


def _packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + _varint(len(body)) + body


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    delay: int | None = None  # v5 Will Delay Interval


def encode_connect(
    client_id: str,
    *,
    version: int = 5,
    keepalive: int = 60,
    clean: bool = True,
    will: Will | None = None,
    session_expiry: int | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    body = _str("MQTT") + bytes([5 if version == 5 else 4, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        body += _props({SESSION_EXPIRY_INTERVAL: session_expiry} if session_expiry else {})
    body += _str(client_id)
    if will is not None:
        if version == 5:
            body += _props({WILL_DELAY_INTERVAL: will.delay} if will.delay else {})
        body += _str(will.topic) + _str(will.payload)
    return _packet(CONNECT, 0, body)


@dataclass
class Packet:
    ptype: int
    flags: int
    body: bytes = field(repr=False)


class RawClient:
    """One TCP connection speaking just enough MQTT to connect and then misbehave."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.closed = False

    def connect(self, client_id: str, **kwargs: object) -> Packet:
        """Send CONNECT and return the CONNACK (reason code in ``connack_code``)."""
        self.sock.sendall(encode_connect(client_id, **kwargs))  # type: ignore[arg-type]
        pkt = self.read_packet(timeout=5.0)
        if pkt is None or pkt.ptype != CONNACK:
            raise AssertionError(f"expected CONNACK, got {pkt}")
        return pkt

    @staticmethod
    def connack_code(pkt: Packet) -> int:
        return pkt.body[1]

    def send_disconnect(self, version: int = 5, reason: int = 0) -> None:
        body = bytes([reason, 0]) if version == 5 else b""
        self.sock.sendall(_packet(DISCONNECT, 0, body))

    def _recv(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self._buf += chunk
        return True

    def read_packet(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None on timeout / connection closed by the peer."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 2:
                mult, length, i = 1, 0, 1
                while i < len(self._buf):
                    byte = self._buf[i]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not byte & 0x80:
                        if len(self._buf) >= i + length:
                            head = self._buf[0]
                            body = self._buf[i : i + length]
                            self._buf = self._buf[i + length :]
                            return Packet(head >> 4, head & 0x0F, body)
                        break
            if self.closed or not self._recv(deadline):
                return None

    def wait_closed(self, timeout: float) -> list[Packet]:
        """Read (and return) packets until the peer closes; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        packets: list[Packet] = []
        while not self.closed:
            pkt = self.read_packet(timeout=max(0.0, deadline - time.monotonic()))
            if pkt is not None:
                packets.append(pkt)
            elif not self.closed:
                raise AssertionError(f"connection still open after {timeout}s: {packets}")
        return packets

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (RST: an abnormal close)."""
        if not self.closed:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
