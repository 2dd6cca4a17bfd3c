"""RolloutWorker: one vLLM engine that samples responses; RolloutFleet: the engines of a run, each in its own
placement group, so the fleet can grow or shrink one engine at a time.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay.config import RelayConfig
from relay.placement import engine_placement

# The engine runs inside the actor's own process (the default multiprocess engine would start another process
# per worker and hand `collective_rpc` arguments over as lists rather than tensors); its INFO lines would drown
# the job log's one line per iteration.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
RETIRE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]  # the sampled response tokens, EOS included when generation stopped there
    logprobs: list[float]  # the sampler's log-prob of each token


class RolloutWorker:
    """A vLLM engine built with vLLM's own Ray stat logger, so its queue, KV-cache and throughput metrics reach
    the Ray dashboard (`ray_vllm:*`) next to relay's."""

    def __init__(self, config: RelayConfig, model_path: str, index: int) -> None:
        from vllm import EngineArgs, LLMEngine
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.index = index
        self.rollout = config.rollout
        self.policy_version = 0
        memory: dict[str, Any]
        if config.device == "cpu":
            # An explicit KV size: a share of "available" memory fails as soon as other roles are loading.
            memory = {"kv_cache_memory_bytes": self.rollout.kv_cache_memory_mb * 2**20}
        else:
            memory = {"gpu_memory_utilization": self.rollout.gpu_memory_utilization}
        engine_args = EngineArgs(
            model=model_path,
            dtype=self.rollout.dtype,
            tensor_parallel_size=self.rollout.tensor_parallel_size,
            distributed_executor_backend="ray" if self.rollout.tensor_parallel_size > 1 else None,
            enforce_eager=self.rollout.enforce_eager or config.device == "cpu",
            max_model_len=self.rollout.max_model_len,
            seed=config.run.seed + index,
            # Log-probs of the distribution actually sampled from (after temperature), as the learner computes them.
            logprobs_mode="processed_logprobs",
            disable_log_stats=False,
            **memory,
        )
        self.engine = LLMEngine.from_engine_args(engine_args, stat_loggers=[RayPrometheusStatLogger])
        self._request_ids = itertools.count()

    def generate(
        self, prompt_token_ids: list[list[int]], samples_per_prompt: int, temperature: float, seed: int | None = None
    ) -> list[list[Sample]]:
        """`samples_per_prompt` samples for each prompt, in prompt order."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=samples_per_prompt,
            temperature=temperature,
            top_p=self.rollout.top_p,
            max_tokens=self.rollout.max_new_tokens,
            logprobs=0,
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        position = {}
        for prompt_index, ids in enumerate(prompt_token_ids):
            request_id = str(next(self._request_ids))
            position[request_id] = prompt_index
            self.engine.add_request(request_id, {"prompt_token_ids": ids}, params)
        results: list[list[Sample]] = [[] for _ in prompt_token_ids]
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    results[position[output.request_id]] = [
                        Sample(
                            token_ids=list(completion.token_ids),
                            logprobs=[step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                        )
                        for completion in output.outputs
                    ]
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor], policy_version: int) -> int:
        """Load the policy learner's full weights in place (vLLM's own reload) and record their version."""
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.engine.reset_prefix_cache()
        self.policy_version = policy_version
        return policy_version

    def load_weights_from(self, model_path: str, policy_version: int) -> int:
        """Load weights from a Hugging Face checkpoint directory, in place."""
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
        self.engine.reset_prefix_cache()
        self.policy_version = policy_version
        return policy_version


@dataclass
class _Member:
    index: int
    worker: Any  # the RolloutWorker actor handle
    placement_group: Any
    ready: ray.ObjectRef  # resolves once the engine is up (the actor's constructor has finished)


class RolloutFleet:
    """The run's vLLM engines, named `rollout-<i>`, each in a placement group of `tensor_parallel_size` bundles.

    Engines are *active* (they generate) or *pending* (placement group not placed yet, or engine still starting).
    A pending engine joins at an iteration boundary, after it has loaded the current policy weights; until then
    the run goes on with the active ones. Pending placement groups are what the Ray autoscaler sees.
    """

    def __init__(self, config: RelayConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self.active: list[_Member] = []
        self.pending: list[_Member] = []
        self._next_index = 0
        self._add(config.rollout.num_workers)
        ray.get([member.ready for member in self.pending])  # the first engines are waited for
        self.active, self.pending = self.pending, []

    @property
    def workers(self) -> list[Any]:
        return [member.worker for member in self.active]

    def _add(self, count: int) -> None:
        placement = engine_placement(self.config)
        remote_class = ray.remote(RolloutWorker)
        for _ in range(count):
            index = self._next_index
            self._next_index += 1
            group = placement_group(placement.bundles, strategy=placement.strategy)
            worker = remote_class.options(
                name=f"rollout-{index}",
                namespace=self.config.actor_namespace,
                num_cpus=placement.cpus_per_rank,
                num_gpus=placement.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0, placement_group_capture_child_tasks=True),
                runtime_env={"env_vars": {**ENGINE_ENV, **_passthrough_env()}},
            ).remote(self.config, self.model_path, index)
            self.pending.append(_Member(index, worker, group, worker.__ray_ready__.remote()))

    def resize(self, target: int) -> None:
        """Ask for `target` engines: start new ones (pending), or retire the newest (pending ones first)."""
        surplus = len(self.active) + len(self.pending) - target
        if surplus < 0:
            self._add(-surplus)
        while surplus > 0 and self.pending:
            self._retire(self.pending.pop(), started=False)
            surplus -= 1
        while surplus > 0 and len(self.active) > 1:
            self._retire(self.active.pop(), started=True)
            surplus -= 1

    def take_ready(self) -> list[Any]:
        """Pending engines that are up now; they must load the current weights, then `activate` them."""
        if not self.pending:
            return []
        ready_refs, _ = ray.wait([member.ready for member in self.pending], num_returns=len(self.pending), timeout=0)
        return [member.worker for member in self.pending if member.ready in ready_refs]

    def activate(self, workers: list[Any]) -> None:
        joining = [member for member in self.pending if member.worker in workers]
        self.pending = [member for member in self.pending if member not in joining]
        self.active += joining

    def generate(
        self, prompt_token_ids: list[list[int]], samples_per_prompt: int, temperature: float, seed: int
    ) -> list[list[Sample]]:
        """Split the prompts over the active engines in contiguous chunks; results come back in prompt order."""
        chunks = _split_evenly(prompt_token_ids, len(self.active))
        calls = [
            member.worker.generate.remote(chunk, samples_per_prompt, temperature, seed + member.index)
            for member, chunk in zip(self.active, chunks)
            if chunk
        ]
        return [samples for part in ray.get(calls) for samples in part]

    def load_weights(self, state_dict_ref: ray.ObjectRef, policy_version: int, workers: list[Any] | None = None) -> None:
        targets = self.workers if workers is None else workers
        ray.get([worker.load_weights.remote(state_dict_ref, policy_version) for worker in targets])

    def load_weights_from(self, model_path: str, policy_version: int) -> None:
        ray.get([worker.load_weights_from.remote(model_path, policy_version) for worker in self.workers])

    def _retire(self, member: _Member, started: bool) -> None:
        if started or member.ready in ray.wait([member.ready], timeout=0)[0]:
            # Graceful: queued behind any call the engine is still running, so no sample in flight is lost;
            # removing the placement group first would kill it on the spot.
            exited = member.worker.__ray_terminate__.remote()
            ray.wait([exited], timeout=RETIRE_TIMEOUT_S)
        else:
            ray.kill(member.worker)
        remove_placement_group(member.placement_group)

    def shutdown(self) -> None:
        for member in self.active + self.pending:
            ray.kill(member.worker)
            remove_placement_group(member.placement_group)
        self.active, self.pending = [], []


def _split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    size, remainder = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < remainder else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def _passthrough_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith("VLLM_") and name != "VLLM_ENABLE_V1_MULTIPROCESSING"}
