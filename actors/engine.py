"""What every vLLM engine of relay shares, the rollout fleet's (actors/rollout.py) and `relay serve`'s replicas
(jobs/serve.py): how it is configured from the run's config, and how it loads new weights (EngineWorker).

A weight load is more than the load: everything the old weights computed must go, the prefix cache and the KV
cache's contents. Attention kernels that read a whole block (vLLM's CPU kernel; FlashAttention 3 on GPUs) mask a
stale slot's score but still multiply its value by that zero, and 0 x NaN is NaN: one NaN an earlier policy left in
a free block made every later generation NaN, whatever the weights (tests/test_actors.py).
"""

from __future__ import annotations

from typing import Any

from relay.config import RelayConfig

# The engine runs inside the actor's own process (the default multiprocess engine would start another process
# per worker and hand `collective_rpc` arguments over as lists rather than tensors). The rest keeps the job log to
# its one line per iteration: vLLM's warnings are about CPU tuning (LD_PRELOAD, Triton), defaults we chose
# (eager mode, seed) and, on every weight sync, the rotary embedding having no weights to load; torch's C++
# warnings are the NUMA binding notice; the Python one is vLLM's use of `torch.distributed.reduce_op`.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
}


def engine_options(config: RelayConfig) -> dict[str, Any]:
    """vLLM engine arguments of an engine that generates as the run's rollout engines do: their dtype, context
    length, tensor parallelism and memory (an explicit KV size on CPUs: a share of "available" memory fails as
    soon as other roles are loading)."""
    rollout = config.rollout
    options: dict[str, Any] = {
        "dtype": rollout.dtype,
        "max_model_len": rollout.max_model_len,
        "tensor_parallel_size": rollout.tensor_parallel_size,
        "enforce_eager": rollout.enforce_eager or config.device == "cpu",
        "worker_extension_cls": f"{__name__}.{EngineWorker.__name__}",
    }
    if config.device == "cpu":
        options["kv_cache_memory_bytes"] = rollout.kv_cache_memory_mb * 2**20
        # No chunked prefill on CPUs: a prompt cut across two steps throws away the token sampled after its first
        # part and rewinds the request's seeded generator, which a CPU generator cannot ("CPU Generator does not
        # use offset": the engine fails). Multi-turn episodes' longer prompts, many at once, fill a step's budget.
        options["enable_chunked_prefill"] = False
        options["max_num_batched_tokens"] = max(rollout.max_model_len, 2048)
    else:
        options["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    return options


class EngineWorker:
    """Mixed into each of an engine's vLLM workers (EngineArgs.worker_extension_cls), so that a load is one call
    by name, `collective_rpc("load_policy_weights", kwargs=...)`, which every engine client can send (a
    multiprocess engine, as Serve's is, accepts method names, not functions). Its name must not be one the worker
    has already (reload_weights, update_weights, ...)."""

    def load_policy_weights(self, last: bool = True, **source: Any) -> None:
        """vLLM's own in-place reload from `weights_iterator` or `weights_path`, then, once the `last` part of the
        new weights is in, the KV cache zeroed. The engine's prefix cache is the caller's to reset (it lives in the
        scheduler, not in the workers)."""
        self.reload_weights(**source)  # type: ignore[attr-defined]  # the vLLM worker's own
        if last:
            for cache in self.model_runner.kv_caches:  # type: ignore[attr-defined]
                for tensor in cache if isinstance(cache, (list, tuple)) else (cache,):
                    tensor.zero_()
