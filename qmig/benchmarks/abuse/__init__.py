"""``qmig bench abuse``: bounded adversarial probes that print what an attack costs the broker.

Each probe is a module of this package (found by name, so adding one edits no list here)
with ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args, ctx) -> dict``.  A probe
starts its own qmig broker on loopback through :meth:`Context.broker`, attacks it within a
fixed budget of packets and seconds, and returns its figures: memory in MB (RSS of the
broker process, before and at the peak) and stalls in ms (how late a bystander client's
PINGRESPs came back while the attack ran, from :class:`StallMeter`).  Nothing here is a pass
or fail: the tests assert behaviour, these numbers go into the issue notes and docs.

    qmig bench abuse                      # every probe
    qmig bench abuse dup-filters --json F # one probe, figures also as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import pkgutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from qmig.benchmarks.brokers import HOST, RunningBroker, start_broker
from qmig.benchmarks.loadgen import connect_packet

PINGREQ = b"\xc0\x00"
PING_INTERVAL = 0.02


def probes() -> dict[str, ModuleType]:
    """Every probe module of this package, by its NAME."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "NAME", None)
        if name:
            found[name] = module
    return dict(sorted(found.items()))


def mqtt_client(
    port: int,
    client_id: str,
    *,
    host: str = HOST,
    timeout: float = 10.0,
    rcvbuf: int | None = None,
) -> socket.socket:
    """A raw TCP MQTT 3.1.1 client (keep alive 0) whose CONNECT was accepted (CONNACK seen).

    ``rcvbuf`` sets SO_RCVBUF before connecting (a client that reads slowly).
    """
    sock = socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(client_id, keep_alive=0))
        if sock.recv(4)[:1] != b"\x20":
            raise ConnectionError(f"{client_id} got no CONNACK")
    except BaseException:
        sock.close()
        raise
    return sock


class StallMeter:
    """A bystander: one TCP client that PINGs every 20 ms and records how late answers come.

    ``worst_ms`` is the longest time any PINGREQ waited for its PINGRESP (or, for one still
    unanswered at :meth:`stop`, how long it had waited): the time other clients were starved.
    """

    def __init__(self, port: int, host: str = HOST, client_id: str = "abuse-bystander") -> None:
        self.sock = mqtt_client(port, client_id, host=host, timeout=5.0)
        self.delays: list[float] = []
        self.unanswered_since: float | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            sent = time.monotonic()
            self.unanswered_since = sent
            try:
                self.sock.sendall(PINGREQ)
                got = b""
                while len(got) < 2 and not self._stop.is_set():
                    try:
                        chunk = self.sock.recv(2 - len(got))
                    except TimeoutError:
                        continue
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
            except OSError:
                self.lost = True
                return
            if len(got) == 2:
                self.delays.append(time.monotonic() - sent)
                self.unanswered_since = None
            time.sleep(PING_INTERVAL)

    def stop(self) -> dict[str, Any]:
        now = time.monotonic()
        self._stop.set()
        self._thread.join(2.0)
        pending = now - self.unanswered_since if self.unanswered_since is not None else 0.0
        with contextlib.suppress(OSError):
            self.sock.close()
        delays = sorted(self.delays)
        worst = max([*delays, pending]) if delays or pending else 0.0
        return {
            "pings_answered": len(delays),
            "stall_worst_ms": round(worst * 1000, 1),
            "stall_median_ms": round(delays[len(delays) // 2] * 1000, 2) if delays else None,
            "bystander_lost": self.lost,
        }


@dataclass
class Context:
    """What a probe gets: a scratch directory and brokers that are always stopped."""

    workdir: Path
    brokers: list[RunningBroker] = field(default_factory=list)

    def broker(self, extra: Sequence[str] = (), quic: bool = False) -> RunningBroker:
        """A fresh qmig broker on loopback (``extra``: more ``qmig broker`` options)."""
        b = start_broker("qmig", self.workdir / f"b{len(self.brokers)}", extra=extra, quic=quic)
        self.brokers.append(b)
        return b

    def close(self) -> None:
        for b in self.brokers:
            b.stop()


def rss_mb(b: RunningBroker) -> float:
    return round(b.rss_mb(), 1)


class PeakRss:
    """Samples the broker's RSS every 50 ms in a thread; ``stop()`` returns the peak in MB."""

    def __init__(self, b: RunningBroker, interval: float = 0.05) -> None:
        self.b = b
        self.peak = b.rss_mb()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # the broker may have died: keep the peak
                self.peak = max(self.peak, self.b.rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(2.0)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self.b.rss_mb())
        return round(self.peak, 1)


@contextlib.contextmanager
def context() -> Iterator[Context]:
    with tempfile.TemporaryDirectory(prefix="qmig-abuse-") as tmp:
        ctx = Context(Path(tmp))
        try:
            yield ctx
        finally:
            ctx.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    found = probes()
    parser.add_argument(
        "probes",
        nargs="*",
        metavar="PROBE",
        help=f"which probes (default all): {', '.join(found) or 'none'}",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="also write the figures as JSON ('-' for stdout)",
    )
    for module in found.values():
        module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    found = probes()
    wanted = args.probes or list(found)
    unknown = [p for p in wanted if p not in found]
    if unknown:
        print(
            f"qmig bench abuse: unknown probe(s) {', '.join(unknown)}; "
            f"choose from {', '.join(found)}",
            file=sys.stderr,
        )
        return 2
    report: dict[str, Any] = {}
    for name in wanted:
        with context() as ctx:
            started = time.monotonic()
            figures = found[name].run(args, ctx)
            figures["probe_seconds"] = round(time.monotonic() - started, 2)
        report[name] = figures
        print(f"{name}: {found[name].HELP}")
        for key, value in figures.items():
            print(f"  {key:<28} {value}")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
