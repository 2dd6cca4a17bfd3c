"""A user's own reward, outside the relay package, as `reward.function: tests.user_reward:score` names it.

It reads the dataset's columns: `answer` for the score and `source`, which it requires, to show that every column
of the row reaches the reward."""

from __future__ import annotations

from typing import Any


def score(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    for row in metadata:
        if row.get("source") != "exported":
            raise ValueError(f"the row's metadata did not reach the reward: {row}")
    return [float(response.strip() == row["answer"]) for response, row in zip(responses, metadata)]


def not_a_number(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    """A broken reward: NaN for every response."""
    return [float("nan")] * len(responses)
