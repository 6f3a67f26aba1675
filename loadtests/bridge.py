"""Run qmig's asyncio client from locust's gevent greenlets.

Locust monkey-patches the standard library at import, and every user is a greenlet on one
gevent hub.  The QUIC client is asyncio (aioquic), so it runs elsewhere: one asyncio loop in a
*real* OS thread, shared by every QUIC user of the locust process.

- A greenlet submits a coroutine with :meth:`Bridge.run`; the loop thread runs it and, when
  it is done, queues the outcome and calls ``send()`` on a gevent ``async_`` watcher, the one
  libev primitive that may be signalled from another thread.  The hub wakes, sets a
  :class:`gevent.event.AsyncResult`, and only the waiting greenlet resumes.  Nothing holds a
  thread per waiting user, so there is no pool to run dry (``hub.threadpool`` has 10 threads:
  an eleventh waiting user deadlocks the lot).
- The thread is started with the original ``_thread.start_new_thread`` (the patched
  ``threading.Thread`` would make a greenlet on the wrong hub); the loop polls with the
  original epoll selector (the patched ``selectors.DefaultSelector`` is gevent's); name
  lookups run inline with the original ``socket.getaddrinfo`` instead of asyncio's default
  executor, whose patched worker "threads" would be greenlets that no hub ever runs.

Sockets asyncio creates in that thread are gevent's ``socket`` class, which in non-blocking
mode is a thin wrapper around the real one: asyncio only ever calls it non-blocking.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import gevent
import gevent.event
from gevent import monkey

log = logging.getLogger("qmig.loadtests")

T = TypeVar("T")


def _original(module: str, name: str, default: Any) -> Any:
    """The standard library object gevent replaced (or the current one if it did not)."""
    try:
        return monkey.get_original(module, name)
    except (AttributeError, ImportError):
        return default


_start_new_thread: Callable[..., int] = _original(
    # threading's private alias (what gevent patches) is not in typeshed.
    "_thread",
    "start_new_thread",
    threading._start_new_thread,  # type: ignore[attr-defined]
)
_Selector: type[selectors.BaseSelector] = _original(
    "selectors", "EpollSelector", selectors.DefaultSelector
)
_getaddrinfo: Callable[..., Any] = _original("socket", "getaddrinfo", socket.getaddrinfo)


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """asyncio's default executor in the loop thread: runs the call at once, unpatched.

    asyncio only sends name lookups here (``loop.getaddrinfo``); for the IP literals a load
    test uses they return at once.  (asyncio insists on a ThreadPoolExecutor; this one
    never starts a thread.)
    """

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        if fn is socket.getaddrinfo:
            fn = _getaddrinfo
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class Bridge:
    """One asyncio loop in a real thread, awaited from greenlets of the current gevent hub.

    Both directions go through a queue plus *one* wake-up while the queue is non-empty:
    every wake-up is a syscall, after which the waking thread must win the GIL back from the
    other one (up to the 5 ms switch interval when that one is busy).  One wake-up per
    message makes every message pay that; one per batch lets a busy bridge carry hundreds
    of users (measured: a wake-up per call gave 400 users at 1 msg/s a p50 round trip of
    50-100 ms, against 2 ms for the same clients in plain asyncio).
    """

    def __init__(self) -> None:
        self._hub = gevent.get_hub()
        # loop thread -> hub
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._inbox_signalled = False
        self._watcher = self._hub.loop.async_()
        self._watcher.ref = False  # an idle bridge must not keep the hub (and locust) alive
        self._watcher.start(self._drain_inbox)
        # hub -> loop thread
        self._outbox: collections.deque[Callable[[], Any]] = collections.deque()
        self._outbox_signalled = False
        self.loop = asyncio.SelectorEventLoop(_Selector())
        self.loop.set_default_executor(_InlineExecutor())
        self._started = gevent.event.Event()
        self._stopped = False
        self.thread_id = _start_new_thread(self._thread_main, ())
        self._started.wait(10)

    def _thread_main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self.post, self._started.set)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    # ------------------------------------------------------------------ loop thread -> hub
    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the loop thread: have ``fn(*args)`` run in the gevent hub (it must not block)."""
        self._inbox.append((fn, args))
        if not self._inbox_signalled:
            self._inbox_signalled = True
            self._watcher.send()

    def _drain_inbox(self) -> None:
        # Clear the flag first: what is posted from now on either is drained below or
        # signals again (a spare wake-up is harmless; a lost one would strand a greenlet).
        self._inbox_signalled = False
        while self._inbox:
            fn, args = self._inbox.popleft()
            try:
                fn(*args)
            except Exception:  # one bad callback must not stop the others being delivered
                log.exception("bridge callback failed")

    # ------------------------------------------------------------------ greenlet -> loop
    def _submit(self, fn: Callable[[], Any]) -> None:
        """From the hub's side: run ``fn()`` in the loop thread."""
        self._outbox.append(fn)
        if not self._outbox_signalled:
            self._outbox_signalled = True
            self.loop.call_soon_threadsafe(self._drain_outbox)

    def _drain_outbox(self) -> None:
        self._outbox_signalled = False
        while self._outbox:
            self._outbox.popleft()()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` in the loop thread; block only the calling greenlet until it ends.

        ``timeout`` raises :class:`TimeoutError` and cancels the coroutine.  Killing the
        greenlet (locust stopping a user) does not: a publish already under way still goes
        out, so that the user's drain can wait for its delivery.
        """
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        holder: list[asyncio.Task[T]] = []

        def done(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                self.post(result.set_exception, asyncio.CancelledError())
            elif task.exception() is not None:
                self.post(result.set_exception, task.exception())
            else:
                self.post(result.set, task.result())

        def start() -> None:
            task = self.loop.create_task(coro)
            holder.append(task)
            task.add_done_callback(done)

        self._submit(start)
        try:
            return result.get(timeout=timeout)
        except gevent.Timeout:
            # Submitted before the cancel, so ``start`` has run by the time ``cancel`` does.
            self._submit(lambda: [task.cancel() for task in holder])
            raise TimeoutError(f"no result within {timeout:g} s") from None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` in the loop thread and do not wait for it."""
        self._submit(lambda: self.loop.create_task(coro))

    def stop(self) -> None:
        """Stop the loop thread (the process is ending; pending tasks are dropped)."""
        if not self._stopped:
            self._stopped = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._watcher.stop()


_bridge: Bridge | None = None


def get_bridge() -> Bridge:
    """The process's bridge, started on first use (from a greenlet of the main hub)."""
    global _bridge
    if _bridge is None:
        _bridge = Bridge()
    return _bridge
