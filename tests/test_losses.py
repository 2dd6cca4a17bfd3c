"""relay.losses: the objectives composed of relay.ppo's terms, each divided by the mini-batch's counts."""

from __future__ import annotations

import pytest
import torch

from relay import ppo
from relay.batch import RolloutBatch
from relay.config import AlgorithmSection
from relay.losses import policy_objective, value_objective


def batch_of(logits: torch.Tensor) -> RolloutBatch:
    rows, length, vocab = logits.shape
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return RolloutBatch(
        query_ids=torch.zeros(rows, 1, dtype=torch.long), query_mask=torch.ones(rows, 1),
        response_ids=torch.randint(0, vocab, (rows, length), generator=generator), response_mask=mask,
        sampler_logprobs=torch.zeros(rows, length), prompts=[""] * rows, responses=[""] * rows,
        metadata=[{}] * rows, policy_version=0,
        old_logprobs=torch.full((rows, length), -1.5), ref_logprobs=torch.full((rows, length), -1.2),
        advantages=torch.randn(rows, length, generator=generator),
        values=torch.randn(rows, length, generator=generator), returns=torch.randn(rows, length, generator=generator),
    )


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes `tensor`'s backward would run."""
    visited, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in visited:
            visited.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {node.name() for node in visited}


def test_the_policy_objective_is_its_terms_and_builds_no_entropy_graph_without_the_bonus():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    batch = batch_of(logits)
    counts = ppo.LossCounts(tokens=8.0, sequences=4.0)  # this batch is half of a mini-batch
    algorithm = AlgorithmSection(kl_placement="loss", kl_estimator="k3", kl_coef=0.1, entropy_coef=0.0,
                                 loss_aggregation="seq_mean_token_sum")
    plain = policy_objective(logits, batch, algorithm, counts)
    assert "LogSoftmaxBackward0" not in graph_nodes(plain.loss)  # entropy_from_logits' softmax: only logged
    logprobs = ppo.token_logprobs(logits, batch.response_ids)
    kl = ppo.kl_penalty(logprobs, batch.ref_logprobs, "k3")
    mask = batch.response_mask
    # seq_mean_token_sum over the mini-batch: the sums of this batch's tokens over the mini-batch's 4 sequences.
    assert plain.figures["losses/kl_ref"].item() == pytest.approx(ppo.masked_sum(kl, mask).item() / 4, rel=1e-6)
    assert plain.loss.item() == pytest.approx(
        plain.figures["losses/policy"].item() + 0.1 * plain.figures["losses/kl_ref"].item(), rel=1e-6)
    entropy = ppo.entropy_from_logits(logits.detach())
    # policy/entropy is a token mean whatever the aggregation: this batch's 4 tokens over the mini-batch's 8.
    assert plain.figures["policy/entropy"].item() == pytest.approx(ppo.masked_sum(entropy, mask).item() / 8)

    bonus = policy_objective(logits, batch, algorithm.model_copy(update={"entropy_coef": 0.5}), counts)
    assert "LogSoftmaxBackward0" in graph_nodes(bonus.loss)
    assert bonus.loss.item() == pytest.approx(plain.loss.item() - 0.5 * ppo.masked_sum(entropy, mask).item() / 4,
                                              rel=1e-6)
    assert all(not value.requires_grad for value in bonus.figures.values())


def test_the_value_objective_is_a_token_mean_over_the_mini_batch():
    values = torch.randn(2, 3, requires_grad=True)
    batch = batch_of(torch.zeros(2, 3, 5))
    objective = value_objective(values, batch, AlgorithmSection(value_clip=None), ppo.LossCounts(tokens=8.0,
                                                                                                 sequences=4.0))
    error = (values.detach() - batch.returns) ** 2
    assert objective.loss.item() == pytest.approx(0.5 * ppo.masked_sum(error, batch.response_mask).item() / 8)
    assert objective.figures["critic/value_error"].item() == pytest.approx(
        ppo.masked_sum(error, batch.response_mask).item() / 8)
