"""relay bench: how fast relay trains, phase by phase; what its own model passes cost alone on the same batch; and,
with `--vs trl`, TRL's PPO trainer on the same work.

    relay bench --config jobs/configs/bench-cpu.yaml [--iterations 5] [--vs trl] [--output runs/bench]

1. A real run of 1 + K PPO iterations (the first is a warm-up and not counted) on the config's cluster, exactly as
   `relay train` runs it. Each iteration's wall time is split into the driver's phases (generate, score,
   advantages, train, sync, and the rest: control, statistics, accounting), which add up to it; inside the parallel
   phases, each role's own busy time (old log-probs, reference, critic values, reward; policy and critic training;
   the gather and the engines' load) comes from the roles themselves (actors/usage.py).
2. Without Ray, in this process: every model pass of an iteration by itself on one batch of the same shape
   (vLLM generation, the policy's, reference's, critic's and reward model's forwards, the policy's and critic's
   forward/backward/step). `overhead_ratio` = relay's iteration seconds / the sum of those passes: what Ray, the
   object store, the scoring layout and the sync cost over the raw parts.
3. With `--vs trl`: TRL's PPO trainer (jobs/trl_baseline.py) on the same model, prompts, samples, response length,
   epochs and reward model, in the policy's dtype; `ratio_vs_baseline` = relay's seconds per iteration / TRL's.

Writes `<output>/bench.json` and `<output>/bench.png` (the phase breakdown), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from transformers import AutoModelForSequenceClassification

from actors.group import free_port
from actors.learner import Learner
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.engine import ENGINE_ENV
from actors.rollout import RolloutWorker
from jobs.common import check_cluster_resources, connect_ray, prepare_base_model
from jobs.ppo import PPOTrainer, initial_tokenizer
from jobs.rollout_source import RolloutSource
from relay.config import RelayConfig, load_config
from relay.metrics import read_metrics
from relay.models import load_tokenizer
from relay.prompts import load_prompt_data
from jobs.trl_baseline import check_same_work, trl_seconds_per_iteration, trl_version

# The driver's phases of an iteration, in order (control: requests and scaling; accounting: the roles' usage);
# what is left of the iteration, unmeasured, is "other" (the statistics, mostly).
PHASES = ("control", "generate", "score", "advantages", "train", "generate_wait", "sync", "accounting")
# The roles' own busy time inside the phases (metric time/<role>_<pass> → label), by phase.
ROLE_PASSES = {
    "generate": {"rollout_generate": "vLLM generation"},
    "score": {"policy_score": "old log-probs", "reference_score": "reference", "policy_score_reference": "reference",
              "critic_score": "critic values", "reward_score": "reward"},
    "train": {"policy_train": "policy train", "critic_train": "critic train"},
    "sync": {"policy_gather": "gather", "rollout_load_weights": "engines load"},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="relay bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations, after one warm-up")
    parser.add_argument("--vs", choices=["trl"], help="also run this trainer on the same work")
    parser.add_argument("--output", type=Path, default=Path("runs/bench"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    return bench(args.config, args.overrides, args.iterations, args.output, args.vs)


def bench(config_path: Path, overrides: list[str], iterations: int, output: Path, vs: str | None) -> dict[str, Any]:
    output = output.resolve()
    run_dir = output / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own run of last time
    run_overrides = [*overrides, f"run.output_dir={run_dir}", f"run.iterations={iterations + 1}", "run.eval_every=0",
                     "run.checkpoint_every=0", "run.resume=never"]
    policy_path, reward_path = prepare_models(load_config(config_path, run_overrides), output)
    config = load_config(config_path, [*run_overrides, "tiny_model=null", f"policy.model={policy_path}",
                                       *([f"reward.model={reward_path}"] if reward_path else [])])
    if vs == "trl":  # before relay's run, not after it
        check_same_work(samples_per_iteration=config.samples_per_iteration, mini_batches=config.algorithm.mini_batches,
                        micro_batch_size=config.policy.micro_batch_size, dtype=config.policy.dtype)

    summary = run_relay(config)
    rows = read_metrics(run_dir / "metrics.jsonl")[1:]  # the first iteration warms up
    report: dict[str, Any] = {"config": str(config_path), "iterations": iterations, "machine": machine()}
    report |= iteration_figures(rows, config)
    report["startup_seconds"] = summary["startup_seconds"]

    raw = raw_passes(config, policy_path, reward_path, repeats=max(2, min(iterations, 3)))
    report["raw_passes"] = raw
    report["raw_seconds"] = sum(raw.values())
    report["overhead_ratio"] = report["iteration_seconds"] / report["raw_seconds"]

    report["baseline"] = report["ratio_vs_baseline"] = None
    if vs == "trl":
        seconds = trl_seconds_per_iteration(
            policy_path, str(reward_path), bench_prompts(config), samples_per_iteration=config.samples_per_iteration,
            response_length=config.rollout.max_new_tokens, epochs=config.algorithm.epochs,
            mini_batches=config.algorithm.mini_batches, micro_batch_size=config.policy.micro_batch_size,
            iterations=iterations + 1, learning_rate=config.policy.learning_rate,
            temperature=config.rollout.temperature, output_dir=str(output / "trl"), dtype=config.policy.dtype,
            seed=config.run.seed,
        )
        report["baseline"] = {"name": "trl", "version": trl_version(), "dtype": config.policy.dtype,
                              "iteration_seconds": statistics.median(seconds[1:]), "all_iteration_seconds": seconds}
        report["ratio_vs_baseline"] = report["iteration_seconds"] / report["baseline"]["iteration_seconds"]

    (output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output / "bench.png")
    print(table(report))
    return report


def prepare_models(config: RelayConfig, output: Path) -> tuple[str, str | None]:
    """The policy's weights (a tiny model built once under `output`, or the config's), and, for a reward model
    named but not there while the policy is built on the spot, a randomly initialised one of the policy's shape."""
    policy_path = prepare_base_model(config, output)
    if config.reward.type != "model":
        return policy_path, None
    reward_path = Path(config.reward.model or output / "reward_model")
    if not reward_path.exists():
        if config.tiny_model is None:
            raise ValueError(f"reward.model: {reward_path} does not exist")
        tokenizer = load_tokenizer(policy_path)
        torch.manual_seed(config.run.seed + 1)
        model = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1,
                                                                   pad_token_id=tokenizer.pad_token_id)
        model.score.reset_parameters()
        model.save_pretrained(reward_path)
        tokenizer.save_pretrained(reward_path)
        print(f"a randomly initialised reward model of the policy's shape: {reward_path}", flush=True)
    return policy_path, str(reward_path.resolve())


def run_relay(config: RelayConfig) -> dict[str, Any]:
    trainer = PPOTrainer(config)
    connect_ray(config)
    try:
        check_cluster_resources(config)
        return trainer.fit()
    finally:
        trainer.shutdown()
        ray.shutdown()  # the raw passes below have the machine to themselves


def iteration_figures(rows: list[dict[str, float]], config: RelayConfig) -> dict[str, Any]:
    """The median iteration (the timed one whose time is the median; medians of each phase would not add up): its
    time, its phases (adding up to it), the roles' busy time in them; throughput, and each role's peak memory."""
    median = sorted(rows, key=lambda row: row["time/iteration"])[(len(rows) - 1) // 2]
    iteration = median["time/iteration"]
    phases = {name: median.get(f"time/{name}", 0.0) for name in PHASES}
    phases["other"] = iteration - sum(phases.values())
    roles = {phase: {label: median[f"time/{key}"] for key, label in passes.items() if f"time/{key}" in median}
             for phase, passes in ROLE_PASSES.items()}
    # The time the driver waits beyond the roles' own work in each phase (the slowest role when they run in
    # parallel, all of them when one after another): Ray, the object store, the driver itself.
    def critical_path(phase: str, busy: dict[str, float]) -> float:
        if not busy:
            return phases[phase]
        one_after_another = phase == "sync" or not config.run.roles_in_parallel  # (the gather, then the load)
        return sum(busy.values()) if one_after_another else max(busy.values())

    overhead = phases["control"] + phases["accounting"] + phases["other"] + sum(
        max(0.0, phases[phase] - critical_path(phase, busy)) for phase, busy in roles.items())
    tokens = median["response/length_mean"] * config.samples_per_iteration
    memory = {name.removeprefix("perf/").removesuffix("_peak_rss_mib"): rows[-1][name]
              for name in rows[-1] if name.endswith("_peak_rss_mib")}
    return {
        "iteration_seconds": iteration,
        "phases": phases,
        "roles": roles,
        "driver_and_ray_overhead_seconds": overhead,
        "tokens_per_s": tokens / iteration,
        "generated_tokens_per_s": median["perf/tokens_per_s"],  # the generation's own time (ahead, or not)
        "samples_per_s": config.samples_per_iteration / iteration,
        "peak_memory_mib": memory,
        "all_iteration_seconds": [row["time/iteration"] for row in rows],
    }


def raw_passes(config: RelayConfig, policy_path: str, reward_path: str | None, repeats: int) -> dict[str, float]:
    """Each model pass of an iteration alone, in this process, on one batch of the bench's shape (median seconds)."""
    os.environ.update(ENGINE_ENV)  # vLLM in this process, as in the actor
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                   "LOCAL_RANK": "0"}
    tokenizer = load_tokenizer(policy_path)
    source = RolloutSource(config, load_prompt_data(config, tokenizer), tokenizer)
    worker = RolloutWorker(config, policy_path, 0)
    source.fleet = worker  # type: ignore[assignment]  # the driver's generate() through one engine, without Ray
    prompts = source.next_prompts(config.data.prompts_per_iteration)

    def median_seconds(call: Callable[[], Any]) -> tuple[float, Any]:
        """The median of `repeats` calls after an untimed one (the first call of a model warms it up)."""
        seconds, result = [], call()
        for _ in range(repeats):
            started = time.perf_counter()
            result = call()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds), result

    raw: dict[str, float] = {}
    raw["generate"], batch = median_seconds(
        lambda: source.generate(prompts, config.rollout.samples_per_prompt, config.run.seed, iteration=1,
                                policy_version=0))
    policy = Learner("policy", config, policy_path, rank=0, world_size=1)
    raw["policy_score"], old_logprobs = median_seconds(lambda: policy.score(batch))
    reference = Reference(config, policy_path, rank=0, world_size=1)
    raw["reference_score"], _ = median_seconds(lambda: reference.score(batch))
    reward = RewardScorer(config, rank=0, world_size=1, model_path=reward_path)
    raw["reward_score"], rewards = median_seconds(lambda: reward.score(batch))
    advantages = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(0))
    train_batch = replace(batch, old_logprobs=old_logprobs, advantages=advantages)
    if config.algorithm.uses_critic:
        critic = Learner("critic", config, policy_path, rank=0, world_size=1)
        raw["critic_score"], values = median_seconds(lambda: critic.score(batch))
        train_batch = replace(train_batch, values=values, returns=values + advantages)
        raw["critic_train"], _ = median_seconds(lambda: critic.train(train_batch, 1))
    raw["policy_train"], _ = median_seconds(lambda: policy.train(train_batch, 1))
    return raw  # (the one-rank process group is vLLM's, which the learners joined: it goes with the process)


def bench_prompts(config: RelayConfig) -> list[str]:
    """The prompts of one iteration, each repeated samples_per_prompt times (TRL samples once per prompt)."""
    tokenizer = initial_tokenizer(config)
    prompts = RolloutSource(config, load_prompt_data(config, tokenizer), tokenizer).next_prompts(
        config.data.prompts_per_iteration)
    return [prompt.text for prompt in prompts for _ in range(config.rollout.samples_per_prompt)]


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(report: dict[str, Any]) -> str:
    iteration = report["iteration_seconds"]
    lines = [f"relay bench: {report['config']}, the median of {report['iterations']} iterations after a warm-up",
             f"{'phase':<28}{'seconds':>9}{'share':>8}"]
    for phase, seconds in report["phases"].items():
        lines.append(f"{phase:<28}{seconds:>9.3f}{seconds / iteration:>8.1%}")
        for label, busy in report["roles"].get(phase, {}).items():
            lines.append(f"  {label:<26}{busy:>9.3f}")
    lines += [
        f"{'iteration':<28}{iteration:>9.3f}",
        f"driver and Ray overhead: {report['driver_and_ray_overhead_seconds']:.3f} s "
        f"({report['driver_and_ray_overhead_seconds'] / iteration:.1%})",
        f"throughput: {report['samples_per_s']:.2f} samples/s, {report['tokens_per_s']:.0f} tokens/s end to end, "
        f"{report['generated_tokens_per_s']:.0f} tokens/s generating",
        f"start to first iteration: {report['startup_seconds']} s",
        "peak memory (MiB): " + ", ".join(f"{role} {mib:.0f}" for role, mib in report["peak_memory_mib"].items()),
        "raw passes alone (s): " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in report["raw_passes"].items()),
        f"overhead_ratio (iteration / sum of raw passes {report['raw_seconds']:.3f} s): {report['overhead_ratio']:.2f}",
    ]
    if report["baseline"]:
        baseline = report["baseline"]
        lines.append(f"{baseline['name']} {baseline['version']} ({baseline['dtype']}): "
                     f"{baseline['iteration_seconds']:.3f} s per iteration; "
                     f"ratio_vs_baseline (relay / {baseline['name']}): {report['ratio_vs_baseline']:.2f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {"relay": report["phases"]}
    if report["baseline"]:
        bars[report["baseline"]["name"]] = {"iteration": report["baseline"]["iteration_seconds"]}
    bars["relay raw passes"] = report["raw_passes"]
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.8 * len(bars)))
    for row, (name, parts) in enumerate(bars.items()):
        left = 0.0
        for part, seconds in parts.items():
            axes.barh(row, seconds, left=left, label=f"{name}: {part}")
            if seconds > 0.04 * max(sum(p.values()) for p in bars.values()):
                axes.text(left + seconds / 2, row, part, ha="center", va="center", fontsize=7)
            left += seconds
    axes.set_yticks(range(len(bars)), list(bars))
    axes.set_xlabel("seconds per PPO iteration")
    axes.set_title("relay bench: where an iteration's time goes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
