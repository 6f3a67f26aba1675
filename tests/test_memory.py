"""broker.memory: the broker gives freed heap back to the system (issue #16).

``release_memory()`` is what the pre-checkpoint step calls before CRIU dumps the broker;
``Trimmer`` is what the QUIC listener calls after handshakes, at most once per interval.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from broker.memory import Trimmer, malloc_trim, release_memory, rss_bytes

# 60 MB in 600-byte blocks (past pymalloc's 512: they come from malloc), of which one in
# 32 survives: the freed ones stay in the allocator's heap, between the survivors.
FRAGMENT = """
import json
from broker.memory import release_memory
blocks = [bytes(600) for _ in range(100_000)]
kept = blocks[::32]
del blocks
print(json.dumps(release_memory()))
"""


def test_release_memory_reports_rss_before_and_after() -> None:
    result = release_memory()
    assert set(result) == {"rss_before", "rss_after"}
    assert all(isinstance(v, int) and v > 0 for v in result.values())
    import psutil

    assert abs(rss_bytes() - psutil.Process().memory_info().rss) < 4 << 20


@pytest.mark.skipif(malloc_trim() is None, reason="the C library is not glibc")
def test_release_memory_gives_freed_heap_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout)
    assert result["rss_before"] - result["rss_after"] > 20 << 20


async def test_trimmer_trims_once_per_interval_however_many_handshakes() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    def trim(pad: int) -> int:
        calls.append(loop.time())
        return 1

    trimmer = Trimmer(loop, interval=0.2, trim=trim)
    for _ in range(100):
        trimmer.note()
    await asyncio.sleep(0.05)
    assert len(calls) == 1  # the first one at once
    for _ in range(100):
        trimmer.note()
    await asyncio.sleep(0.05)
    assert len(calls) == 1  # the next waits for the interval
    await asyncio.sleep(0.25)
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.2 - 0.01
    await asyncio.sleep(0.3)
    assert len(calls) == 2  # no handshake since: no trim
    trimmer.note()
    trimmer.cancel()
    await asyncio.sleep(0.05)
    assert len(calls) == 2 and trimmer.trims == 2


def test_trimmer_without_malloc_trim_does_nothing() -> None:
    loop = asyncio.new_event_loop()
    try:
        trimmer = Trimmer(loop, trim=None)
        trimmer.note()
        assert not trimmer.available and trimmer._handle is None
    finally:
        loop.close()


def test_sessions_share_only_their_empty_queues() -> None:
    from broker.session import Session

    a, b = Session("a", 5), Session("b", 5)
    assert a.pending is b.pending and a.inbound_qos2 is b.inbound_qos2  # one empty each
    with pytest.raises(TypeError):
        a.pending.append(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.inbound_qos2.add(1)
    a.qos2_ids().add(1)
    a.queue_replays()
    assert a.queue() is a.pending is not b.pending
    assert a.inbound_qos2 == {1} and not b.inbound_qos2 and not b.replays


def test_the_broker_imports_neither_ctypes_nor_psutil_until_it_trims() -> None:
    """Every module a broker imports is in its RSS, moved in each migration (psutil 2.7 MB)."""
    code = (
        "import sys, broker.server, broker.quic\n"
        "print('ctypes' in sys.modules, 'psutil' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
