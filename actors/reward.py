"""RewardScorer: one data-parallel rank that scores whole responses with a reward model, a Python function or a
remote HTTP endpoint (relay.rewards). Normalisation and clipping happen in the driver, over the whole batch."""

from __future__ import annotations

import torch

from actors.usage import Usage
from relay.batch import RolloutBatch
from relay.config import RelayConfig
from relay.models import load_model, load_tokenizer, score_in_micro_batches, sequence_scores
from relay.rewards import build_reward_source
from relay.tasks import task_of


class RewardScorer(Usage):
    def __init__(self, config: RelayConfig, rank: int, world_size: int, model_path: str | None = None) -> None:
        """`model_path`: the reward model (type model), which the driver resolves or trains."""
        self.rank = rank
        self.world_size = world_size
        self.section = config.reward
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.section.type == "model":
            assert model_path is not None
            tokenizer = load_tokenizer(model_path)
            self.model = load_model(model_path, "reward", self.section.dtype, tokenizer.pad_token_id)
            self.model = self.model.to(self.device).eval().requires_grad_(False)
        else:
            self.source = build_reward_source(self.section, task_of(config.data), config.data.task)

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """Sequence rewards [b] of this rank's shard."""
        with self.busy("score"):
            if self.section.type == "model":
                shard, real_rows = batch.padded_shard(self.rank, self.world_size)  # never empty
                return score_in_micro_batches(
                    shard, self.section.micro_batch_size,
                    lambda micro: sequence_scores(self.model, micro.to(self.device)).cpu(),
                )[:real_rows]
            shard = batch.shard(self.rank, self.world_size)  # a function or endpoint scores no padding
            return torch.tensor(self.source.score(shard.prompts, shard.responses, shard.metadata),
                                dtype=torch.float32)
