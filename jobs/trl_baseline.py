"""TRL's PPO trainer as a speed baseline: seconds per PPO iteration on the work relay's benchmark does.

What is compared: TRL's `trl.experimental.ppo.PPOTrainer` (TRL 0.29), in this one process on CPU, given
the same policy checkpoint and prompts as relay, with a reference (a copy of the policy), a reward model, and a
value model started from the reward model (`AutoModelForSequenceClassification`, one label, as TRL's examples do).
One iteration is one TRL update: `samples_per_iteration` prompts, one response each (TRL samples one per prompt),
generated with transformers' `generate` at `temperature`; the reference, value and reward passes; GAE; then `epochs`
PPO epochs of `mini_batches` mini-batches in micro-batches of `micro_batch_size`.

In `dtype` "bfloat16", every model is loaded in bfloat16 and trained with `bf16=True` (accelerate's autocast). That is
TRL at its fastest: its own PPO script, given `--bf16`, loads all four models in float32 (it builds the dtype from
`--dtype` but does not pass it on) and autocasts only the policy and value model, so its reference and reward passes
run in float32. In "float32", everything is float32.

Every response is exactly `response_length` tokens: with neither `stop_token` nor `stop_token_id` set, TRL sets the
policy's `generation_config.eos_token_id` to None and generates with `max_new_tokens=response_length` and no EOS, so
nothing stops early or is truncated, and `missing_eos_penalty` stays None.

Timing: a callback reads `time.perf_counter()` at `on_train_begin` (just before TRL's loop) and at each
`on_step_end`, which TRL calls once per iteration after its rollout, PPO epochs, logging and scheduler step; an
iteration's seconds are the difference between consecutive readings. Loading models and building the trainer are
not timed. The first iteration includes warm-up; dropping it is the caller's choice.

TRL's own design, not set here, still differs from relay: it takes the old log-probs from the generation scores (no
separate scoring pass), trains policy and value model as one module with one optimizer, and does not clip gradients.
TRL's accelerate gradient accumulation counts the micro-batches of the whole rollout batch, so it steps the optimizer
once per epoch whatever `num_mini_batches` is (and once per micro-batch on the last batch of its data loader): only
`mini_batches=1` is the same work as relay's, hence the check below, and the prompts are repeated so that no timed
iteration draws its data loader's last batch.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class _IterationClock(TrainerCallback):
    """Wall-clock readings at the start of training and at the end of each TRL iteration."""

    def __init__(self) -> None:
        self.readings: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.readings = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.readings.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.readings, self.readings[1:])]


def trl_version() -> str:
    import trl

    return trl.__version__


def check_same_work(*, samples_per_iteration: int, mini_batches: int, micro_batch_size: int, dtype: str) -> None:
    """Whether TRL can run the same work as relay in this setting: raises ValueError, naming what cannot be."""
    if mini_batches != 1:
        raise ValueError("TRL steps its optimizer once per PPO epoch, not once per mini-batch: only mini_batches=1 "
                         "is the same work as relay's")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"TRL runs in float32 or bfloat16, not the policy's dtype {dtype!r}")
    if samples_per_iteration % micro_batch_size:
        raise ValueError(f"samples_per_iteration {samples_per_iteration} is not a multiple of "
                         f"micro_batch_size {micro_batch_size}")


def trl_seconds_per_iteration(
    policy_path: str,
    reward_model_path: str,
    prompts: list[str],
    *,
    samples_per_iteration: int,
    response_length: int,
    epochs: int,
    mini_batches: int,
    micro_batch_size: int,
    iterations: int,
    learning_rate: float,
    temperature: float,
    output_dir: str,
    dtype: str = "float32",
    seed: int = 0,
) -> list[float]:
    """Run `iterations` iterations of TRL's PPO and return the wall seconds of each (the first is warm-up)."""
    with warnings.catch_warnings():  # "you are importing from trl.experimental": known, and the reason for this module
        warnings.simplefilter("ignore", UserWarning)
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    from transformers import PrinterCallback, ProgressCallback

    if len(prompts) < samples_per_iteration:
        raise ValueError(f"TRL samples one response per prompt: {samples_per_iteration} samples per iteration "
                         f"need at least as many prompts, got {len(prompts)}")
    check_same_work(samples_per_iteration=samples_per_iteration, mini_batches=mini_batches,
                    micro_batch_size=micro_batch_size, dtype=dtype)

    tokenizer = generation_tokenizer(policy_path)
    # More rows than the iterations take: the loader's last batch would step the optimizer at every micro-batch.
    dataset = prompt_dataset(prompts, tokenizer, rows=(iterations + 1) * samples_per_iteration)
    policy, reference, value_model, reward_model = load_models(policy_path, reward_model_path, dtype)
    config = PPOConfig(**ppo_settings(
        output_dir=output_dir, dtype=dtype, seed=seed, learning_rate=learning_rate, iterations=iterations,
        samples_per_iteration=samples_per_iteration, micro_batch_size=micro_batch_size, mini_batches=mini_batches,
        epochs=epochs, response_length=response_length, temperature=temperature))
    clock = _IterationClock()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        callbacks=[clock],
    )
    for printer in (PrinterCallback, ProgressCallback):  # the per-iteration metrics dict it would print
        trainer.remove_callback(printer)
    trainer.train()
    return clock.seconds()


def generation_tokenizer(policy_path: str) -> PreTrainedTokenizerBase:
    """The policy's tokenizer, padding on the left (prompts end where generation starts), with EOS as its pad token
    where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_dataset(prompts: list[str], tokenizer: PreTrainedTokenizerBase, rows: int) -> Dataset:
    """The prompts' token ids, in the `input_ids` column TRL reads, the prompts repeated whole until there are at
    least `rows`."""
    from datasets import Dataset

    repeated = prompts * math.ceil(rows / len(prompts))
    return Dataset.from_dict({"input_ids": [tokenizer(prompt).input_ids for prompt in repeated]})


def load_models(policy_path: str, reward_model_path: str, dtype: str) -> tuple[PreTrainedModel, ...]:
    """The policy, the reference (a copy of it), the value model and the reward model (both from the reward model's
    checkpoint, one label), all in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model
    try:
        torch_dtype = getattr(torch, dtype)
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch_dtype)
        value_model = AutoModelForSequenceClassification.from_pretrained(
            reward_model_path, num_labels=1, dtype=torch_dtype)
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            reward_model_path, num_labels=1, dtype=torch_dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return policy, copy.deepcopy(policy), value_model, reward_model


def ppo_settings(
    *,
    output_dir: str,
    dtype: str,
    seed: int,
    learning_rate: float,
    iterations: int,
    samples_per_iteration: int,
    micro_batch_size: int,
    mini_batches: int,
    epochs: int,
    response_length: int,
    temperature: float,
) -> dict[str, Any]:
    """TRL's PPOConfig fields for relay's work on CPU: one rollout batch of `samples_per_iteration` per iteration,
    responses of exactly `response_length` tokens, and no sample generations, checkpoints, reports or progress bars."""
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,
        seed=seed,
        learning_rate=learning_rate,
        total_episodes=iterations * samples_per_iteration,
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=samples_per_iteration // micro_batch_size,  # rollout batch = micro × accumulation
        num_mini_batches=mini_batches,
        num_ppo_epochs=epochs,
        local_rollout_forward_batch_size=samples_per_iteration,  # one generate call and one pass per model
        response_length=response_length,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        temperature=temperature,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
