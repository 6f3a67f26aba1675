"""Pre-copy without dirty tracking: live rounds read from ``/proc``, dirty pages found by content.

This kernel has no soft-dirty bits (no ``criu pre-dump``), so qmig finds what changed by
comparing bytes instead.  The rules, in order:

1. A *round* reads every present anonymous page (what CRIU dumps) of every private mapping
   of every process in the broker's container (``/proc/PID/pagemap`` says which pages are present,
   ``/proc/PID/mem`` gives their bytes) while the broker keeps serving, and ships the pages
   whose bytes differ from what the destination already holds (the first round: all of them).
   A page is keyed by the process's pid *inside* the container and its virtual address, which
   is how CRIU's images name it (``pagemap-<pid>.img``) and what a restore keeps.
2. Rounds go on while each ships at least :data:`STOP_BYTES` and at most :data:`ROUNDS` ran;
   a last round just before the freeze catches what the migration's own steps changed.
3. At the freeze CRIU dumps as for a cold move.  :func:`make_delta` compares the dump with the
   destination's copy page by page: every page of ``pages-<id>.img`` whose bytes equal the
   copy's is left out, and a manifest (the tar's last member) says where each such run goes.
   The rest of the export tar travels unchanged.
4. The destination (:func:`apply_delta`) rebuilds the exact ``pages-<id>.img`` from its copy
   and the shipped pages, and checks each against the SHA-256 the source took of the real
   dump; a missing page or a wrong digest fails the move, and the source rolls back from its
   full local export exactly as a cold move does.

A page read while the broker was writing it (a torn read) is harmless: a copied page is used
only where the dump's page is byte-identical to it.  What the destination holds is rebuilt
only from the files that crossed the link, never from the source's memory.

The durable store (issue #18) is pre-copied the same way, as blocks of files: a round also
reads every regular file under the store's directories through ``/proc/PID/root`` and ships
the 4 KiB blocks (keyed by the file's path in the container and the block's offset) whose
bytes the destination lacks.  At the freeze the store is inside podman's ``rootfs-diff.tar``
member; :func:`make_delta` leaves out each block of a file in it that the destination holds,
so only what changed since the last round (an SQLite WAL's tail) crosses in the freeze, and
:func:`apply_delta` rebuilds that member byte for byte, checked against its SHA-256 as pages
are.

Round file (``QMIGPGS2``): records ``<IQI`` (pid, vaddr, pages) each followed by that many
4 KiB pages, ended by a record of 0 pages; then records ``<HQI`` (path length, offset, size)
each followed by the path (UTF-8) and that many bytes of the file, ended by a record of
path length 0.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .criu_images import PAGE_SIZE, ImageFormatError, Pagemap, pages_member_id, parse_pagemap

MAGIC = b"QMIGPGS2"
RECORD = struct.Struct("<IQI")
FILE_RECORD = struct.Struct("<HQI")
BLOCK = 4096  # the unit a store file is compared and shipped in (SQLite's page size)
ROOTFS_DIFF = "rootfs-diff.tar"  # podman's member with the container's changed files
ROUNDS = 4  # live rounds at most, the last one (just before the freeze) not counted
STOP_BYTES = 256 * 1024  # a round that ships less than this is the last live one
MANIFEST = "qmig-precopy.json"
_PAGEMAP_NAME = re.compile(r"(?:^|/)checkpoint/pagemap-(\d+)\.img$")
_PRESENT = 1 << 63
_FILE_PAGE = 1 << 61  # a clean page of a file (or shared): CRIU does not dump it, nor do we
_SKIP = ("[vsyscall]", "[vvar]", "[vdso]")  # not process memory CRIU dumps as pages

PageKey = tuple[int, int]  # (pid inside the container, virtual address)
Copy = dict[PageKey, bytes]  # what one side holds of the broker's memory
BlockKey = tuple[str, int]  # (path in the container without the leading /, byte offset)
Blocks = dict[BlockKey, bytes]  # what one side holds of the store's files


class PrecopyError(RuntimeError):
    """A round, the delta or the rebuild failed; before the freeze nothing was changed."""


def support() -> str | None:
    """None if this machine can pre-copy (read other processes' memory), else why not."""
    if os.geteuid() != 0:
        return "pre-copy needs root: it reads the broker's memory through /proc/PID/mem"
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.read(8)
    except OSError as exc:
        return f"pre-copy unavailable: /proc/self/pagemap cannot be read ({exc})"
    return None


def best_method() -> tuple[str, str]:
    """The method that freezes the broker least here, and why: pre-copy where it can run,
    else cold (``make demo`` and ``make soak`` use it)."""
    why_not = support()
    if why_not:
        return "cold", why_not
    return "precopy", "live rounds while the broker serves; only changed pages at the freeze"


# ---------------------------------------------------------------------- reading live memory
def container_processes(init_pid: int) -> list[tuple[int, int]]:
    """(host pid, pid inside the container) of every process in ``init_pid``'s pid namespace."""
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError as exc:
        raise PrecopyError(f"the broker's process {init_pid} is gone: {exc}") from exc
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if nspid:
            found.append((int(entry), int(nspid[-1])))
    return sorted(found)


def _private_ranges(pid: int) -> Iterator[tuple[int, int]]:
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            perms = fields[1]
            if perms[3] != "p" or perms[0] != "r" or (len(fields) > 5 and fields[5] in _SKIP):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            yield start, end


def _present_runs(pagemap: IO[bytes], start: int, end: int) -> Iterator[tuple[int, int]]:
    """(vaddr, pages) of the present anonymous pages in [start, end)."""
    count = (end - start) // PAGE_SIZE
    pagemap.seek(start // PAGE_SIZE * 8)
    raw = pagemap.read(count * 8)
    run_start, run_len = 0, 0
    for i, (bits,) in enumerate(struct.iter_unpack("<Q", raw)):
        if bits & _PRESENT and not bits & _FILE_PAGE:
            if run_len == 0:
                run_start = start + i * PAGE_SIZE
            run_len += 1
        elif run_len:
            yield run_start, run_len
            run_len = 0
    if run_len:
        yield run_start, run_len


def read_process(pid: int, vpid: int) -> Iterator[tuple[PageKey, bytes]]:
    """Every present page of ``pid``'s private mappings, read while it runs."""
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as pm, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for start, end in _private_ranges(pid):
                for vaddr, pages in _present_runs(pm, start, end):
                    try:
                        data = os.pread(mem.fileno(), pages * PAGE_SIZE, vaddr)
                    except OSError:
                        continue  # unmapped meanwhile, or not readable: it just travels later
                    for i in range(len(data) // PAGE_SIZE):
                        yield (
                            (vpid, vaddr + i * PAGE_SIZE),
                            data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE],
                        )
    except OSError as exc:
        raise PrecopyError(f"cannot read the memory of process {pid}: {exc}") from exc


def memory_sample(processes: Iterable[tuple[int, int]], limit: int, stride: int = 8) -> bytes:
    """Every ``stride``-th page of the container's memory, ``limit`` bytes at most.

    What :func:`migration.lab.transfer.choose_codec` measures codecs on: the pages a
    checkpoint is mostly made of, spread over the whole address space.
    """
    out: list[bytes] = []
    for pid, vpid in processes:
        for n, (_, page) in enumerate(read_process(pid, vpid)):
            if n % stride == 0:
                out.append(page)
                if len(out) * PAGE_SIZE >= limit:
                    return b"".join(out)
    return b"".join(out)


@dataclass(frozen=True)
class StoreFiles:
    """The files a round pre-copies: every regular file under ``dirs`` (paths in the
    container) as seen through ``root`` (``/proc/PID/root`` of a process in it)."""

    root: Path
    dirs: tuple[str, ...]

    def blocks(self) -> Iterator[tuple[BlockKey, bytes]]:
        """Every block of every file, read while the broker writes them (a torn block is
        harmless: it is used only where the dump's bytes equal it)."""
        for d in self.dirs:
            top = self.root / d.strip("/")
            for dirpath, _dirs, names in os.walk(top):
                for name in sorted(names):
                    path = Path(dirpath) / name
                    rel = path.relative_to(self.root).as_posix()
                    try:
                        if not path.is_file() or path.is_symlink():
                            continue
                        with open(path, "rb") as f:
                            offset = 0
                            while block := f.read(BLOCK):
                                yield (rel, offset), block
                                offset += len(block)
                    except OSError:
                        continue  # gone meanwhile: it travels in the freeze


@dataclass(frozen=True)
class RoundStats:
    pages_read: int
    pages_sent: int
    blocks_read: int = 0
    file_bytes_sent: int = 0

    @property
    def bytes_sent(self) -> int:
        return self.pages_sent * PAGE_SIZE + self.file_bytes_sent


def live_round(
    processes: Iterable[tuple[int, int]],
    held: Copy,
    out: Path,
    files: StoreFiles | None = None,
    held_blocks: Blocks | None = None,
) -> RoundStats:
    """Read the container's memory (and ``files``); write to ``out`` what the destination
    lacks.

    ``held`` (and ``held_blocks``) is what the destination holds once every earlier round
    arrived; it is updated as if ``out`` arrived too.
    """
    read = sent = blocks_read = file_sent = 0
    with open(out, "wb") as f:
        f.write(MAGIC)
        for pid, vpid in processes:
            for key, page in read_process(pid, vpid):
                read += 1
                if held.get(key) != page:
                    held[key] = page
                    f.write(RECORD.pack(key[0], key[1], 1))
                    f.write(page)
                    sent += 1
        f.write(RECORD.pack(0, 0, 0))
        if files is not None:
            if held_blocks is None:
                raise ValueError("pre-copying files needs held_blocks")
            for (path, offset), block in files.blocks():
                blocks_read += 1
                if held_blocks.get((path, offset)) != block:
                    held_blocks[(path, offset)] = block
                    name = path.encode()
                    f.write(FILE_RECORD.pack(len(name), offset, len(block)))
                    f.write(name)
                    f.write(block)
                    file_sent += len(block)
        f.write(FILE_RECORD.pack(0, 0, 0))
    return RoundStats(read, sent, blocks_read, file_sent)


def _read_exact(f: IO[bytes], n: int, name: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise PrecopyError(f"{name} ends early")
    return data


def load_round(path: Path, into: Copy, blocks: Blocks | None = None) -> int:
    """Merge a round file (as it crossed the link) into ``into`` (pages) and ``blocks``
    (store files); pages read."""
    got = 0
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise PrecopyError(f"{path.name} is not a pre-copy round file")
        while True:
            vpid, vaddr, pages = RECORD.unpack(_read_exact(f, RECORD.size, path.name))
            if pages == 0:
                break
            data = _read_exact(f, pages * PAGE_SIZE, path.name)
            for i in range(pages):
                into[(vpid, vaddr + i * PAGE_SIZE)] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            got += pages
        while True:
            size_name, offset, size = FILE_RECORD.unpack(
                _read_exact(f, FILE_RECORD.size, path.name)
            )
            if size_name == 0:
                return got
            name = _read_exact(f, size_name, path.name).decode()
            block = _read_exact(f, size, path.name)
            if blocks is not None:
                blocks[(name, offset)] = block


# ---------------------------------------------------------------------- the freeze: the delta
@dataclass(frozen=True)
class DeltaStats:
    pages: int  # present pages in the dump
    from_copy: int  # of those, left out: the destination has them
    file_bytes: int = 0  # bytes of pre-copied files in the dump's rootfs archive
    file_bytes_from_copy: int = 0  # of those, left out: the destination has them

    @property
    def shipped(self) -> int:
        """Pages that cross in the freeze."""
        return self.pages - self.from_copy


def _pages_of(pagemap: Pagemap) -> Iterator[int]:
    """The vaddr of each page of the pages file, in file order."""
    for entry in pagemap.entries:
        if entry.present:
            for i in range(entry.nr_pages):
                yield entry.vaddr + i * PAGE_SIZE


def _runs(indices: list[tuple[int, int]]) -> list[list[int]]:
    """(file page index, vaddr) pairs -> [index, count, vaddr] runs, contiguous in both."""
    runs: list[list[int]] = []
    for index, vaddr in indices:
        last = runs[-1] if runs else None
        if last and last[0] + last[1] == index and last[2] + last[1] * PAGE_SIZE == vaddr:
            last[1] += 1
        else:
            runs.append([index, 1, vaddr])
    return runs


def _add(tout: tarfile.TarFile, member: tarfile.TarInfo, body: bytes) -> None:
    """``member`` with another body (its name, mode, owner and times kept)."""
    info = copy.copy(member)
    info.size = len(body)
    tout.addfile(info, io.BytesIO(body))


def _pagemaps_by_pages_id(tar: tarfile.TarFile) -> dict[int, tuple[int, Pagemap]]:
    found: dict[int, tuple[int, Pagemap]] = {}
    for member in tar.getmembers():
        match = _PAGEMAP_NAME.search(member.name)
        f = tar.extractfile(member) if match and member.isfile() else None
        if match and f is not None:
            pm = parse_pagemap(f.read())
            found[pm.pages_id] = (int(match.group(1)), pm)
    return found


@dataclass
class _Span:
    """Bytes of a rootfs archive the destination holds: ``length`` bytes at ``at`` in the
    archive are the bytes of ``path`` from ``offset`` on."""

    at: int
    length: int
    path: str
    offset: int


def _held_spans(archive: bytes, blocks: Blocks) -> tuple[int, list[_Span]]:
    """(bytes of pre-copied files in ``archive``, the spans of them the destination holds)."""
    known = 0
    spans: list[_Span] = []
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as inner:
        for info in inner:
            path = info.name.removeprefix("./").lstrip("/")
            if not info.isfile() or (path, 0) not in blocks:
                continue
            known += info.size
            for offset in range(0, info.size, BLOCK):
                at = info.offset_data + offset
                body = archive[at : at + min(BLOCK, info.size - offset)]
                if blocks.get((path, offset)) != body:
                    continue
                last = spans[-1] if spans else None
                if last and last.path == path and last.at + last.length == at:
                    last.length += len(body)  # contiguous in the archive and in the file
                else:
                    spans.append(_Span(at, len(body), path, offset))
    return known, spans


def make_delta(
    export_tar: Path, held: Copy, out_tar: Path, blocks: Blocks | None = None
) -> DeltaStats:
    """Copy podman's export tar leaving out every page the destination holds (rule 3), and
    every block of a pre-copied file in its rootfs archive that it holds (``blocks``)."""
    pages = from_copy = file_bytes = file_from_copy = 0
    manifest: dict[str, dict[str, object]] = {}
    file_manifest: dict[str, dict[str, object]] = {}
    with (
        tarfile.open(export_tar, "r:") as tin,
        tarfile.open(out_tar, "w:", format=tin.format) as tout,
    ):
        maps = _pagemaps_by_pages_id(tin)
        for member in tin.getmembers():
            src = tin.extractfile(member) if member.isfile() else None
            if src is not None and blocks and member.name == ROOTFS_DIFF:
                archive = src.read()
                known, spans = _held_spans(archive, blocks)
                file_bytes += known
                file_from_copy += sum(span.length for span in spans)
                file_manifest[member.name] = {
                    "size": member.size,
                    "sha256": hashlib.sha256(archive).hexdigest(),
                    "copied": [[x.at, x.length, x.path, x.offset] for x in spans],
                }
                kept, at = [], 0
                for span in spans:
                    kept.append(archive[at : span.at])
                    at = span.at + span.length
                kept.append(archive[at:])
                _add(tout, member, b"".join(kept))
                continue
            pages_id = pages_member_id(member)
            if pages_id is None or src is None:
                tout.addfile(member, src)
                continue
            if pages_id not in maps:
                raise ImageFormatError(f"no pagemap describes {member.name}")
            vpid, pm = maps[pages_id]
            if member.size != pm.present_pages * PAGE_SIZE:
                raise ImageFormatError(f"{member.name} has {member.size} bytes, its pagemap "
                                       f"says {pm.present_pages * PAGE_SIZE}")  # fmt: skip
            data = src.read()  # whole: bytes slices compare with memcmp, page by page
            kept_pages: list[bytes] = []
            copied: list[tuple[int, int]] = []
            for index, vaddr in enumerate(_pages_of(pm)):
                page = data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
                if held.get((vpid, vaddr)) == page:
                    copied.append((index, vaddr))
                else:
                    kept_pages.append(page)
            pages += pm.present_pages
            from_copy += len(copied)
            manifest[member.name] = {
                "pid": vpid,
                "size": member.size,
                "sha256": hashlib.sha256(data).hexdigest(),
                "copied": _runs(copied),
            }
            _add(tout, member, b"".join(kept_pages))
        meta = {"version": 2, "pages": manifest, "files": file_manifest}
        _add(tout, tarfile.TarInfo(MANIFEST), json.dumps(meta).encode())
    return DeltaStats(pages, from_copy, file_bytes, file_from_copy)


def _rebuild_archive(name: str, shipped: bytes, spec: dict[str, Any], blocks: Blocks) -> bytes:
    """A rootfs archive from its shipped bytes and the destination's blocks of files."""
    parts: list[bytes] = []
    at = pos = 0  # where we are in the shipped bytes and in the rebuilt archive
    for start, length, path, offset in spec["copied"]:
        gap = start - pos  # shipped bytes up to this span
        if gap < 0 or at + gap > len(shipped):
            raise PrecopyError(f"{name}: shipped bytes end early")
        parts.append(shipped[at : at + gap])
        at, pos = at + gap, pos + gap
        got = 0
        while got < length:
            block = blocks.get((path, offset + got))
            if not block:
                raise PrecopyError(f"{name}: the destination lacks {path} at {offset + got}")
            parts.append(block[: length - got])
            got += min(len(block), length - got)
        pos += length
    parts.append(shipped[at:])
    rebuilt = b"".join(parts)
    if len(rebuilt) != spec["size"] or hashlib.sha256(rebuilt).hexdigest() != spec["sha256"]:
        raise PrecopyError(f"{name}: the rebuilt archive does not match the dump")
    return rebuilt


def apply_delta(delta: Path, have: Copy, out_tar: Path, blocks: Blocks | None = None) -> int:
    """Rebuild podman's export tar from the shipped delta and ``have``, the destination's copy
    of the memory, and ``blocks``, its copy of the store's files (rule 4).

    Returns the pages taken from the copy.
    """
    data = delta.read_bytes()  # the delta is small: the memory stayed behind
    taken = 0
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tin,
        tarfile.open(out_tar, "w:", format=tin.format) as tout,
    ):
        try:
            meta = tin.extractfile(MANIFEST)
        except KeyError:
            raise PrecopyError("the shipped checkpoint has no pre-copy manifest") from None
        assert meta is not None
        meta_json = json.loads(meta.read())
        manifest, file_manifest = meta_json["pages"], meta_json.get("files", {})
        for member in tin.getmembers():
            if member.name == MANIFEST:
                continue
            src = tin.extractfile(member) if member.isfile() else None
            if src is not None and member.name in file_manifest:
                archive = _rebuild_archive(
                    member.name, src.read(), file_manifest[member.name], blocks or {}
                )
                _add(tout, member, archive)
                continue
            spec = manifest.get(member.name)
            if spec is None or src is None:
                tout.addfile(member, src)
                continue
            shipped = src.read()
            pid, parts, index, at = spec["pid"], [], 0, 0
            for start, count, vaddr in [*spec["copied"], [spec["size"] // PAGE_SIZE, 0, 0]]:
                if start > index:  # shipped pages up to this run
                    end = at + (start - index) * PAGE_SIZE
                    if end > len(shipped):
                        raise PrecopyError(f"{member.name}: shipped pages end early")
                    parts.append(shipped[at:end])
                    at = end
                for i in range(count):
                    page = have.get((pid, vaddr + i * PAGE_SIZE))
                    if page is None:
                        raise PrecopyError(f"{member.name}: the destination lacks the page at "
                                           f"{vaddr + i * PAGE_SIZE:#x}")  # fmt: skip
                    parts.append(page)
                taken += count
                index = start + count
            rebuilt = b"".join(parts)
            if (
                len(rebuilt) != spec["size"]
                or hashlib.sha256(rebuilt).hexdigest() != spec["sha256"]
            ):
                raise PrecopyError(f"{member.name}: the rebuilt pages do not match the dump")
            _add(tout, member, rebuilt)
    return taken
