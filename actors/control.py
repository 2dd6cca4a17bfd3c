"""RunControl: the named actor through which a person steers and inspects a running PPO job.

The driver creates it as `control-<run id>` in the fixed namespace `relay-control` (the run id is the Ray job's
submission id, or the run name outside Ray Jobs). `relay scale` and `relay status` reach it from outside with a
short Ray job of a few lines, so they need nothing but the Jobs API and its token. Requests take effect at the
driver's next iteration boundary.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

CONTROL_NAMESPACE = "relay-control"
# Set by Ray Jobs in every job driver's environment: the job config, whose metadata holds the submission id.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def control_actor_name(run_id: str) -> str:
    return f"control-{run_id}"


def current_run_id(run_name: str) -> str:
    """The submission id when running as a Ray job (what `relay submit` printed), else the run name."""
    job_config = os.environ.get(JOB_CONFIG_ENV)
    if job_config:
        submission_id = json.loads(job_config).get("metadata", {}).get("job_submission_id")
        if submission_id:
            return submission_id
    return run_name


class RunControl:
    def __init__(self, rollout_workers: int) -> None:
        self.requested_rollout_workers = rollout_workers
        self.status: dict[str, Any] = {"state": "starting"}

    def request_rollout_workers(self, count: int) -> str:
        if count < 1:
            raise ValueError(f"--rollout-workers must be at least 1, got {count}")
        self.requested_rollout_workers = count
        return f"rollout workers: {count} requested; applied at the next iteration boundary"

    def rollout_workers_requested(self) -> int:
        return self.requested_rollout_workers

    def report(self, status: dict[str, Any]) -> None:
        self.status = {**status, "updated_at": time.time()}

    def get_status(self) -> dict[str, Any]:
        return {**self.status, "rollout_workers_requested": self.requested_rollout_workers}
