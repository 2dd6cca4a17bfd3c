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
from tests.live_ray import train_to_end as fit, wait_for

pytestmark = pytest.mark.slow


def kill_after(config, actor_name: str, after_rows: int, killed: list[int]) -> threading.Thread:
    """Once the run has logged `after_rows` iterations, kill its actor `actor_name` with SIGKILL (as the OOM
    killer or a lost node would), from a thread; its pid goes into `killed`."""

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
    return thread




def check_every_batch_complete(config, iterations: int) -> list[dict]:
    rows = read_metrics(Path(config.run.output_dir) / "metrics.jsonl")
    per_batch = config.samples_per_iteration
    assert [row["iteration"] for row in rows] == list(range(1, iterations + 1))
    assert [row["perf/samples"] for row in rows] == [per_batch * i for i in range(1, iterations + 1)]
    return rows


def test_a_killed_rollout_engine_of_two_and_then_a_learner_rank_are_survived(ray_session, tmp_path):
    """rollout-0 dies at iteration 3: its prompts go to rollout-1 and a replacement starts. policy-learner-1 dies
    at iteration 7: every role restarts from the newest checkpoint (iteration 6). Each batch is complete."""
    iterations = 14
    config = tiny_run_config(tmp_path, "rollout.num_workers=2", "policy.resources.cpu_ranks_per_node=2",
                             f"run.iterations={iterations}", "run.checkpoint_every=2")
    killed: list[int] = []
    engine_killer = kill_after(config, "rollout-0", after_rows=2, killed=killed)
    learner_killer = kill_after(config, "policy-learner-1", after_rows=6, killed=killed)
    summary = fit(config)
    for thread in (engine_killer, learner_killer):
        thread.join(timeout=10)
    assert len(killed) == 2, "an actor was never killed"
    rows = check_every_batch_complete(config, iterations)
    assert [row["policy/version"] for row in rows[:6]] == list(range(1, 7))
    assert rows[5]["rollout/worker_failures"] == 1
    assert summary["samples"] == config.samples_per_iteration * iterations


def test_the_only_rollout_engine_killed_is_replaced_before_the_run_goes_on(ray_session, tmp_path):
    iterations = 12
    config = tiny_run_config(tmp_path, f"run.iterations={iterations}", "critic.lora={rank: 4, alpha: 8}")
    killed: list[int] = []
    thread = kill_after(config, "rollout-0", after_rows=2, killed=killed)
    summary = fit(config)
    thread.join(timeout=10)
    assert killed, "the engine was never killed"
    rows = check_every_batch_complete(config, iterations)
    assert [row["policy/version"] for row in rows] == list(range(1, iterations + 1))
    assert rows[-1]["rollout/worker_failures"] == 1 and rows[-1]["rollout/workers_active"] == 1
    assert summary["samples"] == config.samples_per_iteration * iterations


def test_a_reward_that_is_not_finite_stops_the_run_and_keeps_the_samples(ray_session, tmp_path):
    from jobs.roles import RewardFailure

    config = tiny_run_config(tmp_path, "reward.function=tests.user_reward:not_a_number")
    trainer = PPOTrainer(config)
    try:
        # The evaluation before training already asks the reward: the run stops before anything trains.
        with pytest.raises(RewardFailure, match=r"the evaluation at iteration 0: .*not_a_number returned nan for "
                                                r"response 0") as raised:
            trainer.fit()
    finally:
        trainer.shutdown()
    [written] = tmp_path.glob("reward_failure_iter_000000.jsonl")
    assert str(written) in str(raised.value)
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) == config.data.eval_prompts * config.data.eval_samples_per_prompt
    assert {"prompt", "response", "metadata"} <= rows[0].keys()
    assert not (tmp_path / "metrics.jsonl").exists() or read_metrics(tmp_path / "metrics.jsonl") == []


def test_a_peers_task_error_restarts_the_roles_only_when_a_process_died(ray_session, tmp_path):
    # A learner rank dies: a surviving rank's RayTaskError can reach the driver before the dead one's
    # RayActorError. It is a role's failure (restart from the checkpoint) when a process died, else a bug to raise.
    from ray.exceptions import RayTaskError

    from actors.group import ActorGroup
    from jobs.supervision import Supervisor
    from relay.placement import Placement
    from tests.live_ray import FailingRank

    def attempt(group: ActorGroup) -> None:
        ray.get(group.actors[0].fail.remote())

    placement = Placement(world_size=2, bundles=[{"CPU": 0.1}] * 2, strategy="PACK", cpus_per_rank=0.1,
                          gpus_per_rank=0.0)
    supervisor = Supervisor(tiny_run_config(tmp_path, "run.max_restarts=1"))
    group = ActorGroup(FailingRank, "rank", placement, namespace="relay-tests", timeout_s=60)
    group.wait_ready()
    calls, torn_down = [], []

    def train() -> dict:
        calls.append(True)
        if len(calls) == 1:
            attempt(group)
        return {"trained": True}

    def fit() -> dict:
        return supervisor.fit(train, lambda: bool(group.dead_ranks()), lambda: torn_down.append(True), "here")

    with pytest.raises(RayTaskError, match="Connection closed by peer"):
        fit()  # every process alive: the error is the run's
    assert group.dead_ranks() == [] and torn_down == []

    calls.clear()
    ray.kill(group.actors[1])
    wait_for(lambda: group.dead_ranks(timeout_s=5) == [1], 30, "rank 1 dead")
    assert fit() == {"trained": True} and len(calls) == 2  # restarted once, and trained
    assert torn_down == [True]  # the roles were torn down for the restart
    group.shutdown()


def test_a_role_that_cannot_be_placed_is_named_after_its_deadline(ray_session):
    # A placement group the cluster cannot hold (after a node loss, say) used to be waited on forever.
    from actors.group import ActorGroup
    from relay.placement import Placement
    from tests.live_ray import FailingRank

    placement = Placement(world_size=1, bundles=[{"CPU": 1000.0}], strategy="PACK", cpus_per_rank=1000.0,
                          gpus_per_rank=0.0)
    with pytest.raises(TimeoutError, match=r"critic-learner: the placement group of its ranks \(\[\{'CPU': 1000\.0\}"
                                           r"\]\) did not answer within run\.call_timeout_s=2 s \(the cluster has"):
        ActorGroup(FailingRank, "critic-learner", placement, namespace="relay-tests", timeout_s=2)
    states = {group["state"] for group in ray.util.placement_group_table().values()}
    assert "PENDING" not in states  # given up: no longer asked of the cluster (or its autoscaler)
