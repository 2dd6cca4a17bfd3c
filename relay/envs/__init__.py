"""Environments: what a policy acts in over several turns (agents), in the style of Gymnasium.

A user's environment is a class named as `env.name: module:Class`, constructed once per episode with `env.kwargs`:

    class MyEnv:
        stop = ["</tool_call>"]   # optional: strings that end a model turn besides EOS (kept in the action)
        def __init__(self, **kwargs): ...
        def reset(self, row: dict, seed: int) -> tuple[str | list[dict], dict]: ...
        def step(self, action: str) -> tuple[str | dict | None, float, bool, bool, dict]: ...

`reset` gives the episode's prompt (text, or chat messages rendered with the tokenizer's template) and an info
dict; `row` is the prompt dataset's row with every column. `step` takes one model turn, decoded without special
tokens (the stop string included, never EOS), and gives (observation, reward, terminated, truncated, info): the
observation is text appended as is, a chat message ({"role": "tool", "content": ...}) rendered with the template,
or None at the end. Either method may be `async def`. An info dict's `tool_calls` and `tool_errors` (counts) are
summed into `env/tool_calls_mean` and `env/tool_errors_mean`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from relay.tasks import load_object

Prompt = str | list[dict[str, Any]]
Observation = str | dict[str, Any] | None


class EnvContractError(ValueError):
    """An environment that does not keep the contract: refused in one line naming the env and the method."""


def load_env_class(name: str) -> type:
    """The class `env.name` names, checked to have `reset` and `step`."""
    env_class = load_object(name, "env.name")
    if not inspect.isclass(env_class):
        raise EnvContractError(f"env.name {name!r} is a {type(env_class).__name__}, not a class")
    for method in ("reset", "step"):
        if not callable(getattr(env_class, method, None)):
            raise EnvContractError(f"env {name}: no method {method}(...) (see relay/envs/__init__.py)")
    return env_class


@dataclass
class Reset:
    prompt: Prompt
    info: dict[str, Any]


@dataclass
class Step:
    observation: Observation
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)


def checked_reset(result: Any, name: str) -> Reset:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise EnvContractError(f"env {name}: reset returned {_shape(result)}, not (prompt, info)")
    prompt, info = result
    if not (isinstance(prompt, str) or _is_messages(prompt)):
        raise EnvContractError(f"env {name}: reset's prompt is {_shape(prompt)}, not text or a list of chat "
                               "messages ({'role': ..., 'content': ...})")
    if not isinstance(info, dict):
        raise EnvContractError(f"env {name}: reset's info is {_shape(info)}, not a dict")
    return Reset(prompt, info)


def checked_step(result: Any, name: str) -> Step:
    if not (isinstance(result, tuple) and len(result) == 5):
        raise EnvContractError(f"env {name}: step returned {_shape(result)}, not (observation, reward, terminated, "
                               "truncated, info)")
    observation, reward, terminated, truncated, info = result
    if not (observation is None or isinstance(observation, str) or _is_message(observation)):
        raise EnvContractError(f"env {name}: step's observation is {_shape(observation)}, not text, a chat message "
                               "or None")
    if isinstance(reward, bool) or not isinstance(reward, Real):
        raise EnvContractError(f"env {name}: step's reward is {_shape(reward)}, not a number")
    if not (isinstance(terminated, bool) and isinstance(truncated, bool)):
        raise EnvContractError(f"env {name}: step's terminated and truncated must be bools, got "
                               f"{_shape(terminated)} and {_shape(truncated)}")
    if not isinstance(info, dict):
        raise EnvContractError(f"env {name}: step's info is {_shape(info)}, not a dict")
    return Step(observation, float(reward), terminated, truncated, info)


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_message(message) for message in value)


def _shape(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"
