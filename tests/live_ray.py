"""A real Ray head node for tests (`ray start --head --block`), started in its own process group and stopped
by signalling that group, so it never touches another Ray instance on the machine (`ray stop` would)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from actors.group import free_port
from relay import cluster


class FailingRank:
    """A role's rank (an ActorGroup member) whose call fails as a surviving rank's does when its peer has died."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank

    def fail(self) -> None:
        raise RuntimeError("Connection closed by peer")  # what gloo tells a rank whose peer died mid-collective


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@contextmanager
def ray_head(
    extra_args: list[str], env: dict[str, str] | None = None, gcs_port: int | None = None
) -> Iterator[tuple[str, dict[str, int]]]:
    """Yield (job API address, ports) of a new head node with dashboard and metrics export on loopback."""
    ports = {"gcs": gcs_port or free_port(), "dashboard": free_port(), "metrics": free_port()}
    venv_bin = Path(sys.executable).parent
    log = tempfile.NamedTemporaryFile("w+", prefix="ray-head-", suffix=".log")
    head = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", f"--port={ports['gcs']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--metrics-export-port={ports['metrics']}", "--include-dashboard=true",
         # Not the default agent ports, which another Ray instance on this machine may hold.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", *extra_args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # Job entrypoints run `python`: the cluster's Python is this virtual environment's.
        env={**os.environ, "RAY_ADDRESS": "", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", **(env or {})},
    )
    address = f"http://127.0.0.1:{ports['dashboard']}"

    last_error: list[str] = []

    def job_api_answers() -> bool:
        if head.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"ray start --head exited with {head.returncode}:\n{log.read()[-3000:]}")
        try:
            return cluster.job_client(address).list_jobs() is not None
        except Exception as error:  # noqa: BLE001 - the dashboard is still starting
            last_error[:] = [f"{type(error).__name__}: {error}"]
            return False

    try:
        try:
            wait_for(job_api_answers, 120, "the job API of the new cluster", interval_s=2)
        except AssertionError as error:
            raise AssertionError(f"{error}; last error: {last_error}") from None
        yield address, ports
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=90)
        log.close()


def running_job_status(job_id: str, address: str) -> dict[str, Any] | None:
    """The run's own report (`relay status`) while its job runs; None until the driver's control actor is up.
    Fails with the job's log as soon as the job has ended: the callers expect it to be still running."""
    report = cluster.status(job_id, address)
    if report["status"] in ("FAILED", "STOPPED", "SUCCEEDED"):
        raise AssertionError(f"job {job_id} ended ({report['status']}):\n"
                             f"{cluster.job_client(address).get_job_logs(job_id)[-3000:]}")
    return report["run"] if isinstance(report.get("run"), dict) else None


@contextmanager
def prometheus_server(scrape_port: int, directory: Path) -> Iterator[str]:
    """A real Prometheus (Debian's `prometheus`, installed by .ci/run) scraping 127.0.0.1:`scrape_port` every
    second, with its data in `directory`; yields its address."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['127.0.0.1:{scrape_port}']}}]}}]\n"
    )
    log = (directory / "prometheus.log").open("w")
    server = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"prometheus exited with {server.returncode}: {(directory / 'prometheus.log').read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"{address}/-/ready", timeout=5).status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, "prometheus to be ready")
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def prometheus_query(address: str, expr: str) -> list[dict[str, Any]]:
    """The series an instant PromQL query returns."""
    url = f"{address}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    if answer["status"] != "success":
        raise AssertionError(f"prometheus refused {expr!r}: {answer}")
    return answer["data"]["result"]


def train_to_end(config):
    """A whole run of the driver, as `relay train` makes it (its roles shut down after)."""
    from jobs.ppo import PPOTrainer

    trainer = PPOTrainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()
