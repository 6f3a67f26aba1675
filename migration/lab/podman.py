"""Podman, driven from Python through podman-py and the Podman API service.

The lab starts ``podman system service`` on its own unix socket (and stops it again), so
nothing depends on a system-wide socket unit.  podman-py covers networks, pods and
containers; it has no checkpoint/restore methods, so those two go through its API client's
raw ``post`` to the libpod REST endpoints:

- ``POST /libpod/containers/NAME/checkpoint?export=true`` answers with the checkpoint as a
  tar in the body (streamed to a file here, so its size is known exactly);
- ``POST /libpod/containers/import/restore?import=true&pod=POD_ID`` takes that tar as the
  body and restores it into the pod, i.e. onto that edge host's network (podman 4.3 accepts
  the pod's ID, not its name).

podman-py 5 speaks API v5 by default; the Debian 12 service is podman 4.3, so the client
pins the v4.0.0 prefix, which every 4.x and 5.x service accepts.

An :class:`Instance` is one edge host's own Podman (``podman: per-host`` in a scenario): its
own storage (graph root), run root, temporary directory (with file locks, so no lock is
shared with another Podman on the machine through ``/dev/shm``), CNI network configs and
``containers.conf``, and its API service running in the host's network namespace, so the
bridges of its pod networks are that host's.  Every podman command for the host (the service,
``podman create``, ``podman container restore``, ``podman load``) runs with the instance's
options; the lab's podman-py client reaches it through the API socket in its run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import net
from .net import LabError

API_VERSION = "4.0.0"
SERVICE_START_TIMEOUT = 15.0
CONFIG_DUMP = "config.dump"  # podman's container config in a checkpoint export
PIDFILE_KEYS = ("conmonPidFile", "pid_file")  # its paths in the source's run root


CONF_DROPINS = Path("/etc/containers/containers.conf.d")


@dataclass(frozen=True)
class Instance:
    """One edge host's own Podman: where it keeps everything, and the netns it runs in."""

    netns: str
    storage: Path  # the graph root: kept across labs, it caches the broker image
    run_dir: Path  # run root, tmp dir (locks), CNI configs, containers.conf: removed at down

    @property
    def conf(self) -> Path:
        return self.run_dir / "containers.conf"

    @property
    def socket(self) -> Path:
        return self.run_dir / "podman.sock"

    def flags(self) -> list[str]:
        return ["--root", str(self.storage), "--runroot", str(self.run_dir / "run"),
                "--tmpdir", str(self.run_dir / "tmp"),
                "--network-config-dir", str(self.run_dir / "cni")]  # fmt: skip

    def argv(self, *args: str, in_netns: bool = True) -> list[str]:
        """``podman ARGS`` as this instance, inside its host's network namespace (or not:
        what needs no network, e.g. listing, also works once the namespace is gone)."""
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"] if in_netns else []
        return [*enter, "podman", *self.flags(), *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def prepare(self) -> None:
        """Create its directories and write its containers.conf: the machine's drop-ins
        (qmig's runtime and ulimits; CONTAINERS_CONF replaces them) plus file locks."""
        for d in (self.storage, self.run_dir / "run", self.run_dir / "tmp", self.run_dir / "cni"):
            d.mkdir(parents=True, exist_ok=True)
        conf: dict[str, dict[str, Any]] = {}
        for dropin in sorted(CONF_DROPINS.glob("*.conf")):
            with contextlib.suppress(OSError, ValueError):
                _merge(conf, tomllib.loads(dropin.read_text()))
        _merge(conf, {"engine": {"lock_type": "file", "events_logger": "file"},
                      "network": {"network_config_dir": str(self.run_dir / "cni")}})  # fmt: skip
        self.conf.write_text(_toml(conf))


def _merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _toml(tables: dict[str, Any], prefix: str = "") -> str:
    """The TOML of nested tables of strings, numbers, booleans and lists of them."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a TOML basic string is a JSON string

    out: list[str] = []
    for name, table in tables.items():
        out.append(f"[{prefix}{name}]")
        out += [f"{json.dumps(k)} = {value(v)}" for k, v in table.items()
                if not isinstance(v, dict)]  # fmt: skip
        out.append("")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if subtables:
            out.append(_toml(subtables, f"{prefix}{name}."))
    return "\n".join(out)


@dataclass(frozen=True)
class ApiTls:
    """The client side of a Podman API behind TLS (:mod:`migration.lab.apifront`): the CA
    that issued the server's certificate, and the client's own certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Api:
    """Where a Podman API is: ``unix:///PATH``, or ``tcp://ADDR:PORT`` with TLS."""

    url: str
    tls: ApiTls | None = None


def _podman_client(api: Api, timeout: float = 120.0) -> Any:
    try:
        from podman import PodmanClient
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise LabError("podman-py is not installed (pip install podman)") from exc
    if api.url.startswith("tcp://") and api.tls is None:
        raise LabError(f"{api.url}: a Podman API over TCP needs TLS (plain TCP would give "
                       "whoever reaches the port root on the host)")  # fmt: skip
    client = PodmanClient(base_url=api.url, version=API_VERSION, timeout=timeout)
    if api.tls is not None:
        # podman-py's TLS settings are "currently ignored": requests does it, on its session.
        client.api.mount("http://", _tls_adapter(api.tls))
        client.api.trust_env = False  # no proxy from the environment in between
    return client


def _tls_adapter(tls: ApiTls) -> Any:
    """A requests adapter that sends podman-py's ``http://`` requests as ``https://`` with
    the client certificate, verifying the server against ``tls.ca`` (host name included)."""
    from requests import PreparedRequest, Response
    from requests.adapters import HTTPAdapter

    class TlsAdapter(HTTPAdapter):
        def send(self, request: PreparedRequest, stream: bool = False,
                 timeout: float | tuple[float | None, float | None] | None = None,
                 verify: bool | str = True, cert: str | tuple[str, str] | None = None,
                 proxies: dict[str, str] | None = None) -> Response:  # fmt: skip
            if request.url and request.url.startswith("http://"):
                request.url = "https://" + request.url.removeprefix("http://")
            return super().send(request, stream=stream, timeout=timeout, verify=str(tls.ca),
                                cert=(str(tls.cert), str(tls.key)), proxies=proxies)  # fmt: skip

    return TlsAdapter()


@dataclass
class CheckpointResult:
    path: Path
    bytes: int
    seconds: float


class Podman:
    """The lab's Podman API service and a podman-py client on it."""

    def __init__(self, socket_path: Path, pid: int | None = None,
                 instance: Instance | None = None, api: Api | None = None) -> None:  # fmt: skip
        self.socket_path = socket_path  # where the service listens
        self.pid = pid
        self.instance = instance  # None: the machine's own Podman
        self.api = api or Api(f"unix://{socket_path}")  # where its clients reach it
        self._client: Any = None

    def argv(self, *args: str) -> list[str]:
        """``podman ARGS`` against this Podman (its instance's options and netns if any)."""
        return self.instance.argv(*args) if self.instance else ["podman", *args]

    def env(self) -> dict[str, str] | None:
        return self.instance.env() if self.instance else None

    # ------------------------------------------------------------------ service
    @classmethod
    def start_service(cls, socket_path: Path, log_path: Path,
                      instance: Instance | None = None) -> Podman:  # fmt: skip
        """Start ``podman system service`` on ``socket_path`` and wait until it answers."""
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        podman = cls(socket_path, None, instance)
        if instance is not None:
            instance.prepare()
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    podman.argv("system", "service", "--time=0", f"unix://{socket_path}"),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                    env=podman.env(),
                )  # fmt: skip
        except FileNotFoundError as exc:
            raise LabError("podman is not installed (run `make setup` as root)") from exc
        podman.pid = proc.pid
        if podman._answers(proc):
            return podman
        if proc.poll() is not None:
            raise LabError(f"podman system service exited ({proc.returncode}); see {log_path}")
        podman.stop_service()
        raise LabError(f"podman system service did not answer within {SERVICE_START_TIMEOUT:g} s")

    def _answers(self, proc: subprocess.Popen[bytes]) -> bool:
        """Wait until this Podman answers where its clients reach it (True), or until
        ``proc`` (what serves it) exits or ``SERVICE_START_TIMEOUT`` passes (False)."""
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if self.alive():
                return True
            time.sleep(0.1)
        return False

    def stop_service(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.pid:
            stop_pid(self.pid)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def expose(self, api: Api, server: tuple[Path, Path], log_path: Path) -> int:
        """Serve this Podman's API at ``api`` (``tcp://ADDR:PORT`` of its host's namespace)
        behind mutual TLS (:mod:`migration.lab.apifront`, with the ``server`` certificate and
        key, clients of ``api.tls.ca``), and reach it there from now on; returns the front's
        PID."""
        assert self.instance is not None, "only an edge host's own Podman is exposed"
        assert api.url.startswith("tcp://") and api.tls is not None, api
        listen = api.url.removeprefix("tcp://")
        cert, key = server
        cmd = net.netns_exec(self.instance.netns, sys.executable, "-m", "migration.lab.apifront",
                             "--listen", listen, "--socket", str(self.socket_path),
                             "--cert", str(cert), "--key", str(key),
                             "--ca", str(api.tls.ca))  # fmt: skip
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip
        before, self.api = self.api, api
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._answers(proc):
            return proc.pid
        stop_pid(proc.pid)
        self.api, self._client = before, None
        raise LabError(f"the Podman API front on {listen} did not answer within "
                       f"{SERVICE_START_TIMEOUT:g} s; see {log_path}")  # fmt: skip

    def alive(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _podman_client(self.api)
        return self._client

    # ------------------------------------------------------------------ networks and pods
    def ensure_network(self, name: str, subnet: str, gateway: str) -> None:
        if self.client.networks.exists(name):
            return
        self.client.networks.create(
            name, driver="bridge", dns_enabled=False,
            subnets=[{"subnet": subnet, "gateway": gateway}],
            labels={"qmig": "lab"},
        )  # fmt: skip

    def remove_network(self, name: str) -> None:
        if self.client.networks.exists(name):
            self.client.networks.get(name).remove(force=True)

    def create_pod(self, name: str, network: str, ip: str) -> str:
        """A pod (one edge host) with a fixed address on its network; returns the pod ID."""
        if self.client.pods.exists(name):
            self.remove_pod(name)
        pod = self.client.pods.create(
            name, labels={"qmig": "lab"},
            netns={"nsmode": "bridge"},
            Networks={network: {"static_ips": [ip]}},
        )  # fmt: skip
        pod.start()
        return str(pod.id)

    def pod_id(self, name: str) -> str:
        return str(self.client.pods.get(name).id)

    def pod_infra_pid(self, name: str) -> int:
        """PID of the pod's infra process: its network namespace is the edge host's."""
        pod = self.client.pods.get(name)
        infra = self.client.containers.get(pod.attrs["InfraContainerID"])
        return int(infra.attrs["State"]["Pid"])

    def remove_pod(self, name: str) -> None:
        if self.client.pods.exists(name):
            pod = self.client.pods.get(name)
            with contextlib.suppress(Exception):
                pod.stop(timeout=2)
            pod.remove(force=True)

    def lab_pods(self) -> list[str]:
        return [p.name for p in self.client.pods.list(filters={"label": "qmig=lab"})]

    def lab_networks(self) -> list[str]:
        return [n.name for n in self.client.networks.list(filters={"label": "qmig=lab"})]

    # ------------------------------------------------------------------ containers
    def run_container(self, name: str, image: str, command: list[str], pod: str,
                      env: dict[str, str], mounts: list[dict[str, Any]],
                      runtime: str | None = None) -> str:  # fmt: skip
        """Create and start a container; ``runtime`` names an OCI runtime podman knows."""
        if self.client.containers.exists(name):
            self.client.containers.get(name).remove(force=True)
        if runtime:
            # podman 4.3's API ignores the create body's oci_runtime: the CLI honours it.
            container = self.client.containers.get(
                self._cli_create(name, image, command, pod, env, mounts, runtime)
            )
        else:
            container = self.client.containers.create(
                image, command, name=name, pod=pod, environment=env, mounts=mounts,
                labels={"qmig": "lab"},
            )  # fmt: skip
        container.start()
        return str(container.id)

    def container_state(self, name: str) -> dict[str, Any] | None:
        if not self.client.containers.exists(name):
            return None
        attrs = self.client.containers.get(name).attrs
        return {
            "status": attrs["State"]["Status"],
            "pid": attrs["State"].get("Pid"),
            "pod": attrs.get("Pod"),
            "id": attrs["Id"],
        }

    def remove_container(self, name: str) -> None:
        if self.client.containers.exists(name):
            self.client.containers.get(name).remove(force=True)

    def logs(self, name: str, tail: int = 30) -> str:
        if not self.client.containers.exists(name):
            return ""
        out = self.client.containers.get(name).logs(tail=tail, stdout=True, stderr=True)
        return b"".join(out).decode(errors="replace") if not isinstance(out, bytes) else \
            out.decode(errors="replace")  # fmt: skip

    def lab_containers(self) -> list[str]:
        return [
            c.name for c in self.client.containers.list(all=True, filters={"label": "qmig=lab"})
        ]

    # ------------------------------------------------------------------ checkpoint / restore
    def checkpoint(self, name: str, path: Path) -> CheckpointResult:
        """Freeze, dump and export container ``name`` into the tar file ``path``.

        The container is stopped by the dump (its memory is in the tar); it stays in podman's
        list as exited until it is removed.
        """
        start = time.monotonic()
        resp = self.client.api.post(
            f"/containers/{name}/checkpoint",
            # fileLocks: the durable store's SQLite file is locked (one broker per store)
            params={"export": "true", "ignoreVolumes": "true", "fileLocks": "true"},
            stream=True,
        )
        _raise_for(resp, f"checkpoint of {name}")
        size = 0
        with open(path, "wb") as out:
            for chunk in resp.iter_content(1 << 20):
                out.write(chunk)
                size += len(chunk)
        if size == 0:
            raise LabError(f"checkpoint of {name} returned an empty archive")
        return CheckpointResult(path, size, time.monotonic() - start)

    def restore(self, path: Path, pod_id: str, name: str) -> float:
        """Restore the exported checkpoint ``path`` as container ``name`` into pod ``pod_id``."""
        start = time.monotonic()
        self._own_pidfiles(path)
        with open(path, "rb") as body:
            resp = self.client.api.post(
                "/containers/import/restore",
                params={"import": "true", "pod": pod_id, "name": name, "fileLocks": "true"},
                data=body,
                headers={"Content-Type": "application/x-tar"},
            )
        _raise_for(resp, f"restore of {name}")
        return time.monotonic() - start

    def _own_pidfiles(self, path: Path) -> None:
        """Make a checkpoint from another edge host's Podman restorable here.

        podman records the container's conmon and runtime pidfile paths (in its run root) in
        the export's ``config.dump`` and, on import, keeps them unless they lie under the
        importing Podman's own run root.  Between edge hosts with different run roots (each
        lab host has its own), the restored container wrote its pidfile into the first host's tree,
        and the next move failed once that container was gone ("Failed to write conmon
        pidfile").  A ``config.dump`` without those paths, appended to the (uncompressed)
        export, overrides the first on extraction; podman then uses its default here.
        """
        if self.instance is None:
            return  # the machine's one Podman: every path is its own
        own = str(self.instance.run_dir / "run")
        with tarfile.open(path, "r:") as tar:
            try:
                member = tar.getmember(CONFIG_DUMP)
            except KeyError:
                return
            body = tar.extractfile(member)
            config = json.loads(body.read()) if body is not None else {}
        foreign = [key for key in PIDFILE_KEYS
                   if config.get(key) and not str(config[key]).startswith(own + "/")]  # fmt: skip
        if not foreign:
            return
        for key in foreign:
            del config[key]
        data = json.dumps(config).encode()
        info = tarfile.TarInfo(CONFIG_DUMP)
        info.size, info.mode, info.mtime = len(data), member.mode, int(time.time())
        with tarfile.open(path, "a:") as tar:
            tar.addfile(info, io.BytesIO(data))

    def _cli_create(self, name: str, image: str, command: list[str], pod: str,
                    env: dict[str, str], mounts: list[dict[str, Any]],
                    runtime: str) -> str:  # fmt: skip
        """``podman create --runtime RUNTIME ...`` (bind mounts only); returns the ID."""
        cmd = ["create", "--runtime", runtime, "--name", name, "--pod", pod,
               "--label", "qmig=lab"]  # fmt: skip
        for key, value in env.items():
            cmd += ["--env", f"{key}={value}"]
        for m in mounts:
            if m.get("type") != "bind":
                raise LabError(f"only bind mounts are supported here, not {m}")
            ro = ",ro=true" if m.get("read_only") else ""
            cmd += ["--mount", f"type=bind,source={m['source']},target={m['target']}{ro}"]
        try:
            proc = subprocess.run(self.argv(*cmd, image, *command), capture_output=True,
                                  text=True, timeout=60, env=self.env())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"podman create {name} failed: {exc}") from exc
        if proc.returncode != 0:
            raise LabError(f"podman create {name} failed: {proc.stderr.strip()[-300:]}")
        return proc.stdout.strip().splitlines()[-1]

    def restore_cli(self, path: Path, pod_id: str, name: str, timeout: float = 120.0) -> float:
        """The same restore as :meth:`restore` through the podman CLI, which keeps the
        container's OCI runtime.

        podman 4.3's API import-restore gives the restored container the default runtime,
        the CLI the one recorded in the checkpoint (post-copy needs the ``qmig-runc``
        wrapper).
        """
        start = time.monotonic()
        self._own_pidfiles(path)
        cmd = self.argv("container", "restore", "--import", str(path), "--pod", pod_id,
                        "--name", name, "--ignore-volumes", "--file-locks")  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=self.env())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"restore of {name} failed: {exc}") from exc
        if proc.returncode != 0:
            raise LabError(f"restore of {name} failed: {' '.join(proc.stderr.split())[-400:]}")
        return time.monotonic() - start

    def ensure_image(self, image: str, timeout: float = 600.0) -> bool:
        """Have ``image`` in this instance's storage, loaded from the machine's Podman if
        missing (what a registry pull would do on a real host); True if it was loaded."""
        if self.instance is None:
            return False
        have = subprocess.run(self.argv("image", "exists", image), env=self.env(),
                              capture_output=True, timeout=60)  # fmt: skip
        if have.returncode == 0:
            return False
        save = subprocess.Popen(["podman", "save", image], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        try:
            load = subprocess.run(self.argv("load"), stdin=save.stdout, capture_output=True,
                                  text=True, timeout=timeout, env=self.env())  # fmt: skip
        finally:
            if save.stdout is not None:
                save.stdout.close()
            save.wait(timeout=60)
        if save.returncode != 0 or load.returncode != 0:
            raise LabError(f"could not load {image} into {self.instance.netns}'s Podman: "
                           f"{(load.stderr or '').strip()[-300:]}")  # fmt: skip
        return True


def _raise_for(resp: Any, what: str) -> None:
    if getattr(resp, "ok", True):
        return
    try:
        detail = json.loads(resp.content or b"{}").get("message") or resp.text
    except ValueError:
        detail = resp.text
    raise LabError(f"{what} failed: {' '.join(str(detail).split())[:400]}")


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM ``pid`` (and its process group), wait up to ``grace`` s, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:
                if not Path(f"/proc/{pid}").exists():
                    return
            time.sleep(0.05)
