"""The checkpoint link: a real byte stream, compressed on the fly, digest checked, rate shaped."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from migration.lab import net, transfer
from migration.lab.net import LabError

NS = "qmig-test-link"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _receive_in_thread(port: int, out: Path, **kwargs: object) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(
        target=lambda: result.append(transfer.receive("127.0.0.1", port, out, **kwargs)),
        daemon=True,
    )  # fmt: skip
    thread.start()
    return thread, result


def _checkpoint_like(path: Path, size: int) -> bytes:
    """Half random (incompressible) and half repetitive, like memory pages."""
    data = os.urandom(size // 2) + b"\0\1\2\3" * (size // 8)
    path.write_bytes(data)
    return data


@pytest.mark.timeout(30)
@pytest.mark.parametrize("codec", ["none", "gzip-1", "zstd-3"])
def test_a_checkpoint_arrives_whole(tmp_path: Path, codec: str) -> None:
    import time

    src = tmp_path / "ckpt.tar"
    data = _checkpoint_like(src, 3_000_000)
    out = tmp_path / "moved"
    port = _free_port()
    thread, result = _receive_in_thread(port, out)
    time.sleep(0.2)  # let it listen
    sent = transfer.send(src, "127.0.0.1", port, codec=codec)
    thread.join(10)
    assert result == [0]
    assert sent.source_bytes == len(data)
    assert out.read_bytes() == data  # the receiver decompressed: a plain copy
    if codec != "none":
        assert sent.bytes < 0.8 * len(data)  # the repetitive half shrinks


def test_the_codec_is_chosen_by_the_link_rate() -> None:
    sample = os.urandom(200_000) + bytes(range(256)) * 3000  # memory-like: part compressible
    slow = transfer.choose_codec(sample, 30_000_000, 1_000_000)  # 1 Mbit/s: ratio decides
    fast = transfer.choose_codec(sample, 30_000_000, 100_000_000_000)  # 100 Gbit/s: CPU does
    assert fast.codec == "none", fast.table
    assert slow.codec != "none", slow.table
    best = min(t["ratio"] for t in slow.table.values())  # within the 3 % that buys no CPU
    assert slow.table[slow.codec]["ratio"] <= best * 1.03, slow.table
    noise = transfer.choose_codec(os.urandom(500_000), 30_000_000, 1_000_000)
    assert noise.codec == "none", noise.table  # incompressible: compressing only costs


def test_an_unknown_codec_is_refused_by_the_receiver(tmp_path: Path) -> None:
    import socket
    import time

    port = _free_port()
    thread, result = _receive_in_thread(port, tmp_path / "moved")
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(transfer.MAGIC + b"\x05lzma9")
        assert sock.makefile("r").readline().startswith("ERR unknown or unavailable codec")
    thread.join(10)
    assert result == [1] and not (tmp_path / "moved").exists()


@pytest.mark.timeout(30)
def test_a_link_that_breaks_mid_stream_is_an_error(tmp_path: Path) -> None:
    import time

    src = tmp_path / "ckpt.tar"
    _checkpoint_like(src, 4_000_000)
    port = _free_port()
    thread, result = _receive_in_thread(port, tmp_path / "moved", fail_after=100_000)
    time.sleep(0.2)
    with pytest.raises(LabError, match="checkpoint transfer"):
        transfer.send(src, "127.0.0.1", port)
    thread.join(10)
    assert result == [3]


def test_rates_parse_as_tc_writes_them() -> None:
    assert net.parse_rate("100mbit") == 100_000_000
    assert net.parse_rate("1gbit") == 1_000_000_000
    assert net.parse_rate("500kbit") == 500_000
    assert net.parse_rate("2.5mbit") == 2_500_000


@pytest.mark.skipif(os.geteuid() != 0 or not net.have("tc"), reason="needs root and tc")
@pytest.mark.timeout(60)
def test_the_shaped_link_runs_at_its_rate(tmp_path: Path) -> None:
    """Through a veth pair limited to 20 Mbit/s, 2.5 MB take about a second, not 10 ms."""
    src = tmp_path / "ckpt.tar"
    src.write_bytes(os.urandom(2_500_000))  # incompressible: the wire carries all of it
    try:
        net.add_netns_link(NS, "qmig-tl0", "qmig-tl1", "198.18.251.0/30")
        assert net.shaped_rate("qmig-tl0") is None
        net.shape("qmig-tl0", "20mbit")
        assert net.shaped_rate("qmig-tl0") == 20_000_000  # what the codec choice reads
        receiver = transfer.Receiver(NS, "198.18.251.2", 7998, tmp_path / "moved")
        sent = transfer.send(src, "198.18.251.2", 7998)
        assert receiver.result(timeout=20).startswith("OK ")
    finally:
        net.del_netns(NS)
        net.del_link("qmig-tl0")
    assert NS not in net.netns_list() and "qmig-tl0" not in net.prefixed_links()
    assert 14 <= sent.mbit_per_s <= 21, sent


@pytest.mark.skipif(os.geteuid() != 0 or not net.have("tc"), reason="needs root and tc")
@pytest.mark.timeout(60)
def test_a_checkpoint_goes_host_to_host_between_two_namespaces(tmp_path: Path) -> None:
    """Per-host Podman's path: the sender speaks from the source host's namespace straight to
    the destination's (a veth pair between them, no route through the machine), and the
    bytes are counted on the source's interface."""
    src = tmp_path / "ckpt.tar"
    data = _checkpoint_like(src, 1_000_000)
    a, b = "qmig-test-ha", "qmig-test-hb"
    own = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        for ns in (a, b):
            net.run(["ip", "netns", "add", ns])
        net.add_ns_pair(a, "qmig-tha", b, "qmig-thb", "198.18.252.0/30")
        before = net.iface_bytes("qmig-tha", a)
        receiver = transfer.Receiver(b, "198.18.252.2", 7996, tmp_path / "moved")
        sent = transfer.send(src, "198.18.252.2", 7996, ns=a)
        assert receiver.result(timeout=20).startswith("OK ")
        assert net.iface_bytes("qmig-tha", a) - before >= sent.bytes
    finally:
        for ns in (a, b):
            net.del_netns(ns)
    assert (tmp_path / "moved").read_bytes() == data
    assert a not in net.netns_list() and b not in net.netns_list()
    assert os.stat("/proc/thread-self/ns/net").st_ino == own  # this thread is back home
