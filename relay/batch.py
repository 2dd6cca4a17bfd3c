"""The rollout batch: what one PPO iteration generates, scores and trains on.

Padding, once for all: prompts are LEFT-padded and responses RIGHT-padded, so every prompt ends at column Lq - 1
and every response starts at column Lq of `input_ids`. Masks are 1 on real tokens, 0 on padding. A response's
last real token is its EOS when generation stopped there, or its last sampled token when it hit max_new_tokens.
Position ids count real tokens only, which is what vLLM saw when it generated the sample. The response mask says
which tokens are read; the action mask which of them the policy sampled, what every loss, KL and advantage covers
(the two differ only where an environment's text sits between a multi-turn episode's actions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    query_ids: Tensor  # [B, Lq] long, left-padded prompt tokens
    query_mask: Tensor  # [B, Lq] float, 1 on real prompt tokens
    response_ids: Tensor  # [B, Lr] long, right-padded sampled tokens
    response_mask: Tensor  # [B, Lr] float, 1 on real response tokens
    sampler_logprobs: Tensor  # [B, Lr] float, vLLM's log-probs of the sampled tokens (for the mismatch metric only)
    prompts: list[str]  # [B] prompt text
    responses: list[str]  # [B] response text, special tokens removed
    metadata: list[dict[str, Any]]  # [B] each example's ground truth, for reward functions
    policy_version: int  # the oldest policy weights that sampled a token of the batch (0: the initial policy)
    # Per token, what a multi-turn episode needs (one answer's are derived from the fields above when not given):
    action_mask: Tensor = None  # type: ignore[assignment]  # [B, Lr] float, 1 on tokens the policy sampled
    token_versions: Tensor = None  # type: ignore[assignment]  # [B, Lr] long, the policy version that sampled each
    step_rewards: Tensor | None = None  # [B, Lr] an environment's rewards, each on the last token of its action
    # Filled in by the scoring phase (step 3) and the advantage phase (step 4):
    old_logprobs: Tensor | None = None  # [B, Lr] policy learner's log-probs before this iteration's update
    ref_logprobs: Tensor | None = None  # [B, Lr] frozen reference policy's log-probs
    values: Tensor | None = None  # [B, Lr] critic's value of the state before each response token
    sequence_rewards: Tensor | None = None  # [B] reward of each whole response
    advantages: Tensor | None = None  # [B, Lr]
    returns: Tensor | None = None  # [B, Lr]
    behavior_weights: Tensor | None = None  # [B, Lr] decoupled PPO's weights, when an older policy generated the batch

    def __post_init__(self) -> None:
        if self.action_mask is None:  # one answer: every response token is the policy's
            self.action_mask = self.response_mask.clone()
        if self.token_versions is None:
            self.token_versions = torch.full_like(self.response_ids, self.policy_version)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:  # [B, Lq + Lr]
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [B, Lq + Lr]
        return torch.cat([self.query_mask, self.response_mask], dim=1).long()

    @property
    def position_ids(self) -> Tensor:  # [B, Lq + Lr]
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def select(self, index: slice | Tensor) -> RolloutBatch:
        """The rows at `index` (a slice or a 1-D index tensor), every per-row field alike."""
        rows = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        chosen: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Tensor):
                chosen[item.name] = value[index]
            elif isinstance(value, list):
                chosen[item.name] = [value[row] for row in rows]
        return replace(self, **chosen)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Every tensor field on `device` (a no-op on CPU)."""
        moved = {
            item.name: value.to(device)
            for item in fields(self)
            if isinstance(value := getattr(self, item.name), Tensor)
        }
        return replace(self, **moved)

    def shard(self, rank: int, world_size: int) -> RolloutBatch:
        """Rank `rank`'s contiguous share, the first `len % world_size` shares one row longer; concatenating the
        shards in rank order gives the batch back. (Training batches split evenly: the config checks that.)"""
        return self.select(slice(*shard_bounds(len(self), rank, world_size)))

    def padded_shard(self, rank: int, world_size: int) -> tuple[RolloutBatch, int]:
        """(rank `rank`'s shard padded to the largest shard's length with copies of the batch's first row, how many
        of its rows are real: they come first). Every rank then runs the same forwards, which ZeRO-3 needs (each
        forward gathers parameters with every rank), and none scores an empty shard when the batch has fewer rows
        than there are ranks."""
        start, end = shard_bounds(len(self), rank, world_size)
        filler = -(-len(self) // world_size) - (end - start)
        return self.select(torch.tensor([*range(start, end), *[0] * filler], dtype=torch.long)), end - start


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous share of `rows` (see RolloutBatch.shard)."""
    size, remainder = divmod(rows, world_size)
    start = rank * size + min(rank, remainder)
    return start, start + size + (1 if rank < remainder else 0)


def request_seeds(run_seed: int, iteration: int, count: int, round_index: int = 0) -> list[int]:
    """One sampling seed per prompt of an iteration's batch, from (run seed, iteration, the prompt's index, and the
    sampling round when an iteration samples more than once): which engine serves a prompt changes nothing, no two
    prompts or iterations share a seed, and a resumed run draws the same samples as an uninterrupted one."""
    key = f"{run_seed}:{iteration}" + (f":round{round_index}" if round_index else "")
    return [int.from_bytes(hashlib.blake2b(f"{key}:{index}".encode(), digest_size=8).digest()) >> 1
            for index in range(count)]


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch of the rows of `batches`, in order, padded anew to the widest prompt and response (the tensors
    that later phases fill in must still be empty)."""
    query_width = max(batch.query_ids.shape[1] for batch in batches)
    response_width = max(batch.response_ids.shape[1] for batch in batches)

    def widen(tensor: Tensor, width: int, value: float, left: bool) -> Tensor:
        padding = (width - tensor.shape[1], 0) if left else (0, width - tensor.shape[1])
        return torch.nn.functional.pad(tensor, padding, value=value)

    return RolloutBatch(
        query_ids=torch.cat([widen(b.query_ids, query_width, pad_id, left=True) for b in batches]),
        query_mask=torch.cat([widen(b.query_mask, query_width, 0.0, left=True) for b in batches]),
        response_ids=torch.cat([widen(b.response_ids, response_width, pad_id, left=False) for b in batches]),
        response_mask=torch.cat([widen(b.response_mask, response_width, 0.0, left=False) for b in batches]),
        sampler_logprobs=torch.cat([widen(b.sampler_logprobs, response_width, 0.0, left=False) for b in batches]),
        prompts=[prompt for b in batches for prompt in b.prompts],
        responses=[response for b in batches for response in b.responses],
        metadata=[row for b in batches for row in b.metadata],
        policy_version=min(b.policy_version for b in batches),
        action_mask=torch.cat([widen(b.action_mask, response_width, 0.0, left=False) for b in batches]),
        token_versions=torch.cat([widen(b.token_versions, response_width, 0, left=False) for b in batches]),
        step_rewards=(None if all(b.step_rewards is None for b in batches) else torch.cat([
            widen(torch.zeros_like(b.response_mask) if b.step_rewards is None else b.step_rewards, response_width,
                  0.0, left=False) for b in batches])),
    )


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row):] = torch.tensor(row)
            mask[index, width - len(row):] = 1.0
    return ids, mask


def pad_right(rows: list[list[float]] | list[list[int]], pad_value: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(row) for row in rows))
    values = torch.full((len(rows), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), width))
    for index, row in enumerate(rows):
        if row:
            values[index, : len(row)] = torch.tensor(row, dtype=dtype)
            mask[index, : len(row)] = 1.0
    return values, mask
