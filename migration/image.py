"""The broker's container image, ``localhost/qmig-broker:<version>-<hash>``, built offline.

No image registry is reachable from the lab hosts, so the image is made from parts this host can
produce itself:

* a Debian bookworm ``minbase`` root filesystem with python3, made once by debootstrap from the
  mirror the system's own apt sources name (cached as a tarball and imported as a base image);
* the runtime dependencies as wheels built or fetched by the host venv's pip, installed with
  ``pip --target`` on the host (pip inside the chroot cannot verify the package proxy's
  certificate; host CPython 3.11 and bookworm's python3.11 share the cp311 ABI);
* the project's packages copied as source, so the image holds exactly the hashed files.

The tag's hash covers those source files, so the image is rebuilt only when the project changes
and the lab always runs the broker code of this checkout. ``python -m migration.image`` builds
if needed and prints the tag as its last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_REPO = "localhost/qmig-broker"
BASE_IMAGE = "localhost/qmig-base:bookworm-python3"
SUITE = "bookworm"  # its python3 is 3.11: the host venv's cp311 wheels must fit it
CACHE_DIR = Path("/var/cache/qmig")
ROOTFS_TAR = CACHE_DIR / "rootfs-bookworm-python3.tar"
WHEEL_DIR = CACHE_DIR / "wheels"
KEEP_IMAGES = 3  # broker images kept after a build
SITE = "/opt/qmig/site"
UNAVAILABLE_FILE = Path("/run/qmig/containers-unavailable")
SOURCE_DIRS = (
    "broker", "client", "measure", "migration", "mqttproto", "qmig", "quicmig", "loadtests",
)  # fmt: skip
SOURCE_SUFFIXES = (".py", ".yaml", ".yml")
# Runtime dependencies the broker never imports: matplotlib only draws lab reports on the host,
# and would add numpy, pillow and friends (tens of MB) to every image.
HOST_ONLY_DEPS = frozenset({"matplotlib", "podman"})
# Code that runs on the edge host, never in the broker container: left out of the image and of
# its hash, so that editing the lab does not rebuild the image.
HOST_ONLY_DIRS = (
    "migration/lab/",
    "migration/workload.py",
    "migration/state_load.py",
    "migration/report.py",
    "loadtests/",
)
# Imports that prove the cp311 binary wheels (cryptography, pylsqpack, psutil, yaml) load.
IMPORT_CHECK = (
    "import qmig, broker, client, migration, mqttproto, quicmig, aioquic, cryptography, yaml, "
    "rich, psutil, pylsqpack; from cryptography.hazmat.primitives.asymmetric import ec; "
    "ec.generate_private_key(ec.SECP256R1()); print('ok')"
)


class ImageError(RuntimeError):
    """The image could not be built or does not work."""


class ContainersUnavailable(ImageError):
    """This host cannot run the lab's containers (the reason is the message)."""


def _log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr, flush=True)


def _run(
    cmd: Sequence[str | os.PathLike[str]], timeout: float, *, what: str | None = None, **kw
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise ImageError with the tail of its output."""
    try:
        proc = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what or cmd[0]} timed out after {timeout:.0f} s") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{cmd[0]} not found") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise ImageError(f"{what or cmd[0]} failed: {' | '.join(tail)}")
    return proc


# --- tag -----------------------------------------------------------------------------------------
def source_files(root: Path) -> list[str]:
    """The project files that go into the image, as sorted POSIX paths relative to root.

    In a git checkout: tracked and untracked-but-not-ignored files of SOURCE_DIRS with
    SOURCE_SUFFIXES (uncommitted work is what a lab run must test). Otherwise the same suffixes
    found on disk, minus caches.
    """
    root = Path(root)
    names: set[str] = set()
    if (root / ".git").exists():
        proc = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
                "--",
                *SOURCE_DIRS,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode == 0:
            names = {n for n in proc.stdout.split("\0") if n}
    if not names:
        for d in SOURCE_DIRS:
            for p in (root / d).rglob("*"):
                if p.is_file():
                    names.add(p.relative_to(root).as_posix())
    return sorted(
        n
        for n in names
        if n.endswith(SOURCE_SUFFIXES)
        and "__pycache__" not in n
        and (root / n).is_file()
        and not n.startswith(HOST_ONLY_DIRS)
    )


def source_hash(root: Path) -> str:
    """First 12 hex digits of a sha256 over the image's project files and pyproject.toml."""
    root = Path(root)
    h = hashlib.sha256()
    for name in [*source_files(root), "pyproject.toml"]:
        h.update(name.encode() + b"\0")
        h.update((root / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _pyproject(root: Path) -> dict:
    with open(Path(root) / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def image_tag(root: Path) -> str:
    """``localhost/qmig-broker:<project version>-<source hash>`` for the checkout at root."""
    version = _pyproject(root)["project"]["version"]
    return f"{IMAGE_REPO}:{version}-{source_hash(root)}"


def runtime_requirements(root: Path) -> list[str]:
    """The project's runtime dependencies the broker image needs (not dev, not HOST_ONLY_DEPS)."""
    reqs = []
    for req in _pyproject(root)["project"].get("dependencies", []):
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
        if _norm(name) not in HOST_ONLY_DEPS:
            reqs.append(req)
    return reqs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- availability --------------------------------------------------------------------------------
def containers_unavailable() -> str | None:
    """Why this host cannot run the lab's containers, or None when it can."""
    try:
        reason = UNAVAILABLE_FILE.read_text().strip()
    except OSError:
        reason = ""
    if reason:
        return reason
    if os.geteuid() != 0:
        return "not root (checkpoint/restore needs root Podman)"
    if shutil.which("podman") is None:
        return "podman is not installed (as root run: make setup)"
    if shutil.which("criu") is None:
        return "criu is not installed (as root run: make setup)"
    return None


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["podman", "image", "exists", tag], capture_output=True, timeout=30
        ).returncode
        == 0
    )


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time on this host (tests and the lab may ask concurrently)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "image.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_image(root: Path, *, verify: bool = True, force: bool = False) -> str:
    """Return the tag of this checkout's broker image, building (and verifying) it if missing."""
    root = Path(root).resolve()
    reason = containers_unavailable()
    if reason:
        raise ContainersUnavailable(reason)
    tag = image_tag(root)
    if not force and image_exists(tag):
        return tag
    with _build_lock():
        if force or not image_exists(tag):
            t0 = time.monotonic()
            _ensure_base_image()
            _build(root, tag)
            t1 = time.monotonic()
            if verify:
                try:
                    verify_image(tag)
                except ImageError:  # do not leave a broken image under a tag that looks done
                    subprocess.run(["podman", "rmi", tag], capture_output=True, timeout=60)
                    raise
            _run(["podman", "tag", tag, f"{IMAGE_REPO}:latest"], 60, what="podman tag")
            _log(f"built {tag} in {t1 - t0:.1f} s, verified in {time.monotonic() - t1:.1f} s")
            _prune_old_tags(tag)
    return tag


# --- base image: debootstrap rootfs --------------------------------------------------------------
def mirror_uri() -> str:
    """The Debian archive URI the system's apt sources name (never a hard-coded host)."""
    uris: list[str] = []
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for line in deb822.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "uris":
                uris += value.split()
    legacy = Path("/etc/apt/sources.list")
    if not uris and legacy.exists():
        for line in legacy.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[") and not w.endswith("]")]
            if len(words) >= 2 and line.split()[0] == "deb":
                uris.append(words[1])
    for uri in uris:
        if "-security" not in uri:
            return uri.rstrip("/")
    raise ImageError(
        "no Debian mirror URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
    )


def _ensure_rootfs() -> Path:
    """The cached bookworm+python3 rootfs tarball; debootstrap it (about 45 s) if missing."""
    if ROOTFS_TAR.exists():
        return ROOTFS_TAR
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (as root run: make setup)")
    uri = mirror_uri()
    _log(f"debootstrap {SUITE} minbase + python3 (about 45 s)")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="qmig-rootfs.", dir="/var/tmp"))
    try:
        rootfs = work / "root"
        _run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, rootfs, uri],
            900,
            what="debootstrap",
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tmp = ROOTFS_TAR.with_suffix(".tar.part")
        _run(["tar", "-C", rootfs, "--numeric-owner", "-cf", tmp, "."], 300, what="tar rootfs")
        tmp.rename(ROOTFS_TAR)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"rootfs {ROOTFS_TAR} ready in {time.monotonic() - t0:.1f} s")
    return ROOTFS_TAR


def _ensure_base_image() -> None:
    if image_exists(BASE_IMAGE):
        return
    tar = _ensure_rootfs()
    _run(
        ["podman", "import", "--change", 'CMD ["python3"]', tar, BASE_IMAGE],
        300,
        what="podman import",
    )


# --- the broker image ----------------------------------------------------------------------------
def _host_python() -> str:
    if sys.version_info[:2] != (3, 11):
        raise ImageError(
            f"host Python is {sys.version.split()[0]}; the {SUITE} image has "
            "python3.11, so its wheels must come from a Python 3.11 venv"
        )
    return sys.executable


def _stage_site(root: Path, site: Path, work: Path) -> None:
    """Fill site with the runtime wheels (host venv's versions) and the project's source."""
    py = _host_python()
    reqs = work / "requirements.txt"
    reqs.write_text("\n".join(runtime_requirements(root)) + "\n")
    # Pin every package the host venv has, so the image runs what the tests ran.
    freeze = _run([py, "-m", "pip", "freeze", "--exclude-editable"], 120, what="pip freeze")
    pins = [
        ln
        for ln in freeze.stdout.splitlines()
        if "==" in ln and not ln.startswith(("-", "#")) and " @ " not in ln
    ]
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    sel: list[str | os.PathLike[str]] = ["-r", reqs, "-c", constraints]
    quiet = ["-q", "--disable-pip-version-check"]
    offline = subprocess.run(
        [
            py,
            "-m",
            "pip",
            "wheel",
            *quiet,
            "--no-index",
            "--find-links",
            WHEEL_DIR,
            "-w",
            WHEEL_DIR,
            *sel,
        ],
        capture_output=True,
        timeout=600,
    )
    if offline.returncode != 0:  # some wheel not cached yet: fetch/build with the package index
        _log("fetching wheels for the runtime dependencies")
        _run([py, "-m", "pip", "wheel", *quiet, "-w", WHEEL_DIR, *sel], 900, what="pip wheel")
    _run(
        [
            py,
            "-m",
            "pip",
            "install",
            *quiet,
            "--no-index",
            "--find-links",
            WHEEL_DIR,
            "--target",
            site,
            "--no-warn-script-location",
            *sel,
        ],
        600,
        what="pip install --target",
    )
    for name in source_files(root):
        dest = site / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest)
    # Hash-checked bytecode: valid whatever the file times become inside the image.
    _run(
        [
            py,
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "checked-hash",
            *[site / d for d in SOURCE_DIRS if (site / d).is_dir()],
        ],
        300,
        what="compileall",
    )


def _build(root: Path, tag: str) -> None:
    _log(f"building {tag}")
    work = Path(tempfile.mkdtemp(prefix="qmig-image.", dir="/var/tmp"))
    try:
        context = work / "context"
        site = context / "site"
        site.mkdir(parents=True)
        _stage_site(root, site, work)
        (context / "Containerfile").write_text(
            f"FROM {BASE_IMAGE}\n"
            f"COPY site {SITE}\n"
            f"ENV PYTHONPATH={SITE} PYTHONUNBUFFERED=1\n"
            f'CMD ["python3", "-m", "qmig", "broker"]\n'
        )
        _run(
            [
                "podman",
                "build",
                "-q",
                "--pull=never",
                "--layers=false",
                "-f",
                context / "Containerfile",
                "-t",
                tag,
                context,
            ],
            600,
            what="podman build",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prune_old_tags(keep: str, newest: int = KEEP_IMAGES) -> None:
    """Drop all but the newest few qmig-broker images (not in use) so rebuilds do not pile up.

    A few are kept because two checkouts (or a checkout and its CI clone) alternate tags.
    """
    proc = subprocess.run(
        ["podman", "images", "--format", "json", IMAGE_REPO],
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        entries = json.loads(proc.stdout or "[]")
    except ValueError:
        return
    by_id: dict[str, tuple[int, set[str]]] = {}
    for e in entries:
        created, names = by_id.get(e["Id"], (int(e.get("Created", 0)), set()))
        names.update(n for n in e.get("Names") or [] if n.startswith(IMAGE_REPO + ":"))
        by_id[e["Id"]] = (created, names)
    ranked = sorted(by_id.values(), key=lambda item: item[0], reverse=True)
    for rank, (_, names) in enumerate(ranked):
        if rank >= newest and not names & {keep, f"{IMAGE_REPO}:latest"}:
            for name in sorted(names):
                subprocess.run(["podman", "rmi", name], capture_output=True, timeout=60)


# --- verification --------------------------------------------------------------------------------
def verify_image(tag: str) -> None:
    """Prove the image works: imports, a QUIC publish to its broker, and a checkpoint/restore.

    The broker runs in a pod without network (loopback only), as the lab runs it in pods: the
    checkpoint/restore shows that Podman drives this host's CRIU through runc for a process
    holding UDP and TCP sockets. (A plain --network none container comes back from a restore
    with its loopback down in podman 4.3; a pod's netns keeps it up.)
    """
    out = _run(
        ["podman", "run", "--rm", "--network", "none", tag, "python3", "-c", IMPORT_CHECK],
        120,
        what="import check in the image",
    ).stdout.strip()
    if out != "ok":
        raise ImageError(f"import check in the image printed {out!r}")
    pod = f"qmig-imgcheck-{os.getpid()}"
    name = f"{pod}-broker"
    broker = (
        "python3 -m qmig certs --out /tmp/c >/dev/null && exec python3 -m qmig broker "
        "--host 127.0.0.1 --tls-port 0 --mptcp-port 0 --quic-port 14567 "
        "--cert /tmp/c/server.crt --key /tmp/c/server.key"
    )
    pub = [
        "podman",
        "exec",
        name,
        "python3",
        "-m",
        "qmig",
        "pub",
        "-h",
        "127.0.0.1",
        "--cafile",
        "/tmp/c/ca.crt",
        "-t",
        "qmig/imgcheck",
        "-q",
        "1",
        "-m",
        "ok",
    ]
    try:
        _run(
            ["podman", "pod", "create", "--name", pod, "--network", "none"],
            60,
            what="podman pod create",
        )
        _run(
            ["podman", "run", "-d", "--pod", pod, "--name", name, tag, "sh", "-c", broker],
            60,
            what="podman run broker",
        )
        deadline = time.monotonic() + 20
        while True:
            proc = subprocess.run(pub, capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:
                logs = subprocess.run(
                    ["podman", "logs", "--tail", "5", name],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                raise ImageError(
                    "QUIC publish to the broker in the image failed: "
                    f"{(proc.stderr or logs.stderr or logs.stdout).strip()[-300:]}"
                )
            time.sleep(0.3)
        _run(["podman", "container", "checkpoint", name], 120, what="podman checkpoint")
        _run(["podman", "container", "restore", name], 120, what="podman restore")
        _run(pub, 30, what="QUIC publish after restore")
    finally:
        subprocess.run(
            ["podman", "pod", "rm", "-f", "-t", "0", pod], capture_output=True, timeout=60
        )
    _log(f"verified {tag}: imports, QUIC publish, checkpoint/restore")


# --- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m migration.image", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="project checkout (default: this one)",
    )
    ap.add_argument("--tag-only", action="store_true", help="print the tag, build nothing")
    ap.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    ap.add_argument("--no-verify", action="store_true", help="skip the checks after a build")
    ap.add_argument(
        "--if-available",
        action="store_true",
        help="exit 0 with one line when this host cannot run containers",
    )
    args = ap.parse_args(argv)
    if args.tag_only:
        print(image_tag(args.root))
        return 0
    try:
        tag = ensure_image(args.root, verify=not args.no_verify, force=args.force)
    except ContainersUnavailable as exc:
        _log(f"skipped: containers unavailable: {exc}")
        return 0 if args.if_available else 1
    except ImageError as exc:
        print(f"image: ERROR: {exc}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
