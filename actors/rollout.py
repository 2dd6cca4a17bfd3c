"""RolloutWorker: one vLLM engine that samples responses; RolloutFleet: the engines of a run, each in its own
placement group, so the fleet can grow or shrink one engine at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.group import bundle
from relay.config import RelayConfig

# The engine runs inside the actor's own process; the default multiprocess engine would start another process
# per worker and hand `collective_rpc` arguments over as lists rather than tensors.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]  # the sampled response tokens, EOS included when generation stopped there
    logprobs: list[float]  # the sampler's log-prob of each token


class RolloutWorker:
    def __init__(self, config: RelayConfig, model_path: str, index: int) -> None:
        from vllm import LLM

        self.index = index
        self.rollout = config.rollout
        self.policy_version = 0
        memory: dict[str, Any]
        if config.device == "cpu":
            # An explicit KV size: a share of "available" memory fails as soon as other roles are loading.
            memory = {"kv_cache_memory_bytes": self.rollout.kv_cache_memory_mb * 2**20}
        else:
            memory = {"gpu_memory_utilization": self.rollout.gpu_memory_utilization}
        self.llm = LLM(
            model=model_path,
            dtype=self.rollout.dtype,
            tensor_parallel_size=self.rollout.tensor_parallel_size,
            distributed_executor_backend="ray" if self.rollout.tensor_parallel_size > 1 else None,
            enforce_eager=self.rollout.enforce_eager or config.device == "cpu",
            max_model_len=self.rollout.max_model_len,
            seed=config.run.seed + index,
            # Log-probs of the distribution actually sampled from (after temperature), as the learner computes them.
            logprobs_mode="processed_logprobs",
            **memory,
        )

    def generate(
        self, prompt_token_ids: list[list[int]], samples_per_prompt: int, temperature: float, seed: int | None = None
    ) -> list[list[Sample]]:
        """`samples_per_prompt` samples for each prompt, in prompt order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=samples_per_prompt,
            temperature=temperature,
            top_p=self.rollout.top_p,
            max_tokens=self.rollout.max_new_tokens,
            logprobs=0,
            seed=seed,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], params, use_tqdm=False)
        return [
            [
                Sample(
                    token_ids=list(completion.token_ids),
                    logprobs=[step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                )
                for completion in output.outputs
            ]
            for output in outputs
        ]

    def load_weights(self, state_dict: dict[str, torch.Tensor], policy_version: int) -> int:
        """Load the policy learner's full weights in place (vLLM's own reload) and record their version."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.llm.reset_prefix_cache()
        self.policy_version = policy_version
        return policy_version

    def load_weights_from(self, model_path: str, policy_version: int) -> int:
        """Load weights from a Hugging Face checkpoint directory, in place."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
        self.llm.reset_prefix_cache()
        self.policy_version = policy_version
        return policy_version


class RolloutFleet:
    """The run's vLLM engines, named `rollout-<i>`, each in a placement group of `tensor_parallel_size` bundles."""

    def __init__(self, config: RelayConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self.workers: list[Any] = []
        self.placement_groups: list[Any] = []
        self._next_index = 0
        self.add(config.rollout.num_workers)

    def add(self, count: int) -> None:
        rollout = self.config.rollout
        gpus = 1 if self.config.device == "cuda" else 0
        # With tensor parallelism the engine's own Ray workers take the GPU bundles; the actor holds only CPUs.
        actor_gpus = gpus if rollout.tensor_parallel_size == 1 else 0
        remote_class = ray.remote(RolloutWorker)
        for _ in range(count):
            index = self._next_index
            self._next_index += 1
            bundles = [bundle(rollout.cpus_per_worker, gpus)] + [
                bundle(0, gpus) for _ in range(rollout.tensor_parallel_size - 1)
            ]
            group = placement_group(bundles, strategy="STRICT_PACK")
            worker = remote_class.options(
                name=f"rollout-{index}",
                namespace=self.config.actor_namespace,
                num_cpus=rollout.cpus_per_worker,
                num_gpus=actor_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0, placement_group_capture_child_tasks=True),
                runtime_env={"env_vars": {**ENGINE_ENV, **_passthrough_env()}},
            ).remote(self.config, self.model_path, index)
            self.workers.append(worker)
            self.placement_groups.append(group)

    def generate(
        self, prompt_token_ids: list[list[int]], samples_per_prompt: int, temperature: float, seed: int
    ) -> list[list[Sample]]:
        """Split the prompts over the engines in contiguous chunks; results come back in prompt order."""
        chunks = _split_evenly(prompt_token_ids, len(self.workers))
        calls = [
            worker.generate.remote(chunk, samples_per_prompt, temperature, seed + index)
            for index, (worker, chunk) in enumerate(zip(self.workers, chunks))
            if chunk
        ]
        return [samples for part in ray.get(calls) for samples in part]

    def load_weights(self, state_dict_ref: ray.ObjectRef, policy_version: int) -> None:
        ray.get([worker.load_weights.remote(state_dict_ref, policy_version) for worker in self.workers])

    def load_weights_from(self, model_path: str, policy_version: int) -> None:
        ray.get([worker.load_weights_from.remote(model_path, policy_version) for worker in self.workers])

    def shutdown(self) -> None:
        for worker, group in zip(self.workers, self.placement_groups):
            ray.kill(worker)
            remove_placement_group(group)
        self.workers, self.placement_groups = [], []


def _split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    size, remainder = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < remainder else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def _passthrough_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith("VLLM_") and name not in ENGINE_ENV}
