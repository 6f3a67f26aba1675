"""``qmig pub`` and ``qmig sub``: mosquitto_pub/mosquitto_sub flags over QUIC, TCP, TLS, MPTCP.

The flags are mosquitto's so that muscle memory and scripts carry over (``-h`` is the host,
as there; ``--help`` is help), plus ``--transport`` whose default is QUIC.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from mqttproto.packets import MQTT_3_1_1, MQTT_5

from .client import STREAM_MODES, Client, ClientError
from .transports import DEFAULT_PORTS, TRANSPORTS

_VERSIONS = {"mqttv5": MQTT_5, "5": MQTT_5, "mqttv311": MQTT_3_1_1, "311": MQTT_3_1_1}


def _common(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add("-h", "--host", default="localhost", help="broker host (default localhost)")
    add("-p", "--port", type=int, default=None,
        help="broker port (default by transport: " +
        ", ".join(f"{t} {p}" for t, p in DEFAULT_PORTS.items()) + ")")  # fmt: skip
    add("--transport", choices=TRANSPORTS, default="quic", help="default quic")
    add("--streams", choices=STREAM_MODES, default="single",
        help="QUIC: one stream (default), or a data stream per topic or per QoS")  # fmt: skip
    add("-t", "--topic", action="append", required=True, help="topic (sub: repeatable)")
    add("-q", "--qos", type=int, choices=(0, 1, 2), default=0)
    add("-i", "--id", default="", help="client id (default: assigned)")
    add("-u", "--username", default=None)
    add("-P", "--pw", default=None, help="password")
    add("-V", "--protocol-version", default="mqttv5", choices=sorted(_VERSIONS))
    add("-k", "--keepalive", type=int, default=60)
    add("--cafile", default=None, help="CA certificate to verify the broker (TLS and QUIC)")
    add("--insecure", action="store_true", help="do not verify the broker's certificate")
    add("--cert", default=None, help="client certificate to present (TLS and QUIC), with --key")
    add("--key", default=None, help="private key of --cert")
    add("--request-migration", metavar="HINT", default=None,
        help="QUIC: once connected, ask the broker to move (HINT: where to, for its "
        "orchestrator)")  # fmt: skip
    add("--quiet", action="store_true", help="no error messages")


def add_pub_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    add = parser.add_argument
    msg = parser.add_mutually_exclusive_group(required=True)
    msg.add_argument("-m", "--message", help="payload")
    msg.add_argument("-l", "--stdin-line", action="store_true",
                     help="publish each line of stdin as a message")  # fmt: skip
    msg.add_argument("-n", "--null-message", action="store_true", help="empty payload")
    add("-r", "--retain", action="store_true")


def add_sub_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    add = parser.add_argument
    add("-C", "--count", type=int, default=0, help="exit after COUNT messages")
    add("-v", "--verbose", action="store_true", help="print the topic before the payload")
    add("-c", "--disable-clean-session", action="store_true",
        help="resume a session (needs -i; with -x for MQTT 5)")  # fmt: skip
    add("-x", "--session-expiry", type=int, default=0, help="session expiry interval (s)")
    add("-W", "--timeout", type=float, default=0, help="exit after this many seconds")
    add("-N", "--no-newline", action="store_true")
    add("-R", "--no-retained", action="store_true", help="do not print stale retained messages")


def _client(
    args: argparse.Namespace, *, clean_start: bool = True, session_expiry: int = 0
) -> Client:
    if args.streams != "single" and args.transport != "quic":
        raise ClientError(f"--streams {args.streams} needs --transport quic")
    return Client(
        args.host,
        args.port,
        transport=args.transport,
        version=_VERSIONS[args.protocol_version],
        client_id=args.id,
        keep_alive=args.keepalive,
        username=args.username,
        password=args.pw,
        cafile=args.cafile,
        insecure=args.insecure,
        certfile=args.cert,
        keyfile=args.key,
        streams=args.streams,
        clean_start=clean_start,
        session_expiry=session_expiry,
    )


async def _pub(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.request_migration is not None:
            await client.request_migration(args.request_migration)
        topic = args.topic[0]
        if args.stdin_line:
            loop = asyncio.get_running_loop()
            while True:
                line = await loop.run_in_executor(None, sys.stdin.buffer.readline)
                if not line:
                    break
                await client.publish(topic, line.rstrip(b"\n"), args.qos, args.retain)
        else:
            payload = b"" if args.null_message else args.message.encode()
            await client.publish(topic, payload, args.qos, args.retain)
    return 0


async def _sub(args: argparse.Namespace) -> int:
    clean = not args.disable_clean_session
    async with _client(args, clean_start=clean, session_expiry=args.session_expiry) as client:
        if args.request_migration is not None:
            await client.request_migration(args.request_migration)
        await client.subscribe(args.topic, args.qos)
        received = 0
        out = sys.stdout.buffer
        end = b"" if args.no_newline else b"\n"

        async def loop() -> None:
            nonlocal received
            async for message in client.messages():
                if args.no_retained and message.retain:
                    continue
                if args.verbose:
                    out.write(message.topic.encode() + b" ")
                out.write(message.payload + end)
                out.flush()
                received += 1
                if args.count and received >= args.count:
                    return

        try:
            await asyncio.wait_for(loop(), args.timeout or None)
        except TimeoutError:
            return 27  # mosquitto_sub's exit status for -W timeouts
    return 0


def _run(coro: Coroutine[Any, Any, int], args: argparse.Namespace, what: str) -> int:
    # aioquic logs a failed handshake itself (a WARNING on its "quic" logger, which Python
    # prints to stderr when logging is not configured); the error line below says it once.
    logging.getLogger("quic").addHandler(logging.NullHandler())
    try:
        return asyncio.run(coro)
    except (ClientError, OSError) as exc:
        if not args.quiet:
            print(f"qmig {what}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_pub(args: argparse.Namespace) -> int:
    return _run(_pub(args), args, "pub")


def run_sub(args: argparse.Namespace) -> int:
    return _run(_sub(args), args, "sub")


__all__ = ["add_pub_arguments", "add_sub_arguments", "run_pub", "run_sub"]
