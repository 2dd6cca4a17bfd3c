"""Where the driver's batches come from: the prompt cursor, sampling on the vLLM fleet, dynamic sampling, and
generating the next batch while this one trains (rollout.generate_ahead).

The source hands each iteration a `Rollout`: a RolloutBatch whose tokens carry the policy version that sampled
them and the mask of what the policy wrote. Its state is the data position (`position`, saved in the checkpoint:
with a batch generated ahead, the position before its prompts, which are drawn again on resume with the same
seeds from the same weights).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from actors.rollout import RolloutFleet, Sample
from relay import ppo
from relay.batch import RolloutBatch, concat_batches, pad_left, pad_right, request_seeds
from relay.config import RelayConfig
from relay.prompts import Prompt, PromptData
from jobs.episode_source import EpisodeSource

# Scores a batch's rewards [B] at an iteration (the reward actors'), for dynamic sampling.
ScoreRewards = Callable[[RolloutBatch, int], torch.Tensor]


@dataclass
class Rollout:
    """One iteration's samples, and what generating them measured."""

    batch: RolloutBatch
    rewards: torch.Tensor | None  # scored already (dynamic sampling), else None
    generate_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # the sampling's own (sampling/*)


@dataclass
class _Ahead:
    rollout: Future[Rollout]
    position: tuple[int, int]  # (data epoch, cursor) before its prompts were drawn


class RolloutSource:
    def __init__(self, config: RelayConfig, data: PromptData, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config, self.data, self.tokenizer = config, data, tokenizer
        self.fleet: RolloutFleet | None = None  # started by `start`, before the other roles
        self.episodes: EpisodeSource | None = None  # a multi-turn run's: its environment actors
        self.epoch = self.cursor = 0  # the data position: the next prompt is the cursor-th of the epoch's order
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)
        self._ahead: _Ahead | None = None
        self._generator = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-ahead")
                           if config.rollout.generate_ahead else None)

    def start(self, model_path: str) -> RolloutFleet:
        """The engines on `model_path`, and a multi-turn run's environment actors."""
        self.fleet = RolloutFleet(self.config, model_path)
        if self.config.env is not None:
            self.episodes = EpisodeSource(self.config, self.tokenizer, self.fleet)
        return self.fleet

    # ---------------------------------------------------------------- batches
    def next(self, iteration: int, policy_version: int, score_rewards: ScoreRewards) -> Rollout:
        """`iteration`'s batch: generated ahead during the last iteration, or now. With rollout.generate_ahead the
        next iteration's starts at once, on the engines' current weights, while this one scores and trains."""
        ahead, self._ahead = self._ahead, None
        rollout = ahead.rollout.result() if ahead is not None else self._sample(iteration, policy_version,
                                                                                  score_rewards)
        if self._generator is not None and iteration < self.config.run.iterations:
            position = self.position
            prompts = self.next_prompts(self.config.data.prompts_per_iteration)
            self._ahead = _Ahead(self._generator.submit(self._timed, prompts, iteration + 1, policy_version),
                                 position)
        return rollout

    def wait_ahead(self) -> None:
        """Until the batch generating ahead is in: the fleet is the generator thread's until then, so the weight
        sync, an evaluation, scaling and shutdown wait here."""
        if self._ahead is not None:
            wait_for_futures([self._ahead.rollout])

    def drop_ahead(self) -> None:
        """Forget the batch generated ahead (a restart regenerates it from the checkpoint's position)."""
        self.wait_ahead()
        self._ahead = None

    @property
    def generating_ahead(self) -> bool:
        return self._ahead is not None

    def _timed(self, prompts: list[Prompt], iteration: int, policy_version: int) -> Rollout:
        started = time.monotonic()
        batch, metrics = self._generate(prompts, self.config.rollout.samples_per_prompt, self.config.run.seed,
                                        iteration, policy_version)
        return Rollout(batch, None, time.monotonic() - started, metrics)

    def _sample(self, iteration: int, policy_version: int, score_rewards: ScoreRewards) -> Rollout:
        """This iteration's batch, sampled now; its rewards too with dynamic sampling.

        With algorithm.dynamic_sampling (DAPO, Yu et al. 2025), a prompt whose samples all got the same reward
        teaches a group-based estimator nothing: it is dropped and more prompts are sampled, up to
        algorithm.max_sampling_rounds rounds; if the batch is still short, dropped groups fill it (advantage 0).
        """
        config, algorithm = self.config, self.config.algorithm
        if not algorithm.dynamic_sampling:
            return self._timed(self.next_prompts(config.data.prompts_per_iteration), iteration, policy_version)
        started = time.monotonic()
        prompts_needed, group_size = config.data.prompts_per_iteration, config.rollout.samples_per_prompt
        kept: list[tuple[RolloutBatch, torch.Tensor]] = []
        dropped: list[tuple[RolloutBatch, torch.Tensor]] = []
        seen = kept_groups = 0
        for round_index in range(algorithm.max_sampling_rounds):
            batch = self.generate(self.next_prompts(prompts_needed), group_size, config.run.seed, iteration,
                                  policy_version, round_index)
            rewards = score_rewards(batch, iteration)
            uniform = ppo.zero_variance_groups(rewards, group_size).repeat_interleave(group_size)
            kept.append((batch.select(torch.nonzero(~uniform).flatten()), rewards[~uniform]))
            dropped.append((batch.select(torch.nonzero(uniform).flatten()), rewards[uniform]))
            seen += prompts_needed
            kept_groups += int((~uniform).sum()) // group_size
            if kept_groups >= prompts_needed:
                break
        parts = kept + dropped  # dropped groups only fill what the kept ones leave short
        batch = concat_batches([part for part, _ in parts if len(part)], self.tokenizer.pad_token_id)
        rewards = torch.cat([part for _, part in parts])
        rows = torch.arange(prompts_needed * group_size)
        metrics = {"sampling/dropped_share": 1.0 - min(kept_groups, prompts_needed) / seen,
                   "sampling/rounds": float(round_index + 1)}
        return Rollout(batch.select(rows), rewards[rows], time.monotonic() - started, metrics)

    def generate(self, prompts: list[Prompt], samples_per_prompt: int, seed: int, iteration: int,
                 policy_version: int, round_index: int = 0) -> RolloutBatch:
        """`samples_per_prompt` samples of each prompt on the fleet, seeded by (seed, iteration, prompt, round):
        single answers, or a multi-turn run's episodes."""
        return self._generate(prompts, samples_per_prompt, seed, iteration, policy_version, round_index)[0]

    def _generate(self, prompts: list[Prompt], samples_per_prompt: int, seed: int, iteration: int,
                  policy_version: int, round_index: int = 0) -> tuple[RolloutBatch, dict[str, float]]:
        """The batch and what its sampling measured (an environment's figures)."""
        assert self.fleet is not None, "start the fleet first"
        seeds = request_seeds(seed, iteration, len(prompts), round_index)
        if self.episodes is not None:
            return self.episodes.run(prompts, samples_per_prompt, seeds, policy_version)
        per_prompt = self.fleet.generate([prompt.ids for prompt in prompts], samples_per_prompt,
                                         self.config.rollout.temperature, seeds)
        return self._batch(prompts, per_prompt, policy_version), {}

    def _batch(self, prompts: list[Prompt], per_prompt: list[list[Sample]], policy_version: int) -> RolloutBatch:
        rows = [(prompt, sample) for prompt, samples in zip(prompts, per_prompt, strict=True) for sample in samples]
        pad_id = self.tokenizer.pad_token_id
        query_ids, query_mask = pad_left([prompt.ids for prompt, _ in rows], pad_id)
        response_ids, response_mask = pad_right([s.token_ids for _, s in rows], pad_id, torch.long)
        sampler_logprobs, _ = pad_right([s.logprobs for _, s in rows], 0.0, torch.float32)
        return RolloutBatch(
            query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
            sampler_logprobs=sampler_logprobs,
            prompts=[prompt.text for prompt, _ in rows],
            responses=self.tokenizer.batch_decode([s.token_ids for _, s in rows], skip_special_tokens=True),
            metadata=[prompt.metadata for prompt, _ in rows],
            policy_version=policy_version,
        )

    # ---------------------------------------------------------------- the data position
    def next_prompts(self, count: int) -> list[Prompt]:
        """The next `count` training prompts, in an order reshuffled every epoch (prompts dropped as too long, or
        skipped as malformed, are passed over)."""
        train = self.data.train
        chosen: list[Prompt] = []
        while len(chosen) < count:
            if self._order_epoch != self.epoch:
                generator = torch.Generator().manual_seed(self.config.data.seed + self.epoch)
                self._order, self._order_epoch = torch.randperm(len(train), generator=generator), self.epoch
            prompt = train.get(int(self._order[self.cursor]))
            if prompt is not None:
                chosen.append(prompt)
            self.cursor += 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return chosen


    @property
    def position(self) -> tuple[int, int]:
        """(data epoch, cursor) as a checkpoint keeps it: before the prompts of a batch generating ahead."""
        return self._ahead.position if self._ahead is not None else (self.epoch, self.cursor)

    @position.setter
    def position(self, position: tuple[int, int]) -> None:
        self.drop_ahead()
        self.epoch, self.cursor = position

    def shutdown(self) -> None:
        """The fleet gone (after the batch generating ahead, whose thread uses it); the source can start again."""
        self.drop_ahead()
        if self.episodes is not None:
            self.episodes.shutdown()
            self.episodes = None
        if self.fleet is not None:
            self.fleet.shutdown()
            self.fleet = None

    def close(self) -> None:
        self.shutdown()
        if self._generator is not None:
            self._generator.shutdown()
