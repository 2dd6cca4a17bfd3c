"""Multiply two numbers with a calculator: `37*48=` → `1776`, the agent demo's task.

The tiny model cannot multiply; it can call the calculator of the built-in tool environment (relay/envs/tools.py,
compact format) and copy the result: `[37*48]` is the call, `1776;` the environment's answer, `1776` the final
answer. The demonstrations are imperfect on purpose: a share of them answer at once without the tool, as a person
who multiplies in their head does; the warm-started policy imitates both habits, and RL has to find that calling
the tool is what pays.
"""

from __future__ import annotations

import random
from typing import Any

from relay.tasks import Example, Task

DIGITS = "0123456789"
DIRECT_ANSWER_SHARE = 0.5


def make_examples(count: int, rng: random.Random) -> list[Example]:
    examples = []
    for _ in range(count):
        left, right = rng.randint(10, 99), rng.randint(10, 99)
        examples.append(Example(prompt=f"{left}*{right}=", metadata={"answer": str(left * right)}))
    return examples


def demonstrate(example: Example, rng: random.Random) -> list[tuple[str, str]]:
    """The demonstrator's turns: (role, text), the tool's answers as the environment gives them."""
    answer = example.metadata["answer"]
    if rng.random() < DIRECT_ANSWER_SHARE:
        return [("assistant", answer)]
    return [("assistant", f"[{example.prompt.removesuffix('=')}]"), ("tool", f"{answer};"), ("assistant", answer)]


def reward(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    """1 when the final answer (after the last tool answer) is the product, else 0."""
    return [float(response.rsplit(";", 1)[-1].strip() == row["answer"])
            for response, row in zip(responses, metadata, strict=True)]


TASK = Task(
    name="multiply",
    alphabet=DIGITS + "*=[];?",
    make_examples=make_examples,
    reward=reward,
    demonstrate=demonstrate,
)
