"""The advantage estimators, one signature each, chosen by name (`algorithm.advantage`) from ESTIMATORS.

Each takes the per-token rewards [B, Lr] (the sequence reward on the last token, and −β·KL on each when the KL is
placed in the reward), the critic's values [B, Lr] (GAE only, else None), the action mask [B, Lr], the algorithm's
settings and the samples per prompt, and returns (advantages [B, Lr], returns [B, Lr] for the critic, or None
without one). Pure functions over relay.ppo's math.

`estimate` runs them over the action tokens alone: in a multi-turn episode the environment's tokens between two
actions are no step of the policy's, so each row's action tokens are packed to its front (in order), estimated as
one contiguous response, and put back; observation tokens get 0. For one answer packing changes nothing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from relay import ppo
from relay.config import AlgorithmSection

Estimate = tuple[Tensor, Tensor | None]
Estimator = Callable[[Tensor, Tensor | None, Tensor, AlgorithmSection, int], Estimate]


def gae(token_rewards: Tensor, values: Tensor | None, mask: Tensor, algorithm: AlgorithmSection,
        group_size: int) -> Estimate:
    """PPO's: generalised advantage estimation against the critic's values (whitened when configured)."""
    if values is None:
        raise ValueError("algorithm.advantage gae needs the critic's values")
    advantages, returns = ppo.gae(token_rewards, values, mask, algorithm.gamma, algorithm.lam)
    return (ppo.masked_whiten(advantages, mask) if algorithm.whiten_advantages else advantages), returns


def reinforce_pp(token_rewards: Tensor, values: Tensor | None, mask: Tensor, algorithm: AlgorithmSection,
                 group_size: int) -> Estimate:
    """REINFORCE++: discounted returns whitened over the batch, no critic."""
    return ppo.reinforce_pp_advantages(token_rewards, mask, algorithm.gamma), None


# The group estimators compare whole responses: each one's summed reward (−β·KL included, when it is placed in the
# reward) against the other samples of its prompt, then the same advantage on each of its tokens.
def grpo(token_rewards: Tensor, values: Tensor | None, mask: Tensor, algorithm: AlgorithmSection,
         group_size: int) -> Estimate:
    sequence_rewards = ppo.masked_sum(token_rewards, mask, dim=1)
    advantages = ppo.grpo_advantages(sequence_rewards, group_size, algorithm.norm_by_std)
    return ppo.sequence_to_tokens(advantages, mask), None


def rloo(token_rewards: Tensor, values: Tensor | None, mask: Tensor, algorithm: AlgorithmSection,
         group_size: int) -> Estimate:
    sequence_rewards = ppo.masked_sum(token_rewards, mask, dim=1)
    return ppo.sequence_to_tokens(ppo.rloo_advantages(sequence_rewards, group_size), mask), None


ESTIMATORS: dict[str, Estimator] = {"gae": gae, "grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}


def estimate(name: str, token_rewards: Tensor, values: Tensor | None, action_mask: Tensor,
             algorithm: AlgorithmSection, group_size: int) -> Estimate:
    """ESTIMATORS[name] over each row's action tokens, packed to the front of the row (see the module's doc)."""
    order = torch.argsort((action_mask == 0).to(torch.int8), dim=1, stable=True)  # action positions first, in order

    def packed(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.gather(1, order)

    def unpacked(tensor: Tensor) -> Tensor:
        return torch.zeros_like(tensor).scatter(1, order, tensor)

    advantages, returns = ESTIMATORS[name](token_rewards.gather(1, order), packed(values), action_mask.gather(1, order),
                                           algorithm, group_size)
    return unpacked(advantages), None if returns is None else unpacked(returns)
