"""A multi-turn run's batches: episodes of the environment (env.name) played on the rollout fleet against a pool
of environment actors (actors/env.py), turned into a RolloutBatch whose response holds the model's turns and the
observations between them, the action mask telling them apart and each step reward on its action's last token.

An episode whose env raised or timed out ends with reward 0 and is counted (`env/errors`); each kind of failure is
logged once, with its last line; past env.max_error_rate of a batch's episodes the run stops. The episodes of an
environment actor that died are run again from the start (same seeds) on its replacement.
"""

from __future__ import annotations

import hashlib
import statistics

import torch
from transformers import PreTrainedTokenizerBase

from actors.env import EnvPool
from actors.episodes import Episode, EpisodeStart
from actors.rollout import RolloutFleet
from relay.batch import RolloutBatch, pad_left, pad_right
from relay.config import RelayConfig
from relay.envs import EnvContractError, load_env_class
from relay.prompts import Prompt


class EnvFailure(RuntimeError):
    """Too many of a batch's episodes failed in the environment: the run stops, naming the env and its error."""


class EpisodeSource:
    def __init__(self, config: RelayConfig, tokenizer: PreTrainedTokenizerBase, fleet: RolloutFleet) -> None:
        assert config.env is not None
        self.config, self.env, self.tokenizer, self.fleet = config, config.env, tokenizer, fleet
        self.stop = env_stop(config)
        self.pool = EnvPool(config.env, config.actor_namespace)
        self.logged_errors: set[str] = set()

    def run(self, prompts: list[Prompt], samples_per_prompt: int, seeds: list[int],
            policy_version: int) -> tuple[RolloutBatch, dict[str, float]]:
        """`samples_per_prompt` episodes of each prompt's row, episode i of prompt p seeded from seeds[p]."""
        starts = [EpisodeStart(key=f"{index}.{sample}", row={self.config.data.prompt_key: prompt.text,
                                                            **prompt.metadata},
                               seed=episode_seed(seeds[index], sample),
                               actor=(index * samples_per_prompt + sample) % len(self.pool.actors))
                  for index, prompt in enumerate(prompts) for sample in range(samples_per_prompt)]
        episodes = self._play(starts)
        self._check_errors(episodes)
        rows = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
        return self._batch(rows, episodes, policy_version), figures(episodes)

    def _play(self, starts: list[EpisodeStart]) -> list[Episode]:
        """Every episode played to its end; those whose env actor died, again on its replacement (within
        rollout.max_failures replacements)."""
        done: dict[str, Episode] = {}
        todo, replaced = starts, 0
        while todo:
            played = self.fleet.run_episodes(todo, self.pool.actors, self.config.rollout.temperature, self.stop)
            lost = {start.actor for start, episode in zip(todo, played) if episode.lost}
            done |= {episode.key: episode for episode in played if not episode.lost}
            replaced += len(lost)
            if replaced > self.config.rollout.max_failures:
                raise RuntimeError(f"environment actors died {replaced} times, more than rollout.max_failures="
                                   f"{self.config.rollout.max_failures}")
            for index in lost:
                self.pool.replace(self.pool.actors[index])
            todo = [start for start in todo if start.key not in done]
        return [done[start.key] for start in starts]

    def _check_errors(self, episodes: list[Episode]) -> None:
        failed = [episode.error for episode in episodes if episode.error is not None]
        for error in failed:
            if error.kind not in self.logged_errors:
                self.logged_errors.add(error.kind)
                print(f"env {self.env.name}: an episode ended on {error.kind}: {error.message} (each kind is "
                      "logged once; env/errors counts them)", flush=True)
        if failed and len(failed) / len(episodes) > self.env.max_error_rate:
            error = failed[-1]
            raise EnvFailure(f"env {self.env.name}: {len(failed)} of {len(episodes)} episodes failed, more than "
                             f"env.max_error_rate={self.env.max_error_rate:g}; the last: {error.kind}: "
                             f"{error.message}")

    def _batch(self, rows: list[Prompt], episodes: list[Episode], policy_version: int) -> RolloutBatch:
        pad_id = self.tokenizer.pad_token_id
        # An episode whose env failed at reset has no prompt of its own: the row's prompt stands in (a row of the
        # learners' batch must hold a real token).
        query_ids, query_mask = pad_left([episode.prompt_ids or prompt.ids for prompt, episode in zip(rows, episodes)],
                                         pad_id)
        response_ids, response_mask = pad_right([episode.response_ids for episode in episodes], pad_id, torch.long)
        action_mask, _ = pad_right([episode.action_mask for episode in episodes], 0.0, torch.float32)
        sampler_logprobs, _ = pad_right([episode.logprobs for episode in episodes], 0.0, torch.float32)
        step_rewards = torch.zeros(response_ids.shape)
        for row, episode in enumerate(episodes):
            for position, reward in episode.step_rewards:
                step_rewards[row, position] += reward
        return RolloutBatch(
            query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
            sampler_logprobs=sampler_logprobs,
            prompts=[prompt.text for prompt in rows],
            responses=self.tokenizer.batch_decode([episode.response_ids for episode in episodes],
                                                  skip_special_tokens=True),
            metadata=[prompt.metadata for prompt in rows],
            policy_version=policy_version, action_mask=action_mask, step_rewards=step_rewards,
        )

    def shutdown(self) -> None:
        self.pool.shutdown()


def env_stop(config: RelayConfig) -> list[str]:
    """The strings that end a model turn besides EOS, as an instance of the env (built with env.kwargs, which
    checks them) has them."""
    assert config.env is not None
    env_class = load_env_class(config.env.name)
    try:
        stop = getattr(env_class(**config.env.kwargs), "stop", [])
    except Exception as error:  # noqa: BLE001 - the user's constructor, refused before anything starts
        raise EnvContractError(f"env {config.env.name}: __init__(**env.kwargs) raised {type(error).__name__}: "
                               f"{error}") from None
    if not isinstance(stop, (list, tuple)) or not all(isinstance(text, str) and text for text in stop):
        raise EnvContractError(f"env {config.env.name}: stop must be a list of non-empty strings, got {stop!r}")
    return list(stop)


def episode_seed(prompt_seed: int, sample: int) -> int:
    """The env's seed of a prompt's `sample`-th episode (and the root of its turns' sampling seeds)."""
    return int.from_bytes(hashlib.blake2b(f"{prompt_seed}:episode{sample}".encode(), digest_size=8).digest()) >> 1


def figures(episodes: list[Episode]) -> dict[str, float]:
    """env/* per episode; time/env_step, each reset's and step's seconds as the engine waited for it."""
    seconds = [value for episode in episodes for value in episode.env_seconds]
    return {
        "env/turns_mean": statistics.fmean(episode.turns for episode in episodes),
        "env/tool_calls_mean": statistics.fmean(episode.tool_calls for episode in episodes),
        "env/tool_errors_mean": statistics.fmean(episode.tool_errors for episode in episodes),
        "env/errors": float(sum(episode.error is not None for episode in episodes)),
        "env/episode_tokens_mean": statistics.fmean(len(episode.response_ids) for episode in episodes),
        "env/return_mean": statistics.fmean(sum(reward for _, reward in episode.step_rewards) for episode in episodes),
        "time/env_step": statistics.fmean(seconds) if seconds else 0.0,
    }
