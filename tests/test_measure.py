"""The one CPU sampler (measure.cpu) on real processes: groups, machine share, others."""

from __future__ import annotations

import subprocess
import sys

from measure.cpu import OTHERS, CpuSampler, PidGroups

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"


def test_pid_groups_count_their_process_and_the_rest_of_the_machine() -> None:
    busy = subprocess.Popen([sys.executable, "-c", BUSY + "time.sleep(0.5)"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.2)"])
    sampler = CpuSampler(PidGroups({"busy": busy.pid, "idle": idle.pid}), tick=0.05)
    sampler.start()
    busy.wait(10)
    idle.wait(10)
    sampler.stop()
    assert 0.4 <= sampler.total("busy") < 1.0
    assert sampler.total("idle") < 0.2
    share = sampler.percent()
    assert set(share) == {"busy", "idle", OTHERS}
    assert share["busy"] > 20 and share["idle"] < 15 and share[OTHERS] >= 0
