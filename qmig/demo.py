"""``qmig demo``: the broker container live-migrates under traffic; its clients carry on.

The main demo (``make demo``) runs the ``demo`` scenario in the container lab: edge hosts
as podman pods, the broker in edge-a, QUIC clients following it with each strategy plus TCP
and MPTCP clients at a steady QoS 1 rate, a move A to B and back, a table per client and
``reports/demo-<timestamp>.json`` with a PNG of the arrivals beside it.  Where containers
cannot run (not root, no podman) it says so in one line and runs the same clients against
the in-process harness instead.

``qmig demo --transports`` is the cross-transport check: ``qmig broker`` on loopback with
QUIC, TCP, TLS and MPTCP listeners, one MQTT 5 publisher and subscriber per transport
(paho-mqtt over TCP/TLS/MPTCP, qmig's client over QUIC), every subscriber listening to every
publisher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TRANSPORTS = ("quic", "tcp", "tls", "mptcp")
TOPIC = "demo/{transport}/telemetry"
IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)


def free_port(udp: bool = False) -> int:
    with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BrokerProcess:
    """A ``qmig broker`` child process on loopback, stopped by its PID."""

    ports: dict[str, int]
    certdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        from broker.certs import make_lab_certs

        certs = make_lab_certs(self.certdir)
        self.cafile = str(certs.ca_cert)
        cmd = [
            sys.executable, "-m", "qmig", "broker", "--host", "127.0.0.1",
            "--tcp-port", str(self.ports["tcp"]), "--tls-port", str(self.ports["tls"]),
            "--mptcp-port", str(self.ports["mptcp"]), "--quic-port", str(self.ports["quic"]),
            "--cert", str(certs.server_cert),
            "--key", str(certs.server_key), "--sys-interval", "1",
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stderr=self._log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"ready" in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self, "_log"):
            self._log.close()


class QuicThreadClient:
    """qmig's asyncio QUIC client behind the few paho-style calls the demo makes.

    paho-mqtt has no QUIC transport, so the QUIC publisher and subscriber are qmig's own
    client, run on an event loop in a thread of their own.
    """

    def __init__(self, client_id: str, cafile: str) -> None:
        self.client_id = client_id
        self.cafile = cafile
        self.on_message: Any = None
        self.on_subscribe: Any = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: Any = None

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, host: str, port: int) -> None:
        from client.client import Client

        async def start() -> Any:
            client = Client(host, port, transport="quic", client_id=self.client_id,
                            cafile=self.cafile)  # fmt: skip
            await client.connect()
            self.loop.create_task(self._receive(client))
            return client

        self.client = self._call(start())

    async def _receive(self, client: Any) -> None:
        async for message in client.messages():
            if self.on_message is not None:
                self.on_message(self, None, message)

    def loop_start(self) -> None:
        pass

    def subscribe(self, topic: str, qos: int) -> None:
        self._call(self.client.subscribe(topic, qos))
        if self.on_subscribe is not None:
            self.on_subscribe(self)

    def socket(self) -> None:
        return None

    def publish(self, topic: str, payload: str, qos: int) -> Any:
        future = asyncio.run_coroutine_threadsafe(
            self.client.publish(topic, payload, qos), self.loop
        )

        class Info:
            @staticmethod
            def wait_for_publish(timeout: float) -> None:
                future.result(timeout)

        return Info()

    def disconnect(self) -> None:
        if self.client is not None:
            self._call(self.client.disconnect())

    def loop_stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def make_client(transport: str, client_id: str, cafile: str) -> Any:
    if transport == "quic":
        return QuicThreadClient(client_id, cafile)
    return paho_client(transport, client_id, cafile)


def paho_client(transport: str, client_id: str, cafile: str) -> Any:
    """A paho-mqtt MQTT 5 client for ``transport``; MPTCP by giving paho an MPTCP socket."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    class Client(mqtt.Client):
        def _create_socket_connection(self) -> socket.socket:
            if transport != "mptcp":
                return super()._create_socket_connection()
            # paho has no socket factory option; this private hook is the narrowest seam.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            sock.settimeout(self._connect_timeout)
            sock.connect((self._host, self._port))
            return sock

    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)  # fmt: skip
    if transport == "tls":
        client.tls_set(ca_certs=cafile)
    return client


@dataclass
class Subscriber:
    transport: str
    received: dict[str, list[int]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        data = json.loads(msg.payload)
        with self.lock:
            self.received.setdefault(data["from"], []).append(data["seq"])
            self.latencies_ms.append((time.time() - data["ts"]) * 1000)


def run_demo(duration: float, rate: float, console: Console) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qmig-demo-") as tmp:
        ports = {t: free_port(udp=t == "quic") for t in TRANSPORTS}
        broker = BrokerProcess(ports, Path(tmp) / "certs", Path(tmp) / "broker.log")
        console.print(f"[bold]Starting qmig broker[/] on 127.0.0.1: {ports}")
        broker.start()
        clients: list[Any] = []
        subscribers: dict[str, Subscriber] = {}
        sent: dict[str, int] = {}
        protocols: dict[str, int] = {}
        try:
            for transport in TRANSPORTS:
                sub = Subscriber(transport)
                client = make_client(transport, f"demo-sub-{transport}", broker.cafile)
                client.on_message = sub.on_message
                subscribed = threading.Event()
                client.on_subscribe = lambda *a, ev=subscribed: ev.set()
                client.connect("127.0.0.1", ports[transport])
                client.loop_start()
                client.subscribe("demo/#", qos=1)
                if not subscribed.wait(5):
                    raise RuntimeError(f"no SUBACK over {transport}")
                sock = client.socket()
                protocols[transport] = (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) if sock else 17
                )
                subscribers[transport] = sub
                clients.append(client)
            publishers = {}
            for transport in TRANSPORTS:
                pub = make_client(transport, f"demo-pub-{transport}", broker.cafile)
                pub.connect("127.0.0.1", ports[transport])
                pub.loop_start()
                publishers[transport] = pub
                clients.append(pub)
            console.print(f"Publishing {rate:g} msg/s per transport, QoS 1, for {duration:g} s")
            interval = 1.0 / rate
            start = time.monotonic()
            seq = 0
            infos = []
            while time.monotonic() - start < duration:
                for transport, pub in publishers.items():
                    payload = json.dumps({"from": transport, "seq": seq, "ts": time.time()})
                    infos.append(pub.publish(TOPIC.format(transport=transport), payload, qos=1))
                seq += 1
                time.sleep(max(0.0, start + seq * interval - time.monotonic()))
            for info in infos:
                info.wait_for_publish(5)
            sent = dict.fromkeys(TRANSPORTS, seq)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(
                sum(len(v) for v in s.received.values()) < seq * len(TRANSPORTS)
                for s in subscribers.values()
            ):
                time.sleep(0.05)
        finally:
            for client in clients:
                client.disconnect()
                client.loop_stop()
            broker.stop()
    return summarize(subscribers, sent, protocols)


def summarize(
    subscribers: dict[str, Subscriber], sent: dict[str, int], protocols: dict[str, int]
) -> dict[str, Any]:
    report: dict[str, Any] = {"sent_per_publisher": sent, "subscribers": {}}
    for transport, sub in subscribers.items():
        lat = sorted(sub.latencies_ms)
        report["subscribers"][transport] = {
            "socket_protocol": {6: "TCP", 17: "QUIC", IPPROTO_MPTCP: "MPTCP"}.get(
                protocols.get(transport, 0), str(protocols.get(transport))
            ),
            "received": {src: len(seqs) for src, seqs in sub.received.items()},
            "lost": {src: n - len(set(sub.received.get(src, []))) for src, n in sent.items()},
            "duplicates": {src: len(s) - len(set(s)) for src, s in sub.received.items()},
            "latency_ms": {
                "p50": statistics.median(lat) if lat else None,
                "p99": lat[int(0.99 * (len(lat) - 1))] if lat else None,
            },
        }
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="qmig demo: every subscriber receives every publisher")
    table.add_column("subscriber")
    table.add_column("socket")
    for src in TRANSPORTS:
        table.add_column(f"from {src}", justify="right")
    table.add_column("lost", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    sent = report["sent_per_publisher"]
    for transport, sub in report["subscribers"].items():
        lat = sub["latency_ms"]
        table.add_row(
            transport,
            sub["socket_protocol"],
            *[f"{sub['received'].get(src, 0)}/{sent[src]}" for src in TRANSPORTS],
            str(sum(sub["lost"].values())),
            f"{lat['p50']:.2f}" if lat["p50"] is not None else "-",
            f"{lat['p99']:.2f}" if lat["p99"] is not None else "-",
        )
    console.print(table)


def _console() -> Console:
    """The terminal's width, or 120 columns when piped (a CI log): rich would take 80 and
    cut the per-client table's columns."""
    return Console(width=None if sys.stdout.isatty() else 120)


def run_transports(args: argparse.Namespace) -> int:
    console = _console()
    report = run_demo(getattr(args, "duration", 5.0), getattr(args, "rate", 20.0), console)
    print_report(report, console)
    lost = sum(sum(s["lost"].values()) for s in report["subscribers"].values())
    console.print("[green]No message lost.[/]" if lost == 0 else f"[red]{lost} messages lost.[/]")
    return 0 if lost == 0 else 1


def run(args: argparse.Namespace) -> int:
    if getattr(args, "transports", False):
        return run_transports(args)
    from migration.lab.lab import containers_unavailable

    console = _console()
    reason = containers_unavailable()
    if reason:
        console.print(f"qmig demo: containers unavailable ({reason}); "
                      "running the in-process migration harness instead")  # fmt: skip
        return run_harness(args, console)
    return run_live(args, console)


def _report_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    out = Path(getattr(args, "report_dir", "reports"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return out / f"demo-{stamp}.json", out / f"demo-{stamp}.png"


def _verdict(console: Console, migrations: list[dict[str, Any]], json_path: Path,
             png_path: Path | None) -> int:  # fmt: skip
    lost = sum(c["lost"] or 0 for m in migrations for c in m["clients"])
    never = [c["name"] for m in migrations for c in m["clients"] if c["interruption_ms"] is None]
    failed = [m for m in migrations if m.get("ok") is False]
    console.print(f"report: {json_path}" + (f"  plot: {png_path}" if png_path else ""))
    if lost == 0 and not never and not failed:
        console.print("[green]Every message arrived; no client reconnected over QUIC.[/]")
        return 0
    console.print(f"[red]{lost} messages lost; clients that never recovered: {never or 'none'}; "
                  f"failed migrations: {len(failed)}[/]")  # fmt: skip
    return 1


def run_live(args: argparse.Namespace, console: Console) -> int:
    from migration.image import ensure_image
    from migration.lab.net import LabError
    from migration.lab.run import run_scenario
    from migration.report import plot_arrivals, print_summary, write_report
    from migration.scenario import Scenario

    scenario = Scenario.load(getattr(args, "scenario", "demo"))
    method = getattr(args, "method", None) or "best"
    if method == "best":
        from migration.lab.precopy import best_method

        method, how = best_method()
        console.print(f"method: {method} ({how})")
    try:
        scenario = scenario.replace(method=method)
    except ValueError as exc:
        console.print(f"[red]qmig demo: {exc}[/]")
        return 2
    if getattr(args, "link_rate", None):
        scenario = scenario.replace(link_rate=args.link_rate)
    if getattr(args, "loss", None) is not None:
        scenario = scenario.replace(loss=args.loss)
    if getattr(args, "podman", None):
        scenario = scenario.replace(podman=args.podman)
    hosts = "each with its own Podman" if scenario.podman == "per-host" else "pods of one Podman"
    console.print(f"edge hosts: {hosts}")
    try:
        image = ensure_image(Path(__file__).resolve().parents[1])
        result = run_scenario(scenario, image, progress=console.log)
    except LabError as exc:
        console.print(f"[red]qmig demo: {exc}[/]")
        return 1
    migrations = result["migrations"]
    print_summary(migrations, console)
    for m in migrations:
        tl = m["timeline"]
        steps = ", ".join(f"{k} +{(v - tl['trigger']) * 1000:.0f} ms"
                          for k, v in sorted(tl.items(), key=lambda kv: kv[1]))  # fmt: skip
        console.print(f"[dim]{m['ip_before']} -> {m['ip_after']}: downtime {m['downtime_ms']} ms;"
                      f" {steps}[/]")  # fmt: skip
    json_path, png_path = _report_paths(args)
    write_report(json_path, migrations)
    plot_arrivals(
        result["clients"],
        migrations,
        png_path,
        title=f"qmig live migration ({scenario.name}, link {scenario.link_rate})",
    )
    return _verdict(console, migrations, json_path, png_path)


def run_harness(args: argparse.Namespace, console: Console) -> int:
    """The fallback: the same strategies, moved by the in-process harness (no containers)."""
    from migration.harness import Harness
    from migration.report import print_summary, write_report

    async def main() -> list[dict[str, Any]]:
        rows = []
        async with Harness(pool_position=1) as harness:
            await harness.add_clients(["proactive", "reactive", "pool", "announce"], rate=20)
            await asyncio.sleep(1.0)
            for _ in range(2):
                before = harness.source
                result = await harness.settle(await harness.migrate(freeze=0.5))
                rows.append({
                    "ip_before": before, "ip_after": harness.source,
                    "downtime_ms": round(result.freeze_s * 1000, 1),
                    "timeline": {"freeze": result.freeze_at, "resume": result.resume_at},
                    "clients": [{**c, "transport": "quic", "extra_ms": c["extra_interruption_ms"]}
                                for c in result.clients],
                })  # fmt: skip
        return rows

    migrations = asyncio.run(main())
    print_summary(migrations, console)
    json_path, _ = _report_paths(args)
    write_report(json_path, migrations)
    return _verdict(console, migrations, json_path, None)
