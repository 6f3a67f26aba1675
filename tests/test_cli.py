"""The ``qmig`` command line: a command imports what it runs, and only that."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("qmig.benchmarks", "client", "migration.lab", "loadtests", "matplotlib", "psutil")

PROBE = """
import sys
import qmig.cli
qmig.cli.build_parser(sys.argv[1:])
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {heavy}))
print(" ".join(heavy))
"""


def _loaded(*argv: str) -> list[str]:
    code = PROBE.format(heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout.split()


@pytest.mark.parametrize("argv", [["certs", "--out", "x"], ["passwd", "f", "u"], ["--version"]])
def test_light_commands_import_no_benchmark_client_or_lab(argv: list[str]) -> None:
    assert _loaded(*argv) == []


def test_a_bench_target_imports_its_own_module_only() -> None:
    loaded = _loaded("bench", "streams")
    assert "qmig.benchmarks.streams" in loaded
    assert "qmig.benchmarks.migration" not in loaded and "migration.lab" not in loaded


def test_the_full_parser_knows_every_command() -> None:
    from qmig.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "abuse"])
    assert callable(args.handler)
    args = parser.parse_args(["pub", "-t", "a", "-m", "b"])
    assert callable(args.handler)


def test_the_version_is_one_and_the_same_everywhere() -> None:
    import tomllib

    import broker
    import qmig

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert broker.__version__ == qmig.__version__ == project["project"]["version"]


@pytest.mark.timeout(60)
def test_a_running_broker_carries_no_module_it_does_not_use(tmp_path: Path) -> None:
    """Every byte of the broker's memory moves in each migration (issue #15): no YAML parser
    without a config file, no SQLite without --persistence, no importlib.metadata at all."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from broker.certs import make_lab_certs

    certs = make_lab_certs(tmp_path)
    with socket.socket(type=socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        quic = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "qmig", "broker", "--host", "127.0.0.1",
         "--tcp-port", "0", "--tls-port", "0", "--mptcp-port", "0", "--quic-port", str(quic),
         "--cert", str(certs.server_cert), "--key", str(certs.server_key)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        lines: list[str] = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "listening quic" in line:
                break
        assert any("listening quic" in ln for ln in lines), "".join(lines[-20:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    imported = {ln.split("|")[-1].strip() for ln in lines if ln.startswith("import time:")}
    assert "broker.server" in imported and "aioquic.quic.connection" in imported
    for unused in ("yaml", "sqlite3", "importlib.metadata", "matplotlib", "podman"):
        assert unused not in imported, unused
