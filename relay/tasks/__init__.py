"""Verifiable tasks: a prompt maker, a reward function and a demonstrator, behind one small interface.

A task is what the demo trains on, and the plug for a user's own verifiable problem: point `data.task` at
`my_module:my_task` (a `Task`), or keep a built-in task and point `reward.function` at `my_module:score`.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from relay.config import DataSection


class RewardFunction(Protocol):
    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """One float per (prompt, response); metadata carries each example's ground truth."""


@dataclass(frozen=True)
class Example:
    prompt: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Task:
    name: str
    alphabet: str  # every character a prompt or response may hold; a tiny model's tokenizer is built from it
    make_examples: Callable[[int, random.Random], list[Example]]
    reward: RewardFunction
    # A (possibly imperfect) human demonstration for SFT: the response, or a multi-turn episode's turns as (role,
    # text), the model's as "assistant" and the environment's answers as it gives them.
    demonstrate: Callable[[Example, random.Random], str | list[tuple[str, str]]]


def load_object(spec: str, what: str) -> Any:
    """Import `module:attribute`, with an error that says which part is missing."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {spec!r} must be of the form module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None


def get_task(name: str) -> Task:
    from relay.tasks import multiply, reverse

    builtin = {"reverse": reverse.TASK, "multiply": multiply.TASK}
    if name in builtin:
        return builtin[name]
    if ":" not in name:
        raise ValueError(f"data.task {name!r} is neither a built-in task ({', '.join(builtin)}) nor module:attribute")
    task = load_object(name, "data.task")
    if not isinstance(task, Task):
        raise ValueError(f"data.task {name!r} is a {type(task).__name__}, not a relay.tasks.Task")
    return task


def task_of(data: DataSection) -> Task | None:
    """The task behind the prompts: None when they come from a dataset (`data.prompts`)."""
    return None if data.prompts is not None else get_task(data.task)


def split_examples(task: Task, train_count: int, eval_count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples with no prompt in common (the eval set never leaks into training)."""
    examples = task.make_examples(train_count + eval_count, random.Random(seed))
    held_out = examples[:eval_count]
    held_out_prompts = {example.prompt for example in held_out}
    train = [example for example in examples[eval_count:] if example.prompt not in held_out_prompts]
    return train, held_out
