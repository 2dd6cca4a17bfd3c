"""Bradley–Terry reward model on preference pairs, on Ray Train (TorchTrainer) with DeepSpeed ZeRO.

    python -m jobs.reward_model --config FILE [overrides]

Reads pairs from `reward_model_training.data` (jsonl, parquet or a Hugging Face dataset; chat format rendered with
the run's chat template, as PPO's prompts are) or, when it is unset, asks a simulated annotator to judge candidate
answers to `data.task` by the task's reward. Starts from the base model (`policy.model` or the tiny model), puts a
one-label score head on it (AutoModelForSequenceClassification), and minimises −log σ(score(chosen) −
score(rejected)).
Saves a Hugging Face checkpoint through Ray Train's checkpointing, with held-out pair accuracy and mean margin; a
PPO run uses it with `reward.type: model` and `reward.model: <path>`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from jobs.common import (
    fit_on_ray_train,
    prepare_base_model,
    save_and_report,
    start_train_worker,
    start_training_job,
)
from relay.config import RelayConfig, RewardModelSection, config_from_command_line
from relay.models import load_tokenizer
from relay.preferences import (
    PreferencePair,
    bradley_terry_loss,
    collate_preferences,
    load_preferences,
    mean_margin,
    pair_accuracy,
    pair_scores,
    simulated_preferences,
    split_pairs,
)
from relay.tasks import get_task

REPORT_EVERY = 50


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    section = RewardModelSection.model_validate(loop_config["section"])
    worker = start_train_worker(loop_config["model_path"], "reward", chat_template=loop_config["chat_template"],
                                zero_stage=section.zero_stage, dtype=section.dtype, batch_size=section.batch_size,
                                learning_rate=section.learning_rate)
    rank, per_rank, tokenizer, engine = worker.rank, worker.per_rank_batch_size, worker.tokenizer, worker.engine

    train_pairs: list[PreferencePair] = ray.get(loop_config["train_pairs"])
    eval_pairs: list[PreferencePair] = ray.get(loop_config["eval_pairs"])
    rng = random.Random(loop_config["seed"] * 7919 + rank)
    metrics: dict[str, float] = {}
    for step in range(section.steps):
        batch = collate_preferences(tokenizer, rng.sample(train_pairs, min(per_rank, len(train_pairs))),
                                    section.max_length)
        chosen, rejected = pair_scores(engine, {name: tensor.to(engine.device) for name, tensor in batch.items()})
        loss = bradley_terry_loss(chosen, rejected)
        engine.backward(loss)
        engine.step()
        metrics = {
            "losses/reward_model": loss.item(),
            "reward_model/train_accuracy": pair_accuracy(chosen, rejected),
            "step": step + 1,
        }
        if (step + 1) % REPORT_EVERY == 0 and step + 1 < section.steps:
            ray.train.report(metrics)

    # Every rank scores the whole held-out set in step: under ZeRO-3 each forward gathers parameters from all.
    engine.eval()
    chosen_parts, rejected_parts = [], []
    with torch.no_grad():
        for start in range(0, len(eval_pairs), per_rank):
            batch = collate_preferences(tokenizer, eval_pairs[start : start + per_rank], section.max_length)
            chosen, rejected = pair_scores(engine, {name: tensor.to(engine.device) for name, tensor in batch.items()})
            chosen_parts.append(chosen.cpu())
            rejected_parts.append(rejected.cpu())
    chosen_all, rejected_all = torch.cat(chosen_parts), torch.cat(rejected_parts)
    metrics["reward_model/eval_accuracy"] = pair_accuracy(chosen_all, rejected_all)
    metrics["reward_model/eval_margin"] = mean_margin(chosen_all, rejected_all)
    metrics["reward_model/eval_pairs"] = len(eval_pairs)

    save_and_report(worker, metrics)


def preference_pairs(config: RelayConfig, model_path: str) -> list[PreferencePair]:
    """The configured pairs, loaded (and validated) on the driver so a bad row fails before any worker starts."""
    section = config.reward_model_training
    assert section is not None
    if section.data is None:
        task = get_task(config.data.task)
        return simulated_preferences(task, section.simulated_pairs, random.Random(config.data.seed))
    return load_preferences(section.data, load_tokenizer(model_path, config.chat_template))


def run_reward_model_training(config: RelayConfig, base_model_path: str, run_dir: Path) -> dict[str, Any]:
    """Train a reward model from `base_model_path`; return {"path", "accuracy", "mean_margin"} (held-out pairs)."""
    section = config.reward_model_training
    assert section is not None
    train_pairs, eval_pairs = split_pairs(preference_pairs(config, base_model_path), section.eval_fraction,
                                          config.data.seed)
    result = fit_on_ray_train(
        "reward_model", train_loop_per_worker, config, section.resources, run_dir,
        {
            "section": section.model_dump(),
            "model_path": base_model_path,
            "chat_template": config.chat_template,
            "seed": config.data.seed,
            # In the object store once; every worker fetches the same copy.
            "train_pairs": ray.put(train_pairs),
            "eval_pairs": ray.put(eval_pairs),
        },
    )
    return {
        "path": result.checkpoint.path,
        "accuracy": result.metrics["reward_model/eval_accuracy"],
        "mean_margin": result.metrics["reward_model/eval_margin"],
    }


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line("Bradley–Terry reward model on Ray Train + DeepSpeed.", argv)
    run_dir = start_training_job(config, "reward_model_training")
    try:
        result = run_reward_model_training(config, prepare_base_model(config, run_dir), run_dir)
    except ValueError as error:  # a malformed preference row or missing chat template: the message says where
        sys.exit(str(error))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
