"""Reference: the frozen initial policy, one data-parallel rank of it. Gives log-probs for the KL penalty (and, in
`relay eval`, a frozen checkpoint's log-probs)."""

from __future__ import annotations

import torch

from actors.usage import Usage
from relay import ppo
from relay.batch import RolloutBatch
from relay.config import RelayConfig
from relay.models import load_model, response_logits, score_in_micro_batches


class Reference(Usage):
    def __init__(self, config: RelayConfig, model_path: str, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.temperature = config.rollout.temperature
        self.micro_batch_size = config.reference.micro_batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, "causal_lm", config.reference.dtype).to(self.device).eval()
        self.model.requires_grad_(False)

    def score(self, batch: RolloutBatch, temperature: float | None = None) -> torch.Tensor:
        """Reference log-probs [b, Lr] of this rank's shard of the batch, at the sampler's temperature unless one is
        given."""
        shard, real_rows = batch.padded_shard(self.rank, self.world_size)  # never empty

        def logprobs(micro: RolloutBatch) -> torch.Tensor:
            micro = micro.to(self.device)
            logits = response_logits(self.model, micro, temperature or self.temperature)
            return ppo.token_logprobs(logits, micro.response_ids).cpu()

        with self.busy("score"):
            return score_in_micro_batches(shard, self.micro_batch_size, logprobs)[:real_rows]
