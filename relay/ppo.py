"""PPO math for language-model policies: pure tensor functions, no I/O, no model code.

Conventions used throughout:

- ``B`` is the batch size, ``L`` the (padded) response length, ``V`` the vocabulary size.
- Responses are right-padded. ``response_mask`` [B, L] is 1.0 on real response tokens
  (including the final EOS) and 0.0 on padding, so row ``b`` has its real tokens at
  positions ``0 .. response_mask[b].sum() - 1``.
- Per-token outputs are 0 on padding positions, and whatever sits in padded positions of an
  input never reaches a real position of an output.
- Everything is computed in float32, whatever the dtype of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under its logits.

    logits [B, L, V], labels [B, L] (long) -> log p(labels) [B, L], float32.
    """
    rows = []
    # Row by row: when scoring (no autograd), only one row of logits is up-cast to float32 at
    # a time, and a full [B, L, V] float32 copy of bf16 logits is often the largest tensor of a
    # step. In training, autograd keeps every row's float32 copy for the backward all the same.
    for row_logits, row_labels in zip(logits, labels):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position.

    logits [B, L, V] -> entropy [B, L], float32 (nats).
    """
    rows = []
    # Row by row, as token_logprobs, for the same memory reason.
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.stack(rows)


def zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` (as float32) where ``mask`` is 1, and 0 elsewhere. Selected with ``where``, not multiplied:
    a NaN or inf in padding stays out (NaN * 0 is NaN), and so does its gradient when this is applied to the
    inputs of a nonlinearity, before it can overflow in padding."""
    return torch.where(mask.bool(), values.float(), 0.0)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1: over everything ([]), or along ``dim``."""
    masked = zero_padding(values, mask)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1: over everything ([]), or along ``dim``.

    An empty mask gives 0 rather than NaN, so a fully padded row or batch yields a zero loss.
    """
    count = mask.float().sum() if dim is None else mask.float().sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all entries where ``mask`` is 1 -> [].

    With ``unbiased`` and fewer than two entries the variance is undefined; 0 is returned.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values.float() - mean) ** 2, mask)
    if unbiased:
        count = mask.float().sum()
        # clamp keeps counts 0 and 1 finite: the biased variance there is already 0.
        variance = variance * count / (count - 1.0).clamp(min=1.0)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` [B, L] to mean 0 and variance 1 over all masked entries of the batch.

    With ``shift_mean=False`` only the scale changes (the mean is added back). Padding -> 0.
    """
    mean = masked_mean(values, mask)
    whitened = (values.float() - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy.

    logprobs, ref_logprobs [B, L] -> [B, L]. With log_ratio = logprobs - ref_logprobs
    (Schulman, http://joschu.net/blog/kl-approx.html):
    k1 = log_ratio (unbiased, high variance, can be negative);
    k2 = 0.5 * log_ratio**2 (biased, low variance, >= 0);
    k3 = exp(-log_ratio) - 1 + log_ratio (unbiased, low variance, >= 0).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")


def token_rewards(
    sequence_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every real token plus the sequence reward on the last one.

    sequence_rewards [B]; logprobs, ref_logprobs, response_mask [B, L].
    Returns (rewards [B, L], kl [B, L]) with rewards = -kl_coef * kl, and
    ``sequence_rewards[b]`` added at the row's last masked index (``response_mask[b].sum() - 1`` when its tokens
    are contiguous from 0; in a multi-turn episode the mask is the action mask, and the last action ends it). Both
    are 0 where the mask is. A row with no real tokens gets no reward anywhere (all zeros).
    """
    mask = response_mask.float()
    kl = zero_padding(kl_penalty(zero_padding(logprobs, mask), zero_padding(ref_logprobs, mask), kl_estimator), mask)
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1).long()
    last = (mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)).unsqueeze(1)
    # Zeroing the reward of empty rows, rather than indexing them, keeps this free of a host sync.
    score = (sequence_rewards.float() * (lengths > 0)).unsqueeze(1)
    return rewards.scatter_add(1, last, score), kl


def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over right-padded rows.

    rewards, values, response_mask [B, L]. The episode ends after the last real token, so the
    value after it is 0. Returns (advantages [B, L], returns [B, L]), returns = advantages + values;
    both 0 on padding.
    """
    mask = response_mask.float()
    # Zeroed padding makes next_value at the last real token 0, and keeps the running
    # advantage at 0 while the scan crosses the padding.
    rewards = zero_padding(rewards, mask)
    values = zero_padding(values, mask)
    length = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = zero_padding(advantages, mask)
    return advantages, zero_padding(advantages + values, mask)


def grpo_advantages(rewards: Tensor, group_size: int, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024): each sample's reward relative to the other samples of its prompt.

    rewards [B], B = prompts × group_size, each prompt's samples contiguous -> advantages [B]:
    A_i = (r_i - mean_g) / (std_g + eps) with std_g the group's unbiased standard deviation, or
    A_i = r_i - mean_g without the division (``norm_by_std=False``, as Dr. GRPO, Liu et al. 2025).
    A group whose rewards are all equal gets 0 everywhere: it carries no signal.
    """
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): each sample's baseline is the mean reward of the other samples of its prompt.

    rewards [B], B = prompts × group_size (>= 2), each prompt's samples contiguous -> advantages [B]:
    A_i = r_i - (sum_g - r_i) / (group_size - 1) = group_size / (group_size - 1) * (r_i - mean_g).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (rollout.samples_per_prompt)")
    groups = rewards.float().view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """Per-token returns G_t = sum_{k >= t} gamma^(k - t) r_k within each right-padded row.

    token_rewards, response_mask [B, L] -> returns [B, L], 0 on padding.
    """
    rewards = zero_padding(token_rewards, response_mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return zero_padding(returns, response_mask)


def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025): per-token returns of the rewards with the KL penalty in them (``token_rewards`` as
    ``token_rewards()`` gives them), whitened over every real token of the batch: no critic, no groups.

    token_rewards, response_mask [B, L] -> advantages [B, L], 0 on padding.
    """
    return masked_whiten(discounted_returns(token_rewards, response_mask, gamma), response_mask)


def sequence_to_tokens(sequence_values: Tensor, response_mask: Tensor) -> Tensor:
    """A value per sequence [B] on each of its real tokens [B, L] (0 on padding)."""
    return zero_padding(sequence_values.float().unsqueeze(1).expand_as(response_mask), response_mask)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[prompts] bool: the groups whose samples all got the same reward (no signal for group-based estimators)."""
    groups = rewards.float().view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


LossAggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]


@dataclass(frozen=True)
class LossCounts:
    """What a mini-batch's losses are divided by: its real tokens and its sequences, counted over all of it.

    A mini-batch is trained in micro-batches (for memory) on several ranks (data parallel); a loss divided by
    one micro-batch's own count would change with the micro-batch size and the number of ranks. The learner
    counts the whole mini-batch once (an all-reduce) and every micro-batch divides its sum by that.
    """

    tokens: float  # real response tokens of the whole mini-batch
    sequences: float  # its rows

    @classmethod
    def of(cls, response_mask: Tensor) -> LossCounts:
        """The counts of one batch [B, L] taken as the whole mini-batch."""
        return cls(tokens=float(response_mask.float().sum()), sequences=float(response_mask.shape[0]))


def aggregate(values: Tensor, response_mask: Tensor, mode: LossAggregation, counts: LossCounts | None = None
              ) -> Tensor:
    """A per-token loss [B, L] as this batch's share of one number over the mini-batch that `counts` describes
    (this batch alone when None), real tokens only. Over the whole mini-batch, with T its real tokens, S its
    sequences and |s| the real tokens of sequence s:
    token_mean: sum over every real token / T (each token weighs the same: long responses weigh more);
    seq_mean_token_sum: sum over every real token / S (Dr. GRPO's form, free of the length bias);
    seq_mean_token_mean: sum over sequences of (the sequence's sum / |s|) / S (each sequence weighs the same).
    The shares of the micro-batches of a mini-batch add up to the mini-batch's value exactly.
    """
    counts = counts or LossCounts.of(response_mask)
    if mode == "token_mean":
        return masked_sum(values, response_mask) / max(counts.tokens, 1.0)
    per_sequence = (masked_sum(values, response_mask, dim=1) if mode == "seq_mean_token_sum"
                    else masked_mean(values, response_mask, dim=1))
    return per_sequence.sum() / max(counts.sequences, 1.0)


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of one policy-loss evaluation (scalar, detached tensors)."""

    clipfrac: Tensor
    approx_kl: Tensor


def behavior_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, response_mask: Tensor, cap: float) -> Tensor:
    """Decoupled PPO's importance weights (Hilton et al. 2021) for samples drawn by an older policy than the one
    being updated: min(π_old / π_sampler, cap) per token, where π_old is the policy before this update (the
    proximal policy, which the clipped ratio is taken against) and π_sampler the one that generated the tokens.

    old_logprobs, sampler_logprobs, response_mask [B, L] -> [B, L], 1 on padding. Truncating at `cap` bounds the
    variance a token the sampler found unlikely would add (as V-trace and truncated importance sampling do).
    """
    log_weight = zero_padding(old_logprobs.float() - sampler_logprobs.float(), response_mask)
    return torch.exp(log_weight).clamp(max=cap)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio: float,
    aggregation: LossAggregation = "token_mean",
    weights: Tensor | None = None,
    counts: LossCounts | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (to minimise), aggregated over real tokens.

    logprobs, old_logprobs, advantages, response_mask [B, L] -> (loss [], stats).
    With r = exp(logprobs - old_logprobs):
    loss = aggregate(max(-A * r, -A * clip(r, 1 - clip_ratio, 1 + clip_ratio)), counts), token_mean by default;
    with `weights` [B, L] (detached: `behavior_weights` for samples of an older policy), each token's term is
    multiplied by its weight first. `counts`: the mini-batch this batch is a part of (see `aggregate`); the stats
    are this batch's shares of the mini-batch's token means too:
    clipfrac, the fraction of real tokens where the clipped term is the larger one;
    approx_kl, the token mean of 0.5 * (logprobs - old_logprobs)**2.
    """
    advantages = zero_padding(advantages, response_mask)
    log_ratio = zero_padding(logprobs.float() - old_logprobs.float(), response_mask)  # exp() of padding stays 1
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token if weights is None else per_token * weights.detach(), response_mask, aggregation,
                     counts)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=aggregate((clipped > unclipped).float(), response_mask, "token_mean", counts),
            approx_kl=aggregate(0.5 * log_ratio**2, response_mask, "token_mean", counts),
        )
    return loss, stats


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, estimator: KLEstimator,
            aggregation: LossAggregation = "token_mean", counts: LossCounts | None = None) -> Tensor:
    """KL(policy || reference) as a loss term (GRPO's placement, instead of a penalty in the reward).

    logprobs, ref_logprobs, response_mask [B, L] -> []. Use k3 or k2: k1's gradient, log_ratio's, has zero mean
    under the policy's own samples, so as a loss it does not pull towards the reference.
    """
    return aggregate(kl_penalty(zero_padding(logprobs, response_mask), zero_padding(ref_logprobs, response_mask),
                                estimator), response_mask, aggregation, counts)


@dataclass(frozen=True)
class ValueLossStats:
    """Diagnostics of one value-loss evaluation (scalar, detached tensor)."""

    clipfrac: Tensor


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_range: float | None,
    counts: LossCounts | None = None,
) -> tuple[Tensor, ValueLossStats]:
    """Critic loss, optionally with PPO-style value clipping, the token mean over the mini-batch of `counts`
    (this batch when None; see `aggregate`).

    values, old_values, returns, response_mask [B, L] -> (loss [], stats).
    With v_clipped = old_values + clamp(values - old_values, -clip_range, clip_range):
    loss = 0.5 * token_mean(max((values - returns)**2, (v_clipped - returns)**2)).
    With clip_range None: loss = 0.5 * token_mean((values - returns)**2) and clipfrac 0.
    """
    values = zero_padding(values, response_mask)
    returns = zero_padding(returns, response_mask)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * aggregate(unclipped, response_mask, "token_mean", counts)
        return loss, ValueLossStats(clipfrac=torch.zeros((), device=values.device))
    old_values = zero_padding(old_values, response_mask)
    values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), response_mask, "token_mean", counts)
    with torch.no_grad():
        clipfrac = aggregate((clipped > unclipped).float(), response_mask, "token_mean", counts)
    return loss, ValueLossStats(clipfrac=clipfrac)


class AdaptiveKLController:
    """KL coefficient that tracks a target KL (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    Each update moves the coefficient by at most 20% * n_steps / horizon, up when the
    measured KL is above target and down when below.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl <= 0:
            raise ValueError(f"target_kl must be positive, got {target_kl}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.value: float = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
