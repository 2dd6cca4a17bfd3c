"""How much independent episodes save over a turn-synchronous loop, with an environment of uneven latency.

    python -m jobs.agent_bench [--episodes 32] [--turns 3] [--max-latency 1.0]

A batch of episodes of `LatencyEnv` (each step sleeps 0 to --max-latency seconds, drawn from the episode's seed, as
a web call or a tool would) is played on one vLLM engine with the tiny model, as the driver plays an env run's
batch: each episode's next turn goes to the engine as soon as its env has answered. A loop that advanced the whole
batch turn by turn would wait, at every turn, for the slowest episode's env: the sum over turns of the per-turn
maxima of the env's latency (measured here, per call) is what it would spend waiting on the env alone, a lower
bound of its time; the slowest episode's own env time is a lower bound of any loop's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from actors.rollout import RolloutFleet
from jobs.common import connect_ray, prepare_base_model
from jobs.episode_source import EpisodeSource, episode_seed
from relay.config import load_config
from relay.models import load_tokenizer
from relay.prompts import load_prompt_data

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


class LatencyEnv:
    """Answers every turn after 0 to `max_latency` seconds; the episode ends after `turns` turns."""

    def __init__(self, turns: int = 3, max_latency: float = 1.0) -> None:
        self.turns, self.max_latency, self.taken = turns, max_latency, 0

    def reset(self, row: dict[str, Any], seed: int) -> tuple[str, dict[str, Any]]:
        self.rng = random.Random(seed)
        return row["prompt"], {}

    async def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        await asyncio.sleep(self.rng.uniform(0.0, self.max_latency))
        self.taken += 1
        return "0=", 0.0, self.taken >= self.turns, False, {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m jobs.agent_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-latency", type=float, default=1.0)
    parser.add_argument("--env-actors", type=int, default=2)
    args = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    config = load_config(DEMO_CONFIG, [
        f"run.output_dir={run_dir}", "warm_start=null", "reward=null", "env.name=jobs.agent_bench:LatencyEnv",
        f"env.kwargs={{turns: {args.turns}, max_latency: {args.max_latency}}}", f"env.max_turns={args.turns}",
        f"env.num_actors={args.env_actors}", "rollout.max_new_tokens=6"])
    connect_ray(config)
    try:
        model_path = prepare_base_model(config, run_dir)
        tokenizer = load_tokenizer(model_path)
        prompts = load_prompt_data(config, tokenizer).train
        fleet = RolloutFleet(config, model_path)
        source = EpisodeSource(config, tokenizer, fleet)
        batch_prompts = [prompts.get(index) for index in range(args.episodes)]
        source.run(batch_prompts[:2], 1, [0, 1], 0)  # the engine's first requests warm it up
        seeds = list(range(args.episodes))
        started = time.perf_counter()
        batch, figures = source.run(batch_prompts, 1, seeds, 0)
        seconds = time.perf_counter() - started
        source.shutdown()
        fleet.shutdown()
    finally:
        ray.shutdown()
    # Each episode's step latencies, drawn as LatencyEnv draws them from its seed.
    latencies = []
    for seed in seeds:
        rng = random.Random(episode_seed(seed, 0))
        latencies.append([rng.uniform(0.0, args.max_latency) for _ in range(args.turns)])
    per_turn_maxima = sum(max(episode[turn] for episode in latencies) for turn in range(args.turns))
    report = {"episodes": args.episodes, "turns": args.turns, "max_latency_s": args.max_latency,
              "batch_seconds": round(seconds, 3),
              # a turn-synchronous loop waits this long on the env alone: its time is at least this
              "turn_synchronous_env_wait_s": round(per_turn_maxima, 3),
              # independent episodes: the slowest episode's env time, a lower bound of any loop's
              "slowest_episode_env_s": round(max(sum(episode) for episode in latencies), 3),
              "env_turns_mean": figures["env/turns_mean"], "tokens": int(batch.response_mask.sum())}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
