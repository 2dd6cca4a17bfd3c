"""RolloutWorker: one vLLM engine that samples responses; RolloutFleet: the engines of a run, each in its own
placement group, so the fleet can grow or shrink one engine at a time.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.engine import ENGINE_ENV, engine_options
from actors.episodes import Episode, EpisodeRunner, EpisodeStart
from actors.group import Deadline
from actors.usage import Usage
from relay.config import RelayConfig
from relay.envs import EnvContractError
from relay.envs.render import TurnRenderer
from relay.models import load_tokenizer
from relay.placement import engine_placement

RETIRE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]  # the sampled response tokens, EOS included when generation stopped there
    logprobs: list[float]  # the sampler's log-prob of each token


class RolloutWorker(Usage):
    """A vLLM engine built with vLLM's own Ray stat logger, so its queue, KV-cache and throughput metrics reach
    the Ray dashboard (`ray_vllm:*`) next to relay's."""

    def __init__(self, config: RelayConfig, model_path: str, index: int) -> None:
        # vLLM applies VLLM_LOGGING_LEVEL only once an engine is configured; importing it already warns (Triton).
        logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))
        from vllm import EngineArgs, LLMEngine
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.index = index
        self.rollout = config.rollout
        self.policy_version = 0
        engine_args = EngineArgs(
            model=model_path,
            **engine_options(config),
            distributed_executor_backend="ray" if self.rollout.tensor_parallel_size > 1 else None,
            seed=config.run.seed + index,
            # Log-probs of the distribution actually sampled from (after temperature), as the learner computes them.
            logprobs_mode="processed_logprobs",
            disable_log_stats=False,
            use_tqdm_on_load=False,  # a bar per weight load from disk
        )
        self.engine = LLMEngine.from_engine_args(engine_args, stat_loggers=[RayPrometheusStatLogger])
        self._request_ids = itertools.count()
        self.config = config
        # A multi-turn run's episodes render their prompts and observations with the run's tokenizer.
        self.renderer = (TurnRenderer(load_tokenizer(model_path, config.chat_template), config.chat_template)
                         if config.env is not None else None)

    def generate(
        self, prompt_token_ids: list[list[int]], samples_per_prompt: int, temperature: float, seeds: list[int]
    ) -> list[list[Sample]]:
        """`samples_per_prompt` samples for each prompt, in prompt order; prompt i is sampled with `seeds[i]`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        def params(seed: int) -> SamplingParams:
            return SamplingParams(
                n=samples_per_prompt,
                temperature=temperature,
                top_p=self.rollout.top_p,
                max_tokens=self.rollout.max_new_tokens,
                ignore_eos=self.rollout.ignore_eos,
                logprobs=0,
                seed=seed,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        with self.busy("generate"):
            position = {}
            for prompt_index, (ids, seed) in enumerate(zip(prompt_token_ids, seeds, strict=True)):
                request_id = str(next(self._request_ids))
                position[request_id] = prompt_index
                self.engine.add_request(request_id, {"prompt_token_ids": ids}, params(seed))
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

    def run_episodes(self, starts: list[EpisodeStart], env_actors: list[Any], temperature: float,
                     stop: list[str]) -> list[Episode] | EnvContractError:
        """Multi-turn episodes against the environment actors, each advancing on its own (actors/episodes.py);
        an env that broke the contract is returned, not raised: it is no failure of this engine."""
        assert self.renderer is not None and self.config.env is not None
        with self.busy("generate"):
            try:
                return EpisodeRunner(self.engine, self.renderer, self.rollout, self.config.env, stop, temperature,
                                     self.config.run.call_timeout_s).run(starts, env_actors)
            except EnvContractError as error:
                while self.engine.has_unfinished_requests():  # the other episodes' turns, dropped
                    self.engine.step()
                return error

    def load_weights(self, buckets: list[ray.ObjectRef], policy_version: int) -> int:
        """Load the policy learner's weights in place, bucket by bucket (vLLM's own reload, which rebuilds each
        layer a bucket touches: a bucket holds whole decoder blocks), and record their version."""
        with self.busy("load_weights"):
            for position, ref in enumerate(buckets):
                bucket = ray.get(ref)  # vLLM copies each tensor into the engine's own storage
                self.engine.collective_rpc("load_policy_weights", kwargs={
                    "weights_iterator": list(bucket.items()), "last": position == len(buckets) - 1})
                del bucket  # one bucket in memory at a time
            self.engine.reset_prefix_cache()
        self.policy_version = policy_version
        return policy_version

    def load_weights_from(self, model_path: str, policy_version: int) -> int:
        """Load weights from a Hugging Face checkpoint directory, in place."""
        with self.busy("load_weights"):
            self.engine.collective_rpc("load_policy_weights", kwargs={"weights_path": model_path})
            self.engine.reset_prefix_cache()
        self.policy_version = policy_version
        return policy_version


@dataclass(eq=False)  # members are told apart by identity (dict keys)
class _Member:
    index: int
    worker: Any  # the RolloutWorker actor handle
    placement_group: Any
    ready: ray.ObjectRef  # resolves once the engine is up (the actor's constructor has finished)


@dataclass
class _Weights:
    """What the active engines hold: a checkpoint directory, or weight buckets in the object store (kept referenced,
    so that an engine that joins later loads exactly these)."""

    policy_version: int
    model_path: str | None = None
    buckets: list[ray.ObjectRef] | None = None


class RolloutFleet:
    """The run's vLLM engines, named `rollout-<i>`, each in a placement group of `tensor_parallel_size` bundles.

    Engines are *active* (they generate) or *pending* (placement group not placed yet, or engine still starting).
    A pending engine joins at an iteration boundary, after it has loaded the current policy weights; until then
    the run goes on with the active ones. Pending placement groups are what the Ray autoscaler sees.

    The fleet owns its engines' health: an engine whose call fails (its process died, its node was lost) or passes
    `call_timeout_s` is removed and replaced by a new pending one, and its prompts are generated again on the
    others, or on the replacement when it was the last. A batch is always complete: no prompt lost, none doubled.
    """

    def __init__(self, config: RelayConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self.call_timeout_s = config.run.call_timeout_s
        self.active: list[_Member] = []
        self.pending: list[_Member] = []
        self.failures = 0
        self.weights = _Weights(policy_version=0, model_path=model_path)
        self._next_index = 0
        self._add(config.rollout.num_workers)
        # The run starts once one engine is up; the others join at an iteration boundary when they are (as when
        # scaling up), so an engine that is slow to start, or cannot be placed yet, does not hold the start.
        self._wait_for_an_engine("a first rollout engine to start")

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
                runtime_env={"env_vars": {**ENGINE_ENV, **self._thread_env(), **_passthrough_env()}},
            ).remote(self.config, self.model_path, index)
            self.pending.append(_Member(index, worker, group, worker.__ray_ready__.remote()))

    def _thread_env(self) -> dict[str, str]:
        """On CPUs, an engine's OpenMP threads. Generation runs alone in its phase of the iteration, and with the
        one thread Ray gives a fractional-CPU actor it took 3.9 s where two threads take 2.7 s (jobs/bench.py, on
        2 cores): every core. Generating ahead, it shares the cores with the learners, and two threads made the
        iteration 19.1 s where one made it 12.3 s: one."""
        if self.config.device != "cpu":
            return {}
        rollout = self.config.rollout
        return {"OMP_NUM_THREADS": str(rollout.cpu_threads or (1 if rollout.generate_ahead else os.cpu_count() or 1))}

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

    def join_ready(self) -> int:
        """At an iteration boundary: pending engines that are up load the current weights and start generating
        (those whose start failed are replaced). Returns how many joined."""
        if not self.pending:
            return 0
        ready_refs, _ = ray.wait([member.ready for member in self.pending], num_returns=len(self.pending), timeout=0)
        return self._join([member for member in self.pending if member.ready in ready_refs])

    def _join(self, members: list[_Member]) -> int:
        loaded = self._call_each(members, self._load_for_joining, "load the current weights")
        joined = [member for member in members if member in loaded]
        self.pending = [member for member in self.pending if member not in members]
        self.active += joined
        return len(joined)

    def _load_for_joining(self, member: _Member) -> ray.ObjectRef:
        ray.get(member.ready)  # a failed start raises here, and the engine is replaced
        if self.weights.buckets is None and self.weights.model_path == self.model_path:
            return ray.put(self.weights.policy_version)  # it started from these weights: nothing to load
        return self._load_current(member)

    def _load_current(self, member: _Member) -> ray.ObjectRef:
        if self.weights.buckets is not None:
            return member.worker.load_weights.remote(self.weights.buckets, self.weights.policy_version)
        return member.worker.load_weights_from.remote(self.weights.model_path, self.weights.policy_version)

    def _wait_for_an_engine(self, what: str) -> None:
        """Until an engine is active: pending ones join as they come up (a failed start is replaced, within
        rollout.max_failures)."""
        deadline = Deadline(self.call_timeout_s)
        while not self.active:
            ready, _ = ray.wait([member.ready for member in self.pending], num_returns=1, timeout=deadline.left())
            if not ready:
                names = ", ".join(f"rollout-{member.index}" for member in self.pending)
                raise TimeoutError(f"waited run.call_timeout_s={self.call_timeout_s:.0f} s for {what}: none of "
                                   f"{names} started (not enough free resources for their placement groups?)")
            self.join_ready()

    def generate(
        self, prompt_token_ids: list[list[int]], samples_per_prompt: int, temperature: float, seeds: list[int]
    ) -> list[list[Sample]]:
        """Split the prompts (and their seeds) over the active engines in contiguous chunks; results come back in
        prompt order, and do not depend on the split. The prompts of an engine that fails go to the others."""
        results: list[list[Sample]] = [[] for _ in prompt_token_ids]
        todo = list(range(len(prompt_token_ids)))
        while todo:
            if not self.active:  # the last engine failed: a replacement must come up first
                self._wait_for_an_engine("a replacement rollout engine")
            chunks = dict(zip(self.active, _split_evenly(todo, len(self.active))))

            def generate_chunk(member: _Member) -> ray.ObjectRef:
                chunk = chunks[member]
                return member.worker.generate.remote([prompt_token_ids[i] for i in chunk], samples_per_prompt,
                                                     temperature, [seeds[i] for i in chunk])

            done = self._call_each([member for member in self.active if chunks[member]], generate_chunk,
                                   "generate")
            for member, samples in done.items():
                for index, prompt_samples in zip(chunks[member], samples, strict=True):
                    results[index] = prompt_samples
            todo = [index for member, chunk in chunks.items() if chunk and member not in done for index in chunk]
        return results

    def run_episodes(self, starts: list[EpisodeStart], env_actors: list[Any], temperature: float,
                     stop: list[str]) -> list[Episode]:
        """The episodes split over the active engines in contiguous chunks, returned in the order of `starts`; an
        engine that fails has its episodes run again on the others."""
        results: dict[str, Episode] = {}
        todo = list(starts)
        while todo:
            if not self.active:
                self._wait_for_an_engine("a replacement rollout engine")
            chunks = dict(zip(self.active, _split_evenly(todo, len(self.active))))
            done = self._call_each([member for member in self.active if chunks[member]],
                                   lambda member: member.worker.run_episodes.remote(chunks[member], env_actors,
                                                                                    temperature, stop),
                                   "run episodes")
            for episodes in done.values():
                if isinstance(episodes, EnvContractError):
                    raise episodes
                results |= {episode.key: episode for episode in episodes}
            todo = [start for member, chunk in chunks.items() if chunk and member not in done for start in chunk]
        return [results[start.key] for start in starts]

    def load_weights(self, buckets: list[ray.ObjectRef], policy_version: int) -> None:
        """The new policy weights (buckets of whole decoder blocks, in the object store) into every active engine;
        engines that join later load the same."""
        self.weights = _Weights(policy_version, buckets=buckets)
        self._call_each(self.active, self._load_current, "load new weights")

    def usage(self) -> list[dict[str, float]]:
        """Each active engine's busy seconds and peak memory (actors.usage)."""
        return list(self._call_each(self.active, lambda member: member.worker.usage.remote(), "usage").values())

    def load_weights_from(self, model_path: str, policy_version: int) -> None:
        self.weights = _Weights(policy_version, model_path=model_path)
        self._call_each(self.active, self._load_current, "load new weights")

    def _call_each(self, members: list[_Member], call: Any, what: str) -> dict[_Member, Any]:
        """`call(member)` -> an ObjectRef, on each member at once; the results of those that answered within
        call_timeout_s. Every other member is replaced (see `_replace`)."""
        refs: dict[_Member, ray.ObjectRef] = {}
        failed: dict[_Member, str] = {}
        for member in members:
            try:
                refs[member] = call(member)
            except RayError as error:
                failed[member] = _describe(error)
        deadline = Deadline(self.call_timeout_s)
        results: dict[_Member, Any] = {}
        for member, ref in refs.items():
            try:
                results[member] = ray.get(ref, timeout=deadline.left())
            except GetTimeoutError:
                failed[member] = f"no answer within run.call_timeout_s={self.call_timeout_s:.0f} s"
            except RayError as error:
                failed[member] = _describe(error)
        for member, reason in failed.items():
            self._replace(member, f"{what}: {reason}")
        return results

    def _replace(self, member: _Member, reason: str) -> None:
        """Remove a failed engine (killed, in case it hangs) and start a pending replacement."""
        self.failures += 1
        if self.failures > self.config.rollout.max_failures:
            raise RuntimeError(f"rollout engines failed {self.failures} times, more than rollout.max_failures="
                               f"{self.config.rollout.max_failures} (the last: rollout-{member.index}, {reason})")
        self.active = [other for other in self.active if other is not member]
        self.pending = [other for other in self.pending if other is not member]
        ray.kill(member.worker)
        remove_placement_group(member.placement_group)
        self._add(1)
        print(f"rollout-{member.index} failed ({reason}); its prompts go to the other engines, and "
              f"rollout-{self._next_index - 1} is starting to replace it", flush=True)

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


def _describe(error: Exception) -> str:
    """The error in a line: a task's error by its cause's type and last line (the first is Ray's header)."""
    cause = getattr(error, "cause", None)
    if cause is not None:
        lines = str(cause).strip().splitlines()
        return f"{type(error).__name__}({type(cause).__name__}): {lines[-1][:200] if lines else ''}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line[:200]}"


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
