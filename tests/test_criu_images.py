"""CRIU pagemap images: read in CRIU's format, lazy pages zeroed in a copy of the pages file."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from migration.lab.criu_images import (
    PAGE_SIZE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    ImageFormatError,
    PagemapEntry,
    encode_pagemap,
    parse_pagemap,
    read_pagemap,
    strip_lazy_pages,
    zero_lazy_pages,
)

ENTRIES = [
    PagemapEntry(0x400000, 2, PE_PRESENT),  # e.g. the stack: never lazy
    PagemapEntry(0x7F0000000000, 3, PE_PRESENT | PE_LAZY),
    PagemapEntry(0x7F0000100000, 1, PE_PARENT),  # in a parent snapshot: no room in pages
    PagemapEntry(0x7F0000200000, 1, PE_PRESENT),
    PagemapEntry(0x7FFF00000000, 2, PE_PRESENT | PE_LAZY),
]


def _pages() -> bytes:
    """Each present page filled with its index + 1, so misplaced bytes show."""
    n = sum(e.nr_pages for e in ENTRIES if e.present)
    return b"".join(bytes([i + 1]) * PAGE_SIZE for i in range(n))


def test_a_pagemap_round_trips_in_criu_format() -> None:
    data = encode_pagemap(7, ENTRIES)
    assert data[:8] == bytes.fromhex("19435654") + bytes.fromhex("25400856")  # LE magics
    pm = parse_pagemap(data)
    assert pm.pages_id == 7 and pm.entries == tuple(ENTRIES)
    assert pm.present_pages == 8 and pm.lazy_pages == 5


def test_old_images_without_flags_read_as_present_or_parent() -> None:
    # compat_nr_pages only (field 2), in_parent (field 3), no flags (field 4)
    head = bytes([0x08, 0x01])
    e1 = bytes([0x08, 0x80, 0x20, 0x10, 0x02])  # vaddr 0x1000, 2 pages
    e2 = bytes([0x08, 0x80, 0x40, 0x10, 0x01, 0x18, 0x01])  # in_parent
    blob = bytes.fromhex("1943565425400856")
    for msg in (head, e1, e2):
        blob += len(msg).to_bytes(4, "little") + msg
    pm = parse_pagemap(blob)
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x1000, 2, PE_PRESENT),
        (0x2000, 1, PE_PARENT),
    ]


@pytest.mark.parametrize("blob", [b"", b"\0" * 8, bytes.fromhex("19435654254008560a000000")])
def test_what_is_not_a_pagemap_is_refused(blob: bytes) -> None:
    with pytest.raises(ImageFormatError):
        parse_pagemap(blob)


def test_zeroing_keeps_layout_and_non_lazy_pages(tmp_path: Path) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(encode_pagemap(3, ENTRIES))
    src, dst = tmp_path / "pages-3.img", tmp_path / "out.img"
    src.write_bytes(_pages())
    pm = read_pagemap(tmp_path / "pagemap-1.img")
    assert zero_lazy_pages(pm, src, dst) == 5 * PAGE_SIZE
    out = dst.read_bytes()
    assert len(out) == len(_pages())
    page = [out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(8)]
    # pages 0-1 kept, 2-4 lazy (zero), 5 kept, 6-7 lazy
    assert [p[0] for p in page] == [1, 2, 0, 0, 0, 6, 0, 0]
    assert all(len(set(p)) == 1 for p in page)


def test_a_pages_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "pages-3.img"
    src.write_bytes(_pages()[:-PAGE_SIZE])
    with pytest.raises(ImageFormatError):
        zero_lazy_pages(parse_pagemap(encode_pagemap(3, ENTRIES)), src, tmp_path / "out")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_the_export_tar_is_copied_with_its_lazy_pages_zeroed(tmp_path: Path) -> None:
    export, out = tmp_path / "export.tar", tmp_path / "shipped.tar"
    pagemap = encode_pagemap(1, ENTRIES)
    with tarfile.open(export, "w") as tar:
        _add(tar, "config.dump", b"{}")
        _add(tar, "checkpoint/pagemap-42.img", pagemap)
        _add(tar, "checkpoint/pages-1.img", _pages())
        _add(tar, "checkpoint/core-42.img", b"core")
    images = tmp_path / "images"
    images.mkdir()
    (images / "pagemap-42.img").write_bytes(pagemap)

    stripped = strip_lazy_pages(export, images, out)

    assert (stripped.lazy_bytes, stripped.kept_bytes) == (5 * PAGE_SIZE, 3 * PAGE_SIZE)
    with tarfile.open(export) as a, tarfile.open(out) as b:
        assert a.getnames() == b.getnames()
        for name in a.getnames():
            old, new = a.extractfile(name), b.extractfile(name)
            assert old is not None and new is not None
            if name.endswith("pages-1.img"):
                data = new.read()
                assert len(data) == len(_pages()) and data.count(0) == 5 * PAGE_SIZE
            else:
                assert old.read() == new.read()
