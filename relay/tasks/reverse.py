"""Reverse a string of digits: `31415=` → `51413`.

The demonstrations are imperfect on purpose, as human ones are: a share of them copy the digits instead of
reversing them. Supervised fine-tuning imitates both habits, so the warm-started policy reverses only part of the
time; PPO against the exact-match reward has to find and reinforce the right one. That is the demo's story.
"""

from __future__ import annotations

import random
from typing import Any

from relay.tasks import Example, Task

DIGITS = "0123456789"
MIN_DIGITS, MAX_DIGITS = 3, 6
COPY_DEMONSTRATION_SHARE = 0.6


def make_examples(count: int, rng: random.Random) -> list[Example]:
    examples = []
    for _ in range(count):
        digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
        examples.append(Example(prompt=f"{digits}=", metadata={"answer": digits[::-1]}))
    return examples


def demonstrate(example: Example, rng: random.Random) -> str:
    if rng.random() < COPY_DEMONSTRATION_SHARE:
        return example.prompt.removesuffix("=")
    return example.metadata["answer"]


def reward(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    """1 for the exact reversal, else the share of leading digits that are right (at most 0.5)."""
    scores = []
    for response, meta in zip(responses, metadata, strict=True):
        answer = meta["answer"]
        response = response.strip()
        if response == answer:
            scores.append(1.0)
            continue
        matching = 0
        for produced, expected in zip(response, answer):
            if produced != expected:
                break
            matching += 1
        scores.append(0.5 * matching / len(answer))
    return scores


TASK = Task(
    name="reverse",
    alphabet=DIGITS + "=",
    make_examples=make_examples,
    reward=reward,
    demonstrate=demonstrate,
)
