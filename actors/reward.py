"""RewardScorer: one data-parallel rank that scores whole responses, with a reward model or a Python function."""

from __future__ import annotations

import torch

from relay.batch import RolloutBatch
from relay.config import RelayConfig
from relay.models import load_model, load_tokenizer, score_in_micro_batches, sequence_scores
from relay.tasks import RewardFunction, get_task, load_object


def reward_function(config: RelayConfig) -> RewardFunction:
    """`reward.function` when set, else the task's own reward."""
    if config.reward.function:
        return load_object(config.reward.function, "reward.function")
    return get_task(config.data.task).reward


class RewardScorer:
    def __init__(self, config: RelayConfig, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.section = config.reward
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.section.type == "model":
            tokenizer = load_tokenizer(self.section.model)
            self.model = load_model(self.section.model, "reward", self.section.dtype, tokenizer.pad_token_id)
            self.model = self.model.to(self.device).eval().requires_grad_(False)
        else:
            self.function = reward_function(config)

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """Sequence rewards [b] of this rank's shard, clipped to ±reward.clip when set."""
        shard = batch.shard(self.rank, self.world_size)
        if self.section.type == "model":
            rewards = score_in_micro_batches(
                shard, self.section.micro_batch_size, lambda micro: sequence_scores(self.model, micro.to(self.device)).cpu()
            )
        else:
            scores = self.function(shard.prompts, shard.responses, shard.metadata)
            if len(scores) != len(shard):
                raise ValueError(f"reward function returned {len(scores)} scores for {len(shard)} responses")
            rewards = torch.tensor(scores, dtype=torch.float32)
        if self.section.clip is not None:
            rewards = rewards.clamp(-self.section.clip, self.section.clip)
        return rewards
