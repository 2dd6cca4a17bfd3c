"""How a run's control actor is found in Ray: the name both the driver (which creates it) and the `relay` client
(which reaches it through a short Ray job) derive from the run's id, and the fixed namespace it lives in."""

from __future__ import annotations

import json
import os

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
