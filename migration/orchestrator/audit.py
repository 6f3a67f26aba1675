"""The audit log: one JSON object per line, appended, never rewritten.

Every decision of the core (queued, refused and why, started, done, failed, interrupted,
drained) and every outcome goes here with its time, written and flushed before the API
answers.  ``tail`` reads the last lines for ``GET /v1/history`` without loading the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

TAIL_CHUNK = 64 * 1024


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, entry: dict[str, Any], at: float | None = None) -> dict[str, Any]:
        record = {"at": round(at if at is not None else time.time(), 6), **entry}
        self._fh.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        self._fh.flush()
        return record

    def close(self) -> None:
        self._fh.close()

    def tail(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` records, oldest first."""
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= limit:
                start = max(0, end - TAIL_CHUNK)
                fh.seek(start)
                data = fh.read(end - start) + data
                end = start
        out = []
        for line in data.splitlines()[-limit:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash mid-write
        return out
