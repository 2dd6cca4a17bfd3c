"""Talking to a Ray cluster from outside: the Ray Job Submission SDK, with Ray's own token authentication.

Ray 2.60 clusters require a token on the dashboard and job API by default. Ray's SDK attaches it when the client
process runs with `RAY_AUTH_MODE=token`, reading it where Ray keeps it (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`,
or `~/.ray/auth_token`). relay sets that mode for its own process unless the user chose one (so import this module
before Ray), and never reads, prints or disables the token itself.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# Before anything imports Ray: Ray reads the authentication mode once, when it loads its configuration.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from relay.naming import CONTROL_NAMESPACE, control_actor_name  # noqa: E402

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_S = 60
# What travels with a job besides the code: nothing big or private.
WORKING_DIR_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def submit_job(client, timeout_s: float = AGENT_WAIT_S, **job: Any) -> str:
    """`client.submit_job`, waiting while a freshly started cluster's job agent is not up yet (Ray answers 500)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit(config_path: str, overrides: list[str], address: str | None, working_dir: str = ".",
           env: dict[str, str] | None = None) -> str:
    """Submit the PPO driver as a Ray job with `working_dir` shipped to the cluster; returns the job id."""
    from relay.config import load_config

    config = load_config(config_path, overrides)  # fail here, before the cluster is asked for anything
    entrypoint = " ".join(["python", "-m", "jobs.ppo", "--config", shlex.quote(config_path),
                           *(shlex.quote(item) for item in overrides)])
    # `relay stop` (Ray's job stop) sends the driver SIGTERM and, this long after, SIGKILL (Ray's default: 3 s);
    # the driver uses the time to checkpoint its last iteration. Ray's job supervisor reads it from the job's env.
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(config.run.stop_grace_s), **(env or {})}
    runtime_env: dict[str, Any] = {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}
    return submit_job(job_client(address), entrypoint=entrypoint, runtime_env=runtime_env)


def control_call(job_id: str, method: str, args: tuple[Any, ...], address: str | None, timeout_s: float = 120) -> Any:
    """Call a method of a run's control actor through a short Ray job, and return its JSON result."""
    snippet = (
        "import json, ray\n"
        "ray.init(log_to_driver=False)\n"
        f"actor = ray.get_actor({control_actor_name(job_id)!r}, namespace={CONTROL_NAMESPACE!r})\n"
        f"print('RELAY_RESULT ' + json.dumps(ray.get(actor.{method}.remote(*{args!r}))))\n"
    )
    client = job_client(address)
    helper_id = submit_job(client, entrypoint=f"python -c {shlex.quote(snippet)}")
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(helper_id)) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        if time.monotonic() > deadline:
            client.stop_job(helper_id)
            raise TimeoutError(f"no answer from the control actor of {job_id} within {timeout_s:.0f} s")
        time.sleep(0.5)
    logs = client.get_job_logs(helper_id)
    for line in logs.splitlines():
        if line.startswith("RELAY_RESULT "):
            return json.loads(line.removeprefix("RELAY_RESULT "))
    if "Failed to look up actor" in logs or "ValueError: Failed to look up" in logs:
        raise LookupError(f"job {job_id} has no running relay driver (it has not started, or it has ended)")
    raise RuntimeError(f"control call {method} for {job_id} failed ({status}):\n{logs[-2000:]}")


def status(job_id: str, address: str | None) -> dict[str, Any]:
    client = job_client(address)
    info = client.get_job_info(job_id)
    report: dict[str, Any] = {"job_id": job_id, "status": str(info.status), "entrypoint": info.entrypoint}
    if info.message:
        report["message"] = info.message
    if str(info.status) == "RUNNING":
        try:
            report["run"] = control_call(job_id, "get_status", (), address)
        except LookupError as error:
            report["run"] = str(error)
    return report


def follow_logs(job_id: str, address: str | None, follow: bool) -> None:
    client = job_client(address)
    if not follow:
        sys.stdout.write(client.get_job_logs(job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def default_working_dir() -> str:
    """The project root when run from a checkout (where `jobs/` and `relay/` sit side by side), else '.'."""
    root = Path(__file__).resolve().parents[1]
    return str(root) if (root / "jobs").is_dir() and (root / "actors").is_dir() else "."
