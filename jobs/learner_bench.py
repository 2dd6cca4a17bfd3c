"""The learner path alone, in this process (no Ray, no vLLM): the policy learner's scoring pass, its PPO step, and
the bucketed gather the weight sync sends, with peak memory. It runs wherever torch and DeepSpeed do, which makes
it the measurement for a GPU machine that has no inference engine.

    python -m jobs.learner_bench --shape qwen2.5-0.5b --zero-stage 2 --samples 64 --prompt-tokens 128 \\
        --response-tokens 512 --micro-batch 8

Prints one JSON line per measurement. The model is random-initialised at the named shape (no download), with the
demo's character tokenizer, so the numbers are those of the architecture, not of any checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from actors.learner import GatherSummary, Learner
from relay.batch import RolloutBatch
from relay.config import RelayConfig, load_config
from relay.models import build_tokenizer
from relay.tasks import get_task
from relay.zero import weight_buckets

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

# Published architectures of the models the GPU recipes name (config.json of each on the Hub).
SHAPES = {
    "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-7b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)),
    "llama3-8b": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
    # The bench's CPU model (jobs/configs/bench-cpu.yaml): 16M parameters.
    "bench-16m": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1376, vocab_size=None, tie_word_embeddings=False)),
}


def build_model(shape: str, dtype: torch.dtype, path: Path) -> Path:
    config_class, model_class, sizes = SHAPES[shape]
    tokenizer = build_tokenizer(get_task("reverse").alphabet)
    sizes = sizes | {"vocab_size": sizes["vocab_size"] or len(tokenizer)}  # None: the tokenizer's
    config = config_class(**sizes, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_class(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synthetic_batch(samples: int, prompt_tokens: int, response_tokens: int, vocab_size: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(0)
    response_mask = torch.ones(samples, response_tokens)
    return RolloutBatch(
        query_ids=torch.randint(3, vocab_size, (samples, prompt_tokens), generator=generator),
        query_mask=torch.ones(samples, prompt_tokens),
        response_ids=torch.randint(3, vocab_size, (samples, response_tokens), generator=generator),
        response_mask=response_mask,
        sampler_logprobs=torch.zeros(samples, response_tokens),
        prompts=[""] * samples, responses=[""] * samples, metadata=[{}] * samples, policy_version=0,
    )


def timed(function, repeats: int) -> tuple[list[float], object]:
    """Seconds of each call; the last call's result. A result is dropped before the next call, as a training loop
    drops each sync's buckets, so the first call pays for allocations (pinned memory) that later ones reuse."""
    result = None
    seconds = []
    for _ in range(repeats):
        result = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--zero-stage", type=int, choices=[2, 3], default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--samples", type=int, default=64, help="samples per iteration (one mini-batch)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps after one warm-up")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[256.0])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--gather-only", action="store_true",
                        help="only the sync's gather, from a model without optimizer (for shapes whose Adam state "
                             "does not fit one device)")
    return parser.parse_args()


def measure_model_gather(args: argparse.Namespace, common: dict[str, str], path: Path, device: str,
                         dtype: torch.dtype) -> None:
    """--gather-only: the sync's gather from the plain model (no Learner, no optimizer), per bucket size."""
    model = SHAPES[args.shape][1].from_pretrained(path, dtype=dtype).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    for bucket_mb in args.bucket_mb:
        # Each bucket dropped once the next is gathered, as the Ray generator does after storing it.
        seconds, buckets = timed(lambda: sum(1 for _ in weight_buckets(model, 2, 0, int(bucket_mb * 2**20))), 3)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        report(**common, what="gather", parameters=parameters, bucket_mb=bucket_mb, buckets=buckets,
               gigabytes=round(size / 1e9, 3), first_seconds=round(seconds[0], 3),
               seconds=round(min(seconds[1:]), 3), gigabytes_per_s=round(size / 1e9 / min(seconds[1:]), 2))


def set_single_process_rendezvous() -> None:
    """The environment the Learner's process group is set up from: a world of this one process, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                   "LOCAL_RANK": "0"}


def learner_config(args: argparse.Namespace, device: str) -> RelayConfig:
    """The demo's config, set to the bench's dtype, ZeRO stage, batch shape and number of steps."""
    prompts_per_iteration = args.samples // 4
    return load_config(DEMO_CONFIG, [
        f"device={device}", "warm_start=null", f"policy.dtype={args.dtype}",
        *[f"{role}.resources.gpus_per_node={int(device == 'cuda')}" for role in ("policy", "critic", "reference")],
        f"policy.zero_stage={args.zero_stage}", f"policy.micro_batch_size={args.micro_batch}",
        f"critic.micro_batch_size={args.micro_batch}", f"reference.micro_batch_size={args.micro_batch}",
        f"policy.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"data.prompts_per_iteration={prompts_per_iteration}", "rollout.samples_per_prompt=4",
        f"rollout.max_new_tokens={args.response_tokens}",
        f"rollout.max_model_len={args.prompt_tokens + args.response_tokens}",
        "algorithm.epochs=1", "algorithm.mini_batches=1", f"run.iterations={args.steps + 1}",
    ])


def start_learner(args: argparse.Namespace, common: dict[str, str], config: RelayConfig,
                  path: Path) -> tuple[Learner, int]:
    """The policy learner and its parameter count, timed together and reported."""
    started = time.perf_counter()
    learner = Learner("policy", config, str(path), rank=0, world_size=1)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in learner.engine.module.parameters())
    report(**common, what="learner_start", parameters=parameters, zero_stage=args.zero_stage,
           seconds=round(time.perf_counter() - started, 2))
    return learner, parameters


def measure_learner_step(args: argparse.Namespace, common: dict[str, str], device: str, learner: Learner,
                         parameters: int) -> list[float]:
    """The scoring pass and the PPO step on a synthetic batch, with peak memory; returns the PPO steps' seconds
    (warm-up first)."""
    vocab_size = learner.engine.module.config.vocab_size
    batch = synthetic_batch(args.samples, args.prompt_tokens, args.response_tokens, vocab_size)
    tokens = args.samples * (args.prompt_tokens + args.response_tokens)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    score_seconds, old_logprobs = timed(lambda: learner.score(batch), args.steps + 1)
    advantages = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1))
    train_batch = replace(batch, old_logprobs=old_logprobs, advantages=advantages)
    iteration = iter(range(1, 10**6))
    train_seconds, stats = timed(lambda: learner.train(train_batch, next(iteration)), args.steps + 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    report(**common, what="learner_step", zero_stage=args.zero_stage, parameters=parameters,
           samples=args.samples, tokens=tokens, micro_batch=args.micro_batch,
           gradient_checkpointing=args.gradient_checkpointing,
           score_seconds=round(statistics.median(score_seconds[1:]), 3),
           train_seconds=round(statistics.median(train_seconds[1:]), 3),
           train_tokens_per_s=round(tokens / statistics.median(train_seconds[1:])),
           peak_memory_gib=round(peak, 2) if peak is not None else None,
           loss=round(stats["losses/policy"], 4))
    return train_seconds


def measure_learner_gather(args: argparse.Namespace, common: dict[str, str], learner: Learner, parameters: int,
                           train_seconds: list[float]) -> None:
    """The learner's bucketed gather for the weight sync, per bucket size, also as a share of the PPO step."""
    for bucket_mb in args.bucket_mb:
        # Each bucket dropped once received, as the Ray generator does after storing it.
        seconds, summary = timed(lambda: deque(learner.weight_buckets(bucket_mb), maxlen=1)[0], 3)
        assert isinstance(summary, GatherSummary)
        report(**common, what="gather", zero_stage=args.zero_stage, parameters=parameters, bucket_mb=bucket_mb,
               buckets=summary.buckets, gigabytes=round(summary.bytes / 1e9, 3),
               first_seconds=round(seconds[0], 3), seconds=round(min(seconds[1:]), 3),
               gigabytes_per_s=round(summary.bytes / 1e9 / min(seconds[1:]), 2),
               share_of_train_step=round(min(seconds[1:]) / statistics.median(train_seconds[1:]), 3))


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    common = {"shape": args.shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        path = build_model(args.shape, dtype, Path(scratch) / "model")
        report(**common, what="build", seconds=round(time.perf_counter() - started, 2))
        if args.gather_only:
            measure_model_gather(args, common, path, device, dtype)
            return

        set_single_process_rendezvous()
        config = learner_config(args, device)
        learner, parameters = start_learner(args, common, config, path)
        train_seconds = measure_learner_step(args, common, device, learner, parameters)
        measure_learner_gather(args, common, learner, parameters, train_seconds)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
