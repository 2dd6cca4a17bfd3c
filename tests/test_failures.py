"""Failures survived, on a live local Ray: a rollout engine's process killed mid-run (of two, and the only one),
and a learner rank killed; every run still finishes with every batch complete: no prompt lost, none doubled."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import ray

from jobs.ppo import PPOTrainer
from relay.metrics import read_metrics
from tests.conftest import tiny_run_config
from tests.live_ray import wait_for

pytestmark = pytest.mark.slow


def fit_killing(config, actor_name: str, after_rows: int) -> dict:
    """Run `config` to the end while, once it has logged `after_rows` iterations, the process of its actor
    `actor_name` is killed with SIGKILL (as the OOM killer or a lost node would); the run's summary."""
    killed: list[int] = []

    def kill() -> None:
        metrics = Path(config.run.output_dir) / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(read_metrics(metrics)) >= after_rows, 300,
                 f"{after_rows} iterations", interval_s=0.1)
        actor = ray.get_actor(actor_name, namespace=config.actor_namespace)
        pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    trainer = PPOTrainer(config)
    try:
        summary = trainer.fit()
    finally:
        trainer.shutdown()
    thread.join(timeout=10)
    assert killed, f"{actor_name} was never killed"
    return summary


def check_every_batch_complete(config, iterations: int) -> list[dict]:
    rows = read_metrics(Path(config.run.output_dir) / "metrics.jsonl")
    per_batch = config.samples_per_iteration
    assert [row["iteration"] for row in rows] == list(range(1, iterations + 1))
    assert [row["perf/samples"] for row in rows] == [per_batch * i for i in range(1, iterations + 1)]
    return rows


@pytest.mark.parametrize("engines", [2, 1])
def test_a_killed_rollout_engine_is_replaced_and_no_batch_loses_a_prompt(ray_session, tmp_path, engines):
    iterations = 20
    config = tiny_run_config(tmp_path, f"rollout.num_workers={engines}", f"run.iterations={iterations}")
    summary = fit_killing(config, "rollout-0", after_rows=2)
    rows = check_every_batch_complete(config, iterations)
    assert [row["policy/version"] for row in rows] == list(range(1, iterations + 1))
    assert rows[-1]["rollout/worker_failures"] == 1
    assert summary["samples"] == config.samples_per_iteration * iterations
    if engines == 1:  # the run had to wait for the replacement, which then generated the rest
        assert rows[-1]["rollout/workers_active"] == 1


def test_a_killed_learner_rank_restarts_every_role_from_the_newest_checkpoint(ray_session, tmp_path):
    iterations = 8
    config = tiny_run_config(tmp_path, "policy.resources.cpu_ranks_per_node=2", f"run.iterations={iterations}",
                             "run.checkpoint_every=2")
    summary = fit_killing(config, "policy-learner-1", after_rows=3)
    # Iterations after the newest checkpoint were trained again after the restart, and logged once.
    check_every_batch_complete(config, iterations)
    assert summary["samples"] == config.samples_per_iteration * iterations


def test_a_reward_that_is_not_finite_stops_the_run_and_keeps_the_samples(ray_session, tmp_path):
    from jobs.ppo import RewardFailure

    config = tiny_run_config(tmp_path, "reward.function=tests.user_reward:not_a_number")
    trainer = PPOTrainer(config)
    try:
        with pytest.raises(RewardFailure, match=r"iteration 1: .*not_a_number returned nan for response 0") as raised:
            trainer.fit()
    finally:
        trainer.shutdown()
    [written] = tmp_path.glob("reward_failure_iter_000001.jsonl")
    assert str(written) in str(raised.value)
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) == config.samples_per_iteration and {"prompt", "response", "metadata"} <= rows[0].keys()
    assert not (tmp_path / "metrics.jsonl").exists() or read_metrics(tmp_path / "metrics.jsonl") == []
