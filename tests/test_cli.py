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
