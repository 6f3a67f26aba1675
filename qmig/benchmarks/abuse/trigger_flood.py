"""MIGRATION_TRIGGER floods: what a QUIC client asking the broker to move costs it.

Two phases of ``--trigger-flood-frames`` MIGRATION_TRIGGER frames each at the broker's QUIC
port: first from a client that completed the QUIC handshake but never sent an MQTT CONNECT,
then from an MQTT client whose (anonymous) CONNECT was accepted.  Every hint carries a line
break followed by a fake log line, to see whether a hint can forge one.  Meanwhile a TCP
bystander pings (StallMeter).  The broker logs at INFO to its log file, whose new lines are
counted per phase; accepted triggers come from the control API's status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

from client.client import Client
from client.transports import QuicStreamProtocol, open_stream
from migration.control import control_request
from qmig.benchmarks.abuse import Context, PeakRss, StallMeter, rss_mb
from qmig.benchmarks.brokers import HOST, RunningBroker, free_port

NAME = "trigger-flood"
HELP = "MIGRATION_TRIGGER floods before/after CONNECT: log lines, accepted, memory, stalls"

FORGED = "qmig broker: WARNING forged by a trigger hint"
HINT = f"edge-b\n{FORGED}"
REASON = 0x1  # "client moved" (docs/protocol.md section 5.4)
BATCH = 500  # frames queued at a time; aioquic packs them into as few packets as it can
SETTLE = 0.5  # seconds after the last acknowledgement for the broker's log to catch up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trigger-flood-frames",
        type=int,
        default=20_000,
        metavar="N",
        help="trigger-flood: MIGRATION_TRIGGER frames per phase (default 20000)",
    )


async def send_triggers(
    proto: QuicStreamProtocol, count: int, hint: str = HINT, timeout: float = 30.0
) -> float:
    """Send ``count`` MIGRATION_TRIGGER frames on ``proto``'s connection and wait until the
    broker has acknowledged them all; returns the seconds it took."""
    quic = proto._migrating()
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    sent = 0
    while sent < count or quic.qmig_pending or quic._loss.bytes_in_flight:
        if loop.time() > deadline:
            raise TimeoutError(f"{sent - len(quic.qmig_pending)} of {count} triggers sent")
        if sent < count and len(quic.qmig_pending) < BATCH:
            for _ in range(min(BATCH, count - sent)):
                if not quic.trigger_migration(REASON, hint):
                    raise ConnectionError("the broker did not advertise MIGRATION_TRIGGER")
                sent += 1
            proto.transmit()
        await asyncio.sleep(0.002)
    return loop.time() - started


def _log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


async def _attack(b: RunningBroker, frames: int, control: int, token: str) -> dict[str, Any]:
    out: dict[str, Any] = {"frames_per_phase": frames}
    seen = len(_log_lines(b.log_path))

    stream, closer = await open_stream(
        "quic", HOST, b.quic_port, lambda _d: None, lambda _e: None, insecure=True
    )
    assert isinstance(stream, QuicStreamProtocol)
    try:
        out["before_connect_seconds"] = round(await send_triggers(stream, frames), 2)
        await asyncio.sleep(SETTLE)
    finally:
        stream.close()
        if isinstance(closer, contextlib.AbstractAsyncContextManager):
            with contextlib.suppress(Exception):
                await closer.__aexit__(None, None, None)
    lines = _log_lines(b.log_path)
    out["before_connect_log_lines"] = len(lines) - seen
    seen = len(lines)

    client = Client(
        HOST,
        b.quic_port,
        transport="quic",
        insecure=True,
        reconnect=False,
        client_id=f"abuse-trigger-{secrets.token_hex(4)}",
    )
    await client.connect()
    try:
        proto = client._stream
        assert isinstance(proto, QuicStreamProtocol)
        out["after_connect_seconds"] = round(await send_triggers(proto, frames), 2)
        await asyncio.sleep(SETTLE)
    finally:
        await client.disconnect()
    lines = _log_lines(b.log_path)
    new = lines[seen:]
    out["after_connect_log_lines"] = len(new)
    out["forged_log_lines"] = sum(line.startswith(FORGED) for line in lines)

    status = await control_request(HOST, control, token, "status")
    counts = status.get("trigger_counts")
    if counts is None:  # a broker without counters logs every trigger it takes
        counts = {"accepted": sum("migration trigger from" in line for line in new)}
    out["triggers_accepted"] = counts.get("accepted")
    out["triggers_dropped"] = {k: v for k, v in counts.items() if k != "accepted"} or None
    out["triggers_kept_in_status"] = len(status["triggers"])
    return out


def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    frames = args.trigger_flood_frames
    token = secrets.token_hex(16)
    token_file = ctx.workdir / "control.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    control = free_port()
    b = ctx.broker(
        extra=[
            "--log-level",
            "INFO",
            "--control-port",
            str(control),
            "--control-token-file",
            str(token_file),
        ],
        quic=True,
    )
    rss_before = rss_mb(b)
    peak = PeakRss(b)
    meter = StallMeter(b.port)
    started = time.monotonic()
    try:
        figures = asyncio.run(_attack(b, frames, control, token))
    finally:
        stall = meter.stop()
        rss_peak = peak.stop()
    figures["attack_seconds"] = round(time.monotonic() - started, 2)
    figures["rss_before_mb"] = rss_before
    figures["rss_peak_mb"] = rss_peak
    figures.update(stall)
    figures["broker_alive"] = b.alive()
    return figures
