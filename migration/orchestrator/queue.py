"""The orchestrator's queue on disk: the core's snapshot, written whole and atomically.

``state.json`` in the state directory holds what a restart needs (the queue, the running
job, where each broker is, draining hosts, schedules): written to a temporary file,
fsynced, renamed over the old one, so a crash leaves the old state or the new one, never
half of either.  ``lock`` is held (``flock``) for the service's life: a second orchestrator
on the same state directory refuses to start instead of running migrations alongside.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any


class StateError(RuntimeError):
    """The state directory cannot be used; the text says why in one line."""


class StateFile:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self._lock: IO[str] | None = None

    def lock(self) -> None:
        """Own the state directory (created 0700 if missing) or raise :class:`StateError`."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fh = open(self.dir / "lock", "a+")  # noqa: SIM115 - held until unlock()
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StateError(f"another orchestrator uses {self.dir}") from None
        self._lock = fh

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def load(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{self.path} is not valid JSON ({exc}); move it away to start "
                             "afresh") from exc  # fmt: skip
        if not isinstance(data, dict):
            raise StateError(f"{self.path} does not hold an orchestrator state")
        return data

    def save(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # the rename itself, durable
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
