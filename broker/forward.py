"""Accepted MIGRATION_TRIGGERs, sent on to the orchestrator (``--orchestrator-url``).

The migration API decides which triggers count (authorized, rate-limited: see
:mod:`broker.migration_api`); each one it accepts is handed to :meth:`TriggerForwarder.forward`,
which POSTs it as JSON to ``<url>/v1/triggers`` with the orchestrator's trigger token as a
bearer token::

    {"broker": "lab", "client_id": "...", "username": "...", "from": "198.18.100.2:50000",
     "reason": 2, "hint": "edge-b", "at": 1764763000.1}

The request runs in a worker thread (stdlib ``urllib``), never on the event loop, bounded
by :data:`POST_TIMEOUT`; at most :data:`MAX_IN_FLIGHT` are under way (more are dropped and
counted: the rate limits keep that rare).  A failure is logged once, then once a minute
with how many failed meanwhile, and once more when the orchestrator answers again.  Before
a checkpoint :meth:`drain` waits for requests under way, so no connection to the
orchestrator is open when CRIU dumps the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from .throttle import LogWindow

log = logging.getLogger("qmig.migration")

POST_TIMEOUT = 3.0  # seconds one POST may take, connect included
MAX_IN_FLIGHT = 4
FAILURE_LOG_WINDOW = 60.0
TRIGGER_PATH = "/v1/triggers"


class TriggerForwarder:
    """POSTs accepted triggers to the orchestrator; ``counts`` says how that went."""

    def __init__(self, url: str, token: str, broker: str) -> None:
        self.url = url.rstrip("/") + TRIGGER_PATH
        self.broker = broker
        self._token = token
        self.counts = {"sent": 0, "failed": 0, "dropped": 0}
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = LogWindow(FAILURE_LOG_WINDOW)
        self._failing = False

    def forward(self, entry: dict[str, Any]) -> None:
        """Send ``entry`` (the migration API's record of one accepted trigger), later."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.counts["dropped"] += 1
            self._failed(f"{MAX_IN_FLIGHT} requests still under way")
            return
        body = json.dumps({"broker": self.broker, **entry}).encode("utf-8")
        task = asyncio.get_running_loop().create_task(self._send(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, body: bytes) -> None:
        try:
            status = await asyncio.to_thread(self._post, body)
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            self.counts["failed"] += 1
            self._failed(_reason(exc))
            return
        self.counts["sent"] += 1
        if self._failing:
            self._failing = False
            log.info("orchestrator at %s takes triggers again (HTTP %d)", self.url, status)

    def _post(self, body: bytes) -> int:
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"},
        )
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT) as reply:
            reply.read(64 * 1024)
            return int(reply.status)

    def _failed(self, why: str) -> None:
        self._failing = True
        held = self._failures.hit(asyncio.get_running_loop().time())
        if held is not None:
            log.warning(
                "migration trigger not forwarded to the orchestrator at %s: %s (%d more "
                "failed since the last such line; counted in the metrics)",
                self.url, why, held,
            )  # fmt: skip

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for requests under way: before a checkpoint."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
