"""The roles a PPO run places besides the rollout fleet, as the driver calls them: the policy and critic learners,
the reference and the reward, each an ActorGroup placed as relay/placement.py plans.

Every call waits with the run's deadline (run.call_timeout_s) and names the role that did not answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import RayTaskError

from actors.group import ActorGroup, Deadline, get_within
from actors.learner import Learner
from actors.reference import Reference
from actors.reward import RewardScorer
from relay.batch import RolloutBatch
from relay.config import RelayConfig
from relay.placement import role_placement
from relay.storage import write_atomic


class RewardFailure(RuntimeError):
    """The reward source raised, or gave a non-finite reward: the run stops rather than train on it."""


@dataclass
class Scored:
    """What the scoring pass gives each sample of a batch, per token [B, Lr]."""

    old_logprobs: torch.Tensor  # the policy learner's (never the sampler's)
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # the critic's, with one
    rewards: torch.Tensor  # [B] the reward source's, raw


class Roles:
    def __init__(self, config: RelayConfig, run_dir: Path, policy_path: str, critic_path: str,
                 reference_model: str, reward_model: str | None) -> None:
        """Place every role and wait until each is up (they start in parallel)."""
        self.config, self.run_dir = config, run_dir
        namespace, timeout_s = config.actor_namespace, config.run.call_timeout_s
        # On CPUs with the roles one after another, each has the machine's cores while it runs.
        threads = os.cpu_count() if config.device == "cpu" and not config.run.roles_in_parallel else None
        self.policy = ActorGroup(Learner, "policy-learner", role_placement(config, "policy"), namespace=namespace,
                                 cpu_threads=threads, timeout_s=timeout_s, role="policy", config=config,
                                 model_path=policy_path)
        shared = self.policy.placement_group  # a colocated scorer sits inside the policy learner's bundles
        # Critic-free estimators get no critic actors, groups or checkpoints; a LoRA policy is its own reference.
        self.critic = (ActorGroup(Learner, "critic-learner", role_placement(config, "critic"), namespace=namespace,
                                  cpu_threads=threads, timeout_s=timeout_s, role="critic", config=config,
                                  model_path=critic_path)
                       if config.algorithm.uses_critic else None)
        self.reference = (None if config.reference_in_policy else
                          ActorGroup(Reference, "reference", role_placement(config, "reference"),
                                     namespace=namespace, share_placement_group=shared, cpu_threads=threads,
                                     timeout_s=timeout_s, config=config, model_path=reference_model))
        # An environment's run without a reward source is rewarded by its step rewards alone.
        self.reward = (ActorGroup(RewardScorer, "reward", role_placement(config, "reward"), namespace=namespace,
                                  share_placement_group=shared, cpu_threads=threads, timeout_s=timeout_s,
                                  config=config, model_path=reward_model)
                       if config.uses_reward_source else None)
        for group in self.groups:
            group.wait_ready()

    @property
    def groups(self) -> list[ActorGroup]:
        return [group for group in (self.policy, self.critic, self.reference, self.reward) if group is not None]

    @property
    def learners(self) -> list[ActorGroup]:
        return [self.policy] if self.critic is None else [self.policy, self.critic]

    def wait(self, refs: list[ray.ObjectRef], role: str) -> list:
        return get_within(refs, self.config.run.call_timeout_s, role)

    def dead(self) -> bool:
        """Whether a process of a placed role is gone."""
        return any(group.dead_ranks() for group in self.groups)

    # ---------------------------------------------------------------- the iteration's calls
    def score(self, batch: RolloutBatch, iteration: int, rewards: torch.Tensor | None) -> Scored:
        """Old log-probs, reference log-probs (a LoRA policy's own, adapters off), values and, unless given,
        rewards: in parallel (run.roles_in_parallel) or one role at a time."""
        batch_ref = ray.put(batch)
        reference = (("reference (policy-learner, adapters off)", self.policy, "score_reference")
                     if self.reference is None else ("reference", self.reference, "score"))
        scorers = [("policy-learner", self.policy, "score"), reference,
                   *([("critic-learner", self.critic, "score")] if self.critic is not None else [])]
        refs = {}
        for name, group, method in scorers:
            refs[name] = group.call(method, batch_ref)
            if not self.config.run.roles_in_parallel:
                self.wait(refs[name], f"{name} (score)")
        if rewards is None:
            rewards = (self.score_rewards(batch, iteration, batch_ref=batch_ref) if self.reward is not None
                       else torch.zeros(len(batch)))
        old, ref, *values = (torch.cat(self.wait(parts, f"{name} (score)")) for name, parts in refs.items())
        return Scored(old, ref, values[0] if values else None, rewards)

    def score_rewards(self, batch: RolloutBatch, iteration: int, evaluation: bool = False,
                      batch_ref: ray.ObjectRef | None = None) -> torch.Tensor:
        assert self.reward is not None, "a run without a reward source scores no rewards"
        return score_rewards(self.reward, batch, iteration, self.run_dir, self.config.run.call_timeout_s,
                             evaluation, batch_ref)

    def train(self, train_ref: ray.ObjectRef, iteration: int) -> dict[str, float]:
        """Training epochs on the policy (clipped surrogate) and the critic (clipped value loss), in parallel
        (run.roles_in_parallel); their statistics, each the mean over the ranks that report it."""
        stats = {}
        for group in self.learners:
            stats[group.name] = group.call("train", train_ref, iteration)
            if not self.config.run.roles_in_parallel:
                self.wait(stats[group.name], f"{group.name} (train)")
        return {name: value for group, refs in stats.items()
                for name, value in mean_over_ranks(self.wait(refs, f"{group} (train)")).items()}

    def gather_policy_weights(self) -> list[ray.ObjectRef]:
        return gather_policy_weights(self.policy, self.config.rollout.sync_bucket_mb, self.config.run.call_timeout_s)

    def usage(self) -> dict[str, list[dict[str, float]]]:
        """Each role's usage report, per rank."""
        return {role: self.wait(group.call("usage"), f"{role} (usage)")
                for role, group in (("policy", self.policy), ("reference", self.reference),
                                    ("critic", self.critic), ("reward", self.reward)) if group is not None}

    # ---------------------------------------------------------------- evaluation
    def policy_logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        return torch.cat(self.wait(self.policy.call("score", ray.put(batch), temperature), "policy-learner (score)"))

    def reference_logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        if self.reference is None:
            refs = self.policy.call("score_reference", ray.put(batch), temperature)
        else:
            refs = self.reference.call("score", ray.put(batch), temperature)
        return torch.cat(self.wait(refs, "reference (score)"))

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: Path) -> None:
        """The learners' Hugging Face weights and DeepSpeed states into `directory`."""
        self.wait([ref for group in self.learners for ref in group.call("save", str(directory.resolve()))],
                  "learners (save)")

    def load(self, checkpoint: Path) -> None:
        self.wait([ref for group in self.learners for ref in group.call("load", str(checkpoint))],
                  "learners (load)")

    def shutdown(self) -> None:
        for group in self.groups:
            group.shutdown()


def score_rewards(reward: ActorGroup, batch: RolloutBatch, iteration: int, run_dir: Path, timeout_s: float,
                  evaluation: bool = False, batch_ref: ray.ObjectRef | None = None) -> torch.Tensor:
    """The reward actors' scores [B]. A reward that raises or is not finite stops the run: nothing trains on it,
    and the samples it was asked to score are written to the run directory for a person to look at (an
    evaluation's too: the one at the start finds a broken reward before anything trains)."""
    try:
        rewards = torch.cat(get_within(reward.call("score", batch_ref or ray.put(batch)), timeout_s, "reward (score)"))
        if torch.isfinite(rewards).all():
            return rewards
        problem = f"the reward is not finite for {int((~torch.isfinite(rewards)).sum())} samples"
    except RayTaskError as error:
        problem = str(error.cause if error.cause is not None else error).strip().splitlines()[-1]
    path = run_dir / f"reward_failure_iter_{iteration:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps({"prompt": prompt, "response": response, "metadata": metadata},
                                          default=str) + "\n"
                               for prompt, response, metadata in zip(batch.prompts, batch.responses, batch.metadata)))
    where = f"the evaluation at iteration {iteration}" if evaluation else f"iteration {iteration}"
    raise RewardFailure(f"{where}: {problem}; the batch's {len(batch)} samples are in {path}")


def gather_policy_weights(policy: ActorGroup, bucket_mb: float, timeout_s: float) -> list[ray.ObjectRef]:
    """The policy's weights as references to buckets that learner rank 0 streams into the object store (all ranks
    take part in the gather). Gathered in full before any engine loads: a learner that dies here is the learner's
    failure, not the engines'."""
    streams = {rank: actor.weight_buckets.options(num_returns="streaming").remote(bucket_mb)
               for rank, actor in enumerate(policy.actors)}
    received: dict[int, list[ray.ObjectRef]] = {rank: [] for rank in streams}
    deadline = Deadline(timeout_s)
    while streams:
        ready = deadline.first_ready(list(streams.values()), f"policy-learner ranks {sorted(streams)} (weight_buckets)")
        rank = next(rank for rank, stream in streams.items() if stream == ready)
        try:
            received[rank].append(next(streams[rank]))
        except StopIteration:
            del streams[rank]
        else:
            if rank != 0:  # their one item is their summary (or their error, raised now)
                ray.get(received[rank][-1])
    # Each rank's last item is its summary, or the error it failed with.
    get_within([items[-1] for items in received.values()], timeout_s, "policy-learner (weight_buckets)")
    return received[0][:-1]


def mean_over_ranks(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the ranks that report it (a rank whose micro-batches were all skipped has no loss)."""
    names = dict.fromkeys(name for rank in stats for name in rank)
    return {name: sum(values) / len(values) for name in names
            if (values := [rank[name] for rank in stats if name in rank])}
