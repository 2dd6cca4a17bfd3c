"""RunControl: the named actor through which a person steers and inspects a running PPO job.

The driver creates it under the name and namespace that relay/naming.py derives from the run's id (the Ray job's
submission id, or the run name outside Ray Jobs). `relay scale`, `relay status` and `relay stop --finish` reach it from outside with a
short Ray job of a few lines, so they need nothing but the Jobs API and its token. Requests take effect at the
driver's next iteration boundary.
"""

from __future__ import annotations

import time
from typing import Any


class RunControl:
    def __init__(self, rollout_workers: int) -> None:
        self.requested_rollout_workers = rollout_workers
        self.finish_requested = False
        self.status: dict[str, Any] = {"state": "starting"}

    def request_rollout_workers(self, count: int) -> str:
        if count < 1:
            raise ValueError(f"--rollout-workers must be at least 1, got {count}")
        self.requested_rollout_workers = count
        return f"rollout workers: {count} requested; applied at the next iteration boundary"

    def request_finish(self) -> str:
        self.finish_requested = True
        return "finish requested: the run ends after its current iteration, with a final evaluation and checkpoint"

    def requests(self) -> dict[str, Any]:
        """What the driver reads at each iteration boundary."""
        return {"rollout_workers": self.requested_rollout_workers, "finish": self.finish_requested}

    def report(self, status: dict[str, Any]) -> None:
        self.status = {**status, "updated_at": time.time()}

    def get_status(self) -> dict[str, Any]:
        return {**self.status, "rollout_workers_requested": self.requested_rollout_workers,
                "finish_requested": self.finish_requested}
