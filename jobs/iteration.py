"""One PPO iteration: a batch from the rollout source → score → advantages → train → sync, and its figures.

The estimators are pure functions chosen by name (relay/estimators.py); the roles are called through jobs/roles.py;
the KL controller and the reward normaliser, which a checkpoint keeps, live here between iterations.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import ray
import torch

from actors.rollout import RolloutFleet
from jobs.record import DriverState
from jobs.roles import Roles, Scored
from jobs.rollout_source import Rollout, RolloutSource
from relay import ppo
from relay.batch import RolloutBatch
from relay.config import RelayConfig
from relay.estimators import estimate
from relay.prompts import PromptCounts
from relay.rewards import RewardNormalizer

PHASES = ("generate", "score", "advantages", "train", "generate_wait", "sync", "eval", "checkpoint")


class Iteration:
    def __init__(self, config: RelayConfig, source: RolloutSource, roles: Roles, state: DriverState,
                 counts: PromptCounts) -> None:
        """Over the placed roles, continuing `state`'s KL coefficient and reward statistics."""
        self.config, self.source, self.roles, self.state, self.counts = config, source, roles, state, counts
        algorithm = config.algorithm
        self.kl_controller: ppo.AdaptiveKLController | ppo.FixedKLController = (
            ppo.AdaptiveKLController(state.kl_coef, algorithm.kl_target, algorithm.kl_horizon)
            if algorithm.kl_target is not None else ppo.FixedKLController(state.kl_coef))
        self.reward_normalizer = RewardNormalizer(normalize=config.reward.normalize, clip=config.reward.clip)
        if state.reward_stats:
            self.reward_normalizer.load_state_dict(state.reward_stats)

    @property
    def fleet(self) -> RolloutFleet:
        assert self.source.fleet is not None
        return self.source.fleet

    def __call__(self, iteration: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        with phase("accounting", metrics):
            self.usage()  # from here on, each role's busy seconds are this iteration's (not the evaluation's)
        with phase("generate", metrics):
            rollout = self.source.next(iteration, self.state.policy_version, self.roles.score_rewards)
        with phase("score", metrics):
            scored = self.roles.score(rollout.batch, iteration, rollout.rewards)
        with phase("advantages", metrics):
            batch, kl = self.advantages(rollout.batch, scored)
        with phase("train", metrics):
            metrics |= self.roles.train(ray.put(batch), iteration)
        if self.source.generating_ahead:  # the engines generate the next batch before they take new weights
            with phase("generate_wait", metrics):
                self.source.wait_ahead()
        with phase("sync", metrics):
            self.sync()
        metrics |= self.statistics(rollout, batch, kl, episode_returns(batch, scored.rewards))
        with phase("accounting", metrics):
            metrics |= self.usage()
        return metrics

    def advantages(self, batch: RolloutBatch, scored: Scored) -> tuple[RolloutBatch, torch.Tensor]:
        """The batch as the learners train on it, and the per-token KL to the reference [B, Lr]: per-token rewards
        (the sequence reward on the last token, and −β·KL on each when the KL is placed in the reward), the
        estimator's advantages, and behaviour weights when an older policy sampled the batch."""
        algorithm, mask = self.config.algorithm, batch.action_mask
        rewards = self.reward_normalizer(scored.rewards)
        kl_coef_in_reward = self.kl_controller.value if algorithm.kl_placement == "reward" else 0.0
        token_rewards, kl = ppo.token_rewards(rewards, scored.old_logprobs, scored.ref_logprobs, mask,
                                              kl_coef_in_reward, algorithm.kl_estimator)
        if batch.step_rewards is not None:  # an environment's, each on the last token of its action
            token_rewards = token_rewards + batch.step_rewards
        advantages, returns = estimate(algorithm.advantage, token_rewards, scored.values, mask, algorithm,
                                       self.config.rollout.samples_per_prompt)
        stale = self.state.policy_version > batch.policy_version
        weights = (ppo.behavior_weights(scored.old_logprobs, batch.sampler_logprobs, mask,
                                        algorithm.behavior_weight_cap) if stale else None)
        return replace(batch, old_logprobs=scored.old_logprobs, ref_logprobs=scored.ref_logprobs,
                       values=scored.values, sequence_rewards=rewards, advantages=advantages, returns=returns,
                       behavior_weights=weights), kl

    def sync(self) -> None:
        """The new policy weights to every rollout engine, in buckets gathered from all learner ranks."""
        buckets = self.roles.gather_policy_weights()
        self.state.policy_version += 1
        self.fleet.load_weights(buckets, self.state.policy_version)

    def statistics(self, rollout: Rollout, batch: RolloutBatch, kl: torch.Tensor,
                   raw_rewards: torch.Tensor) -> dict[str, float]:
        """The iteration's figures (the learners' come from training), after the KL controller's update.
        `raw_rewards` [B] are each sample's, before normalisation (an episode's return)."""
        algorithm, mask = self.config.algorithm, batch.action_mask
        kl_per_sequence = ppo.masked_sum(kl, mask, dim=1).mean().item()
        self.kl_controller.update(kl_per_sequence, len(batch))
        self.state.samples += len(batch)
        response_tokens = mask.sum().item()
        metrics = rollout.metrics | {
            "data/prompts_dropped": float(self.counts.dropped),
            "data/prompts_truncated": float(self.counts.truncated),
            "data/bad_rows": float(self.counts.bad_rows),
            "reward/mean": raw_rewards.mean().item(),
            "reward/std": raw_rewards.std().item(),
            "policy/kl_ref": kl_per_sequence,
            "policy/kl_coef": self.kl_controller.value,
            "policy/version": float(self.state.policy_version),
            # the policy updates between the batch's sampler and the policy it trained (this iteration's sync apart)
            "policy/staleness": float(self.state.policy_version - 1 - batch.policy_version),
            "policy/sampler_logprob_gap": ppo.masked_mean((batch.sampler_logprobs - batch.old_logprobs).abs(),
                                                          mask).item(),
            "response/length_mean": response_tokens / len(batch),
            "perf/tokens_per_s": response_tokens / rollout.generate_seconds,
            "perf/samples": float(self.state.samples),
        }
        if batch.values is not None:
            metrics["critic/values_mean"] = ppo.masked_mean(batch.values, mask).item()
        if batch.behavior_weights is not None:
            metrics["policy/behavior_weight_mean"] = ppo.masked_mean(batch.behavior_weights, mask).item()
            metrics["policy/behavior_weight_capped"] = ppo.masked_mean(
                (batch.behavior_weights >= algorithm.behavior_weight_cap).float(), mask).item()
        if algorithm.advantage in ("grpo", "rloo"):
            groups = ppo.zero_variance_groups(raw_rewards, self.config.rollout.samples_per_prompt)
            metrics["reward/zero_variance_groups"] = groups.float().mean().item()  # prompts that taught nothing
        return metrics

    def usage(self) -> dict[str, float]:
        """Each role's busy seconds per pass since the last call, `time/<role>_<pass>`, and its peak memory,
        `perf/<role>_peak_rss_mib` (and `_peak_gpu_mib`, `_local_parameters`), each the maximum over the role's
        ranks or engines."""
        reports = self.roles.usage() | {"rollout": self.fleet.usage()}
        usage: dict[str, float] = {}
        for role, ranks in reports.items():
            for report in ranks:
                for name, value in report.items():
                    key = f"time/{role}_{name.removeprefix('busy/')}" if name.startswith("busy/") else f"perf/{role}_{name}"
                    usage[key] = max(usage.get(key, 0.0), value)
        return usage

    def save_into(self, state: DriverState) -> None:
        """The KL coefficient and reward statistics into the state a checkpoint writes."""
        state.kl_coef = self.kl_controller.value
        state.reward_stats = self.reward_normalizer.state_dict()


def episode_returns(batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's raw reward [B]: the reward source's, plus an environment's step rewards."""
    return rewards if batch.step_rewards is None else rewards + batch.step_rewards.sum(dim=1)


@contextmanager
def phase(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Time a phase of the iteration into metrics['time/<name>'] (seconds, added up over its parts)."""
    started = time.perf_counter()
    yield
    metrics[f"time/{name}"] = metrics.get(f"time/{name}", 0.0) + time.perf_counter() - started


def iteration_line(iteration: int, iterations: int, metrics: dict[str, float]) -> str:
    """One readable log line per iteration, for a person following the job's log in the dashboard."""
    line = (
        f"iteration {iteration}/{iterations} | reward {metrics['reward/mean']:.3f} | kl {metrics['policy/kl_ref']:.3f}"
        f" | entropy {metrics['policy/entropy']:.3f} | clipfrac {metrics['losses/clipfrac']:.3f}"
        f" | rollout workers {metrics['rollout/workers_active']:.0f}"
    )
    if metrics["rollout/workers_pending"]:
        line += f" (+{metrics['rollout/workers_pending']:.0f} pending)"
    if metrics.get("rollout/worker_failures"):
        line += f" ({metrics['rollout/worker_failures']:.0f} failed so far)"
    if "env/turns_mean" in metrics:
        line += (f" | turns {metrics['env/turns_mean']:.2f} tool calls {metrics['env/tool_calls_mean']:.2f}"
                 f" env errors {metrics['env/errors']:.0f}")
    line += " | " + " ".join(f"{name} {metrics[f'time/{name}']:.2f}s" for name in PHASES if f"time/{name}" in metrics)
    if "eval/score" in metrics:
        line += f" | eval {metrics['eval/score']:.3f}"
    return line
