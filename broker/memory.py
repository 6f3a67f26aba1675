"""Giving the broker's freed memory back to the system (issue #16).

Every byte of the broker's RSS is dumped, compressed, sent and restored in each container
migration.  A QUIC handshake allocates and frees about 100 KB (TLS key schedules, crypto
buffers, certificates, packets) among objects that live as long as the connection, and
glibc's allocator keeps what was freed in the middle of its heap: after 1,000 handshakes the
broker held tens of MB it no longer used.  ``malloc_trim(0)`` hands the free pages back
(``madvise(MADV_DONTNEED)`` on whole free pages anywhere in the heap, not only at its top).

- :func:`release_memory`: a full ``gc.collect()`` then ``malloc_trim(0)``; returns the RSS
  before and after.  For moments when a pause is fine: the pre-checkpoint step, before CRIU
  dumps the process.
- :class:`Trimmer`: ``malloc_trim(0)`` alone (no collection: a full one walks every object),
  at most once per ``interval`` and only when handshakes happened since the last one; the
  QUIC listener tells it about each completed handshake.

``malloc_trim`` is glibc's: where the C library is not glibc (musl, macOS) both do only what
Python can do (the collection), and :func:`malloc_trim` returns None.  ctypes is imported
on first use, and the RSS read from ``/proc`` (psutil, 2.7 MB of RSS once imported, only
where there is no ``/proc``): a broker that never trims pays for neither.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger("qmig.broker")

TRIM_INTERVAL = 1.0  # seconds: at most one malloc_trim per interval


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
    except OSError:
        return None
    # gnu_get_libc_version exists only in glibc; musl and others have no malloc_trim
    # (or a stub that trims nothing).
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def call(pad: int) -> int:
        return int(trim(pad))

    return call


def rss_bytes() -> int:
    """The process's resident set size."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def release_memory() -> dict[str, int]:
    """Collect garbage, then give the allocator's free pages back to the system.

    Returns ``rss_before`` and ``rss_after`` in bytes.  The collection walks every object:
    about 80 ms with 1,000 QUIC connections on this 2-core machine (``malloc_trim`` itself
    is well under a millisecond), so call it when a pause does not matter, such as just
    before a checkpoint.
    """
    before = rss_bytes()
    gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim(0)
    return {"rss_before": before, "rss_after": rss_bytes()}


class Trimmer:
    """``malloc_trim(0)`` after handshakes, batched: at most once per ``interval``.

    :meth:`note` marks that a handshake completed (its transient allocations are freed by
    then, see ``MigratingQuicConnection._qmig_release_handshake``); a trim follows
    ``interval`` after the previous one, or at once if that was long enough ago.  A fleet
    connecting at 1,000/s thus costs one trim a second, not one per handshake.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float = TRIM_INTERVAL,
        trim: Callable[[int], int] | bool | None = True,
    ) -> None:
        """``trim``: the function to call (True: glibc's, found on the first handshake)."""
        self._loop = loop
        self.interval = interval
        self._trim = trim
        self._handle: asyncio.TimerHandle | None = None
        self._last = -interval
        self.trims = 0
        self.trim_seconds = 0.0  # total time spent in malloc_trim

    @property
    def available(self) -> bool:
        """Whether it can trim (finding glibc's function first: ctypes comes in)."""
        return self._function() is not None

    def _function(self) -> Callable[[int], int] | None:
        if self._trim is True:
            self._trim = malloc_trim()
        return self._trim if callable(self._trim) else None

    def note(self) -> None:
        """A handshake completed: trim within ``interval``."""
        if self._handle is not None or self._function() is None:
            return
        when = max(self._loop.time(), self._last + self.interval)
        self._handle = self._loop.call_at(when, self._run)

    def _run(self) -> None:
        self._handle = None
        self._last = self._loop.time()
        trim = self._function()
        assert trim is not None
        start = time.perf_counter()
        trim(0)
        self.trim_seconds += time.perf_counter() - start
        self.trims += 1

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
