"""Pre-copy by content (migration.lab.precopy): live rounds from /proc, the delta, the rebuild.

The rounds read a real child process's memory; the delta and the rebuild work on an export
tar in podman's layout with CRIU pagemap/pages images.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from migration.lab import precopy
from migration.lab.criu_images import PAGE_SIZE, PE_PRESENT, PagemapEntry, encode_pagemap

CHILD = textwrap.dedent(
    """
    import sys
    buf = bytearray(8 * 1024 * 1024)
    for i in range(0, len(buf), 4096):
        buf[i:i + 8] = i.to_bytes(8, "little")
    print(hex(id(buf)), flush=True)
    for line in sys.stdin:  # each line: rewrite the first N pages
        n = int(line)
        for i in range(0, n * 4096, 4096):
            buf[i + 100] = (buf[i + 100] + 1) % 256
        print("done", flush=True)
    """
)


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline()
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _touch(proc: subprocess.Popen[str], pages: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{pages}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


def test_rounds_ship_everything_once_then_only_what_changed(child, tmp_path: Path) -> None:
    procs = [(child.pid, 1)]
    held: precopy.Copy = {}
    first = precopy.live_round(procs, held, tmp_path / "r1")
    assert first.pages_sent == first.pages_read >= 2048  # the 8 MiB buffer at least
    second = precopy.live_round(procs, held, tmp_path / "r2")
    assert second.pages_sent < 64, second  # an idle process changes almost nothing
    _touch(child, 300)
    third = precopy.live_round(procs, held, tmp_path / "r3")
    assert 300 <= third.pages_sent < 400, third
    # the destination's copy, rebuilt only from the files, equals what the source tracked
    dest: precopy.Copy = {}
    for name in ("r1", "r2", "r3"):
        precopy.load_round(tmp_path / name, dest)
    assert dest == held


def test_container_processes_finds_pids_of_one_namespace() -> None:
    found = precopy.container_processes(os.getpid())
    assert (os.getpid(), os.getpid()) in found or any(h == os.getpid() for h, _ in found)


def _export_tar(path: Path, pages: dict[int, list[bytes]], vaddr: int) -> dict[str, bytes]:
    """A tar like podman's export: config files, pagemap-<pid>.img and pages-<id>.img."""
    members: dict[str, bytes] = {"config.dump": b'{"id": "x"}', "checkpoint/core-1.img": b"c" * 99}
    for pid, plist in pages.items():
        # two runs with a hole between them, as a real pagemap has
        half = len(plist) // 2
        second = vaddr + (half + 10) * PAGE_SIZE
        entries = [PagemapEntry(vaddr, half, PE_PRESENT),
                   PagemapEntry(second, len(plist) - half, PE_PRESENT)]  # fmt: skip
        members[f"checkpoint/pagemap-{pid}.img"] = encode_pagemap(pid + 100, entries)
        members[f"checkpoint/pages-{pid + 100}.img"] = b"".join(plist)
    with tarfile.open(path, "w:") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return members


def _vaddrs(n: int, vaddr: int) -> list[int]:
    half = n // 2
    return [vaddr + i * PAGE_SIZE for i in range(half)] + [
        vaddr + (half + 10 + i) * PAGE_SIZE for i in range(n - half)
    ]


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_delta_leaves_out_held_pages_and_the_rebuild_is_exact(tmp_path: Path) -> None:
    base = 0x7F0000000000
    plist = [os.urandom(PAGE_SIZE) for _ in range(40)]
    original = _export_tar(tmp_path / "export.tar", {1: plist}, base)
    addrs = _vaddrs(40, base)
    held: precopy.Copy = {(1, a): p for a, p in zip(addrs, plist, strict=True)}
    held[(1, addrs[3])] = os.urandom(PAGE_SIZE)  # changed since the round: must travel
    del held[(1, addrs[30])]  # never read live: must travel
    stats = precopy.make_delta(tmp_path / "export.tar", dict(held), tmp_path / "delta.tar")
    assert (stats.pages, stats.from_copy) == (40, 38)
    shipped = _members(tmp_path / "delta.tar")
    assert len(shipped["checkpoint/pages-101.img"]) == 2 * PAGE_SIZE
    assert (tmp_path / "delta.tar").stat().st_size < 40 * PAGE_SIZE // 2
    taken = precopy.apply_delta(tmp_path / "delta.tar", held, tmp_path / "rebuilt.tar")
    assert taken == 38
    assert _members(tmp_path / "rebuilt.tar") == original  # every member, same bytes
    with tarfile.open(tmp_path / "rebuilt.tar") as tar:
        assert [m.name for m in tar] == list(original)  # and the same order


def test_a_wrong_or_missing_page_at_the_destination_fails_the_rebuild(tmp_path: Path) -> None:
    base = 0x1000000
    plist = [os.urandom(PAGE_SIZE) for _ in range(8)]
    _export_tar(tmp_path / "export.tar", {1: plist}, base)
    addrs = _vaddrs(8, base)
    held: precopy.Copy = {(1, a): p for a, p in zip(addrs, plist, strict=True)}
    precopy.make_delta(tmp_path / "export.tar", held, tmp_path / "delta.tar")
    wrong = dict(held)
    wrong[(1, addrs[5])] = bytes(PAGE_SIZE)
    with pytest.raises(precopy.PrecopyError, match="do not match"):
        precopy.apply_delta(tmp_path / "delta.tar", wrong, tmp_path / "out.tar")
    missing = dict(held)
    del missing[(1, addrs[0])]
    with pytest.raises(precopy.PrecopyError, match="lacks the page"):
        precopy.apply_delta(tmp_path / "delta.tar", missing, tmp_path / "out.tar")


def test_a_cold_export_without_manifest_is_refused(tmp_path: Path) -> None:
    _export_tar(tmp_path / "export.tar", {1: [bytes(PAGE_SIZE)] * 2}, 0x1000)
    with pytest.raises(precopy.PrecopyError, match="no pre-copy manifest"):
        precopy.apply_delta(tmp_path / "export.tar", {}, tmp_path / "out.tar")


def test_a_truncated_round_file_is_refused(tmp_path: Path, child) -> None:
    held: precopy.Copy = {}
    precopy.live_round([(child.pid, 1)], held, tmp_path / "r1")
    data = (tmp_path / "r1").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(precopy.PrecopyError, match="ends early"):
        precopy.load_round(tmp_path / "cut", {})


# ---------------------------------------------------------------------- the store's files
STORE = "var/lib/qmig"


def _store(root: Path, files: dict[str, bytes]) -> precopy.StoreFiles:
    for name, body in files.items():
        (root / STORE).mkdir(parents=True, exist_ok=True)
        (root / STORE / name).write_bytes(body)
    return precopy.StoreFiles(root, ("/" + STORE,))


def test_rounds_ship_a_store_file_once_then_only_its_changed_tail(tmp_path: Path) -> None:
    root = tmp_path / "root"
    db, wal = os.urandom(10 * precopy.BLOCK), os.urandom(3 * precopy.BLOCK + 100)
    files = _store(root, {"qmig.db": db, "qmig.db-wal": wal})
    held: precopy.Copy = {}
    blocks: precopy.Blocks = {}
    first = precopy.live_round([], held, tmp_path / "r1", files, blocks)
    assert first.file_bytes_sent == len(db) + len(wal) == first.bytes_sent
    assert precopy.live_round([], held, tmp_path / "r2", files, blocks).file_bytes_sent == 0
    with open(root / STORE / "qmig.db-wal", "ab") as f:  # a commit appends to the WAL
        f.write(os.urandom(precopy.BLOCK))
    third = precopy.live_round([], held, tmp_path / "r3", files, blocks)
    assert third.file_bytes_sent == precopy.BLOCK + 100  # the partial block and the new one
    dest: precopy.Blocks = {}
    for name in ("r1", "r2", "r3"):
        precopy.load_round(tmp_path / name, {}, dest)
    assert dest == blocks
    assert dest[(f"{STORE}/qmig.db", 9 * precopy.BLOCK)] == db[-precopy.BLOCK :]


def _rootfs_diff(files: dict[str, bytes]) -> bytes:
    """podman's rootfs-diff.tar: the container's changed files, paths without a leading /."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def test_the_delta_leaves_out_held_store_blocks_and_the_rebuild_is_exact(tmp_path: Path) -> None:
    base = 0x7F0000000000
    plist = [os.urandom(PAGE_SIZE) for _ in range(4)]
    _export_tar(tmp_path / "export.tar", {1: plist}, base)
    db, wal = os.urandom(64 * precopy.BLOCK), os.urandom(8 * precopy.BLOCK + 24)
    blocks: precopy.Blocks = {}
    precopy.live_round([], {}, tmp_path / "r1", _store(tmp_path / "root", {
        "qmig.db": db, "qmig.db-wal": wal[: 5 * precopy.BLOCK]}), blocks)  # fmt: skip
    blocks[(f"{STORE}/qmig.db", 7 * precopy.BLOCK)] = os.urandom(precopy.BLOCK)  # changed since
    diff = _rootfs_diff({"etc/hostname": b"edge-a\n", f"{STORE}/qmig.db": db,
                         f"{STORE}/qmig.db-wal": wal})  # fmt: skip
    with tarfile.open(tmp_path / "export.tar", "a:") as tar:
        info = tarfile.TarInfo(precopy.ROOTFS_DIFF)
        info.size = len(diff)
        tar.addfile(info, io.BytesIO(diff))
    original = _members(tmp_path / "export.tar")
    held = {(1, a): p for a, p in zip(_vaddrs(4, base), plist, strict=True)}
    stats = precopy.make_delta(tmp_path / "export.tar", held, tmp_path / "delta.tar", blocks)
    assert stats.file_bytes == len(db) + len(wal)
    assert stats.file_bytes_from_copy == 63 * precopy.BLOCK + 5 * precopy.BLOCK
    shipped = _members(tmp_path / "delta.tar")[precopy.ROOTFS_DIFF]
    assert len(shipped) == len(diff) - stats.file_bytes_from_copy  # the WAL's tail and the rest
    assert precopy.apply_delta(tmp_path / "delta.tar", held, tmp_path / "rebuilt.tar", blocks) == 4
    assert _members(tmp_path / "rebuilt.tar") == original
    wrong = dict(blocks)
    wrong[(f"{STORE}/qmig.db-wal", 0)] = bytes(precopy.BLOCK)
    with pytest.raises(precopy.PrecopyError, match="does not match"):
        precopy.apply_delta(tmp_path / "delta.tar", held, tmp_path / "out.tar", wrong)
    with pytest.raises(precopy.PrecopyError, match="lacks"):
        precopy.apply_delta(tmp_path / "delta.tar", held, tmp_path / "out.tar", {})
