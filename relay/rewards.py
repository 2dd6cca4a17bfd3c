"""Reward sources behind one interface, and the running normalization applied to what they return.

A source scores whole responses: `score(prompts, responses, metadata)` takes B of each, aligned, and returns B
floats, one per response and in order. `FunctionReward` wraps a Python function, `RemoteReward` asks an HTTP
endpoint; the reward model needs a model on a device and is scored by actors/reward.py. Every source is held to
the same contract: one finite number per response, or an error that names the source and what was wrong.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
import time
from typing import Any, Protocol
from urllib.parse import urlparse

import requests
import torch
from torch import Tensor

from relay import verifiers
from relay.config import RewardRule, RewardSection
from relay.tasks import RewardFunction, Task, load_object


class RewardSource(Protocol):
    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """[B] prompts, responses and metadata -> [B] rewards, one finite float per response, in order."""


def _check_aligned(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> None:
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(
            f"{len(prompts)} prompts, {len(responses)} responses and {len(metadata)} metadata entries: "
            "a reward source takes exactly one of each per response"
        )


def _as_rewards(scores: Any, count: int) -> list[float]:
    """`scores` as [count] floats, or a ValueError whose message reads on from the source's name.

    A list or tuple of real numbers passes (bools included: a verifiable task's True is a reward of 1.0), and so
    does anything with `tolist()`, such as a 1-D tensor or numpy array.
    """
    if hasattr(scores, "tolist"):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"returned a {type(scores).__name__}, not a list of floats")
    if len(scores) != count:
        raise ValueError(f"returned {len(scores)} rewards for {count} responses")
    rewards = []
    for index, score in enumerate(scores):
        if not isinstance(score, numbers.Real):
            raise ValueError(f"returned {score!r:.80} ({type(score).__name__}) for response {index}, not a number")
        if not math.isfinite(score):
            raise ValueError(f"returned {score} for response {index}, not a finite number")
        rewards.append(float(score))
    return rewards


class FunctionReward:
    """A `RewardFunction` (prompts, responses, metadata) -> [B] floats, with its answer checked.

    `name` appears in errors; by default it is the function's `module:qualname`, the form `reward.function` takes.
    """

    def __init__(self, function: RewardFunction, name: str | None = None) -> None:
        self.function = function
        module = getattr(function, "__module__", "?")
        self.name = name or f"{module}:{getattr(function, '__qualname__', repr(function))}"

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """[B] prompts, responses and metadata -> [B] rewards; ValueError if the function's answer is not that."""
        _check_aligned(prompts, responses, metadata)
        scores = self.function(prompts, responses, metadata)
        try:
            return _as_rewards(scores, len(responses))
        except ValueError as problem:
            raise ValueError(f"reward function {self.name} {problem}") from None


class RuleReward:
    """The weighted sum of built-in checks (relay/verifiers.py) of each response against its row's columns."""

    def __init__(self, rules: list[RewardRule]) -> None:
        self.rules = rules
        self.patterns = {index: re.compile(rule.pattern) for index, rule in enumerate(rules) if rule.pattern}
        self.name = "rules " + " + ".join(describe_rule(rule) for rule in rules)

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        _check_aligned(prompts, responses, metadata)
        return [sum(rule.weight * self._check(index, rule, response, row) for index, rule in enumerate(self.rules))
                for response, row in zip(responses, metadata)]

    def _check(self, index: int, rule: RewardRule, response: str, row: dict[str, Any]) -> float:
        if rule.check == "regex":
            return verifiers.regex_match(response, self.patterns[index])
        if rule.column not in row:
            raise ValueError(f"reward rule {describe_rule(rule)}: the row has no column {rule.column!r} "
                             f"(it has {', '.join(sorted(row)) or 'none'})")
        check = verifiers.math_answer if rule.check == "math_answer" else verifiers.exact_match
        return check(response, row[rule.column])


def describe_rule(rule: RewardRule) -> str:
    subject = rule.pattern if rule.check == "regex" else rule.column
    return f"{rule.weight:g}×{rule.check}({subject})"


def build_reward_source(section: RewardSection, task: Task | None, task_name: str | None = None) -> RewardSource:
    """The source a function, rules or remote reward scores with: `reward.function`, `reward.rules`, the endpoint at
    `reward.url`, or the task's own reward (type function without a function). Reward models are scored by actors."""
    if section.type == "remote":
        assert section.url is not None
        return RemoteReward(section.url, timeout_s=section.timeout_s, outage_budget_s=section.outage_budget_s,
                            batch_size=section.request_batch_size)
    if section.type == "rules":
        return RuleReward(section.rules)
    if section.function:
        function = load_object(section.function, "reward.function")
        if not callable(function):
            raise ValueError(f"reward.function {section.function!r} is a {type(function).__name__}, not a function "
                             "(prompts, responses, metadata) -> list[float]")
        return FunctionReward(function, name=section.function)
    if task is None:
        raise ValueError("reward.type function without reward.function needs a task")
    return FunctionReward(task.reward, name=f"task {task_name or task.name}")


MAX_BACKOFF_S = 30.0  # the longest pause between two attempts to reach a reward endpoint


class RemoteRewardError(RuntimeError):
    """A reward endpoint stayed down, refused a request, or answered something other than one reward per response."""


class RemoteReward:
    """Scores by POSTing to an HTTP endpoint, as OpenRLHF's remote reward model does.

    The protocol, one request per chunk of at most `batch_size` responses (all of them when None):

        POST <url>
        Content-Type: application/json
        {"prompts": [str, ...], "responses": [str, ...], "metadata": [object, ...]}    # [b] each, aligned
        -> 200 OK
        {"rewards": [float, ...]}                                                      # [b], in request order

    Metadata must be JSON-serializable. Connection errors, timeouts (`timeout_s` for connecting and again for the
    answer) and 5xx answers are an outage: the same request is sent again after `backoff_s`, then twice that, and
    so on (at most MAX_BACKOFF_S apart), for as long as the outage lasts within `outage_budget_s` (0: no retry).
    A 4xx answer is the request's fault and fails at once, as does an answer that does not follow the protocol.
    Every failure raises RemoteRewardError naming the URL.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        outage_budget_s: float = 300.0,
        backoff_s: float = 1.0,
        batch_size: int | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"reward endpoint {url!r} is not an http:// or https:// URL")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if outage_budget_s < 0:
            raise ValueError(f"outage_budget_s must be >= 0, got {outage_budget_s}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.url = url
        self.timeout_s = timeout_s
        self.outage_budget_s = outage_budget_s
        self.backoff_s = backoff_s
        self.batch_size = batch_size

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """[B] prompts, responses and metadata -> [B] rewards, asked for in chunks of `batch_size`."""
        _check_aligned(prompts, responses, metadata)
        chunk = self.batch_size or max(1, len(responses))
        rewards: list[float] = []
        for start in range(0, len(responses), chunk):
            end = start + chunk
            rewards += self._score_chunk(prompts[start:end], responses[start:end], metadata[start:end])
        return rewards

    def _score_chunk(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        try:
            body = json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata}).encode()
        except TypeError as error:
            raise ValueError(f"metadata for reward endpoint {self.url} is not JSON-serializable ({error})") from None
        last_error = ""
        started, delay_s = time.monotonic(), self.backoff_s
        for attempt in itertools.count(1):
            try:
                answer = requests.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}, timeout=self.timeout_s
                )
            except requests.Timeout:
                last_error = f"timed out after {self.timeout_s:g} s"
            except requests.ConnectionError as error:
                # requests wraps the socket's reason (e.g. "Connection refused") two layers deep.
                reason = getattr(error.args[0], "reason", None) if error.args else None
                last_error = f"cannot connect: {reason or error}"
            else:
                if answer.status_code < 400:
                    return self._rewards_from(answer, len(responses))
                if answer.status_code < 500:
                    raise RemoteRewardError(
                        f"reward endpoint {self.url} rejected the request with HTTP {answer.status_code}: "
                        f"{_excerpt(answer.text)} (not retried: the same request would be rejected again)"
                    )
                last_error = f"HTTP {answer.status_code}: {_excerpt(answer.text)}"
            down_s = time.monotonic() - started
            if down_s + delay_s > self.outage_budget_s:
                raise RemoteRewardError(
                    f"reward endpoint {self.url} did not answer for {down_s:.1f} s, the outage budget "
                    f"(reward.outage_budget_s={self.outage_budget_s:g}); {attempt} attempts, last error: {last_error}"
                )
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def _rewards_from(self, answer: requests.Response, count: int) -> list[float]:
        try:
            content = answer.json()
        except ValueError:
            raise RemoteRewardError(
                f"reward endpoint {self.url} answered with a body that is not JSON: {_excerpt(answer.text)}"
            ) from None
        if not isinstance(content, dict) or "rewards" not in content:
            raise RemoteRewardError(
                f"reward endpoint {self.url} answered without a 'rewards' key: {_excerpt(answer.text)}"
            )
        try:
            return _as_rewards(content["rewards"], count)
        except ValueError as problem:
            raise RemoteRewardError(f"reward endpoint {self.url} {problem}") from None


def _excerpt(text: str, limit: int = 200) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


class RunningMeanStd:
    """Count, mean and population standard deviation of every value seen so far, updated a batch at a time.

    Chan et al.'s parallel form of Welford's update merges each batch's (count, mean, M2) into the running ones in
    float64, so the statistics equal those of all batches concatenated without keeping them, and without the
    cancellation of a running sum of squares.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        return self._m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: Tensor) -> None:
        """Fold in `values` (any shape: every element counts once)."""
        batch = values.detach().to("cpu", torch.float64).flatten()
        if batch.numel() == 0:
            return
        if not torch.isfinite(batch).all():
            raise ValueError("RunningMeanStd.update got NaN or infinite values: they would poison every later batch")
        batch_count = batch.numel()
        batch_mean = batch.mean().item()
        batch_m2 = ((batch - batch_mean) ** 2).sum().item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self._m2 += batch_m2 + delta**2 * self.count * batch_count / total
        self.count = total

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        if int(state["count"]) < 0 or float(state["m2"]) < 0:
            raise ValueError(f"RunningMeanStd state {state} has a negative count or m2")
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self._m2 = float(state["m2"])


class RewardNormalizer:
    """Sequence rewards [B] -> [B], scaled by running statistics and then clipped, before they enter GAE.

    Each call first folds the batch into the running statistics (kept even with `normalize` off, for logging);
    with `normalize`, r -> (r - mean) / (std + 1e-8) over every reward seen so far, this batch included; with
    `clip`, the result is clamped to [-clip, clip]. The statistics must see whole batches, not one rank's shard.
    """

    def __init__(self, normalize: bool = True, clip: float | None = None) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.normalize = normalize
        self.clip = clip
        self.stats = RunningMeanStd()

    def __call__(self, rewards: Tensor) -> Tensor:
        """rewards [B] -> [B], on the same device, in the same dtype when it is a floating one (else float32)."""
        self.stats.update(rewards)
        result = rewards.double()
        if self.normalize:
            result = (result - self.stats.mean) / (self.stats.std + 1e-8)
        if self.clip is not None:
            result = result.clamp(-self.clip, self.clip)
        return result.to(rewards.dtype if rewards.is_floating_point() else torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
