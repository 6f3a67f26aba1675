"""A soak's bounded accounting gives the figures the full traces give."""

from __future__ import annotations

import random

import pytest

from migration.ledger import Ledger, segments_interruption
from migration.report import client_figures, figures_by_migration


def _traffic(seed: int) -> tuple[dict[str, object], dict[str, object], list[dict[str, float]]]:
    """One client at 20 msg/s through two freezes; a lost and a duplicated message."""
    rng = random.Random(seed)
    freezes = [(10.0, 11.4), (30.0, 32.1)]
    ledger = Ledger(gap=0.25)
    sent, received = [], []
    for seq in range(1, 20 * 45):
        at = seq / 20
        sent.append([seq, at])
        ledger.sent(seq, at)
        if seq == 333:
            continue  # lost
        arrive = at + rng.uniform(0.001, 0.01)
        for freeze, resume in freezes:
            if freeze - 0.05 <= arrive < resume:
                arrive = resume + rng.uniform(0.01, 0.08)  # held by the freeze
        copies = 2 if seq == 640 else 1  # a duplicate after the second move
        for _ in range(copies):
            received.append([seq, arrive])
    received.sort(key=lambda r: r[1])
    for seq, at in received:
        ledger.received(int(seq), at)
    traced = {"name": "c", "transport": "quic", "sent": sent, "received": received}
    compact = {"name": "c", "transport": "quic", **ledger.result()}
    migrations = [{"freeze_at": f, "resume_at": r} for f, r in freezes]
    return traced, compact, migrations


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_ledger_gives_the_traces_figures(seed: int) -> None:
    traced, compact, migrations = _traffic(seed)
    for a, b in zip(
        figures_by_migration([traced], migrations),
        figures_by_migration([compact], migrations),
        strict=True,
    ):
        full, small = a["clients"][0], b["clients"][0]
        assert small["interruption_ms"] == full["interruption_ms"]
        assert small["lost"] == full["lost"]
        assert small["duplicates"] == full["duplicates"]
    whole = client_figures(compact, *migrations[1].values())
    assert whole["lost"] == 1 and whole["duplicates"] == 1


def test_a_ledger_keeps_memory_for_what_went_wrong_not_for_traffic() -> None:
    ledger = Ledger(gap=0.25)
    for seq in range(1, 200_001):
        ledger.sent(seq, seq / 1000)
        ledger.received(seq, seq / 1000 + 0.002)
    result = ledger.result()
    assert result["sent_count"] == result["received_count"] == 200_000
    assert result["unreceived"] == [] and result["duplicates"] == []
    assert len(result["segments"]) == 1  # no silence: one segment
    assert len(ledger._seen) < 200_000 // 8 + 2048  # one bit per message


def test_the_interruption_is_the_silence_between_segments() -> None:
    segments = [[0.0, 9.9], [11.5, 20.0], [20.4, 30.0]]
    assert segments_interruption(segments, 0.25, 10.0, 11.4) == pytest.approx(1.6)
    assert segments_interruption(segments, 0.25, 15.0, 15.5) == 0.25  # no silence there
    assert segments_interruption(segments, 0.25, 29.0, 31.0) is None  # nothing after
