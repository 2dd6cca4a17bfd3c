"""Multi-turn episodes on one vLLM engine, each advancing on its own (continuous batching): an episode's next
turn goes to the engine as soon as its environment has answered, not when the slowest episode of the batch has.

The sequence an episode leaves is exactly what the engine sampled and saw: each turn's token ids and log-probs as
sampled, each observation's ids (relay/envs/render.py) appended once; the next turn is generated from those ids.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.env import EnvError
from relay.config import EnvSection, RolloutSection
from relay.envs import EnvContractError, Reset, Step
from relay.envs.render import TurnRenderer


@dataclass(frozen=True)
class EpisodeStart:
    key: str  # unique in the batch
    row: dict[str, Any]  # the prompt dataset's row, every column
    seed: int  # the env's seed, and the root of each turn's sampling seed
    actor: int  # which environment actor runs it


@dataclass
class Episode:
    key: str
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)  # actions and observations, in order
    action_mask: list[float] = field(default_factory=list)  # 1 on the model's tokens, 0 on the observations'
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0 on observation tokens
    step_rewards: list[tuple[int, float]] = field(default_factory=list)  # (its action's last token, reward)
    turns: int = 0  # calls to step
    tool_calls: int = 0  # summed from the infos' `tool_calls`
    tool_errors: int = 0  # and `tool_errors`
    error: EnvError | None = None  # the env raised or timed out: the episode ended there, reward 0
    lost: bool = False  # its environment actor died: run it again
    env_seconds: list[float] = field(default_factory=list)  # each reset and step, as waited for
    finished: bool = False


def turn_seed(seed: int, turn: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:turn{turn}".encode(), digest_size=8).digest()) >> 1


class EpisodeRunner:
    def __init__(self, engine: Any, renderer: TurnRenderer, rollout: RolloutSection, env: EnvSection,
                 stop: list[str], temperature: float, call_timeout_s: float) -> None:
        self.engine, self.renderer, self.rollout, self.env = engine, renderer, rollout, env
        self.stop, self.temperature, self.call_timeout_s = stop, temperature, call_timeout_s
        self.calls: dict[ray.ObjectRef, tuple[Episode, EpisodeStart, float]] = {}

    def run(self, starts: list[EpisodeStart], actors: list[Any]) -> list[Episode]:
        self.actors = actors
        episodes = {start.key: Episode(start.key) for start in starts}
        self.starts = {start.key: start for start in starts}
        for start in starts:
            self._call(episodes[start.key], actors[start.actor].reset.remote(start.key, start.row, start.seed))
        while self.calls or self.engine.has_unfinished_requests():
            if self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        self._acted(episodes[output.request_id.rsplit(":", 1)[0]], output.outputs[0])
            self._answers(block=not self.engine.has_unfinished_requests())
        for actor, keys in self._by_actor(episodes.values()).items():
            self.actors[actor].close.remote(keys)
        return list(episodes.values())

    def _call(self, episode: Episode, ref: ray.ObjectRef) -> None:
        self.calls[ref] = (episode, self.starts[episode.key], time.perf_counter())

    def _answers(self, block: bool) -> None:
        """Handle the env answers that are in; with `block`, wait for at least one (run.call_timeout_s)."""
        if not self.calls:
            return
        pending = list(self.calls)
        if block:
            ready, _ = ray.wait(pending, num_returns=1, timeout=self.call_timeout_s)
            if not ready:
                raise TimeoutError(f"no environment actor answered within run.call_timeout_s="
                                   f"{self.call_timeout_s:.0f} s ({len(pending)} calls waiting)")
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in ready:
            episode, start, called = self.calls.pop(ref)
            try:
                answer = ray.get(ref)
            except RayActorError as error:
                if error.actor_init_failed:  # no replacement would start either: the env does not import there
                    lines = str(error).strip().splitlines()
                    raise EnvContractError(f"env {self.env.name}: an environment actor could not start: "
                                           f"{lines[-1] if lines else error}") from None
                episode.lost = episode.finished = True
                continue
            except RayTaskError as error:  # the env broke the contract: the run's error, not the engine's
                if isinstance(error.cause, EnvContractError):
                    raise error.cause from None
                raise
            episode.env_seconds.append(time.perf_counter() - called)
            self._answered(episode, answer)

    def _answered(self, episode: Episode, answer: Reset | Step | EnvError) -> None:
        if isinstance(answer, EnvError):
            episode.error, episode.finished = answer, True
            episode.step_rewards = []  # an episode that failed earns nothing
        elif isinstance(answer, Reset):
            episode.prompt_ids = self.renderer.prompt_ids(answer.prompt)
            self._next_turn(episode)
        else:
            episode.step_rewards.append((len(episode.response_ids) - 1, answer.reward))
            episode.tool_calls += int(answer.info.get("tool_calls", 0))
            episode.tool_errors += int(answer.info.get("tool_errors", 0))
            if answer.terminated or answer.truncated or episode.turns == self.env.max_turns:
                episode.finished = True
                return
            eos = self.renderer.tokenizer.eos_token_id
            ended_in_eos = bool(episode.response_ids) and episode.response_ids[-1] == eos
            observation = self.renderer.observation_ids(answer.observation, ended_in_eos)
            room = self.rollout.max_model_len - len(episode.prompt_ids) - len(episode.response_ids)
            episode.response_ids += observation[:room]
            episode.action_mask += [0.0] * len(observation[:room])
            episode.logprobs += [0.0] * len(observation[:room])
            self._next_turn(episode)

    def _next_turn(self, episode: Episode) -> None:
        """The episode's next model turn on the engine, from its ids so far; none when no token fits (truncated)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = episode.prompt_ids + episode.response_ids
        room = min(self.rollout.max_new_tokens, self.rollout.max_model_len - len(ids))
        if room <= 0:
            episode.finished = True
            return
        params = SamplingParams(n=1, temperature=self.temperature, top_p=self.rollout.top_p, max_tokens=room,
                                stop=self.stop or None, include_stop_str_in_output=True,
                                ignore_eos=self.rollout.ignore_eos, logprobs=0,
                                seed=turn_seed(self.starts[episode.key].seed, episode.turns),
                                output_kind=RequestOutputKind.FINAL_ONLY)
        self.engine.add_request(f"{episode.key}:{episode.turns}", {"prompt_token_ids": ids}, params)

    def _acted(self, episode: Episode, completion: Any) -> None:
        """A model turn is in: its tokens join the episode as sampled, and its text goes to the env's step."""
        tokens = list(completion.token_ids)
        episode.response_ids += tokens
        episode.action_mask += [1.0] * len(tokens)
        episode.logprobs += [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        episode.turns += 1
        action = self.renderer.tokenizer.decode(tokens, skip_special_tokens=True)
        self._call(episode, self.actors[self.starts[episode.key].actor].step.remote(episode.key, action))

    def _by_actor(self, episodes: Any) -> dict[int, list[str]]:
        """The keys of the episodes to close, by the index of their (living) environment actor."""
        keys: dict[int, list[str]] = {}
        for episode in episodes:
            if not episode.lost:
                keys.setdefault(self.starts[episode.key].actor, []).append(episode.key)
        return keys
