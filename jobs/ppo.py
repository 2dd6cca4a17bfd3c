"""The RL driver: prompts → generate → score → advantages → train → sync → metrics, once per iteration.

    python -m jobs.ppo --config jobs/configs/demo.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python -m jobs.ppo --config jobs/configs/demo.yaml

PPO with GAE and a critic by default; GRPO, RLOO or REINFORCE++ without one (`algorithm.advantage`). Prompts come
from `data.prompts` (a dataset) or `data.task`. With `tiny_model` the policy is built locally (no download); with
`warm_start` it is first fine-tuned on demonstrations (jobs/sft.py). The run directory gets metrics.jsonl,
TensorBoard events, checkpoints (`resume: auto` continues from the newest), summary.json, reward_curve.png and the
final policy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from actors.control import RunControl
from actors.group import ActorGroup, get_within
from actors.learner import Learner, NonFiniteLoss
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.rollout import RolloutFleet, Sample
from jobs.common import (
    check_cluster_resources,
    check_device,
    check_output_dir,
    connect_ray,
    latest_checkpoint,
    prepare_base_model,
    resolve_model_path,
)
from jobs.record import DriverState, check_resumable, checkpoint_path, link_policy, prune_checkpoints
from jobs.reward_model import run_reward_model_training
from jobs.sft import run_warm_start
from relay import ppo
from relay import preflight
from relay.batch import RolloutBatch, concat_batches, pad_left, pad_right, request_seeds
from relay.config import RelayConfig, config_from_command_line, dump_config
from relay.metrics import MetricsLogger, plot_reward_curve
from relay.models import build_tokenizer, check_scoring_tokenizers, load_tokenizer
from relay.naming import CONTROL_NAMESPACE, control_actor_name, current_run_id
from relay.placement import role_placement
from relay.prompts import Prompt, data_alphabet, load_prompt_data, max_prompt_tokens
from relay.rewards import FunctionReward, RewardNormalizer, RewardSource, build_reward_source
from relay.evaluation import EarlyStopping, EvalScorers, Evaluation, over_kl_budget
from relay.storage import publish_directory, write_atomic
from relay.tasks import task_of

@dataclass
class GeneratedAhead:
    """The next iteration's batch, generating while this one is scored and trained (rollout.generate_ahead)."""

    batch: Future[tuple[RolloutBatch, float]]  # and the seconds its generation took
    data_position: tuple[int, int]  # (data_epoch, data_cursor) before its prompts were drawn: what a checkpoint keeps


class PPOTrainer:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.run_dir = Path(config.run.output_dir).resolve()
        # Everything that can be checked is checked here, before Ray starts and before the run directory is
        # touched: the device, the run directory and a run it would resume, the reward, the tokenizer, the prompts.
        check_device(config)
        check_output_dir(self.run_dir)
        check_resumable(config, self.run_dir)
        if config.reward.type != "model":
            build_reward_source(config.reward, task_of(config.data), config.data.task)  # imports reward.function
        self.tokenizer = initial_tokenizer(config)
        check_scoring_tokenizers(config, self.tokenizer)  # reward, critic and reference read the policy's token ids
        self.data = load_prompt_data(config, self.tokenizer)
        counts = self.data.counts
        if counts.dropped or counts.truncated:
            print(f"data: {counts.dropped} prompts dropped and {counts.truncated} truncated, being longer than "
                  f"{max_prompt_tokens(config)} tokens (rollout.max_model_len - rollout.max_new_tokens)", flush=True)
        self.eval_scorer, self.eval_metric = eval_scorer(config)
        self.evaluation = Evaluation(config, self.tokenizer, self.data.eval)  # its text set is read here, too
        check_eval_metric(config, self.data.eval[0].metadata)
        if config.reward.type == "rules":
            columns = self.data.eval[0].metadata
            for rule in config.reward.rules:
                if rule.column is not None and rule.column not in columns:
                    raise ValueError(f"reward.rules: no column {rule.column!r} in {self.data.source} (its columns "
                                     f"besides the prompt: {', '.join(sorted(columns)) or 'none'})")
        self.terminate_requested = False
        self.created = time.monotonic()  # in `relay train`, before Ray starts
        self.startup_seconds: float | None = None  # from here to the first iteration
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)  # the data order of the current epoch
        self.ahead: GeneratedAhead | None = None
        self.generator_thread = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-ahead")
                                 if config.rollout.generate_ahead else None)
        self.reset_state()

    def reset_state(self) -> None:
        """The driver's state as a new run starts it; a checkpoint, when there is one, then overwrites it."""
        config = self.config
        self.state = DriverState(kl_coef=config.algorithm.kl_coef)
        early_stop = config.run.early_stop
        self.early_stopping = EarlyStopping(early_stop.direction, early_stop.min_delta, early_stop.patience)
        self.reward_normalizer = RewardNormalizer(normalize=config.reward.normalize, clip=config.reward.clip)
        self.kl_controller: ppo.AdaptiveKLController | ppo.FixedKLController = (
            ppo.AdaptiveKLController(config.algorithm.kl_coef, config.algorithm.kl_target, config.algorithm.kl_horizon)
            if config.algorithm.kl_target is not None
            else ppo.FixedKLController(config.algorithm.kl_coef)
        )

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Resume from the newest checkpoint or start fresh, then place and start every role."""
        checkpoint = self.prepare_run_dir()
        if checkpoint is not None:
            policy_path, critic_path = self.resume_from(checkpoint)
        else:
            policy_path, critic_path = self.start_fresh()
        self.place_roles(policy_path, critic_path)
        if checkpoint is not None:
            self.wait([ref for group in self.learners for ref in group.call("load", str(checkpoint))],
                      "learners (load)")
        else:  # after placement, so that every role scores: the start all later evaluations compare against
            before = self.evaluation.run(self.eval_scorers())
            self.state.eval_before, self.state.eval_baseline_rewards = before.metrics, before.rewards
            self.state.eval_score_before = before.metrics.get("eval/score")
            self.state.eval_points = [] if self.state.eval_score_before is None else [(0, self.state.eval_score_before)]
        self.metrics = MetricsLogger(self.run_dir, run_name=self.config.run.name, resumed_at=self.state.iteration,
                                     algorithm=self.config.algorithm.advantage, tracking=self.config.tracking,
                                     params=self.config.model_dump(mode="json"))
        self.control = ray.remote(RunControl).options(
            name=control_actor_name(current_run_id(self.config.run.name)), namespace=CONTROL_NAMESPACE,
            num_cpus=0, get_if_exists=True,
        ).remote(self.config.rollout.num_workers)

    def completed_summary(self) -> dict | None:
        """The summary of a run that is complete (trained to run.iterations, or stopped early), read before any role
        is placed; None when there is training left, or a summary left to write."""
        checkpoint = latest_checkpoint(self.run_dir) if self.config.run.resume == "auto" else None
        summary_path = self.run_dir / "summary.json"
        if checkpoint is None or not summary_path.exists():
            return None
        state = DriverState.read(checkpoint)
        if not state.done(self.config.run.iterations):
            return None
        print(f"{self.run_dir} is complete at iteration {state.iteration}; use a new run.output_dir to rerun")
        return json.loads(summary_path.read_text())

    def prepare_run_dir(self) -> Path | None:
        """Create the run directory and record the config; the checkpoint to resume from, if any."""
        resume = self.config.run.resume
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.run_dir) if resume == "auto" else None
        if resume == "never" and (self.run_dir / "checkpoints").exists():
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; set run.resume=auto or a new output_dir")
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        return checkpoint

    def resume_from(self, checkpoint: Path) -> tuple[str, str]:
        """The driver's state, the KL controller and the reward normaliser as saved; engines on the saved policy.
        Returns the policy and critic weights to start the learners from (their DeepSpeed states load later)."""
        self.state = DriverState.read(checkpoint)
        if self.state.early_stop is not None:
            self.early_stopping.load_state_dict(self.state.early_stop)
        self.kl_controller.load_state_dict({"value": self.state.kl_coef})
        if self.state.reward_stats:
            self.reward_normalizer.load_state_dict(self.state.reward_stats)
        policy_path = str(checkpoint / "policy")
        self.fleet = RolloutFleet(self.config, policy_path)
        print(f"resuming from {checkpoint} (iteration {self.state.iteration})", flush=True)
        return policy_path, str(checkpoint / "critic")

    def start_fresh(self) -> tuple[str, str]:
        """Base model → (warm start) → (reward model) → reference, evaluating before and after the warm start.
        Returns the policy and critic weights to start the learners from."""
        config = self.config
        base_path = prepare_base_model(config, self.run_dir)

        def start_engines_and_score_the_base_model() -> float | None:
            # By the task or a reward function in the driver: no other role is up yet.
            self.fleet = RolloutFleet(config, base_path)
            return self.evaluation.run(self.eval_scorers()).metrics.get("eval/score")

        # The engines start and score the base model while the warm start trains, each on resources of its own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="base-eval") as evaluator:
            base_score = evaluator.submit(start_engines_and_score_the_base_model)
            policy_path = base_path if config.warm_start is None else run_warm_start(config, base_path, self.run_dir)
            self.state.eval_score_base = base_score.result()
        if policy_path != base_path:
            self.fleet.load_weights_from(policy_path, policy_version=0)
        self.state.reward_model = self.prepare_reward_model(policy_path)
        self.state.reference_model = resolve_model_path(config.reference.model or policy_path)
        critic_path = resolve_model_path(config.critic.model or self.state.reward_model or policy_path)
        return policy_path, critic_path

    def prepare_reward_model(self, policy_path: str) -> str | None:
        """The reward model's path: trained here from the warm-started policy (as in InstructGPT) when the config
        asks for it, else `reward.model`; None for function and remote rewards."""
        config = self.config
        if config.reward.type == "model" and config.reward_model_training is not None:
            trained = run_reward_model_training(config, policy_path, self.run_dir)
            self.state.reward_model_accuracy = trained["accuracy"]
            return trained["path"]
        return resolve_model_path(config.reward.model) if config.reward.model else None

    def place_roles(self, policy_path: str, critic_path: str) -> None:
        """Learners, reference and reward, each an ActorGroup placed as relay/placement.py plans (a colocated
        scorer inside the policy learner's bundles), all started in parallel."""
        config, namespace, timeout_s = self.config, self.config.actor_namespace, self.config.run.call_timeout_s
        # On CPUs with the roles one after another, each has the machine's cores while it runs.
        threads = os.cpu_count() if config.device == "cpu" and not config.run.roles_in_parallel else None
        self.policy = ActorGroup(Learner, "policy-learner", role_placement(config, "policy"), namespace=namespace,
                                 cpu_threads=threads, timeout_s=timeout_s, role="policy", config=config,
                                 model_path=policy_path)
        if config.algorithm.uses_critic:  # critic-free estimators get no critic actors, groups or checkpoints
            self.critic = ActorGroup(Learner, "critic-learner", role_placement(config, "critic"),
                                     namespace=namespace, cpu_threads=threads, timeout_s=timeout_s, role="critic",
                                     config=config, model_path=critic_path)
        if not config.reference_in_policy:
            self.reference = ActorGroup(Reference, "reference", role_placement(config, "reference"),
                                        namespace=namespace, share_placement_group=self.policy.placement_group,
                                        cpu_threads=threads, timeout_s=timeout_s, config=config,
                                        model_path=self.state.reference_model)
        self.reward = ActorGroup(RewardScorer, "reward", role_placement(config, "reward"), namespace=namespace,
                                 share_placement_group=self.policy.placement_group, cpu_threads=threads,
                                 timeout_s=timeout_s, config=config, model_path=self.state.reward_model)
        for group in (*self.learners, *([] if config.reference_in_policy else [self.reference]), self.reward):
            group.wait_ready()  # built in parallel, awaited here

    # ---------------------------------------------------------------- one PPO iteration
    def train_iteration(self, iteration: int) -> dict[str, float]:
        config, algorithm, metrics = self.config, self.config.algorithm, {}
        with phase("accounting", metrics):
            self.role_usage()  # from here on, each role's busy seconds are this iteration's (not the evaluation's)

        # 1-2. The next prompts (the data cursor is checkpointed), and samples of each on the vLLM fleet with the
        #      sampler's log-probs; with dynamic sampling, prompts whose samples all scored alike are replaced.
        #      With rollout.generate_ahead the batch was generated during the last iteration, and the next one
        #      starts now, on the engines' current weights, while this one scores and trains.
        with phase("generate", metrics):
            ahead, self.ahead = self.ahead, None
            if ahead is not None:  # started by the last iteration (a restart drops it: shutdown_roles)
                batch, generate_seconds = ahead.batch.result()
                raw_rewards = None
            else:
                generating_started = time.monotonic()
                batch, raw_rewards = self.sample_batch(iteration, metrics)
                generate_seconds = time.monotonic() - generating_started
            if config.rollout.generate_ahead and iteration < config.run.iterations:
                self.ahead = self.generate_ahead(iteration + 1)
        batch_ref = ray.put(batch)
        staleness = self.state.policy_version - batch.policy_version  # policy updates since it was generated

        # 3. Score in parallel (run.roles_in_parallel): old log-probs (never the sampler's), reference log-probs,
        #    values (with a critic), rewards.
        with phase("score", metrics):
            scored = {}
            for name, group, method in self.scorers:
                scored[name] = group.call(method, batch_ref)
                if not config.run.roles_in_parallel:
                    self.wait(scored[name], f"{name} (score)")  # one role at a time
            if raw_rewards is None:
                raw_rewards = self.score_rewards(batch, batch_ref, iteration)
            old_logprobs, ref_logprobs, *critic_values = (torch.cat(self.wait(refs, f"{name} (score)"))
                                                          for name, refs in scored.items())
            values = critic_values[0] if critic_values else None
            rewards = self.reward_normalizer(raw_rewards)

        # 4. Per-token rewards (the sequence reward on the last token, and −β·KL on each when the KL is placed in
        #    the reward), then the advantages of the configured estimator.
        with phase("advantages", metrics):
            mask = batch.response_mask
            kl_coef_in_reward = self.kl_controller.value if algorithm.kl_placement == "reward" else 0.0
            token_rewards, kl = ppo.token_rewards(rewards, old_logprobs, ref_logprobs, mask, kl_coef_in_reward,
                                                  algorithm.kl_estimator)
            advantages, returns = self.advantages(token_rewards, values, mask)
            weights = (ppo.behavior_weights(old_logprobs, batch.sampler_logprobs, mask, algorithm.behavior_weight_cap)
                       if staleness else None)
            train_ref = ray.put(replace(batch, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values,
                                        sequence_rewards=rewards, advantages=advantages, returns=returns,
                                        behavior_weights=weights))

        # 5. Training epochs: the policy (clipped surrogate) and the critic (clipped value loss), in parallel
        #    (run.roles_in_parallel).
        with phase("train", metrics):
            stats = {}
            for group in self.learners:
                stats[group.name] = group.call("train", train_ref, iteration)
                if not config.run.roles_in_parallel:
                    self.wait(stats[group.name], f"{group.name} (train)")  # one role at a time
            for name, refs in stats.items():
                metrics |= mean_over_ranks(self.wait(refs, f"{name} (train)"))

        # 6. The new policy weights to every rollout worker, in buckets (all learner ranks take part in the gather),
        #    once the engines have generated the next batch, when they are generating ahead.
        if self.ahead is not None:
            with phase("generate_wait", metrics):
                wait_for_futures([self.ahead.batch])
        with phase("sync", metrics):
            buckets = self.gather_policy_weights()
            self.state.policy_version += 1
            self.fleet.load_weights(buckets, self.state.policy_version)

        # 7. Statistics (the metrics are logged by the caller) and the KL controller's update.
        kl_per_sequence = ppo.masked_sum(kl, mask, dim=1).mean().item()
        self.kl_controller.update(kl_per_sequence, len(batch))
        self.state.samples += len(batch)
        response_tokens = mask.sum().item()
        counts = self.data.counts
        metrics |= {
            "data/prompts_dropped": float(counts.dropped),
            "data/prompts_truncated": float(counts.truncated),
            "data/bad_rows": float(counts.bad_rows),
            "reward/mean": raw_rewards.mean().item(),
            "reward/std": raw_rewards.std().item(),
            "policy/kl_ref": kl_per_sequence,
            "policy/kl_coef": self.kl_controller.value,
            "policy/version": float(self.state.policy_version),
            "policy/staleness": float(staleness),
            "policy/sampler_logprob_gap": ppo.masked_mean((batch.sampler_logprobs - old_logprobs).abs(), mask).item(),
            "response/length_mean": response_tokens / len(batch),
            "perf/tokens_per_s": response_tokens / generate_seconds,
            "perf/samples": float(self.state.samples),
        }
        with phase("accounting", metrics):
            metrics |= self.role_usage()
        if values is not None:
            metrics["critic/values_mean"] = ppo.masked_mean(values, mask).item()
        if weights is not None:
            metrics["policy/behavior_weight_mean"] = ppo.masked_mean(weights, mask).item()
            metrics["policy/behavior_weight_capped"] = ppo.masked_mean(
                (weights >= algorithm.behavior_weight_cap).float(), mask).item()
        if algorithm.advantage in ("grpo", "rloo"):
            groups = ppo.zero_variance_groups(raw_rewards, config.rollout.samples_per_prompt)
            metrics["reward/zero_variance_groups"] = groups.float().mean().item()  # prompts that taught nothing
        return metrics

    def next_prompts(self, count: int) -> list[Prompt]:
        """The next `count` training prompts, in an order reshuffled every epoch (prompts dropped as too long, or
        skipped as malformed, are passed over)."""
        train = self.data.train
        chosen: list[Prompt] = []
        while len(chosen) < count:
            if self._order_epoch != self.state.data_epoch:
                seed = self.config.data.seed + self.state.data_epoch
                self._order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
                self._order_epoch = self.state.data_epoch
            prompt = train.get(int(self._order[self.state.data_cursor]))
            if prompt is not None:
                chosen.append(prompt)
            self.state.data_cursor += 1
            if self.state.data_cursor == len(self._order):
                self.state.data_epoch, self.state.data_cursor = self.state.data_epoch + 1, 0
        return chosen

    def sample_batch(self, iteration: int, metrics: dict[str, float]) -> tuple[RolloutBatch, torch.Tensor | None]:
        """This iteration's batch, and its rewards when they had to be scored here (dynamic sampling), else None.

        With algorithm.dynamic_sampling (DAPO, Yu et al. 2025), a prompt whose samples all got the same reward
        teaches a group-based estimator nothing: it is dropped and more prompts are sampled, up to
        algorithm.max_sampling_rounds rounds; if the batch is still short, dropped groups fill it (advantage 0).
        """
        config, algorithm = self.config, self.config.algorithm
        prompts_needed, group_size = config.data.prompts_per_iteration, config.rollout.samples_per_prompt
        if not algorithm.dynamic_sampling:
            return self.generate(self.next_prompts(prompts_needed), group_size, config.run.seed, iteration), None
        kept: list[tuple[RolloutBatch, torch.Tensor]] = []
        dropped: list[tuple[RolloutBatch, torch.Tensor]] = []
        seen = kept_groups = 0
        for round_index in range(algorithm.max_sampling_rounds):
            batch = self.generate(self.next_prompts(prompts_needed), group_size, config.run.seed, iteration,
                                  round_index)
            rewards = self.score_rewards(batch, ray.put(batch), iteration)
            uniform = ppo.zero_variance_groups(rewards, group_size).repeat_interleave(group_size)
            kept.append((batch.select(torch.nonzero(~uniform).flatten()), rewards[~uniform]))
            dropped.append((batch.select(torch.nonzero(uniform).flatten()), rewards[uniform]))
            seen += prompts_needed
            kept_groups += int((~uniform).sum()) // group_size
            if kept_groups >= prompts_needed:
                break
        parts = kept + dropped  # dropped groups only fill what the kept ones leave short
        batch = concat_batches([part for part, _ in parts if len(part)], self.tokenizer.pad_token_id)
        rewards = torch.cat([part for _, part in parts])
        rows = torch.arange(prompts_needed * group_size)
        metrics["sampling/dropped_share"] = 1.0 - min(kept_groups, prompts_needed) / seen
        metrics["sampling/rounds"] = float(round_index + 1)
        return batch.select(rows), rewards[rows]

    def generate_ahead(self, iteration: int) -> GeneratedAhead:
        """Start generating `iteration`'s batch in the generator thread. Only that thread uses the fleet until the
        batch is in: the driver waits for it before the weight sync, the evaluation and any scaling."""
        assert self.generator_thread is not None
        position = (self.state.data_epoch, self.state.data_cursor)
        prompts = self.next_prompts(self.config.data.prompts_per_iteration)

        def generate() -> tuple[RolloutBatch, float]:
            started = time.monotonic()
            batch = self.generate(prompts, self.config.rollout.samples_per_prompt, self.config.run.seed, iteration)
            return batch, time.monotonic() - started

        return GeneratedAhead(self.generator_thread.submit(generate), position)

    def generate(self, prompts: list[Prompt], samples_per_prompt: int, seed: int, iteration: int,
                 round_index: int = 0) -> RolloutBatch:
        per_prompt = self.fleet.generate([prompt.ids for prompt in prompts], samples_per_prompt,
                                         self.config.rollout.temperature,
                                         request_seeds(seed, iteration, len(prompts), round_index))
        return self.build_batch(prompts, per_prompt)

    def build_batch(self, prompts: list[Prompt], per_prompt: list[list[Sample]]) -> RolloutBatch:
        rows = [(prompt, sample) for prompt, samples in zip(prompts, per_prompt, strict=True) for sample in samples]
        query_ids, query_mask = pad_left([prompt.ids for prompt, _ in rows], self.tokenizer.pad_token_id)
        response_ids, response_mask = pad_right([s.token_ids for _, s in rows], self.tokenizer.pad_token_id, torch.long)
        sampler_logprobs, _ = pad_right([s.logprobs for _, s in rows], 0.0, torch.float32)
        return RolloutBatch(
            query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
            sampler_logprobs=sampler_logprobs,
            prompts=[prompt.text for prompt, _ in rows],
            responses=self.tokenizer.batch_decode([s.token_ids for _, s in rows], skip_special_tokens=True),
            metadata=[prompt.metadata for prompt, _ in rows],
            policy_version=self.state.policy_version,
        )

    def eval_scorers(self) -> EvalScorers:
        """An evaluation's scorers: the task's score (or a reward function) in the driver, and the roles that are
        placed — the reward source, the policy learner's and the reference's log-probs."""
        placed, rewards_placed = hasattr(self, "policy"), hasattr(self, "reward")
        # Without a task the held-out score is the run's reward: once the reward actors are placed, they score the
        # batch and eval/score is eval/reward; the driver scoring it again would call a remote endpoint twice.
        score_in_driver = self.eval_scorer is not None and not (rewards_placed and task_of(self.config.data) is None)
        return EvalScorers(
            generate=lambda prompts, samples, seed: self.generate(prompts, samples, seed, iteration=0),
            scores=None if not score_in_driver else lambda batch: torch.tensor(
                self.eval_scorer.score(batch.prompts, batch.responses, batch.metadata)),
            rewards=self.eval_rewards if rewards_placed else None,
            policy_logprobs=self.eval_policy_logprobs if placed else None,
            reference_logprobs=self.eval_reference_logprobs if placed else None,
        )

    def eval_rewards(self, batch: RolloutBatch) -> torch.Tensor:
        return self.score_rewards(batch, ray.put(batch), self.state.iteration, evaluation=True)

    def eval_policy_logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        return torch.cat(self.wait(self.policy.call("score", ray.put(batch), temperature), "policy-learner (score)"))

    def eval_reference_logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        if self.config.reference_in_policy:
            refs = self.policy.call("score_reference", ray.put(batch), temperature)
        else:
            refs = self.reference.call("score", ray.put(batch), temperature)
        return torch.cat(self.wait(refs, "reference (score)"))

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict:
        """Train to run.iterations. When a learner, reference or reward actor dies, every role is torn down and
        restarted from the newest checkpoint, within run.max_restarts (the rollout fleet heals itself)."""
        started = time.monotonic()
        restarts = 0
        while True:
            try:
                return self.train(started)
            except (RayActorError, RayTaskError) as error:
                # When a rank dies, its peers' calls fail too (a collective whose peer is gone), and their
                # RayTaskError may arrive before its RayActorError: either is a role's failure if a process died.
                if isinstance(error, RayTaskError) and not self.a_role_died():
                    raise
                if restarts == self.config.run.max_restarts:
                    raise RuntimeError(
                        f"a role failed again after {restarts} restarts (run.max_restarts): {error}\nRun the same "
                        f"command again to resume from the newest checkpoint in {self.run_dir / 'checkpoints'}"
                    ) from error
                restarts += 1
                log_line(f"a role failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:300]}); "
                         f"restarting every role from the newest checkpoint ({restarts} of {self.config.run.max_restarts})")
                self.shutdown_roles()
                self.reset_state()

    def a_role_died(self) -> bool:
        """Whether a process of a placed learner, reference or reward role is gone."""
        groups = [getattr(self, name) for name in ("policy", "critic", "reference", "reward") if hasattr(self, name)]
        return any(group.dead_ranks() for group in groups)

    def train(self, started: float) -> dict:
        config = self.config
        summary = self.completed_summary()
        if summary is not None:
            return summary
        self.setup()
        assert self.state.eval_points is not None
        # A run whose final checkpoint was written but not its summary trains nothing more, and finishes below.
        done = self.state.done(config.run.iterations)
        if not done:
            log_line(f"training from iteration {self.state.iteration + 1} to {config.run.iterations}: "
                     f"{config.algorithm.describe()}")
        progress = tqdm(range(self.state.iteration + 1, config.run.iterations + 1 if not done else 0), desc="train",
                        unit="iter",
                        initial=self.state.iteration, total=config.run.iterations, disable=not sys.stdout.isatty())
        for iteration in progress:
            iteration_started = time.monotonic()
            if self.startup_seconds is None:
                self.startup_seconds = iteration_started - self.created
            if self.terminate_requested:
                self.stop_on_signal()
            [requests] = self.wait([self.control.requests.remote()], "control")
            self.apply_scaling(requests["rollout_workers"])
            control_seconds = time.monotonic() - iteration_started
            metrics = self.train_iteration(iteration)
            metrics["time/control"] = control_seconds  # requests, scaling, engines joining
            metrics["time/iteration"] = time.monotonic() - iteration_started  # evaluation and checkpoint apart
            self.state.iteration = iteration
            last = iteration == config.run.iterations or requests["finish"]
            best = False
            if last or (config.run.eval_every and iteration % config.run.eval_every == 0):
                with phase("eval", metrics):
                    self.state.eval_last = self.evaluation.run(self.eval_scorers(),
                                                               self.state.eval_baseline_rewards).metrics
                metrics |= self.state.eval_last
                self.state.eval_points.append((iteration, metrics["eval/score"]))
                best = self.early_stopping.update(iteration, metrics[config.run.early_stop.metric])
            self.state.stop_reason = self.stop_reason(metrics)
            last = last or self.state.stop_reason is not None
            if last or best or (config.run.checkpoint_every and iteration % config.run.checkpoint_every == 0):
                with phase("checkpoint", metrics):
                    self.save_checkpoint(iteration)
                if best:
                    self.link_policy("policy_best", iteration)
            metrics |= {"rollout/workers_active": len(self.fleet.active), "rollout/workers_pending": len(self.fleet.pending),
                        "rollout/worker_failures": self.fleet.failures}
            self.metrics.log(iteration, metrics)
            log_line(iteration_line(iteration, config.run.iterations, metrics))
            self.report_status("running", metrics)
            if last:
                if self.state.stop_reason:
                    log_line(f"stopping early at iteration {iteration}: {self.state.stop_reason}")
                break
        eval_score_after = self.state.eval_points[-1][1] if self.state.eval_points else None
        best = self.early_stopping
        final = self.checkpoint_path(self.state.iteration)
        summary = {
            "eval_score_base": self.state.eval_score_base,
            "eval_score_before": self.state.eval_score_before,
            "eval_score_after": eval_score_after,
            "eval_metric": self.eval_metric,
            "best_metric": config.run.early_stop.metric,
            "eval_score_best": best.best,
            "best_iteration": best.best_iteration,
            "policy_best": None if best.best_iteration is None else str(self.run_dir / "policy_best"),
            "stopped_early": self.state.stop_reason,
            "eval_before": self.state.eval_before,
            "eval_after": self.state.eval_last,
            "prompts": self.data.source,
            "iterations": self.state.iteration,
            "samples": self.state.samples,
            "wall_seconds": round(time.monotonic() - started, 1),
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 1),
            "final_policy": str(final / "policy"),
            "reference_model": self.state.reference_model,
        }
        if self.state.reward_model_accuracy is not None:
            summary |= {"reward_model": self.state.reward_model,
                        "reward_model_accuracy": self.state.reward_model_accuracy}
        self.finish(summary)
        self.report_status("finished", {})
        return summary

    def stop_on_signal(self) -> None:
        """SIGTERM (`relay stop`, `ray job stop`, a preempted node): checkpoint the last finished iteration unless it
        already is, and end the run; resubmitted, it resumes from there."""
        iteration = self.state.iteration
        if iteration and not self.checkpoint_path(iteration).exists():
            self.save_checkpoint(iteration)
        log_line(f"stopped by SIGTERM after iteration {iteration}; its checkpoint is in {self.run_dir / 'checkpoints'}, "
                 "and the same command resumes from it")
        raise Terminated()

    def advantages(self, token_rewards: torch.Tensor, values: torch.Tensor | None,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages [B, Lr], returns [B, Lr] for the critic, or None without one) by algorithm.advantage."""
        algorithm = self.config.algorithm
        if algorithm.advantage == "gae":
            assert values is not None
            advantages, returns = ppo.gae(token_rewards, values, mask, algorithm.gamma, algorithm.lam)
            return (ppo.masked_whiten(advantages, mask) if algorithm.whiten_advantages else advantages), returns
        if algorithm.advantage == "reinforce_pp":
            return ppo.reinforce_pp_advantages(token_rewards, mask, algorithm.gamma), None
        # Group estimators compare whole responses: each one's reward (with −β·KL summed in, when it is placed in
        # the reward) against the other samples of its prompt, then the same advantage on each of its tokens.
        sequence_rewards = ppo.masked_sum(token_rewards, mask, dim=1)
        group_size = self.config.rollout.samples_per_prompt
        if algorithm.advantage == "grpo":
            sequence_advantages = ppo.grpo_advantages(sequence_rewards, group_size, algorithm.norm_by_std)
        else:
            sequence_advantages = ppo.rloo_advantages(sequence_rewards, group_size)
        return ppo.sequence_to_tokens(sequence_advantages, mask), None

    @property
    def learners(self) -> list[ActorGroup]:
        return [self.policy, self.critic] if self.config.algorithm.uses_critic else [self.policy]

    @property
    def scorers(self) -> list[tuple[str, ActorGroup, str]]:
        """(role, group, method) that score each batch besides the reward, in the order train_iteration unpacks
        them: old log-probs, reference log-probs (a LoRA policy's own, adapters off), the critic's values."""
        reference = (("reference (policy-learner, adapters off)", self.policy, "score_reference")
                     if self.config.reference_in_policy else ("reference", self.reference, "score"))
        return [("policy-learner", self.policy, "score"), reference,
                *(("critic-learner", critic, "score") for critic in self.learners[1:])]

    def score_rewards(self, batch: RolloutBatch, batch_ref: ray.ObjectRef, iteration: int,
                      evaluation: bool = False) -> torch.Tensor:
        """The reward actors' scores [B]. A reward that raises or is not finite stops the run: nothing trains on
        it, and the samples it was asked to score are written to the run directory for a person to look at (an
        evaluation's too: the one at the start finds a broken reward before anything trains)."""
        try:
            rewards = torch.cat(self.wait(self.reward.call("score", batch_ref), "reward (score)"))
            if torch.isfinite(rewards).all():
                return rewards
            problem = f"the reward is not finite for {int((~torch.isfinite(rewards)).sum())} samples"
        except RayTaskError as error:
            problem = str(error.cause if error.cause is not None else error).strip().splitlines()[-1]
        path = self.run_dir / f"reward_failure_iter_{iteration:06d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps({"prompt": prompt, "response": response, "metadata": metadata},
                                              default=str) + "\n"
                                   for prompt, response, metadata in zip(batch.prompts, batch.responses, batch.metadata)))
        where = f"the evaluation at iteration {iteration}" if evaluation else f"iteration {iteration}"
        raise RewardFailure(f"{where}: {problem}; the batch's {len(batch)} samples are in {path}")

    def role_usage(self) -> dict[str, float]:
        """Each role's busy seconds per pass since the last call, `time/<role>_<pass>`, and its peak memory,
        `perf/<role>_peak_rss_mib` (and `_peak_gpu_mib`), each the maximum over the role's ranks or engines."""
        groups = {"policy": self.policy, "reference": None if self.config.reference_in_policy else self.reference,
                  "critic": self.critic if self.config.algorithm.uses_critic else None, "reward": self.reward}
        reports = {role: self.wait(group.call("usage"), f"{role} (usage)")
                   for role, group in groups.items() if group is not None}
        reports["rollout"] = self.fleet.usage()
        usage: dict[str, float] = {}
        for role, ranks in reports.items():
            for report in ranks:
                for name, value in report.items():
                    key = f"time/{role}_{name.removeprefix('busy/')}" if name.startswith("busy/") else f"perf/{role}_{name}"
                    usage[key] = max(usage.get(key, 0.0), value)
        return usage

    def gather_policy_weights(self) -> list[ray.ObjectRef]:
        """The policy's weights as references to buckets that learner rank 0 streams into the object store. Gathered
        in full before any engine loads: a learner that dies here is the learner's failure, not the engines'."""
        bucket_mb = self.config.rollout.sync_bucket_mb
        streams = {rank: actor.weight_buckets.options(num_returns="streaming").remote(bucket_mb)
                   for rank, actor in enumerate(self.policy.actors)}
        received: dict[int, list[ray.ObjectRef]] = {rank: [] for rank in streams}
        deadline = time.monotonic() + self.config.run.call_timeout_s
        while streams:
            ready, _ = ray.wait(list(streams.values()), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"policy-learner ranks {sorted(streams)} (weight_buckets) did not answer within "
                                   f"run.call_timeout_s={self.config.run.call_timeout_s:.0f} s")
            for rank, stream in list(streams.items()):
                if stream in ready:
                    try:
                        received[rank].append(next(stream))
                    except StopIteration:
                        del streams[rank]
                    else:
                        if rank != 0:  # their one item is their summary (or their error, raised now)
                            ray.get(received[rank][-1])
        # Each rank's last item is its summary, or the error it failed with.
        self.wait([items[-1] for items in received.values()], "policy-learner (weight_buckets)")
        return received[0][:-1]

    def wait(self, refs: list[ray.ObjectRef], role: str) -> list:
        """`ray.get` with the run's deadline, naming `role` (actors.group.get_within)."""
        return get_within(refs, self.config.run.call_timeout_s, role)

    def apply_scaling(self, rollout_workers: int) -> None:
        """At the iteration boundary: follow the requested fleet size; engines that came up (new ones, and
        replacements of failed ones) load the current weights and join."""
        self.fleet.resize(rollout_workers)
        self.fleet.join_ready()

    def report_status(self, state: str, metrics: dict[str, float]) -> None:
        self.control.report.remote({
            "state": state,
            "iteration": self.state.iteration,
            "iterations": self.config.run.iterations,
            "policy_version": self.state.policy_version,
            "rollout_workers_active": [f"rollout-{member.index}" for member in self.fleet.active],
            "rollout_workers_pending": [f"rollout-{member.index}" for member in self.fleet.pending],
            "rollout_worker_failures": self.fleet.failures,
            "algorithm": self.config.algorithm.describe(),
            "reward_mean": metrics.get("reward/mean"),
            "run_dir": str(self.run_dir),
        })

    def stop_reason(self, metrics: dict[str, float]) -> str | None:
        """Why the run ends here, before run.iterations: the KL budget, or early stopping; None: it goes on."""
        config, stopping = self.config, self.early_stopping
        if over_kl_budget(metrics["policy/kl_ref"], config.algorithm.kl_budget):
            return f"policy/kl_ref {metrics['policy/kl_ref']:.4g} passed algorithm.kl_budget {config.algorithm.kl_budget:g}"
        if stopping.should_stop:
            early_stop = config.run.early_stop
            return (f"{early_stop.metric} did not improve by more than {early_stop.min_delta:g} in "
                    f"{early_stop.patience} evaluations (run.early_stop); best {stopping.best:.4g} at iteration "
                    f"{stopping.best_iteration}")
        return None

    def link_policy(self, name: str, iteration: int) -> None:
        link_policy(self.run_dir, name, iteration)

    def checkpoint_path(self, iteration: int) -> Path:
        return checkpoint_path(self.run_dir, iteration)

    def save_checkpoint(self, iteration: int) -> Path:
        """The learners (Hugging Face + DeepSpeed states) and the driver's state, written whole or not at all."""
        final = self.checkpoint_path(iteration)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.wait([ref for group in self.learners for ref in group.call("save", str(partial.resolve()))],
                  "learners (save)")
        self.state.kl_coef = self.kl_controller.value
        self.state.reward_stats = self.reward_normalizer.state_dict()
        self.state.early_stop = self.early_stopping.state_dict()
        state = self.state
        if self.ahead is not None:  # its prompts are drawn again on resume (same seeds, from the saved weights)
            state = replace(state, data_epoch=self.ahead.data_position[0], data_cursor=self.ahead.data_position[1])
        state.write(partial)
        publish_directory(partial, final)
        prune_checkpoints(self.run_dir, self.config.run.keep_checkpoints)
        return final

    def finish(self, summary: dict) -> None:
        self.link_policy("policy", self.state.iteration)
        if self.early_stopping.best_iteration is not None:  # again: a crash may have come between its checkpoint and link
            self.link_policy("policy_best", self.early_stopping.best_iteration)
        plot_reward_curve(self.metrics.jsonl_path, self.run_dir / "reward_curve.png", self.state.eval_points or [])
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.metrics.close()
        print(json.dumps(summary, indent=2))

    def shutdown(self) -> None:
        self.shutdown_roles()
        if self.generator_thread is not None:
            self.generator_thread.shutdown()
        if hasattr(self, "control"):
            ray.kill(self.control)
            del self.control

    def shutdown_roles(self) -> None:
        """Every role's actors and placement groups gone, and the metric sinks closed. The control actor stays:
        a restart keeps the requests it holds."""
        if self.ahead is not None:  # the fleet is the generator thread's until its batch is in
            wait_for_futures([self.ahead.batch])
            self.ahead = None
        for name in ("fleet", "policy", "critic", "reference", "reward"):
            if hasattr(self, name):
                getattr(self, name).shutdown()
                delattr(self, name)
        if hasattr(self, "metrics"):
            self.metrics.close()
            del self.metrics


def initial_tokenizer(config: RelayConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer before any model is loaded: a tiny model's is built from the data's characters."""
    if config.tiny_model is not None:
        return build_tokenizer(data_alphabet(config), config.chat_template)
    assert config.policy.model is not None
    if config.policy.model.startswith(("/", "./", "../", "~")) and not Path(config.policy.model).expanduser().exists():
        raise ValueError(f"policy.model {config.policy.model}: no such directory")
    try:
        return load_tokenizer(resolve_model_path(config.policy.model), config.chat_template)
    except OSError as error:
        raise ValueError(f"policy.model {config.policy.model!r}: no tokenizer can be loaded from it ({error})") from None


def eval_scorer(config: RelayConfig) -> tuple[RewardSource | None, str]:
    """What the held-out score measures, and the source that scores it in the driver: the task's own reward when
    the prompts come from a task (ground truth, whatever the training reward is), else the run's reward (None for
    a reward model, which scores through the reward actors)."""
    task = task_of(config.data)
    if task is not None:
        return FunctionReward(task.reward, name=f"task {config.data.task}"), f"task {config.data.task} reward"
    if config.reward.type == "model":
        return None, f"reward model {config.reward.model or '(trained in this run)'}"
    source = build_reward_source(config.reward, None)
    return source, f"reward {getattr(source, 'name', None) or config.reward.url}"


def check_eval_metric(config: RelayConfig, columns: dict) -> None:
    """run.early_stop.metric must be one that this run's evaluations give."""
    metric, key = config.run.early_stop.metric, config.eval.answer_key
    if metric in ("eval/bleu", "eval/chrf") and key not in columns:
        raise ValueError(f"run.early_stop.metric {metric} needs reference answers, and the held-out prompts have no "
                         f"column {key!r} (eval.answer_key); their columns besides the prompt: "
                         f"{', '.join(sorted(columns)) or 'none'}")


def log_line(line: str) -> None:
    """One line into the job's log at once: above the progress bar on a terminal, and flushed, so a file or Ray's
    log forwarding gets it the moment it is written rather than when a buffer fills."""
    tqdm.write(line)
    sys.stdout.flush()


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
    phases = " ".join(f"{name} {metrics[f'time/{name}']:.2f}s"
                      for name in ("generate", "score", "advantages", "train", "generate_wait", "sync", "eval", "checkpoint")
                      if f"time/{name}" in metrics)
    line += f" | {phases}"
    if "eval/score" in metrics:
        line += f" | eval {metrics['eval/score']:.3f}"
    return line


def mean_over_ranks(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the ranks that report it (a rank whose micro-batches were all skipped has no loss)."""
    names = dict.fromkeys(name for rank in stats for name in rank)
    return {name: sum(values) / len(values) for name in names
            if (values := [rank[name] for rank in stats if name in rank])}


class RewardFailure(RuntimeError):
    """The reward source raised, or gave a non-finite reward: the run stops rather than train on it."""


class Terminated(Exception):
    """The run ended on SIGTERM, after writing its checkpoint."""


def main(argv: list[str] | None = None) -> dict:
    config = config_from_command_line("PPO on Ray: vLLM rollouts, DeepSpeed learners.", argv)
    problems = preflight.errors(config, check_output_dir, check_resumable)  # relay check's, every one listed
    if problems:
        sys.exit("\n".join(problems))
    try:
        trainer = PPOTrainer(config)  # loads and checks the prompts: before Ray starts
    except ValueError as error:
        sys.exit(f"error: {error}")

    def on_sigterm(signum: int, frame: object) -> None:  # acted on at the next iteration boundary
        trainer.terminate_requested = True

    connect_ray(config)
    try:
        check_cluster_resources(config)
    except ValueError as error:
        sys.exit(f"error: {error}")
    signal.signal(signal.SIGTERM, on_sigterm)  # after ray.init, which installs a handler of its own that aborts
    try:
        return trainer.fit()
    except Terminated:
        sys.exit(128 + signal.SIGTERM)
    except RewardFailure as error:
        sys.exit(f"error: {error}")
    except RayTaskError as error:
        if isinstance(error.cause, NonFiniteLoss):
            sys.exit(f"error: {error.cause}")
        raise
    finally:
        trainer.shutdown()


if __name__ == "__main__":
    main()
