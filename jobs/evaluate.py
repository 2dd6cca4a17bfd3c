"""`relay eval`: evaluate policies side by side on a run's held-out prompts.

    relay eval --config FILE MODEL [MODEL ...] [--against MODEL] [--output FILE] [overrides]

Each MODEL is a run directory (its final policy), a checkpoint directory (`checkpoints/iter_N`), a Hugging Face
model directory or a Hub name. Each is evaluated as training evaluates (relay/evaluation.py): the task's score where
the prompts come from a task, the reward source's score, the win rate against the reference judged by the reward
source, the KL to the reference, the perplexity of the text set, BLEU and chrF where the prompts carry answers. The
reference is the run's own (from the run directory of the first MODEL, or of the config's run.output_dir) unless
--against names another. Printed as a table, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from actors.group import ActorGroup, get_within
from actors.reference import Reference
from actors.reward import RewardScorer
from jobs.common import connect_ray, latest_checkpoint, policy_path, resolve_model_path, run_directory
from jobs.ppo import PPOTrainer, driver_scores
from jobs.record import DriverState
from jobs.roles import score_rewards
from relay.batch import RolloutBatch
from relay.config import RelayConfig, load_config
from relay.evaluation import EvalScorers
from relay.models import check_same_tokenizer, load_tokenizer
from relay.placement import role_placement
from relay.storage import write_atomic


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="relay eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the run's config (its data, reward, eval)")
    parser.add_argument("models", nargs="+", metavar="MODEL or key=value",
                        help="run directories, checkpoints, model directories or Hub names; and config overrides")
    parser.add_argument("--against", help="the reference policy (default: the run's own)")
    parser.add_argument("--output", type=Path, default=Path("runs/eval/eval.json"))
    args, extra = parser.parse_known_args(argv)
    items = [*args.models, *extra]  # overrides may come after the options, too
    models = [item for item in items if "=" not in item]
    overrides = [item for item in items if "=" in item]
    try:
        report = evaluate(args.config, models, args.against, args.output, overrides)
    except ValueError as error:
        sys.exit(f"error: {error}")
    return report


def evaluate(config_path: Path, models: list[str], against: str | None, output: Path,
             overrides: list[str]) -> dict[str, Any]:
    """Resolve every model and the reference (before Ray starts), evaluate each, print and write the report."""
    if not models:
        raise ValueError("name at least one model to evaluate")
    run_config = load_config(config_path, overrides)
    policies = {name: policy_path(name) for name in models}
    run_dir = run_directory(models[0]) or Path(run_config.run.output_dir)
    reference = policy_path(against) if against else run_reference(run_dir)
    config = eval_config(config_path, overrides, next(iter(policies.values())), run_dir, output)
    reference_tokenizer = load_tokenizer(reference, config.chat_template)
    for name, path in policies.items():  # every policy is scored by the reference's engine and in its token ids
        check_same_tokenizer(reference_tokenizer, load_tokenizer(path, config.chat_template),
                             f"the reference {reference}", name)
    trainer = PPOTrainer(config)  # the held-out prompts, their evaluation, the task's scorer: as the run had them

    connect_ray(config)
    scorers: dict[str, ActorGroup] = {}
    try:
        trainer.source.start(reference)  # with an env, its actors too: the held-out episodes are played in it
        if config.uses_reward_source:  # an env run without one is scored by its episodes' return
            scorers["reward"] = ActorGroup(
                RewardScorer, "eval-reward", role_placement(config, "reward"), namespace=config.actor_namespace,
                timeout_s=config.run.call_timeout_s,
                config=config, model_path=config.reward.model and resolve_model_path(config.reward.model))
        scorers["reference"] = logprob_group(config, "eval-reference", reference)
        results: dict[str, dict[str, float]] = {}
        baseline = trainer.evaluation.run(eval_scorers(trainer, scorers.get("reward"), scorers["reference"],
                                                       scorers["reference"]))
        results[f"reference: {against or reference}"] = baseline.metrics
        for version, (name, path) in enumerate(policies.items(), start=1):
            assert trainer.source.fleet is not None
            trainer.source.fleet.load_weights_from(path, policy_version=version)
            policy = logprob_group(config, f"eval-policy-{version}", path)
            try:
                results[name] = trainer.evaluation.run(
                    eval_scorers(trainer, scorers.get("reward"), policy, scorers["reference"]),
                    baseline.rewards).metrics
            finally:
                policy.shutdown()
    finally:
        for group in scorers.values():
            group.shutdown()
        trainer.source.shutdown()
    report = {"config": str(config_path), "reference": reference, "eval_metric": trainer.eval_metric,
              "prompts": len(trainer.data.eval), "samples_per_prompt": config.data.eval_samples_per_prompt,
              "models": {name: policies.get(name, reference) for name in results}, "results": results}
    print(table(results))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, json.dumps(report, indent=2) + "\n")
    print(f"written: {output}")
    return report


def eval_scorers(trainer: PPOTrainer, reward: ActorGroup | None, policy: ActorGroup,
                 reference: ActorGroup) -> EvalScorers:
    """The training evaluation's scorers, with frozen models in place of the learner and the run's reference."""
    config, timeout_s = trainer.config, trainer.config.run.call_timeout_s

    def logprobs(group: ActorGroup) -> Callable[[RolloutBatch, float], torch.Tensor]:
        return lambda batch, temperature: torch.cat(
            get_within(group.call("score", ray.put(batch), temperature), timeout_s, f"{group.name} (score)"))

    return EvalScorers(
        generate=lambda prompts, samples, seed: trainer.source.generate(prompts, samples, seed, 0, 0),
        scores=driver_scores(config, trainer.eval_scorer, rewards_placed=True),
        rewards=None if reward is None else lambda batch: score_rewards(reward, batch, 0, trainer.run_dir, timeout_s,
                                                                        evaluation=True),
        policy_logprobs=logprobs(policy), reference_logprobs=logprobs(reference))


def logprob_group(config: RelayConfig, name: str, model_path: str) -> ActorGroup:
    group = ActorGroup(Reference, name, role_placement(config, "reference"), namespace=config.actor_namespace,
                       timeout_s=config.run.call_timeout_s,
                       config=config, model_path=model_path)
    group.wait_ready()
    return group


def run_reference(run_dir: Path) -> str:
    """The reference policy a run trained against, from its newest checkpoint."""
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        raise ValueError(f"{run_dir} holds no checkpoint to read the run's reference policy from: name it with "
                         "--against")
    return DriverState.read(checkpoint).reference_model


def eval_config(config_path: Path, overrides: list[str], first_policy: str, run_dir: Path,
                output: Path) -> RelayConfig:
    """The run's config for an evaluation: models loaded from paths (a tiny model's tokenizer is saved with it),
    the run's reward model when it trained one, and no training stage."""
    config = load_config(config_path, overrides)
    extra = ["tiny_model=null", f"policy.model={first_policy}", "warm_start=null", "reward_model_training=null",
             "reference.colocate_with_policy=false", "reward.colocate_with_policy=false",
             f"run.output_dir={output.parent.resolve() / 'eval-run'}", "run.resume=never"]
    if config.warm_start is not None and config.warm_start.data and not config.eval.text_data:
        extra.append(f"eval.text_data={config.warm_start.data}")  # the perplexity's text set, as in training
    if config.reward.type == "model" and not config.reward.model:
        checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        trained = checkpoint and DriverState.read(checkpoint).reward_model
        if not trained:
            raise ValueError(f"reward.model is not set and {run_dir} holds no reward model trained in the run: set "
                             "reward.model=PATH")
        extra.append(f"reward.model={trained}")
    return load_config(config_path, [*overrides, *extra])


def table(results: dict[str, dict[str, float]]) -> str:
    """Models as rows, metrics as columns."""
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    headers = [metric.removeprefix("eval/") for metric in metrics]
    width = max(len(name) for name in results) + 2
    columns = [max(10, len(header) + 2) for header in headers]
    lines = ["model".ljust(width) + "".join(header.rjust(column) for header, column in zip(headers, columns))]
    for name, row in results.items():
        cells = [f"{row[metric]:.4f}" if metric in row else "-" for metric in metrics]
        lines.append(name.ljust(width) + "".join(cell.rjust(column) for cell, column in zip(cells, columns)))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
