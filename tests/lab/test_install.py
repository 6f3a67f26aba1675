"""The container lab's installation: CRIU, Podman with runc, and the broker image.

Real checks of this host (as `make setup` left it), skipped where containers cannot run here;
the tag tests need neither root nor Podman. Each check is bounded by subprocess timeouts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from migration import image

ROOT = Path(__file__).resolve().parents[2]


def _need_containers() -> None:
    reason = image.containers_unavailable()
    if reason:
        pytest.skip(f"containers unavailable: {reason}")


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_criu_is_new_enough_and_checks_ok() -> None:
    _need_containers()
    out = _run("criu", "--version").stdout
    m = re.search(r"Version:\s*(\d+)\.(\d+)", out)
    assert m, f"no version in `criu --version`: {out!r}"
    assert (int(m[1]), int(m[2])) >= (4, 2), f"criu {m[1]}.{m[2]} is older than 4.2"
    check = _run("criu", "check")
    assert "Looks good" in check.stdout + check.stderr, check.stderr[-500:]


def test_podman_uses_runc() -> None:
    _need_containers()
    proc = _run("podman", "info", "--format", "{{.Host.OCIRuntime.Name}}")
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == "runc"


def test_setup_script_rerun_is_a_fast_noop() -> None:
    _need_containers()
    proc = _run("bash", str(ROOT / "scripts" / "setup-containers.sh"), timeout=60)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert not re.search(r"installing|building|installed|wrote|added", proc.stdout), proc.stdout
    assert "memory dirty tracking" in proc.stdout
    features = Path("/run/qmig/criu-features").read_text()
    assert re.search(r"^mem_dirty_track=(yes|no)$", features, re.M), features


def _copy_sources(dest: Path) -> Path:
    for name in [*image.source_files(ROOT), "pyproject.toml"]:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def test_tag_is_stable_and_follows_the_sources(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path / "copy")  # not a git checkout: the on-disk file list
    tag = image.image_tag(root)
    assert re.fullmatch(r"localhost/qmig-broker:[\w.+]+-[0-9a-f]{12}", tag), tag
    assert image.image_tag(root) == tag
    cache = root / "broker" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "x.cpython-311.pyc").write_bytes(b"junk")
    (root / "broker" / "notes.txt").write_text("not part of the image")
    assert image.image_tag(root) == tag  # bytecode and other files do not count
    target = root / "broker" / "__init__.py"
    target.write_text(target.read_text() + "\n# changed\n")
    changed = image.image_tag(root)
    assert changed != tag
    (root / "qmig" / "extra.py").write_text("X = 1\n")  # a new module is in the image too
    assert image.image_tag(root) not in (tag, changed)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_tag_in_a_git_checkout_counts_untracked_but_not_ignored(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path / "repo")
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull}
    for cmd in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, timeout=30, env=env)
    tag = image.image_tag(root)
    (root / ".gitignore").write_text("scratch_*.py\n")
    (root / "migration" / "scratch_1.py").write_text("ignored\n")
    assert image.image_tag(root) == tag
    (root / "migration" / "new_module.py").write_text("untracked but real\n")
    assert image.image_tag(root) != tag


def test_image_gets_runtime_deps_only() -> None:
    reqs = " ".join(image.runtime_requirements(ROOT)).lower()
    for name in ("aioquic", "cryptography", "pyyaml", "rich", "psutil"):
        assert name in reqs
    for name in ("matplotlib", "pytest", "ruff", "hypothesis"):
        assert name not in reqs


def test_no_registry_host_is_written_down() -> None:
    host_suffix = "." + "debian" + ".org"  # assembled so this file does not contain it either
    for path in [
        ROOT / "Makefile",
        ROOT / "migration" / "image.py",
        *(ROOT / "scripts").glob("*.sh"),
    ]:
        assert host_suffix not in path.read_text(), path


def test_image_runs_the_broker_python() -> None:
    _need_containers()
    tag = image.image_tag(ROOT)
    if not image.image_exists(tag):  # sources changed since the last build: use the newest one
        tag = f"{image.IMAGE_REPO}:latest"
        if not image.image_exists(tag):
            pytest.skip("no broker image yet (run: make image)")
    # The default ulimits come from containers.conf.d/qmig.conf (Podman's own fail here).
    script = image.IMPORT_CHECK + (
        "; import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[1])"
        "; import qmig.cli; qmig.cli.main(['--version'])"
    )
    proc = _run(
        "podman", "run", "--rm", "--network", "none", tag, "python3", "-c", script, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["ok", "1024"], proc.stdout
    assert lines[2].startswith("qmig "), proc.stdout
