"""A user's own environments, outside the relay package, as `env.name: tests.user_env:Class` names them.

`DigitGame` (synchronous): the prompt is the row's digits; each turn is rewarded by how many of the row's `answer`
digits it holds; the env answers `N=` between turns (N: that turn's reward) and ends after `turns` turns.
`AsyncDigitGame` is the same with async methods that wait a little, as an env that calls a service does. The
others break on purpose: they raise, hang, or answer in the wrong shape.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any


class DigitGame:
    def __init__(self, turns: int = 2) -> None:
        self.turns, self.taken = turns, 0

    def reset(self, row: dict[str, Any], seed: int) -> tuple[str, dict[str, Any]]:
        if "answer" not in row:
            raise ValueError(f"the row's columns did not reach the env: {row}")
        self.answer = row["answer"]
        return row["prompt"], {"seed": seed}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self.taken += 1
        reward = float(sum(digit in action for digit in self.answer)) / len(self.answer)
        return f"{round(reward * 9)}=", reward, self.taken >= self.turns, False, {}


class AsyncDigitGame(DigitGame):
    async def reset(self, row: dict[str, Any], seed: int) -> tuple[str, dict[str, Any]]:
        await asyncio.sleep(0.01)
        return super().reset(row, seed)

    async def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        await asyncio.sleep(random.Random(self.taken).uniform(0.0, 0.05))
        return super().step(action)


class RaisingGame(DigitGame):
    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        raise RuntimeError("the game server is down")


class HangingGame(DigitGame):
    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        time.sleep(30)
        return super().step(action)


class GarbageGame(DigitGame):
    def step(self, action: str) -> Any:
        return "not a tuple"


class SlowDigitGame(DigitGame):
    """Each step takes half a second: a batch is still being played when an env actor is killed."""

    async def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        await asyncio.sleep(0.5)
        return super().step(action)
