"""The driver's rooms without Ray: the rollout source over a stand-in fleet, the estimators' table, the run's
record. (Through real roles, tests/test_e2e.py.)"""

from __future__ import annotations

import json
import typing

import pytest
import torch

from actors.rollout import Sample
from jobs.record import DriverState, RunRecord
from jobs.rollout_source import RolloutSource
from relay.batch import RolloutBatch, concat_batches
from relay.config import AlgorithmSection
from relay.estimators import ESTIMATORS
from relay.models import build_tokenizer
from relay.prompts import data_alphabet, load_prompt_data
from tests.conftest import tiny_run_config


class StandInFleet:
    """Answers each prompt with 1 to 3 of its own first tokens."""

    def __init__(self) -> None:
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True

    def generate(self, prompts: list[list[int]], samples_per_prompt: int, temperature: float,
                 seeds: list[int]) -> list[list[Sample]]:
        return [[Sample(token_ids=prompt[: 1 + index % 3], logprobs=[-0.5] * (1 + index % 3))
                 for index in range(samples_per_prompt)] for prompt in prompts]


def source_of(tmp_path, *overrides: str) -> RolloutSource:
    config = tiny_run_config(tmp_path, *overrides)
    tokenizer = build_tokenizer(data_alphabet(config), config.chat_template)
    source = RolloutSource(config, load_prompt_data(config, tokenizer), tokenizer)
    source.fleet = StandInFleet()  # type: ignore[assignment]
    return source


def no_rewards(batch: RolloutBatch, iteration: int) -> torch.Tensor:
    raise AssertionError("only dynamic sampling scores while it samples")


def test_a_source_resumed_at_its_position_draws_the_same_prompts(tmp_path):
    straight = source_of(tmp_path)
    batches = [straight.next(iteration, 0, no_rewards).batch.prompts for iteration in (1, 2, 3)]
    resumed = source_of(tmp_path)
    resumed.next(1, 0, no_rewards)
    position = resumed.position
    again = source_of(tmp_path)
    again.position = position
    assert [again.next(iteration, 0, no_rewards).batch.prompts for iteration in (2, 3)] == batches[1:]
    assert len(set(batches[0]) & set(batches[1])) < len(set(batches[0]))  # the cursor moves on


def test_generating_ahead_keeps_the_position_before_the_batch_in_flight(tmp_path):
    source = source_of(tmp_path, "rollout.generate_ahead=true", "run.iterations=3")
    per_batch = source.config.data.prompts_per_iteration
    first = source.next(1, 0, no_rewards)
    assert source.generating_ahead and source.position == (0, per_batch)  # iteration 2's prompts are in flight
    source.wait_ahead()
    second = source.next(2, 1, no_rewards)
    assert second.batch.policy_version == 0  # generated on the weights iteration 1 trained from
    assert first.batch.prompts != second.batch.prompts
    source.next(3, 2, no_rewards)
    assert not source.generating_ahead and source.position == (0, 3 * per_batch)  # nothing ahead of the last
    fleet = source.fleet
    source.close()
    assert fleet.shut_down and source.fleet is None


def test_dynamic_sampling_keeps_the_groups_that_teach_and_fills_with_the_rest(tmp_path):
    source = source_of(tmp_path, "algorithm.advantage=grpo", "algorithm.dynamic_sampling=true",
                       "algorithm.max_sampling_rounds=2", "critic.resources.cpus_per_rank=1")
    group = source.config.rollout.samples_per_prompt
    rounds = []

    def rewards(batch: RolloutBatch, iteration: int) -> torch.Tensor:
        rounds.append(len(batch))
        # Every other prompt's samples all score alike: half the groups teach nothing.
        return torch.tensor([float(row % group if (row // group) % 2 else 1.0) for row in range(len(batch))])

    rollout = source.next(1, 0, rewards)
    assert len(rounds) == 2 and len(rollout.batch) == len(rollout.rewards) == rounds[0]
    assert rollout.metrics == {"sampling/dropped_share": 0.5, "sampling/rounds": 2.0}  # of the prompts seen
    assert (rollout.rewards.view(-1, group).std(dim=1) > 0).all()  # two rounds of half: every group teaches


def test_a_batch_of_answers_is_all_action_and_keeps_its_versions_when_concatenated(tmp_path):
    source = source_of(tmp_path)
    prompts = [source.data.train.get(i) for i in range(2)]
    old = source.generate(prompts, 2, seed=0, iteration=1, policy_version=3)
    new = source.generate(prompts, 3, seed=0, iteration=1, policy_version=5)
    assert torch.equal(old.action_mask, old.response_mask)
    assert torch.equal(old.token_versions, torch.full_like(old.response_ids, 3))
    both = concat_batches([old, new], source.tokenizer.pad_token_id)
    assert both.policy_version == 3 and both.token_versions[len(old):, 0].tolist() == [5] * len(new)
    assert torch.equal(both.action_mask, both.response_mask)


def test_every_advantage_setting_has_an_estimator():
    choices = typing.get_args(AlgorithmSection.model_fields["advantage"].annotation)
    assert set(ESTIMATORS) == set(choices)
    mask = torch.ones(4, 3)
    with pytest.raises(ValueError, match="gae needs the critic's values"):
        ESTIMATORS["gae"](torch.zeros(4, 3), None, mask, AlgorithmSection(), 2)
    advantages, returns = ESTIMATORS["rloo"](torch.tensor([[0.0, 0, 1], [0, 0, 0], [0, 0, 2], [0, 0, 0]]), None,
                                             mask, AlgorithmSection(), 2)
    assert returns is None and advantages[:, 0].tolist() == [1.0, -1.0, 2.0, -2.0]


def test_a_checkpoint_is_written_whole_and_a_complete_run_is_read_back(tmp_path):
    config = tiny_run_config(tmp_path, "run.keep_checkpoints=1", "run.iterations=2")
    record = RunRecord(config, tmp_path)
    assert record.prepare() is None and (tmp_path / "config.yaml").exists()

    def learners_fail(directory):
        (directory / "policy").mkdir()
        raise RuntimeError("a learner died mid-save")

    with pytest.raises(RuntimeError):
        record.save_checkpoint(1, DriverState(iteration=1), learners_fail)
    assert not record.checkpoint_path(1).exists()  # only a .partial directory, which is no checkpoint
    for iteration in (1, 2):
        record.save_checkpoint(iteration, DriverState(iteration=iteration), lambda d: (d / "policy").mkdir())
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["iter_000002"]  # pruned to 1
    assert record.completed_summary() is None  # no summary yet: it is written last
    (tmp_path / "summary.json").write_text(json.dumps({"iterations": 2}))
    assert record.completed_summary() == {"iterations": 2}
