"""The RL driver: prompts → generate → score → advantages → train → sync → metrics, once per iteration.

    python -m jobs.ppo --config jobs/configs/demo.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python -m jobs.ppo --config jobs/configs/demo.yaml

PPO with GAE and a critic by default; GRPO, RLOO or REINFORCE++ without one (`algorithm.advantage`). Prompts come
from `data.prompts` (a dataset) or `data.task`. With `tiny_model` the policy is built locally (no download); with
`warm_start` it is first fine-tuned on demonstrations (jobs/sft.py). The run directory gets metrics.jsonl,
TensorBoard events, checkpoints (`resume: auto` continues from the newest), summary.json, reward_curve.png and the
final policy.

The driver wires its rooms: where a batch comes from (jobs/rollout_source.py), where it is trained
(jobs/iteration.py, over the roles of jobs/roles.py), where the run is saved (jobs/record.py), and what keeps it
going (jobs/supervision.py); the held-out evaluation is relay/evaluation.py, shared with `relay eval`.
"""

from __future__ import annotations

import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from ray.exceptions import RayTaskError
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from actors.learner import NonFiniteLoss
from jobs.common import (
    check_cluster_resources,
    check_device,
    check_output_dir,
    connect_ray,
    prepare_base_model,
    resolve_model_path,
)
from jobs.iteration import Iteration, iteration_line, phase
from jobs.record import DriverState, RunRecord, check_resumable
from jobs.reward_model import run_reward_model_training
from jobs.episode_source import EnvFailure, env_stop
from jobs.roles import RewardFailure, Roles
from jobs.rollout_source import RolloutSource
from jobs.sft import run_warm_start
from jobs.supervision import Supervisor, Terminated, log_line
from relay import preflight
from relay.batch import RolloutBatch
from relay.config import RelayConfig, config_from_command_line
from relay.evaluation import EarlyStopping, EvalScorers, Evaluation, over_kl_budget
from relay.metrics import MetricsLogger
from relay.models import build_tokenizer, check_scoring_tokenizers, load_tokenizer
from relay.prompts import data_alphabet, load_prompt_data, max_prompt_tokens
from relay.rewards import FunctionReward, RewardSource, build_reward_source
from relay.tasks import task_of


class PPOTrainer:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.run_dir = Path(config.run.output_dir).resolve()
        # Everything that can be checked is checked here, before Ray starts and before the run directory is
        # touched: the device, the run directory and a run it would resume, the reward, the tokenizer, the prompts.
        check_device(config)
        check_output_dir(self.run_dir)
        check_resumable(config, self.run_dir)
        if config.reward.type not in ("model", "none"):
            build_reward_source(config.reward, task_of(config.data), config.data.task)  # imports reward.function
        if config.env is not None:
            env_stop(config)  # imports the env, builds one with env.kwargs and reads its stop strings
        self.tokenizer = initial_tokenizer(config)
        check_scoring_tokenizers(config, self.tokenizer)  # reward, critic and reference read the policy's token ids
        self.data = load_prompt_data(config, self.tokenizer)
        counts = self.data.counts
        if counts.dropped or counts.truncated:
            print(f"data: {counts.dropped} prompts dropped and {counts.truncated} truncated, being longer than "
                  f"{max_prompt_tokens(config)} tokens (rollout.max_model_len - rollout.max_new_tokens)", flush=True)
        config.check_prompt_columns(self.data.eval[0].metadata, self.data.source)
        self.eval_scorer, self.eval_metric = eval_scorer(config)
        self.evaluation = Evaluation(config, self.tokenizer, self.data.eval)  # its text set is read here, too
        self.record = RunRecord(config, self.run_dir)
        self.supervisor = Supervisor(config)
        self.source = RolloutSource(config, self.data, self.tokenizer)
        self.roles: Roles | None = None  # placed by setup, gone after shutdown_roles
        self.iteration: Iteration | None = None
        self.metrics: MetricsLogger | None = None
        self.created = time.monotonic()  # in `relay train`, before Ray starts
        self.startup_seconds: float | None = None  # from here to the first iteration
        self.reset_state()

    def reset_state(self) -> None:
        """The driver's state as a new run starts it; a checkpoint, when there is one, then overwrites it."""
        self.state = DriverState(kl_coef=self.config.algorithm.kl_coef)
        early_stop = self.config.run.early_stop
        self.early_stopping = EarlyStopping(early_stop.direction, early_stop.min_delta, early_stop.patience)
        self.source.position = (0, 0)

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Resume from the newest checkpoint or start fresh, then place and start every role."""
        checkpoint = self.record.prepare()
        policy_path, critic_path = self.resume_from(checkpoint) if checkpoint else self.start_fresh()
        self.roles = Roles(self.config, self.run_dir, policy_path, critic_path, self.state.reference_model,
                           self.state.reward_model)
        if checkpoint is not None:
            self.roles.load(checkpoint)
        else:  # after placement, so that every role scores: the start all later evaluations compare against
            before = self.evaluation.run(self.eval_scorers())
            self.state.eval_before, self.state.eval_baseline_rewards = before.metrics, before.rewards
            self.state.eval_score_before = before.metrics.get("eval/score")
            self.state.eval_points = [] if self.state.eval_score_before is None else [(0, self.state.eval_score_before)]
        self.iteration = Iteration(self.config, self.source, self.roles, self.state, self.data.counts)
        self.metrics = MetricsLogger(self.run_dir, run_name=self.config.run.name, resumed_at=self.state.iteration,
                                     algorithm=self.config.algorithm.advantage, tracking=self.config.tracking,
                                     params=self.config.model_dump(mode="json"))
        self.supervisor.start_control()

    def resume_from(self, checkpoint: Path) -> tuple[str, str]:
        """The driver's state and the data position as saved; engines on the saved policy. Returns the policy and
        critic weights to start the learners from (their DeepSpeed states load once they are placed)."""
        self.state = DriverState.read(checkpoint)
        if self.state.early_stop is not None:
            self.early_stopping.load_state_dict(self.state.early_stop)
        self.source.position = (self.state.data_epoch, self.state.data_cursor)
        self.source.start(str(checkpoint / "policy"))
        print(f"resuming from {checkpoint} (iteration {self.state.iteration})", flush=True)
        return str(checkpoint / "policy"), str(checkpoint / "critic")

    def start_fresh(self) -> tuple[str, str]:
        """Base model → (warm start) → (reward model) → reference, evaluating before and after the warm start.
        Returns the policy and critic weights to start the learners from."""
        config = self.config
        base_path = prepare_base_model(config, self.run_dir)

        def start_engines_and_score_the_base_model() -> float | None:
            # By the task or a reward function in the driver: no other role is up yet.
            self.source.start(base_path)
            return self.evaluation.run(self.eval_scorers()).metrics.get("eval/score")

        # The engines start and score the base model while the warm start trains, each on resources of its own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="base-eval") as evaluator:
            base_score = evaluator.submit(start_engines_and_score_the_base_model)
            policy_path = base_path if config.warm_start is None else run_warm_start(config, base_path, self.run_dir)
            self.state.eval_score_base = base_score.result()
        if policy_path != base_path:
            assert self.source.fleet is not None
            self.source.fleet.load_weights_from(policy_path, policy_version=0)
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

    def eval_scorers(self) -> EvalScorers:
        """An evaluation's scorers: the task's score (or a reward function) in the driver, and the roles that are
        placed: the reward source, the policy learner's and the reference's log-probs."""
        roles = self.roles
        return EvalScorers(
            generate=lambda prompts, samples, seed: self.source.generate(prompts, samples, seed, 0,
                                                                         self.state.policy_version),
            scores=driver_scores(self.config, self.eval_scorer, rewards_placed=roles is not None),
            rewards=None if roles is None or roles.reward is None else lambda batch: roles.score_rewards(
                batch, self.state.iteration, evaluation=True),
            policy_logprobs=None if roles is None else roles.policy_logprobs,
            reference_logprobs=None if roles is None else roles.reference_logprobs,
        )

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict:
        """Train to run.iterations, restarting every role from the newest checkpoint when one dies
        (jobs/supervision.py)."""
        started = time.monotonic()
        return self.supervisor.fit(lambda: self.train(started), self.a_role_died, self.restart,
                                   str(self.run_dir / "checkpoints"))

    def a_role_died(self) -> bool:
        return self.roles is not None and self.roles.dead()

    def restart(self) -> None:
        self.shutdown_roles()
        self.reset_state()

    def train(self, started: float) -> dict:
        summary = self.record.completed_summary()
        if summary is not None:
            return summary
        self.setup()
        iterations = self.config.run.iterations
        # A run whose final checkpoint was written but not its summary trains nothing more, and finishes below.
        if not self.state.done(iterations):
            log_line(f"training from iteration {self.state.iteration + 1} to {iterations}: "
                     f"{self.config.algorithm.describe()}")
            progress = tqdm(range(self.state.iteration + 1, iterations + 1), desc="train", unit="iter",
                            initial=self.state.iteration, total=iterations, disable=not sys.stdout.isatty())
            for iteration in progress:
                if self.run_iteration(iteration):
                    break
        return self.finish(started)

    def run_iteration(self, iteration: int) -> bool:
        """Requests, the iteration, then evaluation and checkpoint when due; True when it is the run's last."""
        assert self.iteration is not None and self.metrics is not None
        started = time.monotonic()
        if self.startup_seconds is None:
            self.startup_seconds = started - self.created
        if self.supervisor.terminate_requested:
            self.stop_on_signal()
        requests = self.supervisor.requests()
        self.apply_scaling(requests["rollout_workers"])
        control_seconds = time.monotonic() - started
        metrics = self.iteration(iteration)
        metrics["time/control"] = control_seconds  # requests, scaling, engines joining
        metrics["time/iteration"] = time.monotonic() - started  # evaluation and checkpoint apart
        self.state.iteration = iteration
        last = iteration == self.config.run.iterations or requests["finish"]
        best = self.evaluate_if_due(iteration, metrics, last)
        self.state.stop_reason = self.stop_reason(metrics)
        last = last or self.state.stop_reason is not None
        checkpoint_every = self.config.run.checkpoint_every
        if last or best or (checkpoint_every and iteration % checkpoint_every == 0):
            with phase("checkpoint", metrics):
                self.save_checkpoint(iteration)
            if best:
                self.record.link_policy("policy_best", iteration)
        fleet = self.iteration.fleet
        metrics |= {"rollout/workers_active": len(fleet.active), "rollout/workers_pending": len(fleet.pending),
                    "rollout/worker_failures": fleet.failures}
        self.metrics.log(iteration, metrics)
        log_line(iteration_line(iteration, self.config.run.iterations, metrics))
        self.report_status("running", metrics)
        if last and self.state.stop_reason:
            log_line(f"stopping early at iteration {iteration}: {self.state.stop_reason}")
        return last

    def evaluate_if_due(self, iteration: int, metrics: dict[str, float], last: bool) -> bool:
        """The held-out evaluation every run.eval_every iterations and at the last; True when it is the best."""
        eval_every = self.config.run.eval_every
        if not (last or (eval_every and iteration % eval_every == 0)):
            return False
        assert self.state.eval_points is not None
        with phase("eval", metrics):
            self.state.eval_last = self.evaluation.run(self.eval_scorers(), self.state.eval_baseline_rewards).metrics
        metrics |= self.state.eval_last
        self.state.eval_points.append((iteration, metrics["eval/score"]))
        return self.early_stopping.update(iteration, metrics[self.config.run.early_stop.metric])

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

    def stop_on_signal(self) -> None:
        """SIGTERM: checkpoint the last finished iteration unless it already is, and end the run; resubmitted, it
        resumes from there."""
        iteration = self.state.iteration
        if iteration and not self.record.checkpoint_path(iteration).exists():
            self.save_checkpoint(iteration)
        log_line(f"stopped by SIGTERM after iteration {iteration}; its checkpoint is in {self.run_dir / 'checkpoints'}, "
                 "and the same command resumes from it")
        raise Terminated()

    def apply_scaling(self, rollout_workers: int) -> None:
        """At the iteration boundary: follow the requested fleet size; engines that came up (new ones, and
        replacements of failed ones) load the current weights and join."""
        assert self.source.fleet is not None
        self.source.fleet.resize(rollout_workers)
        self.source.fleet.join_ready()

    def report_status(self, state: str, metrics: dict[str, float]) -> None:
        fleet = self.source.fleet
        self.supervisor.report({
            "state": state,
            "iteration": self.state.iteration,
            "iterations": self.config.run.iterations,
            "policy_version": self.state.policy_version,
            "rollout_workers_active": [f"rollout-{member.index}" for member in fleet.active] if fleet else [],
            "rollout_workers_pending": [f"rollout-{member.index}" for member in fleet.pending] if fleet else [],
            "rollout_worker_failures": fleet.failures if fleet else 0,
            "algorithm": self.config.algorithm.describe(),
            "reward_mean": metrics.get("reward/mean"),
            "run_dir": str(self.run_dir),
        })

    def save_checkpoint(self, iteration: int) -> Path:
        """The learners (Hugging Face + DeepSpeed states) and the driver's state, written whole or not at all."""
        assert self.roles is not None and self.iteration is not None
        self.iteration.save_into(self.state)
        self.state.early_stop = self.early_stopping.state_dict()
        self.state.data_epoch, self.state.data_cursor = self.source.position
        return self.record.save_checkpoint(iteration, self.state, self.roles.save)

    def finish(self, started: float) -> dict:
        """The summary of the run, written with the final links and the reward curve (the run is complete)."""
        assert self.metrics is not None
        state, best = self.state, self.early_stopping
        summary = {
            "eval_score_base": state.eval_score_base,
            "eval_score_before": state.eval_score_before,
            "eval_score_after": state.eval_points[-1][1] if state.eval_points else None,
            "eval_metric": self.eval_metric,
            "best_metric": self.config.run.early_stop.metric,
            "eval_score_best": best.best,
            "best_iteration": best.best_iteration,
            "policy_best": None if best.best_iteration is None else str(self.run_dir / "policy_best"),
            "stopped_early": state.stop_reason,
            "eval_before": state.eval_before,
            "eval_after": state.eval_last,
            "prompts": self.data.source,
            "iterations": state.iteration,
            "samples": state.samples,
            "wall_seconds": round(time.monotonic() - started, 1),
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 1),
            "final_policy": str(self.record.checkpoint_path(state.iteration) / "policy"),
            "reference_model": state.reference_model,
        }
        if state.reward_model_accuracy is not None:
            summary |= {"reward_model": state.reward_model, "reward_model_accuracy": state.reward_model_accuracy}
        self.record.finish(summary, state, best.best_iteration, self.metrics.jsonl_path)
        self.metrics.close()
        self.report_status("finished", {})
        return summary

    def shutdown(self) -> None:
        self.shutdown_roles()
        self.source.close()
        self.supervisor.shutdown()

    def shutdown_roles(self) -> None:
        """Every role's actors and placement groups gone (the fleet after the batch it may be generating ahead),
        and the metric sinks closed. The control actor stays: a restart keeps the requests it holds."""
        self.source.shutdown()
        if self.roles is not None:
            self.roles.shutdown()
            self.roles = self.iteration = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


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
    if config.env is not None:
        return None, f"episode return in env {config.env.name}"
    task = task_of(config.data)
    if task is not None:
        return FunctionReward(task.reward, name=f"task {config.data.task}"), f"task {config.data.task} reward"
    if config.reward.type == "model":
        return None, f"reward model {config.reward.model or '(trained in this run)'}"
    source = build_reward_source(config.reward, None)
    return source, f"reward {getattr(source, 'name', None) or config.reward.url}"


def driver_scores(config: RelayConfig, scorer: RewardSource | None,
                  rewards_placed: bool) -> Callable[[RolloutBatch], torch.Tensor] | None:
    """The held-out score computed in the driver, or None. Without a task the held-out score is the run's reward:
    once the reward actors are placed, they score the batch and eval/score is eval/reward (the driver scoring it
    again would call a remote endpoint twice)."""
    if scorer is None or (rewards_placed and task_of(config.data) is None) or config.env is not None:
        return None
    return lambda batch: torch.tensor(scorer.score(batch.prompts, batch.responses, batch.metadata))


def main(argv: list[str] | None = None) -> dict:
    config = config_from_command_line("PPO on Ray: vLLM rollouts, DeepSpeed learners.", argv)
    problems = preflight.errors(config, check_output_dir, check_resumable)  # relay check's, every one listed
    if problems:
        sys.exit("\n".join(problems))
    try:
        trainer = PPOTrainer(config)  # loads and checks the prompts: before Ray starts
    except ValueError as error:
        sys.exit(f"error: {error}")
    connect_ray(config)
    try:
        check_cluster_resources(config)
    except ValueError as error:
        sys.exit(f"error: {error}")
    trainer.supervisor.catch_sigterm()
    try:
        return trainer.fit()
    except Terminated:
        sys.exit(128 + signal.SIGTERM)
    except (RewardFailure, EnvFailure) as error:
        sys.exit(f"error: {error}")
    except RayTaskError as error:
        if isinstance(error.cause, NonFiniteLoss):
            sys.exit(f"error: {error.cause}")
        raise
    finally:
        trainer.shutdown()


if __name__ == "__main__":
    main()
