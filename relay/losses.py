"""The learners' objectives, written out with what each term is divided by.

    policy:  loss = surrogate + kl_coef · KL (kl_placement: loss) − entropy_coef · entropy
    critic:  loss = ½ · (clipped) squared value error

Every term is `relay.ppo.aggregate` of per-token values over one `LossCounts`: the real tokens (or sequences) of
the whole mini-batch, across all its micro-batches and ranks. A micro-batch's loss is then its exact share of the
mini-batch's, and the shares' gradients, summed by gradient accumulation and by the ranks' all-reduce (the learner
undoes the averaging DeepSpeed does in both), are the gradient of the mini-batch's objective, whatever the
micro-batch size or the number of ranks. (This is how transformers' Trainer fixed gradient accumulation in 2024,
with `num_items_in_batch`.) The figures returned beside the loss are shares of the mini-batch's in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from relay import ppo
from relay.batch import RolloutBatch
from relay.config import AlgorithmSection


@dataclass(frozen=True)
class Objective:
    loss: Tensor  # [] with its graph: this micro-batch's share of the mini-batch's loss
    figures: dict[str, Tensor]  # name -> [] detached, this micro-batch's share of the mini-batch's figure


def policy_objective(logits: Tensor, batch: RolloutBatch, algorithm: AlgorithmSection,
                     counts: ppo.LossCounts) -> Objective:
    """The policy's loss on `batch`, a micro-batch of the mini-batch that `counts` counts.

    logits [B, Lr, V] (with their graph); `batch` carries old_logprobs, advantages, and ref_logprobs when the KL
    is a loss term, behavior_weights when an older policy sampled it.
    """
    mask = batch.action_mask
    logprobs = ppo.token_logprobs(logits, batch.response_ids)
    surrogate, stats = ppo.policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, algorithm.clip_ratio,
                                       algorithm.loss_aggregation, batch.behavior_weights, counts)
    loss = surrogate
    figures = {"losses/policy": surrogate, "losses/approx_kl": stats.approx_kl, "losses/clipfrac": stats.clipfrac}
    if algorithm.kl_placement == "loss":
        kl = ppo.kl_loss(logprobs, batch.ref_logprobs, mask, algorithm.kl_estimator, algorithm.loss_aggregation,
                         counts)
        loss = loss + algorithm.kl_coef * kl
        figures["losses/kl_ref"] = kl
    if algorithm.entropy_coef:
        token_entropy = ppo.entropy_from_logits(logits)
        loss = loss - algorithm.entropy_coef * ppo.aggregate(token_entropy, mask, algorithm.loss_aggregation, counts)
    else:
        # Only logged: without a graph, which would keep a float32 [B, Lr, V] softmax alive until the backward.
        with torch.no_grad():
            token_entropy = ppo.entropy_from_logits(logits)
    figures["policy/entropy"] = ppo.aggregate(token_entropy.detach(), mask, "token_mean", counts)
    figures["losses/policy_total"] = loss  # surrogate with the KL term and the entropy bonus
    return Objective(loss, {name: value.detach() for name, value in figures.items()})


def value_objective(values: Tensor, batch: RolloutBatch, algorithm: AlgorithmSection,
                    counts: ppo.LossCounts) -> Objective:
    """The critic's loss on `batch`, a micro-batch of the mini-batch that `counts` counts: the token mean of the
    (clipped) squared error against `batch.returns`. values [B, Lr] (with their graph)."""
    mask = batch.action_mask
    loss, stats = ppo.value_loss(values, batch.values, batch.returns, mask, algorithm.value_clip, counts)
    error = ppo.aggregate((values.detach() - batch.returns) ** 2, mask, "token_mean", counts)
    return Objective(loss, {"losses/value": loss.detach(), "critic/value_clipfrac": stats.clipfrac,
                            "critic/value_error": error})
