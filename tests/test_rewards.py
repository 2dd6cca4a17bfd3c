"""Tier-1 tests of relay.rewards: function and remote reward sources (a real HTTP server on loopback) and the
running reward normalization, against values worked out by hand."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from actors.group import free_port
from relay.rewards import FunctionReward, RemoteReward, RemoteRewardError, RewardNormalizer, RunningMeanStd

PROMPTS = ["a", "bb", "ccc"]
RESPONSES = ["x", "yyyy", "zz"]
METADATA = [{"bonus": 0.5}, {"bonus": 0.0}, {"bonus": -1.0}]
# What the test server (and `length_plus_bonus`) score: len(response) + bonus -> 1 + 0.5, 4 + 0, 2 - 1
EXPECTED = [1.5, 4.0, 1.0]


def length_plus_bonus(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    return [len(response) + meta["bonus"] for response, meta in zip(responses, metadata)]


# ---------------------------------------------------------------- FunctionReward


def test_function_reward_passes_good_scores_through():
    rewards = FunctionReward(length_plus_bonus).score(PROMPTS, RESPONSES, METADATA)
    assert rewards == EXPECTED
    assert all(type(reward) is float for reward in rewards)


def test_function_reward_converts_ints_bools_and_tensors_to_floats():
    assert FunctionReward(lambda p, r, m: [1, True, 0]).score(PROMPTS, RESPONSES, METADATA) == [1.0, 1.0, 0.0]
    tensor_scores = FunctionReward(lambda p, r, m: torch.tensor([0.25, 0.5, 1.0]))
    assert tensor_scores.score(PROMPTS, RESPONSES, METADATA) == [0.25, 0.5, 1.0]


def returns_two(prompts, responses, metadata):
    return [1.0, 2.0]


def returns_nan(prompts, responses, metadata):
    return [1.0, math.nan, 0.0]


def returns_string(prompts, responses, metadata):
    return [1.0, 2.0, "3"]


def returns_number(prompts, responses, metadata):
    return 1.0


@pytest.mark.parametrize(
    "function, problem",
    [
        (returns_two, "returned 2 rewards for 3 responses"),
        (returns_nan, "returned nan for response 1, not a finite number"),
        (returns_string, "returned '3' (str) for response 2, not a number"),
        (returns_number, "returned a float, not a list of floats"),
    ],
)
def test_function_reward_rejects_bad_answers_naming_function_and_problem(function, problem):
    with pytest.raises(ValueError) as raised:
        FunctionReward(function).score(PROMPTS, RESPONSES, METADATA)
    message = str(raised.value)
    assert function.__name__ in message
    assert problem in message


def test_function_reward_uses_the_given_name_in_errors():
    with pytest.raises(ValueError, match=r"reward function my_module:score returned 2 rewards"):
        FunctionReward(returns_two, name="my_module:score").score(PROMPTS, RESPONSES, METADATA)


def test_reward_sources_reject_misaligned_inputs():
    with pytest.raises(ValueError, match="3 prompts, 2 responses and 3 metadata"):
        FunctionReward(length_plus_bonus).score(PROMPTS, RESPONSES[:2], METADATA)


# ---------------------------------------------------------------- RemoteReward against a real HTTP server


@dataclass
class ScoringServer:
    """What the test server saw and how it should answer; the handler reads and writes it under `lock`."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)  # request bodies, in arrival order
    scripted: list[tuple[int, bytes]] = field(default_factory=list)  # answers to the first requests, in order
    hang_s: float = 0.0  # hold each answer this long (or until teardown) before sending it
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ScoringHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        state: ScoringServer = self.server.state  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.seen.append(body)
            scripted = state.scripted.pop(0) if state.scripted else None
        if state.hang_s:
            state.released.wait(state.hang_s)
        if scripted is None:
            rewards = length_plus_bonus(body["prompts"], body["responses"], body["metadata"])
            scripted = (200, json.dumps({"rewards": rewards}).encode())
        status, payload = scripted
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up first: the case under test

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server(request):
    state = ScoringServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScoringHandler)
    httpd.state = state  # type: ignore[attr-defined]
    # a short poll interval: shutdown() waits for the serving loop's next poll
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="scoring-server", daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"

    def stop() -> None:
        state.released.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    return state


def test_remote_reward_returns_scores_in_order_and_sends_the_protocol(server):
    rewards = RemoteReward(server.url).score(PROMPTS, RESPONSES, METADATA)
    assert rewards == EXPECTED
    assert server.seen == [{"prompts": PROMPTS, "responses": RESPONSES, "metadata": METADATA}]


def test_remote_reward_splits_into_batch_size_chunks(server):
    prompts = [f"p{index}" for index in range(5)]
    responses = ["r" * (index + 1) for index in range(5)]
    metadata = [{"bonus": float(index)} for index in range(5)]
    rewards = RemoteReward(server.url, batch_size=2).score(prompts, responses, metadata)
    # len(response) + bonus = (index + 1) + index
    assert rewards == [1.0, 3.0, 5.0, 7.0, 9.0]
    # 5 responses in chunks of 2 -> requests of 2, 2 and 1, in order
    assert [body["responses"] for body in server.seen] == [responses[0:2], responses[2:4], responses[4:5]]


def test_remote_reward_sends_nothing_for_an_empty_batch(server):
    assert RemoteReward(server.url, batch_size=2).score([], [], []) == []
    assert server.seen == []


def test_remote_reward_retries_5xx_then_succeeds(server):
    server.scripted = [(500, b"warming up"), (503, b"busy")]
    rewards = RemoteReward(server.url, outage_budget_s=5, backoff_s=0.01).score(PROMPTS, RESPONSES, METADATA)
    assert rewards == EXPECTED
    assert len(server.seen) == 3
    assert server.seen[0] == server.seen[2]  # the same batch, scored again


def test_remote_reward_gives_up_on_5xx_when_the_outage_outlasts_its_budget(server):
    server.scripted = [(500, b"boom")] * 1000
    with pytest.raises(RemoteRewardError) as raised:
        RemoteReward(server.url, outage_budget_s=0.3, backoff_s=0.01).score(PROMPTS, RESPONSES, METADATA)
    message = str(raised.value)
    assert message.startswith(f"reward endpoint {server.url} did not answer for 0.")
    assert message.endswith(", last error: HTTP 500: 'boom'") and "(reward.outage_budget_s=0.3)" in message
    # Retried; and the pauses alone (0.01, 0.02, 0.04, 0.08, then 0.16 s) leave room for five attempts at most.
    assert 2 <= len(server.seen) <= 5


def test_remote_reward_does_not_retry_4xx(server):
    server.scripted = [(400, b"metadata lacks 'answer'")]
    with pytest.raises(RemoteRewardError) as raised:
        RemoteReward(server.url, outage_budget_s=5, backoff_s=0.01).score(PROMPTS, RESPONSES, METADATA)
    message = str(raised.value)
    assert server.url in message
    assert "HTTP 400" in message and "metadata lacks 'answer'" in message
    assert len(server.seen) == 1


def test_remote_reward_times_out_until_the_outage_budget_is_spent(server):
    server.hang_s = 5.0
    # Attempt 1 times out at 0.3 s; 0.3 + 0.05 s of backoff is within the 0.5 s budget, so attempt 2 goes out and
    # times out at about 0.65 s; a third would start past the budget.
    reward = RemoteReward(server.url, timeout_s=0.3, outage_budget_s=0.5, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError) as raised:
        reward.score(PROMPTS, RESPONSES, METADATA)
    elapsed_s = time.monotonic() - start
    assert str(raised.value).endswith("2 attempts, last error: timed out after 0.3 s")
    assert len(server.seen) == 2
    # Each attempt was cut off by the client's timeout, not answered late: two 0.3 s timeouts cannot end sooner
    # than 0.6 s, and waiting for the server would take its 5 s hang per attempt.
    assert 0.6 <= elapsed_s < server.hang_s


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"<html>oops</html>", "answered with a body that is not JSON: '<html>oops</html>'"),
        (b'{"scores": [1, 2, 3]}', "answered without a 'rewards' key"),
        (b'{"rewards": [1.0, 2.0]}', "returned 2 rewards for 3 responses"),
        (b'{"rewards": [1.0, "2", 3.0]}', "returned '2' (str) for response 1, not a number"),
        (b'{"rewards": [1.0, NaN, 3.0]}', "returned nan for response 1, not a finite number"),
    ],
)
def test_remote_reward_rejects_malformed_answers_without_retry(server, payload, problem):
    server.scripted = [(200, payload)]
    with pytest.raises(RemoteRewardError) as raised:
        RemoteReward(server.url, outage_budget_s=5, backoff_s=0.01).score(PROMPTS, RESPONSES, METADATA)
    assert str(raised.value).startswith(f"reward endpoint {server.url} {problem}")
    assert len(server.seen) == 1


def test_remote_reward_on_a_closed_port_names_the_url():
    port = free_port()  # nothing listens on it
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RemoteRewardError) as raised:
        RemoteReward(url, timeout_s=1.0, outage_budget_s=0.015, backoff_s=0.01).score(PROMPTS, RESPONSES, METADATA)
    message = str(raised.value)
    assert message.startswith(f"reward endpoint {url} did not answer for ")
    assert "2 attempts, last error: cannot connect" in message
    assert "refused" in message


def test_remote_reward_rejects_bad_settings():
    with pytest.raises(ValueError, match="not an http"):
        RemoteReward("127.0.0.1:8000/score")
    with pytest.raises(ValueError, match="outage_budget_s"):
        RemoteReward("http://127.0.0.1:8000/score", outage_budget_s=-1)
    with pytest.raises(ValueError, match="not JSON-serializable"):
        RemoteReward("http://127.0.0.1:8000/score").score(["p"], ["r"], [{"when": object()}])


# ---------------------------------------------------------------- RunningMeanStd


def test_running_mean_std_of_two_batches_by_hand():
    stats = RunningMeanStd()
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    stats.update(torch.tensor([4.0, 5.0]))
    # batch a: n 3, mean 2, M2 1 + 0 + 1 = 2; batch b: n 2, mean 4.5, M2 0.25 + 0.25 = 0.5
    # merged: delta 2.5, mean 2 + 2.5 * 2 / 5 = 3, M2 2 + 0.5 + 2.5² * 3 * 2 / 5 = 10, var 10 / 5 = 2
    assert stats.count == 5
    assert stats.mean == pytest.approx(3.0, abs=1e-12)
    assert stats.std == pytest.approx(math.sqrt(2.0), abs=1e-12)


def test_running_mean_std_equals_torch_over_the_concatenation():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(size, generator=generator) * 3 + 7 for size in (1, 17, 64, 5)]
    stats = RunningMeanStd()
    for batch in batches:
        stats.update(batch)
    everything = torch.cat(batches).double()
    assert stats.count == everything.numel()
    assert stats.mean == pytest.approx(everything.mean().item(), abs=1e-12)
    # population std: divides by the count, as the normalizer uses it
    assert stats.std == pytest.approx(everything.std(correction=0).item(), abs=1e-12)


def test_running_mean_std_state_round_trip_continues_identically():
    stats = RunningMeanStd()
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    restored = RunningMeanStd()
    restored.load_state_dict(stats.state_dict())
    for running in (stats, restored):
        running.update(torch.tensor([4.0, 5.0]))
    assert restored.state_dict() == stats.state_dict()


def test_running_mean_std_rejects_nan():
    with pytest.raises(ValueError, match="NaN or infinite"):
        RunningMeanStd().update(torch.tensor([1.0, math.nan]))


# ---------------------------------------------------------------- RewardNormalizer


def test_reward_normalizer_normalizes_with_running_stats_by_hand():
    normalizer = RewardNormalizer(normalize=True)
    # first batch (1, 3): mean 2, std sqrt(((1-2)² + (3-2)²) / 2) = 1 -> (-1, 1)
    first = normalizer(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)
    # then (5, 7): over (1, 3, 5, 7) mean 4, var (9 + 1 + 1 + 9) / 4 = 5 -> (1 / sqrt 5, 3 / sqrt 5)
    second = normalizer(torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(second, torch.tensor([1 / math.sqrt(5), 3 / math.sqrt(5)]), atol=1e-6, rtol=0)
    assert second.dtype == torch.float32


def test_reward_normalizer_clips():
    # normalize off: raw rewards clamped to [-1.5, 1.5]
    clipped = RewardNormalizer(normalize=False, clip=1.5)(torch.tensor([-3.0, 0.5, 2.0]))
    torch.testing.assert_close(clipped, torch.tensor([-1.5, 0.5, 1.5]))
    # normalize on: (1, 3) -> (-1, 1), then clamped to [-0.5, 0.5]
    both = RewardNormalizer(normalize=True, clip=0.5)(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(both, torch.tensor([-0.5, 0.5]))


def test_reward_normalizer_passes_through_when_off_but_keeps_stats():
    normalizer = RewardNormalizer(normalize=False)
    rewards = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(normalizer(rewards), rewards)
    assert normalizer.stats.count == 2 and normalizer.stats.mean == 2.0


def test_reward_normalizer_state_round_trip():
    normalizer = RewardNormalizer(normalize=True)
    normalizer(torch.tensor([1.0, 3.0]))
    restored = RewardNormalizer(normalize=True)
    restored.load_state_dict(normalizer.state_dict())
    batch = torch.tensor([5.0, 7.0])
    torch.testing.assert_close(restored(batch), normalizer(batch))
