"""Figures from a locust run's trace (``--trace-file``): steady-state latency, migration impact.

Pure functions over the trace's JSON, so the limits and migration drivers and the tests all
read a run the same way.  Times in a trace are wall clock; latencies are milliseconds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from measure import distribution

TRANSPORTS = ("quic", "tcp")


def _users(trace: dict[str, Any], transport: str | None) -> list[dict[str, Any]]:
    return [u for u in trace["users"] if transport is None or u["transport"] == transport]


def steady_state(trace: dict[str, Any], warmup: float = 2.0,
                 until: float | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per transport: latency percentiles of messages sent from ``ready_at + warmup`` on.

    The connection storm of the spawn phase is left out: the figure is what a fleet that is
    already connected sees.
    """
    start = (trace.get("ready_at") or trace.get("started_at") or 0.0) + warmup
    end = until if until is not None else math.inf
    out: dict[str, dict[str, Any]] = {}
    for transport in TRANSPORTS:
        users = _users(trace, transport)
        if not users:
            continue
        deliver = [ms for u in users for _, sent, ms in u.get("deliveries", ())
                   if start <= sent <= end]  # fmt: skip
        publish = [ms for u in users for sent, ms in u.get("acks", ()) if start <= sent <= end]
        lost = sum(1 for u in users for _, sent in u["lost_messages"] if start <= sent <= end)
        late = sum(1 for u in users for _, sent, _ in u.get("lates", ()) if start <= sent <= end)
        out[transport] = {
            "users": len(users),
            "connected": sum(1 for u in users if u["connected_at"] is not None),
            "messages": len(deliver) + lost + late,
            "lost": lost,
            "late": late,
            "failures": sum(len(u["failures"]) for u in users),
            "deliver_ms": distribution(deliver),
            "publish_ms": distribution(publish),
        }
    return out


def _gap_around(receipts: Sequence[float], start: float, end: float) -> float:
    """The longest time between consecutive receipts that overlaps ``[start, end]``."""
    longest = 0.0
    for before, after in itertools.pairwise(receipts):
        if after >= start and before <= end:
            longest = max(longest, after - before)
    return longest


def migration_impact(trace: dict[str, Any], timeline: dict[str, float],
                     after: float = 10.0, bin_s: float = 0.25) -> dict[str, Any]:  # fmt: skip
    """What a live migration did to the users: interruption, loss, latency spike.

    Per user, over the window from the migration's trigger to ``after`` seconds past its
    resume: *gap* is the longest time without a delivery, *interruption* that gap minus the
    user's nominal publish interval (what the migration added), *max latency* the worst
    end-to-end latency of a message sent in the window.  Lost counts the run's messages that
    never arrived; late those that arrived after the delivery timeout.  The spike
    is the per-``bin_s`` latency profile of all users' messages, by send time.
    """
    trigger = timeline["trigger"]
    resumed = timeline.get("resumed") or timeline.get("rolled_back") or trigger
    start, end = trigger, resumed + after
    rate = float(trace["settings"]["msg_rate"])
    interval = 1.0 / rate
    baseline_end = trigger - 0.5
    base = steady_state(trace, until=baseline_end)
    out: dict[str, Any] = {"window": [round(start, 6), round(end, 6)],
                           "nominal_interval_ms": round(interval * 1000, 1),
                           "transports": {}}  # fmt: skip
    for transport in TRANSPORTS:
        users = _users(trace, transport)
        if not users:
            continue
        gaps, interruptions, worst, worst_ack = [], [], [], []
        lost = late = dup = 0
        affected = 0
        for u in users:
            deliveries = u.get("deliveries", [])
            receipts = sorted(sent + ms / 1000.0 for _, sent, ms in deliveries)
            receipts += sorted(sent + ms / 1000.0 for _, sent, ms in u.get("lates", []))
            receipts.sort()
            gap = _gap_around(receipts, start, end)
            gaps.append(round(gap * 1000, 1))
            interruption = max(0.0, gap - interval)
            interruptions.append(round(interruption * 1000, 1))
            affected += interruption > 0.1
            in_window = [ms for _, sent, ms in deliveries if start - 2 * interval <= sent <= end]
            worst.append(max(in_window, default=0.0))
            worst_ack.append(
                max(
                    (ms for sent, ms in u.get("acks", []) if start - 2 * interval <= sent <= end),
                    default=0.0,
                )
            )
            lost += len(u["lost_messages"])  # over the whole run: stricter than the window
            late += len(u.get("lates", []))
            dup += u["duplicates"]
        out["transports"][transport] = {
            "users": len(users),
            "users_interrupted_over_100ms": affected,
            "gap_ms": distribution(gaps),
            "interruption_ms": distribution(interruptions),
            "max_latency_ms": distribution(worst),
            "max_publish_ms": distribution(worst_ack),
            "lost": lost,
            "late": late,
            "duplicates": dup,
            "baseline": base.get(transport, {}),
        }
    out["spike"] = latency_profile(trace, start - 2.0, end, bin_s, origin=trigger)
    return out


def latency_profile(trace: dict[str, Any], start: float, end: float, bin_s: float,
                    origin: float) -> list[dict[str, Any]]:  # fmt: skip
    """Per ``bin_s`` of send time in ``[start, end)``: how many messages, p50/p99/max latency."""
    bins: dict[int, list[float]] = {}
    for u in trace["users"]:
        for _, sent, ms in [*u.get("deliveries", ()), *u.get("lates", ())]:
            if start <= sent < end:
                bins.setdefault(int((sent - start) // bin_s), []).append(ms)
    rows = []
    for index in range(math.ceil((end - start) / bin_s)):
        values = bins.get(index, [])
        at = start + index * bin_s - origin
        d = distribution(values)
        rows.append({"t_s": round(at, 3), "n": d["n"], "p50": d["p50"], "p99": d["p99"],
                     "max": d["max"]})  # fmt: skip
    return rows


def failures(trace: dict[str, Any]) -> list[tuple[str, str]]:
    """Every recorded failure as ``(what, detail)`` (moves of the broker excluded)."""
    return [(what, detail) for u in trace["users"] for _, what, detail in u["failures"]
            if not what.endswith(":moved")]  # fmt: skip


def fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.0f}{unit}"


def table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    """A plain fixed-width table (the drivers print to a terminal or a CI log)."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
