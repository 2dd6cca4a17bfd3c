"""Against a live local Ray cluster (`ray start --head`, started and stopped here): submit a job through the Jobs
API with token authentication, read its log, scale its rollout fleet 1 → 2 → 1 while it runs, find relay's
metrics on Ray's metrics export port and, through a real Prometheus scraping it, data for every panel of relay's
Grafana dashboard, and end the run cleanly with `relay stop --finish`."""

from __future__ import annotations

import json
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from relay import cluster
from relay.cli import main as relay_main
from relay.config import ConfigError
from relay.metrics import read_metrics
from tests.conftest import DEMO_CONFIG
from tests.live_ray import prometheus_query, prometheus_server, ray_head, running_job_status, wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_cluster(tmp_path_factory):
    with ray_head(["--num-cpus=4"]) as (address, ports):
        with prometheus_server(ports["metrics"], tmp_path_factory.mktemp("prometheus")) as prometheus:
            yield address, ports | {"prometheus": prometheus}


def dashboard_queries() -> dict[str, list[str]]:
    """Every query of relay's Grafana dashboard (cluster/grafana/relay-dashboard.json), by panel title."""
    board = json.loads((ROOT / "cluster" / "grafana" / "relay-dashboard.json").read_text())
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in board["panels"]}


def test_submit_rejects_a_bad_config_before_contacting_the_cluster():
    with pytest.raises(ConfigError, match="algorithm.kl_coeff: unknown key"):
        cluster.submit(str(DEMO_CONFIG), ["algorithm.kl_coeff=1"], address="http://127.0.0.1:9")


def test_job_api_refuses_requests_without_the_token(live_cluster):
    address, _ = live_cluster
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code == 401


def test_submit_logs_scale_and_metrics(live_cluster, tmp_path, capsys):
    address, ports = live_cluster
    # More iterations than the test ever waits for: it ends the run itself with `relay stop --finish`.
    prompts, samples, iterations = 8, 2, 1_000_000
    overrides = [
        f"run.output_dir={tmp_path}", "run.name=scaled", f"run.iterations={iterations}", "run.eval_every=2",
        "run.checkpoint_every=0", "warm_start=null", "data.train_prompts=256", f"data.prompts_per_iteration={prompts}",
        "data.eval_prompts=8", "data.eval_samples_per_prompt=1", f"rollout.samples_per_prompt={samples}",
        "rollout.max_new_tokens=8", "policy.micro_batch_size=4", "critic.micro_batch_size=4", "algorithm.mini_batches=1",
    ]
    relay_main(["submit", str(DEMO_CONFIG.relative_to(ROOT)), "--address", address, "--working-dir", str(ROOT),
                *overrides])
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    client = cluster.job_client(address)
    run_status = partial(running_job_status, job_id, address)

    wait_for(lambda: (s := run_status()) and s.get("iteration", 0) >= 2, 300, "the run's second iteration", 3)

    assert "2 requested" in cluster.control_call(job_id, "request_rollout_workers", (2,), address)
    grown = wait_for(lambda: (s := run_status()) and len(s["rollout_workers_active"]) == 2 and s, 240,
                     "the second rollout worker to join", 3)
    assert grown["rollout_workers_active"] == ["rollout-0", "rollout-1"]

    # relay's metrics on Ray's Prometheus export port, tagged by run and role.
    def exported():
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).read().decode()
        return text if "ray_relay_reward_mean" in text and "ray_relay_rollout_workers_active" in text else None

    text = wait_for(exported, 90, "relay metrics on the export port", 3)
    assert 'run="scaled"' in text and 'role="reward"' in text
    # vLLM's own engine metrics, through the RayPrometheusStatLogger each rollout worker's engine was built with.
    assert "ray_vllm" in text

    # A real Prometheus scraping that port answers every query of every panel of relay's dashboard for this run.
    queries = {(title, expr.replace("$run", "scaled")) for title, exprs in dashboard_queries().items() for expr in exprs}

    def unanswered():
        return {query for query in queries if not prometheus_query(ports["prometheus"], query[1])}

    try:
        wait_for(lambda: not unanswered(), 60, "data for every dashboard query", 2)
    except AssertionError:
        raise AssertionError(f"Prometheus has no data for these panels' queries: {sorted(unanswered())}") from None

    relay_main(["scale", job_id, "--rollout-workers", "1", "--address", address])
    shrunk = wait_for(lambda: (s := run_status()) and len(s["rollout_workers_active"]) == 1 and s, 120,
                      "the scale-down", 3)
    # Trained on with one worker again after the scale-down, then ended cleanly at an iteration boundary.
    wait_for(lambda: (s := run_status()) and s["iteration"] > shrunk["iteration"], 120, "an iteration after the scale-down", 3)
    relay_main(["stop", job_id, "--finish", "--address", address])
    wait_for(lambda: client.get_job_status(job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 300, "the job to end", 3)
    relay_main(["logs", job_id, "--address", address])
    logs = capsys.readouterr().out
    assert client.get_job_status(job_id) == "SUCCEEDED", logs[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    last = summary["iterations"]
    assert f"iteration {last}/{iterations} | reward" in logs

    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in row]
    assert [row["iteration"] for row in rows] == list(range(1, last + 1))
    # Every batch was generated and trained on: samples grow by one full batch per iteration, versions by one.
    assert [row["perf/samples"] for row in rows] == [prompts * samples * i for i in range(1, last + 1)]
    assert [row["policy/version"] for row in rows] == list(range(1, last + 1))
    fleet_sizes = [int(row["rollout/workers_active"]) for row in rows]
    first_two = fleet_sizes.index(2)
    assert fleet_sizes[0] == 1 and 1 in fleet_sizes[first_two:]
    assert summary["samples"] == prompts * samples * last
    assert "eval/score" in rows[-1] and (tmp_path / "checkpoints" / f"iter_{last:06d}" / "policy").is_dir()
