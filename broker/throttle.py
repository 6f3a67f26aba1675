"""What an untrusted peer may make the broker do per second, and what it may put in the log.

Sans-I/O helpers: every call takes ``now`` (seconds on any monotonic clock), so the engine's
fake clock drives them in tests as the event loop's drives them in the broker.

- :class:`TokenBucket`: ``rate`` events a second on average, ``burst`` at once.
- :class:`FailureBackoff`: how long to hold back the answer to a failed attempt, doubling
  with each failure of the same peer and of everybody, capped, forgotten after a quiet spell.
- :class:`LogWindow`: one log line per window for a repeated event, the rest counted.
- :func:`log_safe`: peer-supplied text made safe to log (no line breaks, no control
  characters, bounded length), so it cannot forge or flood log lines.
"""

from __future__ import annotations

from dataclasses import dataclass


class TokenBucket:
    """Allows ``rate`` events per second on average and ``burst`` in a row."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; False (nothing spent) if not."""
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class FailureBackoff:
    """Delays for failed attempts: ``base * 2**(n-1)`` for a peer's n-th recent failure.

    Everybody's failures count too, after ``global_free`` of them: many peers guessing
    together are slowed like one.  The larger of the two delays applies, at most ``cap``
    seconds.  A peer's (or everybody's) count is forgotten after ``forget`` seconds without
    a failure; at most ``max_peers`` peers are remembered (the longest quiet go first).
    """

    def __init__(
        self,
        base: float = 0.1,
        cap: float = 3.0,
        forget: float = 60.0,
        global_free: int = 5,
        max_peers: int = 4096,
    ) -> None:
        self.base = base
        self.cap = cap
        self.forget = forget
        self.global_free = global_free
        self.max_peers = max_peers
        self._peers: dict[str, _Failures] = {}
        self._all = _Failures(0, 0.0)

    def _delay(self, count: int) -> float:
        if count <= 0:
            return 0.0
        return min(self.cap, self.base * (1 << min(count - 1, 62)))  # 2 ** n, as an int

    def failed(self, peer: str, now: float) -> float:
        """Record a failure of ``peer``; returns the seconds to hold back the answer."""
        entry = self._peers.pop(peer, None)  # re-inserted last: the dict is oldest-first
        if entry is None or now - entry.last > self.forget:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        self._peers[peer] = entry
        while len(self._peers) > self.max_peers:
            del self._peers[next(iter(self._peers))]
        everyone = self._all
        if now - everyone.last > self.forget:
            everyone.count = 0
        everyone.count += 1
        everyone.last = now
        return max(self._delay(entry.count), self._delay(everyone.count - self.global_free))

    def succeeded(self, peer: str) -> None:
        """``peer`` got it right: its own count starts over (everybody's does not)."""
        self._peers.pop(peer, None)

    def failures(self, peer: str) -> int:
        entry = self._peers.get(peer)
        return entry.count if entry is not None else 0


class LogWindow:
    """Lets one log line through per ``window`` seconds and counts what it holds back."""

    __slots__ = ("held", "opened", "window")

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.opened: float | None = None
        self.held = 0

    def hit(self, now: float) -> int | None:
        """An event: None if its line is held back, else how many were held since the last."""
        if self.opened is not None and now - self.opened < self.window:
            self.held += 1
            return None
        held, self.held, self.opened = self.held, 0, now
        return held


def log_safe(text: str, limit: int = 256) -> str:
    """``text`` with backslashes, line breaks and other unprintable characters escaped
    (``\\n``, ``\\x1b``, ``\\u2028``) and cut to ``limit`` characters (``...`` marks a cut)."""
    out = []
    size = 0
    for ch in text:
        piece = ch if ch.isprintable() and ch != "\\" else ch.encode("unicode_escape").decode()
        size += len(piece)
        if size > limit:
            out.append("...")
            break
        out.append(piece)
    return "".join(out)
