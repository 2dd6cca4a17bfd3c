"""Environments without Ray: the contract's checks, token-in-token-out rendering, advantages over action tokens
only, per-turn reward placement, the tool environment and its calculator, and the env's config."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from relay import ppo
from relay.config import AlgorithmSection, ConfigError
from relay.envs import EnvContractError, checked_reset, checked_step, load_env_class
from relay.envs.render import TurnRenderer
from relay.envs.tools import ToolEnv, calculator
from relay.estimators import estimate
from relay.models import build_tokenizer
from tests.conftest import tiny_run_config


# ---------------------------------------------------------------- the contract
def test_a_users_env_class_is_loaded_and_a_broken_one_refused_in_one_line():
    assert load_env_class("tests.user_env:DigitGame").__name__ == "DigitGame"
    with pytest.raises(ValueError, match="cannot import module 'tests.no_such'"):
        load_env_class("tests.no_such:Env")
    with pytest.raises(EnvContractError, match="env.name 'tests.user_reward:score' is a function, not a class"):
        load_env_class("tests.user_reward:score")
    with pytest.raises(EnvContractError, match=r"env relay.envs:Reset: no method reset"):
        load_env_class("relay.envs:Reset")  # a class with neither reset nor step


def test_answers_of_the_wrong_shape_name_the_env_and_the_method():
    assert checked_reset(("12=", {}), "E").prompt == "12="
    assert checked_reset(([{"role": "user", "content": "hi"}], {}), "E").info == {}
    with pytest.raises(EnvContractError, match=r"env E: reset returned a str, not \(prompt, info\)"):
        checked_reset("12=", "E")
    with pytest.raises(EnvContractError, match="env E: reset's prompt is a int"):
        checked_reset((12, {}), "E")
    assert checked_step(("ok", 1, True, False, {}), "E").reward == 1.0
    with pytest.raises(EnvContractError, match="env E: step returned a tuple of 4"):
        checked_step(("ok", 1.0, True, {}), "E")
    with pytest.raises(EnvContractError, match="env E: step's reward is a str"):
        checked_step(("ok", "1", True, False, {}), "E")
    with pytest.raises(EnvContractError, match="step's terminated and truncated must be bools"):
        checked_step(("ok", 1.0, 1, False, {}), "E")


# ---------------------------------------------------------------- token in, token out
def test_observations_are_tokenised_once_without_special_tokens(bpe_model):
    tokenizer = AutoTokenizer.from_pretrained(bpe_model)
    renderer = TurnRenderer(tokenizer)
    prompt = renderer.prompt_ids([{"role": "user", "content": "reverse 123="}])
    assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    text = renderer.observation_ids("the answer is", action_ended_in_eos=False)
    assert tokenizer.bos_token_id not in text and tokenizer.decode(text) == "the answer is"
    # A tool message after a turn the model ended with a stop string: the template closes the turn, adds the
    # message and opens the next assistant turn; after an EOS, the model's own EOS closed it.
    tool = {"role": "tool", "content": "321"}
    assert tokenizer.decode(renderer.observation_ids(tool, action_ended_in_eos=False)) == (
        "<|im_end|>\n<|im_start|>tool\n321<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(renderer.observation_ids(tool, action_ended_in_eos=True)) == (
        "\n<|im_start|>tool\n321<|im_end|>\n<|im_start|>assistant\n")


def test_without_a_chat_template_turns_are_concatenated():
    tokenizer = build_tokenizer("0123456789=")
    renderer = TurnRenderer(tokenizer)
    assert renderer.prompt_ids([{"role": "user", "content": "12="}]) == renderer.prompt_ids("12=")
    assert tokenizer.decode(renderer.observation_ids({"role": "tool", "content": "21="}, False)) == "21="


# ---------------------------------------------------------------- advantages over the policy's tokens
def test_advantages_and_the_final_reward_skip_the_observation_tokens():
    # One episode: action (2 tokens), observation (2), action (1), then padding. Step rewards 0.5 and 1.
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 0]])
    step = torch.tensor([[0.0, 0.5, 0, 0, 1.0, 0]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.0]])  # the critic's guesses at observations must not count
    zero = torch.zeros(1, 6)
    token_rewards, _ = ppo.token_rewards(torch.tensor([2.0]), zero, zero, mask, kl_coef=0.0)
    assert token_rewards.tolist() == [[0, 0, 0, 0, 2.0, 0]]  # the sequence reward on the last action token
    algorithm = AlgorithmSection(gamma=1.0, lam=1.0, whiten_advantages=False)
    advantages, returns = estimate("gae", token_rewards + step, values, mask, algorithm, group_size=1)
    # Over the action tokens alone: rewards [0, 0.5, 3.0], values [0.1, 0.2, 0.3] -> returns [3.5, 3.5, 3.0].
    assert torch.allclose(returns, torch.tensor([[3.5, 3.5, 0, 0, 3.0, 0]]))
    assert torch.allclose(advantages, torch.tensor([[3.4, 3.3, 0, 0, 2.7, 0]]))
    # One answer (a mask contiguous from 0) is estimated exactly as before packing.
    single = torch.tensor([[1.0, 1, 1, 0, 0, 0]])
    rewards = torch.randn(1, 6)
    assert torch.equal(estimate("gae", rewards, values, single, algorithm, 1)[0],
                       ppo.gae(rewards, values, single, 1.0, 1.0)[0])


# ---------------------------------------------------------------- the tool environment
def test_the_calculator_is_arithmetic_only():
    assert calculator("37 * 48") == "1776" and calculator("7/2") == "3.5" and calculator("(2+3)**2") == "25"
    for bad in ("__import__('os')", "2**1000", "1/0", "x + 1", "3 +"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_the_tool_env_calls_answers_and_counts_bad_calls():
    env = ToolEnv()
    assert env.reset({"prompt": "what is 37*48?", "answer": "1776"}, seed=0) == ("what is 37*48?", {})
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "37*48"}}</tool_call>'
    assert asyncio.run(env.step(call)) == ({"role": "tool", "content": "1776"}, 0.0, False, False,
                                           {"tool_calls": 1, "tool_errors": 0})
    observation, _, done, _, info = asyncio.run(env.step('<tool_call>{"name": "search"}</tool_call>'))
    assert "no tool 'search'" in observation["content"] and not done and info["tool_errors"] == 1
    assert asyncio.run(env.step(" 1776 ")) == (None, 1.0, True, False, {})
    compact = ToolEnv(call_format="compact")
    compact.reset({"prompt": "37*48=", "answer": "1776"}, seed=0)
    assert compact.stop == ["]"] and asyncio.run(compact.step("[37*48]"))[0] == "1776;"
    assert asyncio.run(compact.step("[37*]"))[0] == "?;"


# ---------------------------------------------------------------- config
def test_an_env_run_needs_no_reward_source_and_says_what_it_cannot_combine(tmp_path):
    config = tiny_run_config(tmp_path, "env.name=tests.user_env:DigitGame", "reward=null")  # no reward section
    assert config.reward.type == "none" and not config.uses_reward_source
    with pytest.raises(ConfigError, match="reward.type is 'none'"):
        tiny_run_config(tmp_path, "reward.type=none")
    with pytest.raises(ConfigError, match="algorithm.dynamic_sampling takes single answers"):
        tiny_run_config(tmp_path, "env.name=tests.user_env:DigitGame", "reward=null", "algorithm.advantage=grpo",
                        "algorithm.dynamic_sampling=true")
    from relay.placement import placed_roles
    assert "reward" not in placed_roles(config)


# ---------------------------------------------------------------- multi-turn warm start
def test_a_multi_turn_demonstration_trains_the_models_turns_only_as_a_rollout_lays_them_out():
    from relay.data import IGNORE_INDEX, parse_sft_row
    from relay.envs.render import tokenize_turns
    from relay.tasks.multiply import TASK

    tokenizer = build_tokenizer(TASK.alphabet)
    renderer = TurnRenderer(tokenizer)
    turns = [("assistant", "[37*48]"), ("tool", "1776;"), ("assistant", "1776")]
    ids, labels = tokenize_turns(renderer, "37*48=", turns)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "37*48=[37*48]1776;1776"
    trained = tokenizer.decode([token for token, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == "[37*48]1776" + tokenizer.eos_token  # EOS after the last turn only; the tool's never trained
    # The rollout's layout: prompt, action ids, observation ids (tokenised alone), next action.
    assert ids == (renderer.prompt_ids("37*48=") + tokenizer("[37*48]", add_special_tokens=False).input_ids
                   + renderer.observation_ids("1776;", False) + tokenizer("1776", add_special_tokens=False).input_ids
                   + [tokenizer.eos_token_id])
    # A chat row with tool messages is such an episode; one without is a conversation trained on its last reply.
    bpe_like = {"messages": [{"role": "user", "content": "37*48="}, {"role": "assistant", "content": "[37*48]"},
                             {"role": "tool", "content": "1776;"}, {"role": "assistant", "content": "1776"}]}
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prompt, response = parse_sft_row(bpe_like, "row 1", tokenizer, template)
    assert prompt == "37*48=" and response == turns
    conversation = {"messages": [{"role": "user", "content": "1="}, {"role": "assistant", "content": "1"},
                                 {"role": "user", "content": "2="}, {"role": "assistant", "content": "2"}]}
    assert parse_sft_row(conversation, "row 2", tokenizer, template) == ("1=12=", "2")


def test_the_multiply_task_scores_the_final_answer():
    from relay.tasks.multiply import TASK, demonstrate
    import random

    [example] = TASK.make_examples(1, random.Random(0))
    answer = example.metadata["answer"]
    assert TASK.reward([example.prompt] * 3, [f"[x]{answer};{answer}", answer, f"[x]{answer};1"],
                       [example.metadata] * 3) == [1.0, 1.0, 0.0]
    shown = {str(demonstrate(example, random.Random(seed))) for seed in range(20)}
    assert len(shown) == 2  # with the tool, and without


def test_the_readme_example_env_keeps_the_contract(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("# my_envs.py\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (my_envs.py)", "exec"), namespace)  # noqa: S102 - our own README's example
    env = namespace["GuessTheNumber"](lives=2)
    reset = checked_reset(env.reset({"secret": "7", "prompt": "It is below 10."}, seed=0), "GuessTheNumber")
    assert reset.prompt[0]["role"] == "user"
    assert checked_step(asyncio.run(env.step("<guess>3</guess>")), "GuessTheNumber").observation == {
        "role": "tool", "content": "higher"}
    final = checked_step(asyncio.run(env.step("<guess>7</guess>")), "GuessTheNumber")
    assert (final.reward, final.terminated) == (1.0, True)
