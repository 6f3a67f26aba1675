"""A live migration of the broker container from one edge host to another, with rollback.

The sequence (cold migration, as CRIU and podman 4.3 allow here)::

    trigger -> prepare (SERVER_MIGRATION to QUIC clients) -> pre-checkpoint (TCP/MPTCP
    clients sent to the destination, TCP listeners closed) -> freeze: checkpoint + export
    -> transfer over the shaped link -> restore into the destination pod -> restored
    (listeners reopen, SERVER_MIGRATED announced) -> clean the source pod

Every step is stamped on a wall-clock timeline so it lines up with what the clients saw.
If the transfer or the restore fails, the broker is restored at the source from the same
checkpoint, QUIC clients are told to stay, and :class:`MigrationFailed` carries the timeline.
Should even that fail, a fresh broker is started at the source (sessions lost, but the
broker runs somewhere, never nowhere), and the error says so.

Post-copy (``method="postcopy"``, issue #15) freezes the same way (an ordinary checkpoint
to local disk) but ships the dump with its lazily restorable pages zeroed; the destination
restores at once through the ``qmig-runc`` runtime wrapper with ``criu lazy-pages``, which
pulls the missing pages over the link from ``criu page-server --lazy-pages`` reading the full
dump at the source.  Until every page has arrived the source keeps that dump: any failure in
the lazy phase kills the destination and restores the source from it, as a cold rollback does.
Nothing the destination acknowledged is lost by such a rollback: from pre-checkpoint until
the commit (every page arrived) the broker is provisional (:mod:`broker.provisional`) and
acknowledges nothing the frozen image would not know, so clients send it again to the
source (see docs/design/postcopy.md).  ``hybrid`` runs as post-copy here: CRIU's
pre-copy needs the kernel's memory dirty tracking, which :func:`precopy_support` detects.

Pre-copy (``method="precopy"``) needs no dirty tracking: :mod:`migration.lab.precopy` reads
the broker's memory from ``/proc`` in live rounds while it serves, ships it to the
destination, and at the freeze sends only the dump's pages whose bytes the destination does
not hold; the destination rebuilds the exact export tar from both and restores it.  The
source keeps its full local export, so its rollback is the cold one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migration.control import ControlError
from migration.scenario import METHODS, Host

from . import criu_images, net, precopy, transfer
from .lab import BROKER_STORE, Lab, container_name, pod_name
from .net import LabError
from .postcopy import (
    PAGE_SERVER_PORT,
    RUNTIME,
    LazyRestore,
    PageServer,
    hybrid_note,
    postcopy_support,
    runtime_installed,
)

TRANSFER_PORT = 7999
CODEC_SAMPLE = 2 << 20  # bytes of the broker's memory the codecs are measured on
ROUND_PORT = 7997  # pre-copy's live rounds, one receiver after the other
FAIL_POINTS = ("transfer", "restore", "lazy-pages")
LAZY_FAIL_AFTER = 0.5  # seconds of serving at the destination before fail_at lazy-pages


class MigrationFailed(LabError):
    """The migration did not happen; ``outcome`` says what did (rollback included)."""

    def __init__(self, message: str, outcome: dict[str, Any]) -> None:
        super().__init__(message)
        self.outcome = outcome


def precopy_support() -> str | None:
    """None if CRIU can pre-copy here, else the one-line reason it cannot."""
    try:
        proc = subprocess.run(["criu", "check", "--feature", "mem_dirty_track"],
                              capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pre-copy unavailable: criu check failed ({exc})"
    if proc.returncode == 0:
        return None
    return ("CRIU's pre-copy unavailable: this kernel has no memory dirty tracking (criu "
            "check --feature mem_dirty_track fails); --method precopy finds dirty pages "
            "by content")  # fmt: skip


class Migration:
    """One move of the broker from where it runs to ``dest`` (an edge host's name)."""

    def __init__(self, lab: Lab, dest: str, *, fail_at: str | None = None,
                 method: str = "cold",
                 progress: Callable[[str], None] | None = None) -> None:  # fmt: skip
        if fail_at is not None and fail_at not in FAIL_POINTS:
            raise ValueError(f"fail_at must be one of {FAIL_POINTS}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        # No dirty tracking here (precopy_support), so hybrid's pre-copy rounds are empty.
        self.method = "postcopy" if method == "hybrid" else method
        if fail_at == "lazy-pages" and self.method != "postcopy":
            raise ValueError("fail_at lazy-pages needs method postcopy")
        if self.method == "postcopy":
            reason = postcopy_support()
            if reason:
                raise LabError(reason)
        self.lab = lab
        self.src = lab.broker_host
        self.dest = lab.scenario.host(dest)
        if self.dest == self.src:
            raise LabError(f"the broker already runs on {dest}")
        self.fail_at = fail_at
        # Where checkpoints go: the destination's receiver (address, netns); what the source
        # sends from (netns) and the interface that carries it (counted, its rate measured).
        self.link_ip, self.recv_ns, _, _ = lab.checkpoint_link(self.dest)
        _, _, self.link_dev, self.send_ns = lab.checkpoint_link(self.src)
        self.progress = progress or (lambda step: None)
        self.timeline: dict[str, float] = {}
        self.outcome: dict[str, Any] = {
            "from": self.src.name,
            "to": self.dest.name,
            "ip_before": self.src.address,
            "ip_after": self.dest.address,
            "timeline": self.timeline,
            "method": self.method,
        }
        if method == "hybrid":
            self.outcome["method_note"] = hybrid_note()
        stamp = time.strftime("%H%M%S")
        self.work = lab.state_dir / f"move-{stamp}"  # pre-/post-copy's images and logs
        self.local_ckpt = lab.state_dir / f"ckpt-{stamp}-{self.src.name}.tar"
        # the receiver decompresses: the destination always holds a plain tar
        self.moved_ckpt = lab.state_dir / f"ckpt-{stamp}-{self.dest.name}.tar"
        # pre-copy: what the source sends and what the destination holds, kept apart
        self.held: precopy.Copy = {}
        self.dest_copy: precopy.Copy = {}
        self.held_blocks: precopy.Blocks = {}  # and of the durable store's files
        self.dest_blocks: precopy.Blocks = {}
        self.rounds: list[dict[str, Any]] = []
        self._link0 = 0  # the link counter at the trigger
        self.codec = "none"  # the checkpoint link's, chosen at the trigger

    def _mark(self, event: str, message: str | None = None) -> None:
        self.timeline[event] = time.time()
        if message:
            self.progress(message)

    def _quic(self, host: Host) -> str:
        return f"{host.address}:{self.lab.scenario.ports.quic}"

    # ------------------------------------------------------------------ the move
    def run(self) -> dict[str, Any]:
        lab, src, dest = self.lab, self.src, self.dest
        podman, there = lab.podman_at(src), lab.podman_at(dest)
        link_ip = self.link_ip
        self._mark("trigger", f"migrating the broker {src.name} ({src.address}) -> "
                              f"{dest.name} ({dest.address})")  # fmt: skip
        self._link0 = self._link_bytes()  # every byte of the move, rounds included
        self.outcome["broker_rss_bytes"] = self._broker_rss()  # what the move has to carry
        receiver = transfer.Receiver(
            self.recv_ns, link_ip, TRANSFER_PORT, self.moved_ckpt,
            fail_after=64 * 1024 if self.fail_at == "transfer" else None,
        )  # fmt: skip
        blocker = self._block_destination() if self.fail_at == "restore" else None
        final: tuple[transfer.Receiver, Path] | None = None
        try:
            self.codec = self._choose_codec()
            if self.method == "precopy":
                self._live_rounds(link_ip, precopy.ROUNDS)
                # The last round runs between pre-checkpoint and the freeze, while the TCP
                # clients are away: its receiver is listening before they are sent off.
                final = self._round_receiver(link_ip)
            told = lab.control("prepare", host=src, dest=self._quic(dest))
            self.outcome["quic_notified"] = told.get("quic_notified", 0)
            self._mark("clients_notified", f"told {told.get('quic_notified', 0)} QUIC clients")
            # A bare host: TCP, TLS and MPTCP clients each keep their own port.
            # Post-copy: from here until the commit the broker acknowledges nothing that a
            # rollback to the frozen image would forget (broker.provisional).
            hold = {"provisional": self._provisional_seconds()} if self.method == "postcopy" else {}
            pre = lab.control("pre-checkpoint", host=src, reference=dest.address, **hold)
            self.outcome["tcp_sent_away"] = pre.get("disconnected", 0)
            # QUIC clients that had not acknowledged the destination within the grace.
            self.outcome["quic_unacknowledged"] = pre.get("quic_unacknowledged", 0)
            self._mark("pre_checkpoint", f"sent {pre.get('disconnected', 0)} TCP/MPTCP clients "
                                         f"to {dest.address}")  # fmt: skip
            if self.method == "precopy":
                self._live_rounds(link_ip, 1, final)  # what prepare and pre-checkpoint changed
                final = None
        except (ControlError, LabError, precopy.PrecopyError) as exc:
            receiver.stop()
            if final is not None:
                final[0].stop()
            self._remove_blocker(blocker)
            self._rollback_control()
            shutil.rmtree(self.work, ignore_errors=True)
            raise MigrationFailed(f"migration to {dest.name} did not start: {exc}",
                                  self.outcome) from exc  # fmt: skip

        if self.method == "postcopy":
            return self._postcopy(receiver, link_ip)
        self._mark("freeze_start")
        try:
            ckpt = podman.checkpoint(container_name(src), self.local_ckpt)
        except LabError as exc:
            receiver.stop()
            try:
                return self._fail("checkpoint", exc)
            finally:
                self._remove_blocker(blocker)  # after the rollback: not on its path
        self.outcome["checkpoint_bytes"] = ckpt.bytes
        self._mark("dump_done", f"checkpoint: {ckpt.bytes / 1e6:.1f} MB in {ckpt.seconds:.2f} s")

        try:
            shipped, restored = self.local_ckpt, self.moved_ckpt
            if self.method == "precopy":
                shipped = self.work / "delta.tar"
                restored = self.work / "rebuilt.tar"
                delta = precopy.make_delta(self.local_ckpt, self.held, shipped,
                                           self.held_blocks)  # fmt: skip
                self.outcome["pages_from_copy"] = delta.from_copy
                self.outcome["pages_shipped"] = delta.shipped
                if delta.file_bytes:
                    self.outcome["store_bytes"] = delta.file_bytes
                    self.outcome["store_bytes_from_copy"] = delta.file_bytes_from_copy
                self._mark("delta_done", f"delta: {delta.shipped} of {delta.pages} pages "
                                         "changed since the last round")  # fmt: skip
            sent = transfer.send(shipped, link_ip, TRANSFER_PORT, codec=self.codec,
                                 ns=self.send_ns)  # fmt: skip
            receiver.result(timeout=30)
            self.outcome["transfer_bytes"] = sent.bytes
            self.outcome["transfer_mbit_s"] = round(sent.mbit_per_s, 1)
            rate = f"{sent.mbit_per_s:.0f} Mbit/s"
            self._mark(
                "transfer_done",
                f"transfer: {sent.bytes / 1e6:.1f} MB in {sent.seconds:.2f} s ({rate})",
            )
            if self.method == "precopy":  # at the destination, from what crossed the link
                taken = precopy.apply_delta(self.moved_ckpt, self.dest_copy, restored,
                                            self.dest_blocks)  # fmt: skip
                self._mark("rebuilt", f"rebuilt the checkpoint ({taken} pages from the copy)")
            there.remove_container(container_name(dest))  # a leftover of an earlier run
            self._restore(restored, dest)
            self._mark("restore_done", f"restored in {dest.name}")
            self._serving_at_destination(f"serving at {dest.address}")
        except (LabError, ControlError, precopy.PrecopyError, OSError,
                tarfile.TarError) as exc:  # fmt: skip
            receiver.stop()
            return self._fail("transfer" if "transfer_done" not in self.timeline
                              else "restore", exc)  # fmt: skip
        finally:
            self._remove_blocker(blocker)  # after any rollback: not on its path
        self.outcome["service_gap_ms"] = round(
            (self.timeline["resumed"] - self.timeline["freeze_start"]) * 1000, 1
        )
        self.outcome.setdefault("downtime_ms", self.outcome["service_gap_ms"])
        self.outcome["link_bytes"] = self._link_bytes() - self._link0
        self.outcome["total_ms"] = round(
            (self.timeline["resumed"] - self.timeline["trigger"]) * 1000, 1
        )
        self.outcome["ok"] = True
        self._clean_source()
        return self.outcome

    def _link_rate(self) -> int:
        """The checkpoint link's rate as shaped now (the scenario's if tc shows none)."""
        rate = net.shaped_rate(self.link_dev, self.send_ns)
        return rate or net.parse_rate(self.lab.scenario.link_rate)

    def _link_bytes(self) -> int:
        """Bytes so far on the interface that carries what the source sends."""
        return net.iface_bytes(self.link_dev, self.send_ns)

    def _init_pid(self) -> int:
        attrs = self.lab.podman_at(self.src).client.containers.get(container_name(self.src)).attrs
        return int(attrs["State"]["Pid"])

    def _choose_codec(self) -> str:
        """The checkpoint link's codec, measured on the broker's memory before the freeze."""
        if not self.lab.scenario.compress:
            return "none"
        try:
            sample = precopy.memory_sample(
                precopy.container_processes(self._init_pid()), CODEC_SAMPLE
            )
        except precopy.PrecopyError as exc:  # cannot read it: the old default
            self.progress(f"codec: gzip-1 (the broker's memory cannot be sampled: {exc})")
            return "gzip-1"
        rate = self._link_rate()
        choice = transfer.choose_codec(sample, len(sample), rate)
        self.outcome["codec"] = choice.codec
        self.outcome["codec_table"] = choice.table
        ratio = choice.table[choice.codec]["ratio"]
        self._mark("codec_chosen", f"codec: {choice.codec} (ratio {ratio:.2f} on "
                                   f"{len(sample) / 1e6:.1f} MB of the broker's memory, link "
                                   f"{rate / 1e6:g} Mbit/s)")  # fmt: skip
        return choice.codec

    # ------------------------------------------------------------------ pre-copy
    def _round_receiver(self, link_ip: str) -> tuple[transfer.Receiver, Path]:
        """The next round's receiver, listening (starting one takes ~0.2 s: start it early)."""
        self.work.mkdir(parents=True, exist_ok=True)
        moved = self.work / f"round-{len(self.rounds) + 1}-moved"
        return transfer.Receiver(self.recv_ns, link_ip, ROUND_PORT, moved), moved

    def _live_rounds(self, link_ip: str, most: int,
                     ready: tuple[transfer.Receiver, Path] | None = None) -> None:  # fmt: skip
        """Pre-copy rounds while the broker serves, until one ships little (precopy rule 2)."""
        init_pid = self._init_pid()
        # The durable store's files too, where the broker keeps one (issue #18).
        store = (precopy.StoreFiles(Path(f"/proc/{init_pid}/root"), (BROKER_STORE,))
                 if self.lab.scenario.persistence else None)  # fmt: skip
        for _ in range(most):
            n = len(self.rounds) + 1
            start = time.monotonic()
            receiver, moved = ready or self._round_receiver(link_ip)
            ready = None
            local = self.work / f"round-{n}"
            try:
                stats = precopy.live_round(precopy.container_processes(init_pid), self.held,
                                           local, store, self.held_blocks)  # fmt: skip
                sent = transfer.send(local, link_ip, ROUND_PORT, codec=self.codec,
                                     ns=self.send_ns)  # fmt: skip
                receiver.result(timeout=30)
            finally:
                receiver.stop()
            precopy.load_round(moved, self.dest_copy, self.dest_blocks)  # the destination's
            local.unlink()
            moved.unlink()
            self.rounds.append({"pages_read": stats.pages_read, "pages_sent": stats.pages_sent,
                                "store_bytes_sent": stats.file_bytes_sent,
                                "link_bytes": sent.bytes,
                                "seconds": round(time.monotonic() - start, 3)})  # fmt: skip
            self.outcome["precopy_rounds"] = self.rounds
            files = f", {stats.file_bytes_sent / 1e6:.2f} MB of the store" if store else ""
            self._mark(f"round_{n}", f"pre-copy round {n}: {stats.pages_sent} of "
                                     f"{stats.pages_read} pages{files} ({sent.bytes / 1e6:.2f} "
                                     "MB on the link) while serving")  # fmt: skip
            if stats.bytes_sent < precopy.STOP_BYTES:
                return

    # ------------------------------------------------------------------ post-copy
    def _postcopy(self, receiver: transfer.Receiver, link_ip: str) -> dict[str, Any]:
        """Freeze, ship the dump without its lazy pages, resume at once, pull the rest."""
        lab, src, dest = self.lab, self.src, self.dest
        podman, there = lab.podman_at(src), lab.podman_at(dest)
        # Where the page server listens: the machine's end of the link, or per-host the
        # source host's own link address (and namespace).
        source_ip = (lab.checkpoint_link(src)[0] if lab.per_host
                     else net.net_address(lab.scenario.link_subnet, 1))  # fmt: skip
        shutil.rmtree(self.work, ignore_errors=True)
        images = self.work / "source"
        shipped = self.work / "shipped.tar"
        server: PageServer | None = None
        lazy: LazyRestore | None = None
        runtime = podman.client.containers.get(container_name(src)).attrs.get("OCIRuntime")
        if runtime != RUNTIME:
            receiver.stop()
            self._rollback_control()
            raise MigrationFailed(
                f"post-copy needs the broker to run under the {RUNTIME} runtime, it runs under "
                f"{runtime} (restart it with `qmig lab up`, or migrate cold)",
                self.outcome,
            )
        self._mark("freeze_start")
        try:
            ckpt = podman.checkpoint(container_name(src), self.local_ckpt)
        except LabError as exc:
            receiver.stop()
            return self._fail("checkpoint", exc)
        self.outcome["checkpoint_bytes"] = ckpt.bytes
        self._mark("dump_done", f"checkpoint: {ckpt.bytes / 1e6:.1f} MB in {ckpt.seconds:.2f} s")
        try:
            _unpack_checkpoint(self.local_ckpt, images)
            stripped = criu_images.strip_lazy_pages(self.local_ckpt, images / "checkpoint",
                                                    shipped)  # fmt: skip
            self.outcome["lazy_bytes"] = stripped.lazy_bytes
            self._mark("lazy_stripped", f"{stripped.lazy_bytes / 1e6:.1f} MB of pages left "
                                        "for the lazy phase")  # fmt: skip
            budget = self._lazy_budget(ckpt.bytes)
            server = PageServer(images / "checkpoint", source_ip, PAGE_SERVER_PORT, budget + 30,
                                self.work / "page-server.log", ns=self.send_ns)  # fmt: skip
            sent = transfer.send(shipped, link_ip, TRANSFER_PORT, codec=self.codec,
                                 ns=self.send_ns)  # fmt: skip
            receiver.result(timeout=30)
            self.outcome["transfer_bytes"] = sent.bytes
            self._mark("transfer_done", f"transfer: {sent.bytes / 1e6:.2f} MB in "
                                        f"{sent.seconds:.2f} s")  # fmt: skip
            server.wait_listening()
            there.remove_container(container_name(dest))  # a leftover of an earlier run
            lazy = LazyRestore(self.work / "lazy", self.recv_ns, source_ip, PAGE_SERVER_PORT,
                               budget)  # fmt: skip
            try:
                there.restore_cli(self.moved_ckpt, there.pod_id(pod_name(dest)),
                                  container_name(dest))  # fmt: skip
            finally:
                lazy.disarm()
            if lazy.pid is None:
                raise LabError(f"the restore did not go through the {RUNTIME} runtime wrapper")
            self._mark("restore_done", f"restored in {dest.name} (pages still at {src.name})")
            self._serving_at_destination(f"serving at {dest.address}; pulling the remaining pages")
            if self.fail_at == "lazy-pages":
                time.sleep(LAZY_FAIL_AFTER)  # mid-way: the destination has served a while
                self._kill_lazy_daemon(lazy)
            rc = lazy.wait(time.monotonic() + budget)
            if rc != 0:
                raise LabError(f"criu lazy-pages failed (rc {rc}): {lazy.log_tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(10)
            if server.finished() != 0:
                raise LabError(f"criu page-server failed ({server.finished()}): "
                               f"{server.log.read_text(errors='replace')[-300:]}")  # fmt: skip
            result = lazy.result()
            self.outcome["pages_faulted"] = result.faults
            self.outcome["pages_pulled"] = result.pages
            self._mark("pages_done", f"every page at {dest.name} ({result.pages} pulled, "
                                     f"{result.faults} on demand)")  # fmt: skip
            self._commit()
        except (LabError, ControlError, criu_images.ImageFormatError, OSError,
                tarfile.TarError) as exc:  # fmt: skip
            receiver.stop()
            if lazy is not None:
                lazy.stop()
            if server is not None:
                server.stop()
            step = ("lazy_pages" if "restore_done" in self.timeline else
                    "restore" if "transfer_done" in self.timeline else "transfer")  # fmt: skip
            try:
                return self._fail(step, exc)
            finally:
                if not os.environ.get("QMIG_KEEP_POSTCOPY"):  # kept for a post-mortem
                    shutil.rmtree(self.work, ignore_errors=True)
        self.outcome["service_gap_ms"] = round(
            (self.timeline["resumed"] - self.timeline["freeze_start"]) * 1000, 1
        )
        self.outcome.setdefault("downtime_ms", self.outcome["service_gap_ms"])
        self.outcome["total_ms"] = round(
            (self.timeline["pages_done"] - self.timeline["trigger"]) * 1000, 1
        )
        self.outcome["link_bytes"] = self._link_bytes() - self._link0
        self.outcome["ok"] = True
        self._clean_source()
        return self.outcome

    def _lazy_budget(self, nbytes: int) -> float:
        """Seconds the lazy phase may take for ``nbytes`` of memory: twice the link's
        time for them, plus 10 s."""
        return 2 * nbytes * 8 / self._link_rate() + 10

    def _provisional_seconds(self) -> float:
        """How long the broker may hold its acknowledgements back at most (its deadline if
        neither commit nor rollback comes): the lazy phase of its resident memory, plus
        the steps around it."""
        return round(self._lazy_budget(max(self._broker_rss(), 64 << 20)) + 60, 1)

    def _broker_rss(self) -> int:
        """The broker container's resident memory now (its processes' VmRSS; 0 if unknown)."""
        try:
            return sum(_resident_bytes(pid)
                       for pid, _ in precopy.container_processes(self._init_pid()))  # fmt: skip
        except Exception:  # a measurement: never a reason for the move to fail
            return 0

    def _commit(self) -> None:
        """Every page is at the destination: the move can no longer roll back, so the
        broker there sends what it held since pre-checkpoint."""
        try:
            done = self.lab.control("commit", host=self.dest)
        except ControlError as exc:  # it commits by itself at its deadline
            self.outcome["commit_error"] = str(exc)
            self.progress(f"commit failed ({exc}); the broker commits by itself at its "
                          "deadline")  # fmt: skip
            return
        self.outcome["held_acks"] = done.get("held_acks", 0)
        self.outcome["held_qos2"] = done.get("held_qos2", 0)
        self._mark("committed", f"committed: {done.get('held_acks', 0)} acknowledgements and "
                                f"{done.get('held_qos2', 0)} QoS 2 messages released")  # fmt: skip

    def _kill_lazy_daemon(self, lazy: LazyRestore) -> None:
        """The link or the destination "dies" mid-way: SIGKILL the real lazy-pages daemon."""
        pid = lazy.daemon_pid()
        if pid is None:
            raise LabError("fail_at lazy-pages: no lazy-pages daemon to kill (already done?)")
        import signal

        os.kill(pid, signal.SIGKILL)
        self._mark("lazy_daemon_killed", f"killed the lazy-pages daemon (pid {pid}) on purpose")

    def _restore(self, path: Path, host: Host) -> None:
        """Restore ``path`` as the broker of ``host``, keeping the qmig-runc runtime if any.

        podman 4.3's API import-restore drops the container's runtime (the next move could
        not be post-copy); its CLI keeps it.
        """
        podman = self.lab.podman_at(host)
        if runtime_installed():
            podman.restore_cli(path, podman.pod_id(pod_name(host)), container_name(host))
        else:
            podman.restore(path, podman.pod_id(pod_name(host)), container_name(host))

    def _serving_at_destination(self, message: str) -> None:
        """The restored broker is the lab's now: record it, tell it (``restored``)."""
        lab, dest = self.lab, self.dest
        assert lab.state is not None  # a running lab has its state
        lab.state.broker_host = dest.name
        lab.state.save(lab.state_dir)
        done = lab.control("restored", host=dest, address=self._quic(dest))
        self.outcome["quic_announced"] = done.get("quic_announced", 0)
        self._mark("resumed", message)
        self._note_freeze(done.get("freeze"))

    def _note_freeze(self, freeze: dict[str, Any] | None) -> None:
        """The broker's own view of its freeze: the true freeze-to-resume downtime."""
        if freeze:
            self.timeline["frozen"] = freeze["frozen_at"]
            self.timeline["thawed"] = freeze["thawed_at"]
            self.outcome["downtime_ms"] = round(
                (freeze["thawed_at"] - freeze["frozen_at"]) * 1000, 1
            )

    def first_client_packet(self) -> float | None:
        """When the restored broker heard its first QUIC datagram (ask after some traffic).

        Also fills ``outcome["clients"]``: each client's return as the broker saw it, in ms
        after the thaw (QUIC: first datagram; TCP/MPTCP: the new connection).
        """
        with contextlib.suppress(ControlError, LabError):
            status = self.lab.control("status", host=self.dest)
            self.outcome["clients"] = status.get("returned", [])
            freeze = status.get("last_freeze") or {}
            at = freeze.get("first_packet_at")
            if at:
                self.timeline["first_client_packet"] = float(at)
                return float(at)
        return None

    # ------------------------------------------------------------------ cleanup
    def _clean_source(self) -> None:
        """Remove the checkpointed source container and CRIU's lock from the source pod."""
        podman = self.lab.podman_at(self.src)
        podman.remove_container(container_name(self.src))
        pid = podman.pod_infra_pid(pod_name(self.src))
        self.outcome["source_lock_rules_removed"] = net.clear_criu_lock(pid)
        left = net.criu_lock_rules(pid)
        if left:
            raise LabError(f"CRIU's network lock is still in pod {pod_name(self.src)}: {left}")
        for path in (self.local_ckpt, self.moved_ckpt):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(self.work, ignore_errors=True)
        self._mark("source_cleaned")

    def _block_destination(self) -> str:
        """Make the restore fail for real: something already holds the QUIC port there."""
        name = f"qmig-blocker-{self.dest.name}"
        port = self.lab.scenario.ports.quic
        script = (f"import signal, socket, sys, time; signal.signal(signal.SIGTERM, "
                  f"lambda *_: sys.exit(0)); s = socket.socket(socket.AF_INET, "
                  f"socket.SOCK_DGRAM); s.bind(('0.0.0.0', {port})); time.sleep(600)")  # fmt: skip
        assert self.lab.state is not None
        self.lab.podman_at(self.dest).run_container(
            name, self.lab.state.image, ["python3", "-c", script], pod=pod_name(self.dest),
            env={}, mounts=[])  # fmt: skip
        time.sleep(0.5)  # let it bind before the restore needs the port
        return name

    def _remove_blocker(self, name: str | None) -> None:
        if name:
            with contextlib.suppress(Exception):
                self.lab.podman_at(self.dest).remove_container(name)

    # ------------------------------------------------------------------ rollback
    def _rollback_control(self) -> None:
        with contextlib.suppress(ControlError):
            self.lab.control("rollback", host=self.src, address=self._quic(self.src))

    def _fail(self, step: str, exc: Exception) -> dict[str, Any]:
        """Bring the broker back at the source from the same checkpoint, then raise."""
        lab, src, dest = self.lab, self.src, self.dest
        podman, there = lab.podman_at(src), lab.podman_at(dest)
        self.outcome["ok"] = False
        self.outcome["failed_at"] = step
        self.outcome["error"] = str(exc)
        self.progress(f"{step} failed ({exc}); rolling back to {src.name}")
        self._mark("rollback_start")
        how = ""
        try:
            with contextlib.suppress(Exception):  # a half-restored container at the destination
                there.remove_container(container_name(dest))
            with contextlib.suppress(Exception):
                net.clear_criu_lock(there.pod_infra_pid(pod_name(dest)))
            state = podman.container_state(container_name(src))
            if state is not None and state["status"] == "running":
                how = "the checkpoint failed, the broker kept running"  # CRIU let it go on
            else:
                if not self.local_ckpt.exists():
                    raise LabError("no checkpoint to roll back from")
                podman.remove_container(container_name(src))
                net.clear_criu_lock(podman.pod_infra_pid(pod_name(src)))
                self._restore(self.local_ckpt, src)
                how = "restored from the same checkpoint"
            assert lab.state is not None  # a running lab has its state
            lab.state.broker_host = src.name
            lab.state.save(lab.state_dir)
            back = lab.control("rollback", host=src, address=self._quic(src))
            self._note_freeze(back.get("freeze"))
            self._mark("rolled_back", f"rolled back: the broker serves at {src.address} again "
                                      f"({how})")  # fmt: skip
            self.outcome["rollback"] = how
            if "freeze_start" in self.timeline:
                self.outcome["service_gap_ms"] = round(
                    (self.timeline["rolled_back"] - self.timeline["freeze_start"]) * 1000, 1
                )
                self.outcome.setdefault("downtime_ms", self.outcome["service_gap_ms"])
        except (LabError, ControlError) as again:
            self.progress(f"rollback failed ({again}); starting a fresh broker at {src.name}")
            with contextlib.suppress(Exception):
                podman.remove_container(container_name(src))
                net.clear_criu_lock(podman.pod_infra_pid(pod_name(src)))
            lab.start_broker(src)  # sessions are lost, but the broker is running
            self.outcome["rollback"] = f"failed ({again}); a fresh broker was started"
            raise MigrationFailed(
                f"migration to {dest.name} failed at {step} ({exc}) and so did the rollback "
                f"({again}); a fresh broker serves at {src.address}",
                self.outcome,
            ) from exc
        finally:
            for path in (self.local_ckpt, self.moved_ckpt):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if self.method == "precopy":
                shutil.rmtree(self.work, ignore_errors=True)
        raise MigrationFailed(
            f"migration to {dest.name} failed at {step} ({exc}); rolled back: the broker "
            f"serves at {src.address} again",
            self.outcome,
        ) from exc


def _resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _unpack_checkpoint(export_tar: Path, out: Path) -> None:
    """The ``checkpoint/`` images of podman's export tar, unpacked under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(export_tar, "r:") as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            if parts[:1] != ("checkpoint",) or ".." in parts or not (m.isfile() or m.isdir()):
                continue
            members.append(m)
        tar.extractall(out, members=members)
