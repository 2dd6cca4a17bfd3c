"""EnvActor: the environments of a multi-turn run, many episodes at once in one Ray actor; EnvPool: the run's
actors (env.num_actors), replaced when one dies.

An EnvActor is an async actor: every call runs on its event loop, so an I/O-bound `step` (a tool, a web call)
does not hold up the other episodes; a synchronous `reset` or `step` runs in a thread. A call that raises or
outlasts env.timeout_s ends its episode with an error (counted by the driver); an answer that breaks the
contract (relay/envs/__init__.py) is no episode's error but the env's: it raises, and the run stops in one line.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any

import ray

from relay.config import EnvSection
from relay.envs import Reset, Step, checked_reset, checked_step, load_env_class


@dataclass
class EnvError:
    """A reset or step that raised or timed out: the episode ends with reward 0."""

    kind: str  # the exception's type, or "timeout"
    message: str  # its last line


class EnvActor:
    def __init__(self, env: EnvSection) -> None:
        self.env = env
        self.env_class = load_env_class(env.name)
        self.episodes: dict[str, Any] = {}

    async def reset(self, key: str, row: dict[str, Any], seed: int) -> Reset | EnvError:
        try:
            self.episodes[key] = self.env_class(**self.env.kwargs)
        except Exception as error:  # noqa: BLE001 - the user's constructor: its failure is the episode's
            return _error(error)
        result = await self._call(key, "reset", row, seed)
        return result if isinstance(result, EnvError) else checked_reset(result, self.env.name)

    async def step(self, key: str, action: str) -> Step | EnvError:
        result = await self._call(key, "step", action)
        return result if isinstance(result, EnvError) else checked_step(result, self.env.name)

    def close(self, keys: list[str]) -> None:
        for key in keys:
            episode = self.episodes.pop(key, None)
            if episode is not None and callable(getattr(episode, "close", None)):
                episode.close()

    async def _call(self, key: str, method: str, *args: Any) -> Any:
        function = getattr(self.episodes[key], method)
        call = function(*args) if inspect.iscoroutinefunction(function) else asyncio.to_thread(function, *args)
        try:
            return await asyncio.wait_for(call, self.env.timeout_s)
        except asyncio.TimeoutError:
            return EnvError("timeout", f"{method} took longer than env.timeout_s={self.env.timeout_s:g} s")
        except Exception as error:  # noqa: BLE001 - the user's env: its failure is the episode's
            return _error(error)


def _error(error: BaseException) -> EnvError:
    lines = str(error).strip().splitlines()
    return EnvError(type(error).__name__, lines[-1] if lines else "")


class EnvPool:
    """The run's environment actors; `replace_dead` swaps in a new actor for each one that died."""

    def __init__(self, env: EnvSection, namespace: str) -> None:
        self.env, self.namespace = env, namespace
        self.actors = [self._start() for _ in range(env.num_actors)]

    def _start(self) -> Any:
        return ray.remote(EnvActor).options(num_cpus=self.env.cpus_per_actor, max_concurrency=1000,
                                            namespace=self.namespace).remote(self.env)

    def replace(self, actor: Any) -> Any:
        """A new actor in place of `actor` (which died, or hangs)."""
        ray.kill(actor)
        replacement = self._start()
        self.actors = [replacement if other == actor else other for other in self.actors]
        return replacement

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
