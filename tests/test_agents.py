"""Tier 2, agents: multi-turn episodes of a user's environment (tests/user_env.py) on the tiny model through real
Ray actors and vLLM, then PPO and GRPO on them through the whole driver."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from actors.group import ActorGroup
from actors.reference import Reference
from actors.rollout import RolloutFleet
from jobs.episode_source import EnvFailure, EpisodeSource
from relay.envs import EnvContractError
from relay.metrics import read_metrics
from relay.models import load_tokenizer
from relay.placement import role_placement
from relay.prompts import load_prompt_data
from tests.conftest import tiny_run_config
from tests.live_ray import train_to_end as run, wait_for

pytestmark = pytest.mark.slow

ENV = ["env.name=tests.user_env:DigitGame", "env.kwargs={turns: 3}", "reward=null", "rollout.max_new_tokens=6"]


@pytest.fixture(scope="module")
def fleet(ray_session, tiny_model, tmp_path_factory):
    config = tiny_run_config(tmp_path_factory.mktemp("agents"), *ENV)
    fleet = RolloutFleet(config, str(tiny_model))
    wait_for(lambda: fleet.join_ready() + len(fleet.active) == 1, 300, "the rollout engine to join")
    yield fleet
    fleet.shutdown()


def play(fleet, tiny_model, tmp_path, *overrides, prompts=8, samples=2):
    """A batch of episodes of the env the overrides name, as the driver's rollout source plays it."""
    config = tiny_run_config(tmp_path, *ENV, *overrides)
    tokenizer = load_tokenizer(str(tiny_model))
    data = load_prompt_data(config, tokenizer)
    source = EpisodeSource(config, tokenizer, fleet)  # its own environment actors, of the env `overrides` name
    try:
        return source.run([data.train.get(i) for i in range(prompts)], samples, list(range(prompts)), 0), source
    finally:
        source.shutdown()


def test_episodes_are_token_in_token_out_and_the_learner_agrees_with_the_sampler(fleet, tiny_model, tmp_path):
    (batch, figures), source = play(fleet, tiny_model, tmp_path, "env.num_actors=2")
    tokenizer = source.tokenizer
    assert figures["env/errors"] == 0 and figures["env/turns_mean"] > 1
    for row in range(len(batch)):
        mask, real = batch.action_mask[row], batch.response_mask[row].bool()
        ids = batch.response_ids[row][real].tolist()
        actions = mask[real].tolist()
        # The response alternates the model's turns and the env's `N=` observations, each tokenised once.
        observations = [tokenizer.decode(part) for part in split_runs(ids, actions, 0.0)]
        assert all(len(text) == 2 and text[0].isdigit() and text[1] == "=" for text in observations)
        # Each step reward sits on the last token of its action: that token is an action token and the next one
        # is an observation's (or the episode's end).
        for position in torch.nonzero(batch.step_rewards[row]).flatten().tolist():
            assert actions[position] == 1.0 and (position + 1 == len(actions) or actions[position + 1] == 0.0)
        assert torch.all(batch.sampler_logprobs[row][mask == 0] == 0)
    # The learner's log-probs of the action tokens equal the sampler's, as for single answers (atol 1e-4).
    config = tiny_run_config(tmp_path, *ENV)
    reference = ActorGroup(Reference, "agents-reference", role_placement(config, "reference"),
                           namespace=config.actor_namespace, config=config, model_path=str(tiny_model))
    try:
        logprobs = torch.cat(ray.get(reference.call("score", ray.put(batch))))
    finally:
        reference.shutdown()
    actions = batch.action_mask.bool()
    assert actions.sum() > batch.action_mask.shape[0]  # several action tokens per episode
    assert torch.allclose(logprobs[actions], batch.sampler_logprobs[actions], atol=1e-4)


def split_runs(ids: list[int], mask: list[float], value: float) -> list[list[int]]:
    """The maximal runs of `ids` whose mask is `value`."""
    runs: list[list[int]] = []
    for token, flag in zip(ids, mask):
        if flag == value:
            if not runs or runs[-1] is None:
                runs.append([])
            runs[-1].append(token)
        elif runs and runs[-1] is not None:
            runs.append(None)  # type: ignore[arg-type]
    return [run for run in runs if run]


def test_an_async_env_plays_the_same_contract(fleet, tiny_model, tmp_path):
    (batch, figures), _ = play(fleet, tiny_model, tmp_path, "env.name=tests.user_env:AsyncDigitGame")
    assert figures["env/errors"] == 0 and figures["env/turns_mean"] > 1 and figures["time/env_step"] > 0
    assert batch.step_rewards.sum() > 0


def test_an_env_that_raises_hangs_or_answers_garbage(fleet, tiny_model, tmp_path):
    # Raising: every episode ends at its first step with reward 0, counted; within the error budget the batch is in.
    (batch, figures), _ = play(fleet, tiny_model, tmp_path, "env.name=tests.user_env:RaisingGame",
                               "env.max_error_rate=1.0", prompts=2)
    assert figures["env/errors"] == len(batch) == 4 and batch.step_rewards.abs().sum() == 0
    with pytest.raises(EnvFailure, match=r"env tests.user_env:RaisingGame: 4 of 4 episodes failed, more than "
                                         r"env.max_error_rate=0.1; the last: RuntimeError: the game server is down"):
        play(fleet, tiny_model, tmp_path, "env.name=tests.user_env:RaisingGame", prompts=2)
    # Hanging: the step outlasts env.timeout_s, and the episode ends on a timeout.
    (_, figures), _ = play(fleet, tiny_model, tmp_path, "env.name=tests.user_env:HangingGame", "env.timeout_s=1",
                           "env.max_error_rate=1.0", prompts=1)
    assert figures["env/errors"] == 2
    # Garbage: the env broke the contract; the run stops naming it, the engine is not blamed.
    with pytest.raises(EnvContractError, match=r"env tests.user_env:GarbageGame: step returned a str"):
        play(fleet, tiny_model, tmp_path, "env.name=tests.user_env:GarbageGame", prompts=1)
    assert fleet.failures == 0 and len(fleet.active) == 1


def test_an_env_actor_killed_mid_batch_is_replaced_and_its_episodes_redone(fleet, tiny_model, tmp_path):
    config = tiny_run_config(tmp_path, *ENV, "env.name=tests.user_env:SlowDigitGame", "env.num_actors=2")
    tokenizer = load_tokenizer(str(tiny_model))
    data = load_prompt_data(config, tokenizer)
    source = EpisodeSource(config, tokenizer, fleet)
    doomed = source.pool.actors[0]
    killer = threading.Timer(1.0, lambda: ray.kill(doomed))
    killer.start()
    try:
        started = time.monotonic()
        batch, figures = source.run([data.train.get(i) for i in range(4)], 2, list(range(4)), 0)
        assert time.monotonic() - started > 1.0  # the kill came while episodes were being played
        assert doomed not in source.pool.actors and len(source.pool.actors) == 2
        assert figures["env/errors"] == 0 and figures["env/turns_mean"] == 3.0 and len(batch) == 8
    finally:
        killer.cancel()
        source.shutdown()


def test_ppo_trains_on_episodes_and_resumes_exactly(ray_session, tmp_path):
    import shutil

    overrides = [*ENV, "run.checkpoint_every=1", "run.eval_every=1"]
    straight = run(tiny_run_config(tmp_path, *overrides))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2]
    assert all("env/turns_mean" in row and "time/env_step" in row and "losses/value" in row for row in rows)
    assert straight["eval_metric"] == "episode return in env tests.user_env:DigitGame"
    assert straight["eval_score_after"] is not None and straight["eval_score_after"] > 0
    # A crash after iteration 1's checkpoint: the resumed run trains iteration 2 again, bitwise as it was.
    shutil.rmtree(tmp_path / "checkpoints" / "iter_000002")
    (tmp_path / "summary.json").unlink()
    resumed = run(tiny_run_config(tmp_path, *overrides))
    assert resumed["eval_score_after"] == straight["eval_score_after"]

    def numbers(row):
        return {name: value for name, value in row.items() if not name.startswith(("time/", "perf/"))}

    assert [numbers(row) for row in read_metrics(tmp_path / "metrics.jsonl")] == [numbers(row) for row in rows]


def test_grpo_trains_on_an_async_envs_episodes_and_relay_eval_plays_them_again(ray_session, tmp_path):
    from jobs.evaluate import main as evaluate_main

    summary = run(tiny_run_config(tmp_path, *ENV, "env.name=tests.user_env:AsyncDigitGame",
                                  "algorithm.advantage=grpo", "run.iterations=1"))
    [row] = read_metrics(tmp_path / "metrics.jsonl")
    assert row["env/turns_mean"] == 3.0 and "losses/value" not in row
    # relay eval plays the held-out episodes in the same env, as the run's last evaluation did: the same score.
    report = evaluate_main(["--config", str(tmp_path / "config.yaml"), str(tmp_path),
                            "--output", str(tmp_path / "eval" / "eval.json")])
    assert report["results"][str(tmp_path)]["eval/score"] == summary["eval_score_after"] == row["eval/score"]
    assert "eval/reward" not in report["results"][str(tmp_path)]  # no reward source: the return is the score


