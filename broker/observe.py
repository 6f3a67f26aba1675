"""Observers: how measurement reaches the broker without living on its hot path.

The I/O layer calls :attr:`BrokerServer.observer` (one ``None`` check per datagram or
connection when nobody observes) with what it sees: every QUIC datagram and every new
TCP-family connection.  :class:`ReturnWatch` is the observer the migration API installs at
a thaw: it notes the first client datagram at the new address and when each client was heard
again, for the move's timeline, and removes itself after :data:`RETURN_WATCH` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

RETURN_WATCH = 30.0  # seconds after a thaw during which returning clients are noted


class Observer(Protocol):
    def datagram(self, io: Any, addr: Any) -> None:
        """A QUIC datagram arrived for the connection ``io`` from ``addr``."""

    def connection(self, io: Any) -> None:
        """A TCP, TLS or MPTCP connection was accepted (``io``: its protocol)."""


class ReturnWatch:
    """Who came back after the thaw at ``thawed_at`` (wall clock), and when."""

    def __init__(self, thawed_at: float, done: Callable[[ReturnWatch], None]) -> None:
        self.thawed_at = thawed_at
        self.first_packet_at: float | None = None
        self.first_packet_from: str | None = None
        # id(io) -> (when, io, client id, transport): who it was is noted when it is first
        # heard, as the connection may have ended (and left its io) by the time of a report.
        self._returns: dict[int, tuple[float, Any, str, str]] = {}
        self._done = done

    def datagram(self, io: Any, addr: Any) -> None:
        if self.first_packet_at is None:
            self.first_packet_at = time.time()
            self.first_packet_from = f"{addr[0]}:{addr[1]}" if addr else None
        self.connection(io)

    def connection(self, io: Any) -> None:
        now = time.time()
        if id(io) not in self._returns:
            conn = getattr(io, "conn", None)
            if conn is not None:
                self._returns[id(io)] = (now, io, conn.client_id, conn.transport)
            else:
                self._returns[id(io)] = (now, io, "", "?")
        if now - self.thawed_at > RETURN_WATCH:
            self._done(self)  # bounded: nobody is watched for long

    def returned(self) -> list[dict[str, Any]]:
        """Per client, how long after the thaw it was heard again: the broker's view."""
        out = []
        for at, io, noted_id, noted_transport in sorted(self._returns.values(),
                                                        key=lambda r: r[0]):  # fmt: skip
            # A new TCP connection has no client id until its CONNECT: ask it again now.
            conn = getattr(io, "conn", None)
            client_id = (conn.client_id if conn is not None else "") or noted_id
            transport = conn.transport if conn is not None else noted_transport
            out.append({
                "client_id": client_id,
                "transport": transport,
                "after_thaw_ms": round((at - self.thawed_at) * 1000, 1),
            })  # fmt: skip
        return out
