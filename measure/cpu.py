"""CPU time of groups of processes, sampled from /proc by one thread: the one CPU sampler.

A :class:`Classifier` says which processes belong to which group (the broker's pods, the
clients' namespace, fixed PIDs...); :class:`CpuSampler` reads every process's user + system
time (children it reaped included) every ``tick`` seconds and keeps the running total per
group, plus the whole machine's busy time, so a figure can be given as a share of a core and
next to what everything else on the machine did meanwhile.

A process seen at the first sample counts from then; one born later counts from zero; one
that died counts until its last sample (its last ``tick`` of CPU may be missed, though a
frozen or exiting process uses little).  ``series`` holds (wall time, {group: seconds}), with
the machine's busy seconds under :data:`MACHINE`.  The sampler's own CPU is measured
(``own_cpu_s``) so a caller can leave it out of its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from functools import cached_property
from typing import Protocol

MACHINE = "machine"
OTHERS = "others"
_TICKS = os.sysconf("SC_CLK_TCK")


class Proc:
    """One process as /proc shows it; each field is read once, when first asked for."""

    __slots__ = ("__dict__", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @cached_property
    def _stat(self) -> tuple[int, float] | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                text = f.read()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2 :].split()
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return int(fields[1]), ticks / _TICKS

    @property
    def ppid(self) -> int | None:
        stat = self._stat
        return stat[0] if stat else None

    @property
    def cpu_seconds(self) -> float | None:
        stat = self._stat
        return stat[1] if stat else None

    @cached_property
    def netns(self) -> int | None:
        return netns_inode(f"/proc/{self.pid}/ns/net")

    @cached_property
    def comm(self) -> str:
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""


def netns_inode(path: str) -> int | None:
    """The inode that identifies a network namespace (``/proc/PID/ns/net``, ``/run/netns/X``)."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def processes() -> dict[int, Proc]:
    return {int(e): Proc(int(e)) for e in os.listdir("/proc") if e.isdigit()}


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; idle and iowait left out)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


class Classifier(Protocol):
    """Which group each process belongs to; processes left out are not counted."""

    groups: tuple[str, ...]

    def classify(self, procs: Mapping[int, Proc]) -> dict[int, str]: ...


class PidGroups:
    """Fixed processes, each its own group: ``{"broker": pid, "locust": pid}``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.groups = tuple(self.pids)

    def classify(self, procs: Mapping[int, Proc]) -> dict[int, str]:
        return {pid: name for name, pid in self.pids.items() if pid in procs}


class CpuSampler(threading.Thread):
    """Samples the groups of ``classifier`` every ``tick`` seconds until :meth:`stop`."""

    def __init__(self, classifier: Classifier, tick: float = 0.1) -> None:
        super().__init__(name="qmig-cpu-sampler", daemon=True)
        self.classifier = classifier
        self.tick = tick
        self.base: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}  # pid -> (group, seconds)
        self.series: list[tuple[float, dict[str, float]]] = []
        self.own_cpu_s = 0.0
        self._machine0 = 0.0
        self._halt = threading.Event()
        self._first = True

    def sample(self) -> None:
        now = time.time()
        procs = processes()
        for pid, group in self.classifier.classify(procs).items():
            seconds = procs[pid].cpu_seconds
            if seconds is None:
                continue
            if pid not in self.base:
                self.base[pid] = seconds if self._first else 0.0
            self.last[pid] = (group, seconds)
        machine = machine_busy_seconds()
        if self._first:
            self._machine0 = machine
        self._first = False
        totals = dict.fromkeys(self.classifier.groups, 0.0)
        for pid, (group, seconds) in self.last.items():
            totals[group] = totals.get(group, 0.0) + max(0.0, seconds - self.base[pid])
        totals[MACHINE] = machine - self._machine0
        self.series.append((now, totals))

    def run(self) -> None:
        start = time.thread_time()
        while True:
            self.sample()
            self.own_cpu_s = time.thread_time() - start
            if self._halt.wait(self.tick):
                break
        self.sample()
        self.own_cpu_s = time.thread_time() - start

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def at(self, when: float, group: str) -> float:
        """Cumulative seconds of ``group`` at the last sample not after ``when``."""
        value = 0.0
        for t, totals in self.series:
            if t > when:
                break
            value = totals.get(group, 0.0)
        return value

    def between(self, since: float, until: float, group: str) -> float:
        return max(0.0, self.at(until, group) - self.at(since, group))

    def total(self, group: str) -> float:
        return self.series[-1][1].get(group, 0.0) if self.series else 0.0

    def percent(self) -> dict[str, float]:
        """Each group's share of one core over the sampled span, and ``others``: the rest
        of the machine meanwhile (other work sharing it)."""
        if len(self.series) < 2:
            return {}
        span = self.series[-1][0] - self.series[0][0]
        if span <= 0:
            return {}
        out = {g: round(self.total(g) / span * 100, 1) for g in self.classifier.groups}
        machine = self.total(MACHINE) / span * 100
        out[OTHERS] = round(max(0.0, machine - sum(out.values())), 1)
        return out
