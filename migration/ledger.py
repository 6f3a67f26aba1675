"""A client's message accounting in bounded memory, for runs of hours (``make soak``).

The workload's traces keep every message as ``[seq, time]`` three times (sent, acknowledged,
received): fine for a demo, but an hour at 1,000 msg/s is 11 million entries, more memory
than the broker being measured.  A :class:`Ledger` keeps instead only what the figures of
:mod:`migration.report` need, with memory proportional to what went wrong, not to traffic:

- counts of messages sent, acknowledged and received;
- the messages sent and not received yet (``outstanding``; at the end of a drained run,
  these are the lost ones), with their send times;
- which sequence numbers arrived, one bit each (a client's sequence numbers count up from
  1), so a second arrival is known as a duplicate, listed with when it arrived;
- delivery **segments**: runs of deliveries less than ``gap`` apart, as ``[first, last]``
  times.  A new segment starts only after a silence of ``gap`` or more, so the list grows
  with the number of interruptions, and the interruption across a migration (the largest
  silence between deliveries around it, :func:`migration.report.interruption`) is the
  silence between two segments.

It is sans-I/O: the workload calls ``sent``/``acknowledged``/``received`` with its clock's
times, and :meth:`result` gives the JSON the report reads (``"ledger": true``).
"""

from __future__ import annotations

import itertools
from typing import Any

MAX_LISTED = 1000  # duplicates listed one by one (more are only counted)


class Ledger:
    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.sent_count = 0
        self.acked_count = 0
        self.received_count = 0
        self.outstanding: dict[int, float] = {}  # seq -> when it was sent
        self._seen = bytearray()  # bit seq: it arrived at least once
        self.duplicates: list[list[float]] = []  # [seq, when it arrived again]
        self.duplicates_unlisted = 0
        self.segments: list[list[float]] = []  # [first, last] delivery time

    def sent(self, seq: int, at: float) -> None:
        self.sent_count += 1
        self.outstanding[seq] = at

    def acknowledged(self, seq: int, at: float) -> None:
        self.acked_count += 1

    def received(self, seq: int, at: float) -> None:
        self.received_count += 1
        byte, bit = divmod(seq, 8)
        if byte >= len(self._seen):
            self._seen.extend(bytes(byte + 1 - len(self._seen) + 1024))
        if self._seen[byte] >> bit & 1:
            if len(self.duplicates) < MAX_LISTED:
                self.duplicates.append([seq, at])
            else:
                self.duplicates_unlisted += 1
        else:
            self._seen[byte] |= 1 << bit
            self.outstanding.pop(seq, None)
        segments = self.segments
        if segments and at - segments[-1][1] < self.gap:
            segments[-1][1] = max(segments[-1][1], at)
        else:
            segments.append([at, at])

    def result(self) -> dict[str, Any]:
        return {
            "ledger": True,
            "gap": self.gap,
            "sent_count": self.sent_count,
            "acked_count": self.acked_count,
            "received_count": self.received_count,
            "unreceived": [[s, round(t, 6)] for s, t in sorted(self.outstanding.items())],
            "duplicates": [[s, round(t, 6)] for s, t in self.duplicates],
            "duplicates_unlisted": self.duplicates_unlisted,
            "segments": [[round(a, 6), round(b, 6)] for a, b in self.segments],
        }


def segments_interruption(
    segments: list[list[float]], gap: float, start: float, end: float
) -> float | None:
    """The interruption across [start, end] from delivery segments (see the module doc).

    The largest silence between two segments that the window touches; with none, the
    deliveries around the window were all less than ``gap`` apart, and ``gap`` (an upper
    bound) is returned.  None when nothing arrived before ``start`` or after ``end``.
    """
    if not segments or segments[0][0] > start or segments[-1][1] < end:
        return None
    silences = [b[0] - a[1] for a, b in itertools.pairwise(segments)
                if b[0] > start and a[1] < end]  # fmt: skip
    return max(silences) if silences else gap
