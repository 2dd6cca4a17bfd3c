"""Supervised warm start on Ray Train (TorchTrainer) with DeepSpeed ZeRO.

    python -m jobs.sft --config jobs/configs/demo.yaml

Trains the policy on `warm_start.data` (prompt/response or chat `messages` rows from jsonl, parquet or a Hugging
Face dataset; see relay/data.py) or, when that is unset, on the task's demonstrations, with the loss on response
tokens only, and saves a Hugging Face checkpoint through Ray Train's checkpointing. The PPO job runs the same
function as its warm start when the config has a `warm_start` section.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.experimental import tqdm_ray

from jobs.common import (
    fit_on_ray_train,
    prepare_base_model,
    save_and_report,
    start_train_worker,
    start_training_job,
)
from relay.config import ConfigError, RelayConfig, WarmStartSection, config_from_command_line
from relay.data import collate_sft, load_sft_examples, tokenize_sft_example
from relay.models import load_tokenizer
from relay.envs.render import TurnRenderer, tokenize_turns
from relay.tasks import Example, get_task, split_examples


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    section = WarmStartSection.model_validate(loop_config["section"])
    worker = start_train_worker(loop_config["model_path"], "causal_lm", chat_template=loop_config["chat_template"],
                                zero_stage=section.zero_stage, dtype=loop_config["dtype"],
                                batch_size=section.batch_size, learning_rate=section.learning_rate)
    rank, world_size, per_rank = worker.rank, worker.world_size, worker.per_rank_batch_size
    tokenizer, engine = worker.tokenizer, worker.engine

    if loop_config["examples"] is not None:
        # User data, tokenized once on the driver: every rank walks the same shuffled order, one global batch
        # per step, and trains on its own slice of it.
        examples = ray.get(loop_config["examples"])
        order = shuffled_forever(len(examples), loop_config["seed"])

        def next_batch() -> list[tuple[list[int], list[int]]]:
            global_batch = [examples[next(order)] for _ in range(per_rank * world_size)]
            return global_batch[rank * per_rank : (rank + 1) * per_rank]
    else:
        task = get_task(loop_config["task"])
        train_examples, _ = split_examples(
            task, loop_config["train_examples"], loop_config["eval_examples"], loop_config["seed"]
        )
        rng = random.Random(loop_config["seed"] * 7919 + rank)

        renderer = TurnRenderer(tokenizer, loop_config["chat_template"])

        def demonstration(example: Example) -> tuple[list[int], list[int]]:
            shown = task.demonstrate(example, rng)
            if isinstance(shown, str):
                return tokenize_sft_example(tokenizer, example.prompt, shown, section.max_length)
            return tokenize_turns(renderer, example.prompt, shown, section.max_length)  # a multi-turn episode

        def next_batch() -> list[tuple[list[int], list[int]]]:
            return [demonstration(example) for example in rng.sample(train_examples, per_rank)]

    loss_value = float("nan")
    # tqdm_ray draws one bar in the driver's console from any worker, and survives Ray's log forwarding; in a log
    # (the driver's stdout is no terminal) a bar is a run of carriage returns, so rank 0 prints a line per report.
    progress = tqdm_ray.tqdm(total=section.steps, desc="warm start") if rank == 0 and loop_config["progress_bar"] else None
    for step in range(section.steps):
        batch = collate_sft(next_batch(), tokenizer.pad_token_id)
        loss = engine(**{name: tensor.to(engine.device) for name, tensor in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        loss_value = loss.item()
        if progress is not None:
            progress.update(1)
        if (step + 1) % 100 == 0 and step + 1 < section.steps:
            ray.train.report({"loss": loss_value, "step": step + 1})
            if rank == 0 and progress is None:
                print(f"warm start: step {step + 1}/{section.steps} | loss {loss_value:.4f}", flush=True)

    if progress is not None:
        progress.close()
    save_and_report(worker, {"loss": loss_value, "step": section.steps})


def shuffled_forever(count: int, seed: int) -> Iterator[int]:
    """Indices 0..count-1 in a fresh seeded shuffle each epoch: the same stream on every rank."""
    for epoch in itertools.count():
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield from order


def tokenize_user_data(config: RelayConfig, model_path: str) -> list[tuple[list[int], list[int]]]:
    """`warm_start.data` as (input_ids, labels), validated here so a bad row fails before any worker starts. Every
    example keeps response tokens to learn from: a long one gives up its prompt's first tokens first."""
    section = config.warm_start
    assert section is not None and section.data is not None
    tokenizer = load_tokenizer(model_path, config.chat_template)
    try:
        pairs = load_sft_examples(section.data, tokenizer)
    except ValueError as error:
        raise ConfigError(f"warm_start.data: {error}") from None
    renderer = TurnRenderer(tokenizer, config.chat_template)
    return [tokenize_sft_example(tokenizer, prompt, response, section.max_length) if isinstance(response, str)
            else tokenize_turns(renderer, prompt, response, section.max_length) for prompt, response in pairs]


def run_warm_start(config: RelayConfig, model_path: str, run_dir: Path) -> str:
    """Fine-tune `model_path` on `warm_start.data` or the task's demonstrations; return the saved model's path."""
    assert config.warm_start is not None
    section = config.warm_start
    examples = ray.put(tokenize_user_data(config, model_path)) if section.data is not None else None
    result = fit_on_ray_train(
        "warm_start", train_loop_per_worker, config, section.resources, run_dir,
        {
            "section": section.model_dump(),
            "model_path": model_path,
            "chat_template": config.chat_template,
            "dtype": config.policy.dtype,
            "examples": examples,
            "task": config.data.task,
            "seed": config.data.seed,
            "train_examples": config.data.train_prompts,
            "eval_examples": config.data.eval_prompts,
            "progress_bar": sys.stdout.isatty(),
        },
    )
    return result.checkpoint.path


def main(argv: list[str] | None = None) -> None:
    config = config_from_command_line("Supervised warm start on Ray Train + DeepSpeed.", argv)
    run_dir = start_training_job(config, "warm_start")
    try:
        model_path = run_warm_start(config, prepare_base_model(config, run_dir), run_dir)
    except ConfigError as error:  # a malformed row of warm_start.data, found before any worker starts
        sys.exit(str(error))
    print(f"warm-started model: {model_path}")


if __name__ == "__main__":
    main()
