"""The RL algorithm's section: the advantage estimator, the KL to the reference, clipping, epochs and the loss's
aggregation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from relay.config.base import Section


class AlgorithmSection(Section):
    """Every setting of the RL algorithm, in one place: the advantage estimator, the KL to the reference (its
    estimator, coefficient and placement), clipping, epochs and how the loss is aggregated."""

    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae", description="gae: PPO with a critic; grpo, rloo: group baselines; reinforce_pp: batch-whitened returns"
    )
    norm_by_std: bool = Field(True, description="grpo: divide by the group's reward std (false: Dr. GRPO)")
    kl_coef: float = Field(0.05, ge=0, description="β of the KL to the reference")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_placement: Literal["reward", "loss"] = Field(
        "reward", description="reward: −β·KL per token in the reward; loss: β·KL as a term of the policy loss"
    )
    kl_target: float | None = Field(None, gt=0, description="set to adapt β towards this KL (Ziegler et al.)")
    kl_horizon: int = Field(10_000, ge=1, description="adaptive KL horizon in samples")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="gae: the λ of GAE")
    clip_ratio: float = Field(0.2, gt=0)
    value_clip: float | None = Field(0.2, gt=0, description="gae: the critic's value clipping")
    epochs: int = Field(1, ge=1, description="passes over each batch")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch; the batch is split into this many")
    entropy_coef: float = Field(0.0, ge=0)
    whiten_advantages: bool = Field(True, description="gae: whiten advantages over the batch")
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = Field(
        "token_mean", description="how per-token losses become one number (see relay.ppo.aggregate)"
    )
    dynamic_sampling: bool = Field(
        False, description="grpo, rloo: drop prompts whose samples all scored alike, sample more to fill the batch"
    )
    max_sampling_rounds: int = Field(4, ge=1, description="dynamic sampling: generation rounds per iteration at most")
    kl_budget: float | None = Field(
        None, gt=0, description="the most KL to the reference (policy/kl_ref, per sequence) the run may reach: past "
        "it the run stops, checkpointing the iteration that crossed it (policy_best keeps the best before it)"
    )
    behavior_weight_cap: float = Field(
        2.0, gt=0, description="rollout.generate_ahead: each token's policy loss is weighted by "
        "min(π_old / π_sampler, this cap), π_sampler being the older policy that generated it"
    )
    reuse_scoring_forward: bool = Field(
        False, description="the policy's and critic's scoring pass keeps its graph and serves as the first epoch's "
        "forward (one mini-batch only; the scored batch's activations stay in memory until then)"
    )

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmSection:
        if self.kl_placement == "loss" and self.kl_estimator == "k1":
            raise ValueError("algorithm.kl_placement loss needs kl_estimator k3 or k2: k1's gradient has zero mean")
        if self.dynamic_sampling and self.advantage not in ("grpo", "rloo"):
            raise ValueError("algorithm.dynamic_sampling drops groups of samples: it needs advantage grpo or rloo")
        if self.kl_placement == "loss" and self.kl_target is not None:
            raise ValueError("algorithm.kl_target (adaptive β) applies to the KL in the reward, not as a loss")
        if self.reuse_scoring_forward and self.mini_batches != 1:
            raise ValueError("algorithm.reuse_scoring_forward needs mini_batches 1: the first mini-batch must be the "
                             "whole batch the scoring pass saw")
        return self

    def describe(self) -> str:
        """One line for logs and status: `grpo (KL k3 in the loss, β 0.01, token_mean)`."""
        return (f"{self.advantage} (KL {self.kl_estimator} in the {self.kl_placement}, β {self.kl_coef:g}, "
                f"{self.loss_aggregation})")
