"""What one load-test user sent, got acknowledged and got delivered (pure: no locust, no I/O).

Every user publishes numbered messages to its own topic and is subscribed to it, so each
message is timed twice on one clock: the publish round trip (PUBACK) and the end-to-end
delivery.  A message not delivered within the delivery timeout is *lost* (a failure); if it
turns up later it is also counted *late*, so a report can tell "never arrived" from "arrived
too late".  Duplicates are allowed at QoS 1 and are only counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# perf_counter readings become wall-clock times (for lining up with a migration's timeline)
# through one offset taken at import: intervals stay on the monotonic clock.
WALL_OFFSET = time.time() - time.perf_counter()


def wall(t: float) -> float:
    return round(t + WALL_OFFSET, 6)


def payload(seq: int, size: int) -> bytes:
    """``b"<seq>."`` padded with dots to ``size`` bytes (never shorter than the number)."""
    head = f"{seq}.".encode()
    return head + b"." * max(0, size - len(head))


def parse_seq(data: bytes | bytearray) -> int | None:
    head, _, _ = data.partition(b".")
    try:
        return int(head)
    except ValueError:
        return None


@dataclass
class Tracker:
    """One user's messages; times are ``time.perf_counter()`` readings."""

    name: str
    transport: str
    keep_series: bool = False  # record every delivery/ack (for traces), not only counts
    next_seq: int = 0
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> sent at
    lost_at: dict[int, float] = field(default_factory=dict)  # seq -> sent at, declared lost
    sent: int = 0
    acked: int = 0
    ack_failures: int = 0
    delivered: int = 0
    duplicates: int = 0
    late: int = 0
    unexpected: int = 0
    connected_at: float | None = None
    deliveries: list[tuple[int, float, float]] = field(default_factory=list)  # seq, sent wall, ms
    acks: list[tuple[float, float]] = field(default_factory=list)  # sent wall, rtt ms
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # wall, what, detail
    lates: list[tuple[int, float, float]] = field(default_factory=list)  # seq, sent wall, ms

    def new(self, now: float) -> int:
        self.next_seq += 1
        self.sent += 1
        self.outstanding[self.next_seq] = now
        return self.next_seq

    def ack(self, sent: float, rtt: float) -> None:
        """The message sent at ``sent`` was acknowledged after ``rtt`` seconds."""
        self.acked += 1
        if self.keep_series:
            self.acks.append((wall(sent), round(rtt * 1000, 3)))

    def failure(self, now: float, what: str, detail: str) -> None:
        if what.endswith("publish"):
            self.ack_failures += 1
        if len(self.failures) < 1000:
            self.failures.append((wall(now), what, detail[:200]))

    def deliver(self, data: bytes | bytearray, now: float) -> float | None:
        """A delivery at ``now``: its latency in seconds, or None if not a first, timely one."""
        seq = parse_seq(data)
        if seq is None or seq > self.next_seq or seq < 1:
            self.unexpected += 1
            return None
        sent = self.outstanding.pop(seq, None)
        if sent is None:
            late = self.lost_at.pop(seq, None)
            if late is None:
                self.duplicates += 1
            else:
                self.late += 1
                self.lates.append((seq, wall(late), round((now - late) * 1000, 3)))
            return None
        self.delivered += 1
        latency = now - sent
        if self.keep_series:
            self.deliveries.append((seq, wall(sent), round(latency * 1000, 3)))
        return latency

    def overdue(self, now: float, timeout: float) -> list[tuple[int, float]]:
        """Messages older than ``timeout`` not delivered: declared lost, ``(seq, age)``."""
        out = []
        for seq, sent in list(self.outstanding.items()):  # insertion order = sending order
            if now - sent < timeout:
                break
            del self.outstanding[seq]
            self.lost_at[seq] = sent
            out.append((seq, now - sent))
        return out

    def give_up(self, now: float) -> list[tuple[int, float]]:
        """At the end: everything still outstanding is lost."""
        return self.overdue(now, float("-inf"))

    @property
    def lost(self) -> int:
        """Declared lost and never arrived (late arrivals are taken out again)."""
        return len(self.lost_at)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "transport": self.transport,
            "sent": self.sent,
            "acked": self.acked,
            "ack_failures": self.ack_failures,
            "delivered": self.delivered,
            "lost": self.lost,
            "late": self.late,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "connected_at": None if self.connected_at is None else wall(self.connected_at),
            "lost_messages": [[s, wall(t)] for s, t in self.lost_at.items()],
            "failures": [list(f) for f in self.failures],
        }
        if self.keep_series:
            out["deliveries"] = [list(d) for d in self.deliveries]
            out["acks"] = [list(a) for a in self.acks]
            out["lates"] = [list(x) for x in self.lates]
        return out
