"""What a lab run means, per migration: interruption, loss, duplicates; a table, a plot, a JSON.

Input is what :mod:`migration.workload` writes (per client ``sent``/``acked``/``received``
as ``[seq, wall time]``) and the orchestrator's migrations, each a dict with at least
``freeze_at`` and ``resume_at`` (wall clock: the container stops answering, then answers
again from its new address) and optionally ``ip_before``, ``ip_after``, ``downtime_ms`` and
``timeline`` (event name -> wall time).  Everything here is a pure function of those dicts
except the plot and the JSON file, so the figures can be unit-tested on synthetic data.

The rules, and why:

- interruption: the largest gap between consecutive *deliveries* that spans the
  [freeze, resume] window (the rule of :meth:`migration.harness.ClientStats.interruption`).
  Deliveries, not publishes, because each message crosses the migration twice and what a
  user sees is the subscriber going quiet.  ``None`` when nothing arrived before the freeze
  or nothing after the resume (the client never recovered: see ``lost``).
- extra: interruption minus the freeze itself, i.e. what the transport and the follow
  strategy add to the unavoidable CRIU downtime.  The broker's own freeze window is known
  to one tick of its freeze watch at each end (``broker.migration_api.FREEZE_TICK``, 5 ms):
  a delivery in the last tick before the freeze, or a first tick after the thaw that runs
  late, makes a client that saw nothing but the freeze come out up to two ticks *below*
  zero.  Such values are kept as measured (clamping them would bias every median up).
- lost / duplicates are counted over messages *sent* in a window of time, so that a run
  with several migrations can give each migration its own row without counting a message
  twice: :func:`counting_windows` cuts the run into consecutive windows, one per
  migration, and :func:`figures_by_migration` applies them.  A message is lost if it was
  never received at all (at any time in the run) and was sent before ``end - margin``
  (later ones may still have been on their way when the run stopped).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from migration.ledger import segments_interruption

DRAIN_MARGIN = 0.5  # seconds before ``end`` during which an unreceived message is not "lost"
REPORT_CLIENT_KEYS = ("name", "transport", "strategy", "interruption_ms", "lost", "duplicates")

Window = tuple[float | None, float | None]  # [since, until) on the wall clock; None = open


# ---------------------------------------------------------------------- figures
def interruption(received_times: Iterable[float], start: float, end: float) -> float | None:
    """Largest gap (s) between consecutive deliveries that spans [start, end], or None."""
    times = sorted(received_times)
    before = [t for t in times if t <= start]
    after = [t for t in times if t >= end]
    if not before or not after:
        return None
    window = [before[-1], *(t for t in times if start < t < end), after[0]]
    return max(b - a for a, b in itertools.pairwise(window))


def _in(t: float, window: Window) -> bool:
    since, until = window
    return (since is None or t >= since) and (until is None or t < until)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def client_figures(
    client: dict[str, Any],
    freeze_at: float,
    resume_at: float,
    end: float | None = None,
    *,
    window: Window = (None, None),
    margin: float = DRAIN_MARGIN,
) -> dict[str, Any]:
    """One client's figures for one migration (times: wall clock, seconds).

    ``client`` is one entry of RESULT.json's ``clients``.  ``window`` = (since, until)
    restricts ``lost``, ``duplicates`` and ``reconnects`` to messages sent (connections
    made) in [since, until); the default counts the whole run.  ``end`` is when the run
    stopped; messages sent within ``margin`` seconds of it are not counted as lost.  With
    ``end=None`` every sent message counts (the workload drains before it stops, so any
    message it did not receive was lost).
    """
    cutoff = None if end is None else end - margin
    counts = _ledger_counts if client.get("ledger") else _trace_counts
    gap, lost, duplicates = counts(client, freeze_at, resume_at, window, cutoff)
    figures: dict[str, Any] = {
        "name": client.get("name"),
        "transport": client.get("transport"),
        "strategy": client.get("strategy"),
        "interruption_ms": _ms(gap),
        "extra_ms": _ms(None if gap is None else gap - (resume_at - freeze_at)),
        "lost": lost,
        "duplicates": duplicates,
        "reconnects": _reconnects(client, window),
    }
    figures.update(_path_figures(client, window, resume_at))
    return figures


def _trace_counts(
    client: dict[str, Any], freeze_at: float, resume_at: float, window: Window,
    cutoff: float | None,
) -> tuple[float | None, int, int]:  # fmt: skip
    """(interruption, lost, duplicates) from a client's full traces."""
    received = [(int(s), float(t)) for s, t in client.get("received", ())]
    gap = interruption((t for _, t in received), freeze_at, resume_at)
    sent = {int(s) for s, t in client.get("sent", ())
            if _in(t, window) and (cutoff is None or t < cutoff)}  # fmt: skip
    in_window = {int(s) for s, t in client.get("sent", ()) if _in(t, window)}
    got = {s for s, _ in received}
    counts = Counter(s for s, _ in received if s in in_window)
    return gap, len(sent - got), sum(counts.values()) - len(counts)


def _ledger_counts(
    client: dict[str, Any], freeze_at: float, resume_at: float, window: Window,
    cutoff: float | None,
) -> tuple[float | None, int, int]:  # fmt: skip
    """The same from a client that kept a ledger (migration.ledger), with duplicates
    charged to the window they *arrived* in (a ledger keeps no send time for a message
    that arrived)."""
    gap = segments_interruption(client["segments"], client["gap"], freeze_at, resume_at)
    lost = sum(1 for _, t in client["unreceived"]
               if _in(t, window) and (cutoff is None or t < cutoff))  # fmt: skip
    return gap, lost, sum(1 for _, t in client["duplicates"] if _in(t, window))


def _reconnects(client: dict[str, Any], window: Window) -> int:
    """Connections made in the window after the first one of the run (else the total)."""
    events = client.get("connections")
    if not events:
        return int(client.get("reconnects", 0))
    connected = sorted(t for e, t, *_ in events if e == "connected")
    return sum(1 for t in connected[1:] if _in(t, window))


def _path_figures(client: dict[str, Any], window: Window, resume_at: float) -> dict[str, Any]:
    """For a QUIC client: when it validated the broker's new path, relative to the resume."""
    for record in client.get("migrations") or ():
        learned = record.get("learned_at")
        validated = record.get("validated_at")
        if learned is not None and _in(learned, window) and validated is not None:
            return {"moved_to": record.get("adopted"), "trigger": record.get("trigger"),
                    "validated_after_resume_ms": _ms(validated - resume_at)}  # fmt: skip
    return {}


# ---------------------------------------------------------------------- several migrations
def migration_window(migration: dict[str, Any]) -> tuple[float, float]:
    """(freeze, resume) of one migration: its keys, or its timeline's "freeze"/"resume"."""
    timeline = migration.get("timeline") or {}
    freeze = migration.get("freeze_at", timeline.get("freeze"))
    resume = migration.get("resume_at", timeline.get("resume"))
    if freeze is None or resume is None:
        raise ValueError("a migration needs freeze_at and resume_at (or timeline freeze/resume)")
    return float(freeze), float(resume)


def _begins(migration: dict[str, Any]) -> float:
    """When a migration starts to matter: its earliest timeline event, or the freeze."""
    times = [float(t) for t in (migration.get("timeline") or {}).values() if t is not None]
    return min([migration_window(migration)[0], *times])


def counting_windows(migrations: Sequence[dict[str, Any]]) -> list[Window]:
    """Consecutive [since, until) windows, one per migration, that cover the whole run.

    Window i ends halfway between migration i's resume and migration i+1's first event
    (prepare, pre-checkpoint...): a message lost to the slow recovery after one move is
    charged to that move, one lost to the next move's early steps to the next one.  The
    first window is open to the left, the last to the right, so every message is counted
    in exactly one row and the rows add up to the whole run.
    """
    order = sorted(range(len(migrations)), key=lambda i: migration_window(migrations[i])[0])
    cuts: list[float | None] = [None]
    for a, b in itertools.pairwise(order):
        resume = migration_window(migrations[a])[1]
        cuts.append((resume + max(resume, _begins(migrations[b]))) / 2)
    cuts.append(None)
    windows: list[Window] = [(None, None)] * len(migrations)
    for rank, i in enumerate(order):
        windows[i] = (cuts[rank], cuts[rank + 1])
    return windows


def figures_by_migration(
    clients: Sequence[dict[str, Any]],
    migrations: Sequence[dict[str, Any]],
    end: float | None = None,
    margin: float = DRAIN_MARGIN,
) -> list[dict[str, Any]]:
    """Copies of ``migrations``, each with ``downtime_ms`` and per-client ``clients`` rows.

    The rows of one client over all migrations add up to its whole-run lost/duplicates.
    """
    out = []
    for migration, window in zip(migrations, counting_windows(migrations), strict=True):
        freeze, resume = migration_window(migration)
        row = dict(migration)
        if row.get("downtime_ms") is None:
            row["downtime_ms"] = _ms(resume - freeze)
        row["clients"] = [
            client_figures(c, freeze, resume, end, window=window, margin=margin) for c in clients
        ]
        out.append(row)
    return out


# ---------------------------------------------------------------------- table
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)


def summary_table(migrations: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    """One row per migration and client (``migrations`` as from figures_by_migration).

    Where each migration went and its freeze are in the caption, to keep rows narrow.
    """
    table = Table(title=title or "qmig live migration: what each client saw")
    table.add_column("#", justify="right")
    table.add_column("client", no_wrap=True)
    table.add_column("transport")
    table.add_column("strategy")
    for name in ("interrupt ms", "extra ms", "lost", "dup", "reconn"):
        table.add_column(name, justify="right")
    captions = []
    for i, migration in enumerate(migrations, 1):
        where = f"{migration.get('ip_before') or '?'} -> {migration.get('ip_after') or '?'}"
        captions.append(f"#{i} {where}, freeze {_cell(migration.get('downtime_ms'))} ms")
        rows = migration.get("clients") or []
        for j, c in enumerate(rows):
            lost = c.get("lost") or 0
            gap = c.get("interruption_ms")
            table.add_row(
                str(i) if j == 0 else "",
                str(c.get("name")), str(c.get("transport")), str(c.get("strategy")),
                _cell(gap) if gap is not None else "[red]never[/red]",
                _cell(c.get("extra_ms")),
                f"[red]{lost}[/red]" if lost else "0",
                _cell(c.get("duplicates")), _cell(c.get("reconnects")),
                end_section=j == len(rows) - 1,
            )  # fmt: skip
    table.caption = "; ".join(captions)
    return table


def print_summary(migrations: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(migrations))


# ---------------------------------------------------------------------- JSON
def write_report(path_json: Path, migrations: Sequence[dict[str, Any]]) -> Path:
    """``{"migrations": [{ip_before, ip_after, downtime_ms, timeline, clients: [...]}]}``.

    The shape the project's issue asks for; other keys of the migrations and of the client
    rows are kept after the required ones.  Written atomically.
    """
    out = []
    for migration in migrations:
        row: dict[str, Any] = {
            "ip_before": migration.get("ip_before"),
            "ip_after": migration.get("ip_after"),
            "downtime_ms": migration.get("downtime_ms"),
            "timeline": dict(migration.get("timeline") or {}),
        }
        row.update({k: v for k, v in migration.items() if k not in row and k != "clients"})
        row["clients"] = [
            {**{k: c.get(k) for k in REPORT_CLIENT_KEYS}, **c} for c in migration.get("clients", ())
        ]
        out.append(row)
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_json.with_name(f".{path_json.name}.tmp")
    tmp.write_text(json.dumps({"migrations": out}, indent=2, default=str) + "\n")
    os.replace(tmp, path_json)
    return path_json


# ---------------------------------------------------------------------- plot
def _spread(xs: list[float], gap: float) -> list[float]:
    """Label positions at least ``gap`` apart, each as close to its mark as that allows."""
    placed: list[float] = []
    for x in xs:
        placed.append(max(x, placed[-1] + gap) if placed else x)
    return placed


def plot_arrivals(
    clients: Sequence[dict[str, Any]],
    migrations: Sequence[dict[str, Any]],
    path: Path,
    title: str | None = None,
) -> Path:
    """One PNG: deliveries per client over time, delivery latency, the migrations on top.

    Top panel: a row per client, a tick per delivered message, a red cross where a message
    was sent but never delivered.  Bottom panel: how long each delivery took (log scale),
    which shows the messages held up by a freeze arriving in a burst after it.  Grey spans
    are freeze -> resume; dashed lines are the timeline events.  Agg backend: no display.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    starts = [float(t) for c in clients for _, t in c.get("sent", ())[:1]]
    events = [(str(name), float(t)) for m in migrations
              for name, t in (m.get("timeline") or {}).items() if t is not None]  # fmt: skip
    t0 = min(starts or [t for _, t in events] or [0.0])
    colors = matplotlib.color_sequences["tab10"]  # the colours of the "tab10" colormap

    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(12, 4.6 + 0.45 * max(1, len(clients))), layout="constrained",
        gridspec_kw={"height_ratios": [max(1.5, 0.45 * len(clients)), 2.2]},
    )  # fmt: skip
    lost_labelled = False
    for i, client in enumerate(clients):
        color = colors[i % len(colors)]
        label = f"{client.get('name')} ({client.get('transport')}, {client.get('strategy')})"
        got = [(int(s), float(t)) for s, t in client.get("received", ())]
        y = len(clients) - 1 - i
        top.plot([t - t0 for _, t in got], [y] * len(got), "|", color=color, ms=11,
                 mew=1.2, label=label)  # fmt: skip
        received = {s for s, _ in got}
        lost = [float(t) for s, t in client.get("sent", ()) if int(s) not in received]
        if lost:
            top.plot([t - t0 for t in lost], [y] * len(lost), "x", color="red", ms=6, mew=1.5,
                     label=None if lost_labelled else "sent, never delivered")  # fmt: skip
            lost_labelled = True
        sent_at = {int(s): float(t) for s, t in client.get("sent", ())}
        lat = [(t - t0, max(1e-4, t - sent_at[s]) * 1000) for s, t in got if s in sent_at]
        if lat:
            bottom.plot(*zip(*lat, strict=True), ".", color=color, ms=3)
    top.set_yticks(range(len(clients)),
                   [str(c.get("name")) for c in reversed(clients)])  # fmt: skip
    top.set_ylim(-0.7, len(clients) - 0.3)
    top.set_ylabel("deliveries")
    bottom.set_yscale("log")
    bottom.set_ylabel("delivery latency (ms)")
    bottom.set_xlabel("seconds since the workload started")
    bottom.grid(True, which="major", axis="y", alpha=0.3)

    for n, migration in enumerate(migrations, 1):
        try:
            freeze, resume = migration_window(migration)
        except ValueError:
            continue
        for ax in (top, bottom):
            ax.axvspan(freeze - t0, resume - t0, color="0.6", alpha=0.35, lw=0,
                       label="freeze -> resume" if n == 1 and ax is top else None)  # fmt: skip
        where = f"#{n}"
        if migration.get("ip_after"):
            where += f" {migration.get('ip_before') or '?'} -> {migration['ip_after']}"
        bottom.text((freeze + resume) / 2 - t0, 0.97, where, transform=bottom.get_xaxis_transform(),
                    rotation=90, ha="center", va="top", fontsize=7, color="0.2")  # fmt: skip
    if events:
        events.sort(key=lambda e: e[1])
        for ax in (top, bottom):
            for _, t in events:
                ax.axvline(t - t0, color="0.25", ls="--", lw=0.7, alpha=0.7)
        lo, hi = top.get_xlim()
        xs = _spread([t - t0 for _, t in events], (hi - lo) * 0.018)
        for (name, t), x in zip(events, xs, strict=True):
            top.annotate(name, xy=(t - t0, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(x, 1.03), textcoords=("data", "axes fraction"),
                         rotation=60, fontsize=7, ha="left", va="bottom",
                         arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"})  # fmt: skip
        top.set_xlim(lo, hi)
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, max(1, len(labels))),
               fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(title or "qmig live migration: message deliveries", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
