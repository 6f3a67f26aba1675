"""``qmig bench freeze``: cold, pre-copy and post-copy side by side, as the thesis compares them.

Per link rate and broker state, one lab; in it the broker moves A -> B -> A ... once per
method and repeat, the methods interleaved (cold, precopy, postcopy, cold, ...) so that a drift
of the machine hits them alike.  Two QUIC clients (proactive, reactive) publish QoS 1 to their
own topics and read them back all along.  Per move:

- downtime: the broker's own freeze (its freeze watch, to 5 ms), the yardstick being cold;
- total: the trigger until every byte of memory is at the destination (cold and pre-copy:
  the broker serving there; post-copy: the last lazy page pulled);
- link: every byte the move put on the checkpoint link (pre-copy's rounds, the checkpoint,
  post-copy's pages), both directions, from the link's own counters;
- faulted: pages the destination asked for on demand (post-copy only);
- degradation: the p99 delivery latency of messages *sent* in the 2 s after the resume
  against those sent in the 2 s before the trigger (a post-copied broker stalls on faults);
- lost and duplicates, from every client's sequence numbers (``migration.report``).

``hybrid`` is not a separate row: here it runs as post-copy (one line says why).  Medians over
the repeats; the raw figures of every move are in the JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from measure import percentile

LINKS = ("1gbit", "100mbit", "10mbit")
STATES = ("idle", "loaded")
METHODS = ("cold", "precopy", "postcopy")
REPEATS = 3
SETTLE = 2.5  # s of traffic before the first and after each move (>= the windows below)
WINDOW = 2.0  # s: the degradation window after the resume, and the reference before
DESTINATIONS = ("edge-b", "edge-a")
FIGURES = (
    "downtime_ms",
    "total_ms",
    "link_mb",
    "freeze_mb",
    "store_freeze_mb",
    "pages_faulted",
    "p99_before_ms",
    "p99_after_ms",
    "lost",
    "duplicates",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke subset: 100mbit, idle, cold and precopy, one move each",
    )
    parser.add_argument("--links", default=None, help=f"link rates (default {','.join(LINKS)})")
    parser.add_argument("--states", default=None, help="idle, loaded (1,000 sessions)")
    parser.add_argument("--methods", default=None, help=f"default {','.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=None, help=f"default {REPEATS}")
    parser.add_argument("--sessions", type=int, default=1000, help="the loaded state's sessions")
    parser.add_argument(
        "--qos",
        type=int,
        choices=(1, 2),
        default=1,
        help="the clients' QoS (2: duplicates would be errors)",
    )
    parser.add_argument(
        "--persistence",
        action="store_true",
        help="the broker keeps a durable store, which moves with it",
    )
    parser.add_argument(
        "--podman",
        choices=("shared", "per-host"),
        default="per-host",
        help="per-host (default): each edge host its own Podman, checkpoints host to host; "
        "shared: every edge host a pod of one Podman",
    )
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="write the results (- for stdout)"
    )
    parser.add_argument(
        "--report-dir",
        default=None,
        metavar="DIR",
        help="results.json, results.csv, summary.md and a plot "
        "(default reports/bench-freeze; none with --quick)",
    )


def _csv_arg(text: str | None, default: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip()) if text else tuple(default)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{', '.join(bad) or 'nothing'}: choose from {', '.join(allowed)}")
    return values


# --------------------------------------------------------------------------- figures
def _latencies(client: dict[str, Any]) -> list[tuple[float, float]]:
    """(sent at, delivery latency) in s of each of the client's own messages that arrived."""
    received = {int(seq): t for seq, t in client.get("received", [])}
    return [(t, received[int(seq)] - t) for seq, t in client.get("sent", [])
            if int(seq) in received]  # fmt: skip


def degradation(
    clients: Sequence[dict[str, Any]], trigger: float, resume: float
) -> tuple[float | None, float | None]:
    """p99 latency (ms) of messages sent WINDOW s before the trigger, and after the resume."""
    sent = [x for c in clients for x in _latencies(c)]
    before = [lat for t, lat in sent if trigger - WINDOW <= t < trigger]
    after = [lat for t, lat in sent if resume <= t < resume + WINDOW]
    p_before, p_after = percentile(before, 99), percentile(after, 99)
    return (
        None if p_before is None else round(p_before * 1000, 1),
        None if p_after is None else round(p_after * 1000, 1),
    )


def move_figures(migration: dict[str, Any], clients: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One move's row (``migration`` as from migration.report.figures_by_migration)."""
    t = migration.get("timeline", {})
    resume = t.get("resumed", t.get("rolled_back", 0.0))  # serving again, either side
    before, after = degradation(clients, t.get("trigger", 0.0), resume)
    rows = migration.get("clients", [])
    link = migration.get("link_bytes")
    frozen = migration.get("transfer_bytes")  # what crossed the link in the freeze
    store = migration.get("store_bytes")  # pre-copy with a durable store: its files in the dump
    return {
        "method": migration.get("method"),
        "ok": bool(migration.get("ok")),
        "error": migration.get("error"),
        "downtime_ms": migration.get("downtime_ms"),
        "total_ms": migration.get("total_ms"),
        "link_mb": None if link is None else round(link / 1e6, 2),
        "freeze_mb": None if frozen is None else round(frozen / 1e6, 2),
        "store_freeze_mb": None
        if store is None
        else round((store - migration.get("store_bytes_from_copy", 0)) / 1e6, 3),
        "checkpoint_mb": round(migration.get("checkpoint_bytes", 0) / 1e6, 2),
        "pages_faulted": migration.get("pages_faulted"),
        "precopy_rounds": len(migration.get("precopy_rounds", [])),
        "p99_before_ms": before,
        "p99_after_ms": after,
        "lost": sum(r.get("lost") or 0 for r in rows),
        "duplicates": sum(r.get("duplicates") or 0 for r in rows),
    }


def _median(values: Sequence[float | int | None]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return round(statistics.median(got), 1) if got else None


def aggregate(moves: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (link, state, method): medians of the repeats, sums of lost/duplicates."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for m in moves:
        cells.setdefault((m["link"], m["state"], m["method"]), []).append(m)
    out = []
    for (link, state, method), ms in cells.items():
        ok = [m for m in ms if m["ok"]]
        row: dict[str, Any] = {
            "link": link,
            "state": state,
            "method": method,
            "moves": len(ms),
            "failed": len(ms) - len(ok),
        }
        for key in FIGURES:
            if key in ("lost", "duplicates"):
                row[key] = sum(m[key] for m in ms)
            else:
                row[key] = _median([m.get(key) for m in ok])
        out.append(row)
    return out


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's downtime as a fraction of cold's in the same link and state."""
    cold = {(r["link"], r["state"]): r["downtime_ms"] for r in rows if r["method"] == "cold"}
    for r in rows:
        base = cold.get((r["link"], r["state"]))
        r["vs_cold"] = (
            round(r["downtime_ms"] / base, 2) if base and r["downtime_ms"] is not None else None
        )
    return rows


# --------------------------------------------------------------------------- running
def run_lab(
    link: str,
    state: str,
    methods: Sequence[str],
    repeats: int,
    sessions: int,
    image: str,
    say: Callable[[str], None],
    qos: int = 1,
    persistence: bool = False,
    podman: str = "per-host",
) -> list[dict[str, Any]]:
    """One lab: every method ``repeats`` times, interleaved; one row per move."""
    from migration.lab.run import run_scenario
    from migration.scenario import ClientSpec, Scenario
    from qmig.benchmarks.migration import RunHooks, Settings

    order = [m for _ in range(repeats) for m in methods]
    scenario = Scenario.load("demo").replace(
        link_rate=link,
        settle=SETTLE,
        qos=qos,
        persistence=persistence,
        podman=podman,
        clients=(
            ClientSpec("quic-proactive", "quic", "proactive"),
            ClientSpec("quic-reactive", "quic", "reactive"),
        ),
        migrations=tuple(DESTINATIONS[i % 2] for i in range(len(order))),
    )
    hooks = RunHooks(Settings(sessions=sessions), state, say)
    result = run_scenario(
        scenario, image, methods=order, progress=say, on_ready=hooks.ready, on_lab=hooks.done
    )
    label = "idle" if state == "idle" else f"{sessions} sessions"
    reconnects = sum(c.get("reconnects", 0) for c in result["clients"])  # the whole run's
    moves = []
    for index, migration in enumerate(result["migrations"]):
        row = move_figures(migration, result["clients"])
        row["method"] = order[index]
        row["quic_reconnects_in_run"] = reconnects
        moves.append({"link": link, "state": label, "index": index, **row})
    return moves


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    keys = ["link", "state", "method", "moves", "failed", *FIGURES, "vs_cold"]
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summary_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# qmig bench freeze: cold vs pre-copy vs post-copy",
        "",
        f"Command: `{report['command']}`; {report['repeats']} move(s) per cell, medians; "
        f"started {report['started']}.",
        "",
        "| link | state | method | downtime ms | vs cold | total ms | link MB | in freeze MB | "
        "store in freeze MB | faulted | p99 before / after ms | lost | dup | failed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    for r in report["results"]:
        lines.append(
            f"| {r['link']} | {r['state']} | {r['method']} | {f(r['downtime_ms'])} | "
            f"{f(r['vs_cold'])} | {f(r['total_ms'])} | {f(r['link_mb'])} | "
            f"{f(r.get('freeze_mb'))} | {f(r.get('store_freeze_mb'))} | "
            f"{f(r['pages_faulted'])} | {f(r['p99_before_ms'])} / {f(r['p99_after_ms'])} "
            f"| {r['lost']} | {r['duplicates']} | {r['failed']} |"
        )
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = sorted({r["state"] for r in rows})
    fig, axes = plt.subplots(1, len(states), figsize=(6 * len(states), 4), squeeze=False)
    for ax, state in zip(axes[0], states, strict=True):
        cells = [r for r in rows if r["state"] == state]
        links = [x for x in LINKS if any(r["link"] == x for r in cells)]
        methods = [x for x in METHODS if any(r["method"] == x for r in cells)]
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            values = [
                next(
                    (
                        r["downtime_ms"] or 0
                        for r in cells
                        if r["link"] == link and r["method"] == method
                    ),
                    0,
                )
                for link in links
            ]
            ax.bar([j + i * width for j in range(len(links))], values, width, label=method)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(links))], links)
        ax.set_ylabel("downtime (ms)")
        ax.set_title(f"broker {state}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(message: str) -> None:
    print(f"bench freeze: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        quick = bool(args.quick)
        links = _csv_arg(args.links, ("100mbit",) if quick else LINKS, LINKS)
        states = _csv_arg(args.states, ("idle",) if quick else STATES, STATES)
        methods = _csv_arg(args.methods, ("cold", "precopy") if quick else METHODS, METHODS)
        repeats = args.repeats if args.repeats is not None else (1 if quick else REPEATS)
        if repeats < 1:
            raise ValueError("--repeats must be at least 1")
    except ValueError as exc:
        _log(f"bad value: {exc}")
        return 2
    from migration.lab.lab import containers_unavailable
    from migration.lab.postcopy import hybrid_note, postcopy_support
    from migration.lab.precopy import support as precopy_support

    reason = containers_unavailable()
    if reason:
        _log(f"containers unavailable: {reason}")
        return 2
    notes = [hybrid_note()]
    for method, why in (("postcopy", postcopy_support()), ("precopy", precopy_support())):
        if why and method in methods:
            notes.append(f"{method} left out: {why}")
            _log(notes[-1])
            methods = tuple(m for m in methods if m != method)
    from migration.image import ensure_image

    image = ensure_image(Path(__file__).resolve().parents[2])
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    moves: list[dict[str, Any]] = []
    for state in states:
        for link in links:
            _log(f"{link}, {state}: {', '.join(methods)} x {repeats}")
            try:
                moves += run_lab(
                    link,
                    state,
                    methods,
                    repeats,
                    args.sessions,
                    image,
                    _log,
                    qos=args.qos,
                    persistence=args.persistence,
                    podman=args.podman,
                )
            except Exception as exc:  # one failed lab must not lose the others' numbers
                _log(f"{link}, {state}: the lab run failed: {type(exc).__name__}: {exc}")
                notes.append(f"{link}, {state}: the lab run failed: {exc}")
    rows = with_ratios(aggregate(moves))
    command = (
        " ".join(["qmig", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "qmig bench freeze"
    )
    report = {
        "command": command,
        "started": started,
        "repeats": repeats,
        "results": rows,
        "moves": moves,
        "notes": notes,
    }
    text = json.dumps(report, indent=2, default=str)
    if args.json == "-":
        print(text)
    elif args.json:
        Path(args.json).write_text(text + "\n")
    print(summary_markdown(report), file=sys.stderr if args.json == "-" else sys.stdout)
    out = (
        Path(args.report_dir)
        if args.report_dir
        else None
        if quick
        else Path("reports/bench-freeze")
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
        (out / "results.csv").write_text(results_csv(rows))
        (out / "summary.md").write_text(summary_markdown(report))
        if rows:
            plot(rows, out / "downtime.png")
        _log(f"report: {out / 'summary.md'}")
    bad = [r for r in rows if r["failed"] or r["lost"]]
    return 1 if bad or not rows else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmig bench freeze", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
