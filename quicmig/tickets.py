"""A server's TLS session tickets for QUIC resumption: bounded in count, bytes and age.

aioquic issues a session ticket (NewSessionTicket, 64 random bytes naming a resumption
secret) after each full handshake and asks the application to keep the secret; a client
that offers the ticket on its next connect skips the certificate and its signature.  The
store is sans-I/O and lives in the server process's memory, so a container migration moves
it with the broker.  Rules:

- A ticket is single-use: :meth:`TicketStore.take` removes it, and the resumed connection
  gets a fresh one.  That also keeps one entry per reconnecting client.
- At most ``max_tickets`` entries and ``max_bytes`` (estimated) bytes: the oldest go first.
  Every entry gets the same lifetime, so insertion order is expiry order and expiry takes
  from the front too (a ticket tied to a client certificate may end earlier: see below).
- ``certified``: the ticket was issued on a connection whose client presented a certificate
  that the server verified (or resumed such a ticket).  A server that requires client
  certificates honours only those: aioquic sends no CertificateRequest in a PSK handshake,
  so an uncertified ticket would admit a client without a certificate.  Such a ticket
  expires no later than the certificate it stands for.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from aioquic.tls import SessionTicket

# What an entry costs beyond its byte strings: the SessionTicket dataclass, two datetimes,
# the entry and its slot in the ordered dict (measured with tracemalloc: ~700 bytes).
ENTRY_OVERHEAD = 800
DEFAULT_MAX_TICKETS = 65_536
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_LIFETIME = 86_400.0  # seconds: aioquic's ticket_lifetime, which clients are told


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class StoredTicket:
    ticket: SessionTicket
    certified: bool
    size: int


class TicketStore:
    """Session tickets by identity (the ticket bytes), oldest first."""

    def __init__(
        self,
        max_tickets: int = DEFAULT_MAX_TICKETS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        lifetime: float = DEFAULT_LIFETIME,
        now: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        self.max_tickets = max_tickets
        self.max_bytes = max_bytes
        self.lifetime = datetime.timedelta(seconds=lifetime)
        self._now = now
        self._entries: OrderedDict[bytes, StoredTicket] = OrderedDict()
        self.bytes = 0
        self.counts = {"issued": 0, "resumed": 0, "refused": 0, "expired": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, identity: object) -> bool:
        return identity in self._entries

    @staticmethod
    def size_of(ticket: SessionTicket) -> int:
        return (
            ENTRY_OVERHEAD
            + 2 * len(ticket.ticket)  # the value and the dict key (the same bytes, counted)
            + len(ticket.resumption_secret)
            + len(ticket.server_name or "")
        )

    def add(
        self,
        ticket: SessionTicket,
        certified: bool = False,
        not_after: datetime.datetime | None = None,
    ) -> None:
        """Keep ``ticket``; ``not_after`` (a client certificate's end) can shorten its life."""
        if self.max_tickets <= 0:
            return
        now = self._now()
        self._expire(now)
        end = min(ticket.not_valid_after, now + self.lifetime)
        if not_after is not None:
            end = min(end, not_after)
        # Nothing of the handshake's transport parameters is needed without 0-RTT.
        ticket = replace(ticket, not_valid_after=end, other_extensions=[])
        entry = StoredTicket(ticket, certified, self.size_of(ticket))
        old = self._entries.pop(ticket.ticket, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[ticket.ticket] = entry
        self.bytes += entry.size
        self.counts["issued"] += 1
        while self._entries and (
            len(self._entries) > self.max_tickets or self.bytes > self.max_bytes
        ):
            self._pop_oldest()
            self.counts["evicted"] += 1

    def take(self, identity: bytes, certified_only: bool = False) -> StoredTicket | None:
        """Remove and return the ticket named ``identity`` if it may resume a connection."""
        now = self._now()
        self._expire(now)
        entry = self._entries.pop(identity, None)
        if entry is None:
            return None
        self.bytes -= entry.size
        if entry.ticket.not_valid_after <= now:
            self.counts["expired"] += 1
            return None
        if certified_only and not entry.certified:
            self.counts["refused"] += 1
            return None
        self.counts["resumed"] += 1
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _pop_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self.bytes -= entry.size

    def _expire(self, now: datetime.datetime) -> None:
        entries = self._entries
        while entries and next(iter(entries.values())).ticket.not_valid_after <= now:
            self._pop_oldest()
            self.counts["expired"] += 1
