"""CRIU's memory images, read and rewritten for post-copy: the pagemap and the raw pages.

A CRIU dump keeps a process's memory in two kinds of file (CRIU image format, images v1.1):

- ``pagemap-<pid>.img`` (and ``pagemap-shmem-<id>.img``): a 4-byte "common" magic, the
  4-byte pagemap magic, then entries, each a little-endian u32 length and that many bytes
  of protobuf: first a ``PagemapHead {pages_id}``, then ``PagemapEntry {vaddr,
  compat_nr_pages, in_parent, flags, nr_pages}`` for each run of pages;
- ``pages-<pages_id>.img``: the raw pages, no header, in pagemap order, one 4 KiB page
  after the other for every entry flagged ``PE_PRESENT`` (entries without it, e.g. pages in a
  parent snapshot, take no room).

Pages of VMAs that CRIU can restore lazily carry ``PE_LAZY`` as well.  For post-copy the
destination gets a copy of ``pages-*.img`` in which those pages are zeroed (same size, same
offsets, so CRIU reads the non-lazy pages where it expects them; gzip makes the zeros almost
free on the link) and pulls the real ones from a page server at the source that reads the
full, untouched image from disk.

The protobuf reader here understands just what these two messages use (varints); it is
written from the format's description in CRIU's ``images/pagemap.proto``.
"""

from __future__ import annotations

import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PAGE_SIZE = 4096

PE_PARENT = 1 << 0  # the pages are in the parent snapshot
PE_LAZY = 1 << 1  # the pages can be restored lazily
PE_PRESENT = 1 << 2  # the pages are in pages-<id>.img

_PAGES_NAME = re.compile(r"(?:^|/)checkpoint/pages-(\d+)\.img$")
_COPY_CHUNK = 1 << 20


class ImageFormatError(ValueError):
    """Not a CRIU pagemap image, or one this reader does not understand."""


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)

    @property
    def size(self) -> int:
        return self.nr_pages * PAGE_SIZE


@dataclass(frozen=True)
class Pagemap:
    pages_id: int
    entries: tuple[PagemapEntry, ...]

    @property
    def lazy_pages(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present and e.lazy)

    @property
    def present_pages(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present)


# ---------------------------------------------------------------------- protobuf, minimally
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ImageFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ImageFormatError("varint too long")


def _fields(buf: bytes) -> dict[int, int]:
    """Field number -> value for a message of varint fields (other wire types skipped)."""
    out: dict[int, int] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ImageFormatError(f"unsupported protobuf wire type {wire}")
    if pos != len(buf):
        raise ImageFormatError("truncated protobuf field")
    return out


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_fields(fields: list[tuple[int, int]]) -> bytes:
    return b"".join(_encode_varint(n << 3) + _encode_varint(v) for n, v in fields)


# ---------------------------------------------------------------------- pagemap images
def parse_pagemap(data: bytes) -> Pagemap:
    if len(data) < 8:
        raise ImageFormatError("too short for a CRIU image")
    common, magic = struct.unpack_from("<II", data, 0)
    if common != IMG_COMMON_MAGIC or magic != PAGEMAP_MAGIC:
        raise ImageFormatError(f"not a pagemap image (magic {common:#x} {magic:#x})")
    pos = 8
    messages: list[bytes] = []
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageFormatError("truncated entry length")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ImageFormatError("truncated entry")
        messages.append(data[pos : pos + size])
        pos += size
    if not messages:
        raise ImageFormatError("pagemap image without a head")
    head = _fields(messages[0])
    if 1 not in head:
        raise ImageFormatError("pagemap head without pages_id")
    entries = []
    for raw in messages[1:]:
        f = _fields(raw)
        if 1 not in f or 2 not in f:
            raise ImageFormatError("pagemap entry without vaddr or nr_pages")
        nr_pages = f.get(5, f[2])
        if 4 in f:
            flags = f[4]
        elif f.get(3):  # images of old CRIUs: in_parent instead of flags
            flags = PE_PARENT
        else:
            flags = PE_PRESENT
        entries.append(PagemapEntry(f[1], nr_pages, flags))
    return Pagemap(head[1], tuple(entries))


def read_pagemap(path: Path) -> Pagemap:
    return parse_pagemap(path.read_bytes())


def encode_pagemap(pages_id: int, entries: list[PagemapEntry]) -> bytes:
    """A pagemap image in CRIU's format (what the tests feed the reader and the zeroing)."""
    out = [struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)]
    for fields in [[(1, pages_id)]] + [
        [(1, e.vaddr), (2, e.nr_pages & 0xFFFFFFFF), (4, e.flags), (5, e.nr_pages)] for e in entries
    ]:
        body = _encode_fields(fields)
        out.append(struct.pack("<I", len(body)) + body)
    return b"".join(out)


def pagemaps(images: Path) -> dict[int, Pagemap]:
    """Every pagemap of a dump directory, by the pages_id of the pages file it describes."""
    found: dict[int, Pagemap] = {}
    for path in sorted(images.glob("pagemap-*.img")):
        pm = read_pagemap(path)
        if pm.pages_id in found:
            raise ImageFormatError(f"two pagemaps describe pages-{pm.pages_id}.img")
        found[pm.pages_id] = pm
    return found


def pages_member_id(member: tarfile.TarInfo) -> int | None:
    """The pages_id of an export tar's ``checkpoint/pages-<id>.img``, else None."""
    match = _PAGES_NAME.search(member.name) if member.isfile() else None
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------- zeroing lazy pages
def _zeroed_chunks(pagemap: Pagemap, src: IO[bytes], size: int) -> Iterator[bytes]:
    """The bytes of a pages file with every PE_LAZY page replaced by zeros."""
    expected = pagemap.present_pages * PAGE_SIZE
    if size != expected:
        raise ImageFormatError(
            f"pages-{pagemap.pages_id}.img has {size} bytes, its pagemap says {expected}"
        )
    zeros = bytes(_COPY_CHUNK)
    for entry in pagemap.entries:
        if not entry.present:
            continue
        left = entry.size
        if entry.lazy:
            src.seek(left, 1)
            while left:
                n = min(left, _COPY_CHUNK)
                yield zeros[:n]
                left -= n
        else:
            while left:
                block = src.read(min(left, _COPY_CHUNK))
                if not block:
                    raise ImageFormatError(f"pages-{pagemap.pages_id}.img ends early")
                yield block
                left -= len(block)


class _ChunkReader:
    """A file-like ``read`` over an iterator of byte chunks (for ``tarfile.addfile``)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def zero_lazy_pages(pagemap: Pagemap, src: Path, dst: Path) -> int:
    """Write ``dst``: ``src`` (a pages file) with its lazy pages zeroed; returns lazy bytes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in _zeroed_chunks(pagemap, fin, src.stat().st_size):
            fout.write(chunk)
    return pagemap.lazy_pages * PAGE_SIZE


@dataclass(frozen=True)
class StrippedCheckpoint:
    lazy_bytes: int  # zeroed here, to be pulled from the page server
    kept_bytes: int  # memory that travels in the tar (non-lazy pages)


def strip_lazy_pages(export_tar: Path, images: Path, out_tar: Path) -> StrippedCheckpoint:
    """Copy podman's export tar with the lazy pages of every ``pages-*.img`` zeroed.

    ``images`` is the tar's ``checkpoint/`` directory unpacked (its pagemaps say which pages
    are lazy).  Every member keeps its name, size and order, so podman imports the copy as it
    would the original.
    """
    maps = pagemaps(images)
    lazy = kept = 0
    with (
        tarfile.open(export_tar, "r:") as tin,
        tarfile.open(out_tar, "w:", format=tin.format) as tout,
    ):
        for member in tin:
            pages_id = pages_member_id(member)
            src = tin.extractfile(member) if member.isfile() else None
            if pages_id is not None and src is not None:
                pm = maps.get(pages_id)
                if pm is None:
                    raise ImageFormatError(f"no pagemap describes {member.name}")
                zeroed = _ChunkReader(_zeroed_chunks(pm, src, member.size))
                tout.addfile(member, zeroed)  # type: ignore[arg-type,unused-ignore]
                lazy += pm.lazy_pages * PAGE_SIZE
                kept += (pm.present_pages - pm.lazy_pages) * PAGE_SIZE
            else:
                tout.addfile(member, src)
    return StrippedCheckpoint(lazy, kept)
