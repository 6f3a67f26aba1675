"""How a queued move is carried out: the executor of the inventory's driver.

``lab`` runs :class:`migration.lab.live.Migration` in the single-Podman lab the inventory
names (``lab.state_dir``, ``lab.scenario``): the same code as ``qmig migrate``, with its
rollback.  An executor answers two questions, where a broker runs now (:meth:`locate`) and
what happened when it was moved (:meth:`migrate`: the outcome, ``ok`` true or false); it
raises nothing for a failed move, so the service records every outcome the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .core import Job
from .inventory import Inventory

log = logging.getLogger("qmig.orchestrator")

FIRST_PACKET_WAIT = 1.0  # seconds after a move before asking when clients were heard


class Executor(Protocol):
    def locate(self, broker: str) -> str | None: ...

    def migrate(self, job: Job, progress: Callable[[str], None]) -> dict[str, Any]: ...


class LabExecutor:
    """Moves the lab's broker between the pods of the lab's one Podman."""

    def __init__(self, inventory: Inventory) -> None:
        import migration.lab.live  # noqa: F401 - imported now, not in a move's first 30 ms
        from migration.scenario import Scenario

        self.state_dir = Path(inventory.lab["state_dir"])
        self.scenario = Scenario.load(inventory.lab.get("scenario", "demo"))
        names = {h.name for h in self.scenario.hosts}
        unknown = [h.name for h in inventory.hosts if h.name not in names]
        if unknown:
            from .inventory import InventoryError

            raise InventoryError(f"inventory {inventory.path}: hosts {', '.join(unknown)} are "
                                 f"not in the lab's scenario {self.scenario.name!r}")  # fmt: skip

    def _lab(self) -> Any:
        from migration.lab.lab import Lab

        return Lab(self.scenario, self.state_dir)

    def locate(self, broker: str) -> str | None:
        lab = self._lab()
        return lab.state.broker_host if lab.state is not None else None

    def migrate(self, job: Job, progress: Callable[[str], None]) -> dict[str, Any]:
        from migration.lab.live import Migration, MigrationFailed
        from migration.lab.net import LabError
        from migration.scenario import ScenarioError

        lab = self._lab()
        if lab.state is None:
            return {"ok": False, "error": f"the lab is not up ({self.state_dir})"}
        try:
            migration = Migration(lab, job.dest, method=job.method, progress=progress)
            outcome = migration.run()
        except MigrationFailed as exc:
            return {**exc.outcome, "ok": False, "error": str(exc)}
        except (LabError, ScenarioError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        time.sleep(FIRST_PACKET_WAIT)  # clients speak to the new address; then ask when
        with contextlib.suppress(Exception):
            migration.first_client_packet()
        return outcome


def executor_for(inventory: Inventory) -> Executor:
    if inventory.driver == "lab":
        return LabExecutor(inventory)
    raise ValueError(f"no executor for driver {inventory.driver!r}")  # inventory checks it
