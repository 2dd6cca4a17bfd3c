"""The advantage estimators, one signature each, chosen by name (`algorithm.advantage`) from ESTIMATORS.

Each takes the per-token rewards [B, Lr] (the sequence reward on the last token, and −β·KL on each when the KL is
placed in the reward), the critic's values [B, Lr] (GAE only, else None), the action mask [B, Lr], the algorithm's
settings and the samples per prompt, and returns (advantages [B, Lr], returns [B, Lr] for the critic, or None
without one). Pure functions over relay.ppo's math.
"""

from __future__ import annotations

from typing import Callable

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
