"""One model contract, on a tokenizer as users bring them (tests/conftest.py's byte-level BPE: pad is EOS, a ChatML
template): the run's tokenizer and template decided once and saved with what the run writes; one tokenisation of
prompt + response + EOS for the warm start, reward pairs and evaluation; a reward model read at the same token in
training and in PPO; scoring models checked to read the policy's token ids; chat pairs split by conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from relay.batch import RolloutBatch, pad_left, pad_right
from relay.config import ConfigError
from relay.data import IGNORE_INDEX, render_chat, tokenize_example, tokenize_prompt, tokenize_sft_example
from relay.models import (
    check_same_tokenizer,
    check_scoring_tokenizers,
    load_model,
    load_tokenizer,
    sequence_scores,
)
from relay.preferences import PreferencePair, collate_preferences, load_preferences, pair_scores, split_pairs
from tests.conftest import BPE_CHAT_TEMPLATE, tiny_run_config

# The run's own template, unlike the tokenizer's: a system line before the conversation.
RUN_TEMPLATE = BPE_CHAT_TEMPLATE.replace("{{ bos_token }}",
                                        "{{ bos_token }}<|im_start|>system\nreverse digits<|im_end|>\n")


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# --- the run's tokenizer -----------------------------------------------------------------------------------------


def test_the_run_tokenizer_carries_the_run_template_and_pad_is_eos_into_what_is_saved(bpe_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from relay.zero import save_pretrained

    tokenizer = load_tokenizer(str(bpe_model), RUN_TEMPLATE)
    assert tokenizer.chat_template == RUN_TEMPLATE
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert load_tokenizer(str(bpe_model)).chat_template == BPE_CHAT_TEMPLATE  # no run template: the model's own
    # A learner's save (relay.zero.save_pretrained, rank 0 of ZeRO-2) writes the tokenizer it is given: the run's.
    model = AutoModelForCausalLM.from_pretrained(bpe_model)
    save_pretrained(model, tokenizer, zero_stage=2, rank=0, path=tmp_path / "policy")
    saved = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert saved.chat_template == RUN_TEMPLATE
    assert saved.apply_chat_template(chat("1="), tokenize=False).startswith("<|begin_of_text|><|im_start|>system")


def test_a_run_has_one_chat_template(tmp_path):
    template = json.dumps(RUN_TEMPLATE)  # a YAML string: the override's value is parsed as YAML
    config = tiny_run_config(tmp_path, f"reward_model_training.chat_template={template}")
    assert config.chat_template == RUN_TEMPLATE
    assert tiny_run_config(tmp_path).chat_template is None
    with pytest.raises(ConfigError, match="data.chat_template and warm_start.chat_template differ"):
        tiny_run_config(tmp_path, f"data.chat_template={template}", "warm_start.chat_template=other")


# --- one tokenisation ----------------------------------------------------------------------------------------------


def test_sft_reward_pairs_and_a_ppo_sample_tokenise_alike_and_cut_alike(bpe_model):
    tokenizer = load_tokenizer(str(bpe_model))
    prompt = render_chat(chat("reverse 31415="), tokenizer, add_generation_prompt=True)
    query = tokenize_prompt(tokenizer, prompt)
    answer = tokenizer("51413", add_special_tokens=False).input_ids
    assert query.count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second from the tokenizer
    eos = tokenizer.eos_token_id
    # Whole: as PPO samples it, the prompt as the engine is given it, the answer, then the EOS where it stopped.
    # Where pad is EOS, a reward pair ended without it (eos != pad was the condition) and the score was read a
    # token earlier than PPO reads it.
    assert tokenize_example(tokenizer, prompt, "51413") == (query, answer + [eos])
    for max_length in (None, len(query) + len(answer) + 1, len(query), 3):
        sft_ids, labels = tokenize_sft_example(tokenizer, prompt, "51413", max_length)
        pair_ids = collate_preferences(tokenizer, [PreferencePair(prompt, "51413", "31415")], max_length or 10**6)
        row = pair_ids["input_ids"][0][pair_ids["attention_mask"][0].bool()].tolist()
        assert sft_ids == row, max_length
        prompt_ids, response_ids = tokenize_example(tokenizer, prompt, "51413", max_length)
        assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    # Cut: the prompt's first tokens go first; the response and its EOS stay whole while one prompt token is left.
    assert tokenize_example(tokenizer, prompt, "51413", len(query)) == (query[len(answer) + 1 :], answer + [eos])
    # Then the response keeps its start, and no EOS: an unfinished answer, as a sample cut at max_new_tokens.
    assert tokenize_example(tokenizer, prompt, "51413", 3) == (query[-1:], answer[:2])


def test_a_reward_model_reads_a_pair_at_the_token_ppo_reads_a_sample(bpe_model):
    tokenizer = load_tokenizer(str(bpe_model))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = load_model(str(bpe_model), "reward", "float32", tokenizer.pad_token_id).eval()
    prompts = [render_chat(chat(f"reverse {digits}="), tokenizer, add_generation_prompt=True)
               for digits in ("31415", "27")]
    pairs = [PreferencePair(prompts[0], "51413", "3141"), PreferencePair(prompts[1], "72", "2772")]
    with torch.no_grad():
        chosen, rejected = pair_scores(model, collate_preferences(tokenizer, pairs, 64))
        # The same answers as PPO lays out its samples: left-padded prompts, answers ending in the sampled EOS,
        # right-padded with the pad token (here EOS too).
        queries = [tokenize_prompt(tokenizer, pair.prompt) for pair in pairs for _ in range(2)]
        answers = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                   for pair in pairs for text in (pair.chosen, pair.rejected)]
        query_ids, query_mask = pad_left(queries, tokenizer.pad_token_id)
        response_ids, response_mask = pad_right(answers, tokenizer.pad_token_id, torch.long)
        batch = RolloutBatch(query_ids, query_mask, response_ids, response_mask, torch.zeros(response_ids.shape),
                             [""] * 4, [""] * 4, [{}] * 4, policy_version=0)
        ppo = sequence_scores(model, batch)
    torch.testing.assert_close(torch.stack([chosen, rejected], dim=1).flatten(), ppo, atol=1e-5, rtol=1e-5)


# --- scoring models read the policy's token ids --------------------------------------------------------------------


def test_a_scoring_model_with_another_tokenizer_is_refused_naming_both(bpe_model, tiny_model, tmp_path):
    bpe, char = load_tokenizer(str(bpe_model)), load_tokenizer(str(tiny_model))
    check_same_tokenizer(bpe, load_tokenizer(str(bpe_model), RUN_TEMPLATE), "policy", "critic")  # a template is text
    with pytest.raises(ValueError, match=r"^reward.model R does not read the token ids of policy.model P: \d+ tokens "
                                         r"differ.*; BOS id 0 against 1; use a model"):
        check_same_tokenizer(bpe, char, "policy.model P", "reward.model R")
    other_eos = AutoTokenizer.from_pretrained(bpe_model, eos_token="<|im_start|>")
    with pytest.raises(ValueError, match=r"^critic does not read the token ids of policy: EOS id 2 against 1;"):
        check_same_tokenizer(bpe, other_eos, "policy", "critic")

    # From the config, before Ray starts: the models it names to score, each by its field.
    config = tiny_run_config(tmp_path, "tiny_model=null", f"policy.model={bpe_model}", "reward.type=model",
                             f"reward.model={tiny_model}")
    with pytest.raises(ValueError, match=rf"^reward.model {tiny_model} does not read the token ids of policy.model "
                                         rf"{bpe_model}: .*use a model with the policy's tokenizer"):
        check_scoring_tokenizers(config, bpe)
    config = tiny_run_config(tmp_path, "tiny_model=null", f"policy.model={bpe_model}", f"critic.model={bpe_model}",
                             f"reference.model={bpe_model}")
    check_scoring_tokenizers(config, bpe)
    config = tiny_run_config(tmp_path, "reward.type=function", f"reference.model={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match=rf"^reference.model {tmp_path / 'missing'}: no tokenizer can be loaded"):
        check_scoring_tokenizers(config, char)
    # relay label with two models loads the second one's weights into the first one's engine.
    from jobs.label import main as label_main

    with pytest.raises(SystemExit, match=rf"^error: {tiny_model} does not read the token ids of {bpe_model}: "):
        label_main(["--config", str(tmp_path / "config.yaml"), str(bpe_model), str(tiny_model)])


# --- chat preference pairs ---------------------------------------------------------------------------------------


def test_chat_pairs_are_answers_to_their_conversation_and_split_by_it(bpe_model, tmp_path):
    tokenizer = load_tokenizer(str(bpe_model))
    rows = []
    for conversation in range(12):
        question = chat(f"reverse {conversation}{conversation}7=")
        for answer in range(3):  # three pairs of answers to each conversation
            rows.append({"chosen": question + [{"role": "assistant", "content": f"7{conversation}"}],
                         "rejected": question + [{"role": "assistant", "content": f"{answer}"}]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = load_preferences(path, tokenizer)
    # The prompt is the conversation as PPO's prompts are rendered; the answers are the last messages' contents.
    assert pairs[0] == PreferencePair(
        "<|begin_of_text|><|im_start|>user\nreverse 007=<|im_end|>\n<|im_start|>assistant\n", "70", "0")
    train, held_out = split_pairs(pairs, 0.25, seed=0)
    assert len(held_out) == 3 * 3  # three whole conversations
    assert not {pair.prompt for pair in train} & {pair.prompt for pair in held_out}

    rows[1]["rejected"] = chat("another question") + [{"role": "assistant", "content": "1"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=rf"{path}:2: 'chosen' and 'rejected' differ before their last message"):
        load_preferences(path, tokenizer)
    rows[1]["rejected"] = chat("reverse 007=")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=rf"{path}:2: 'rejected' ends with a message from 'user', not 'assistant'"):
        load_preferences(path, tokenizer)


# --- the whole pipeline on the BPE model -------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reverse_chats(count: int) -> list[tuple[list[dict[str, str]], str, str]]:
    """(conversation, right answer, a copy of the digits) for `count` reverse prompts as data.task writes them."""
    import random

    rng = random.Random(0)
    chats = []
    for _ in range(count):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        chats.append((chat(f"{digits}="), digits[::-1], digits))
    return chats


@pytest.mark.slow
def test_warm_start_reward_model_ppo_eval_and_serve_share_the_runs_tokenizer(ray_session, bpe_model, tmp_path):
    """Warm start -> reward model -> PPO -> relay eval -> relay serve on the BPE model, the chat template set once in
    the config (not the tokenizer's own): every model the run saves carries it, relay eval scores the final policy as
    training's evaluation did, and the served chat completion is transformers' greedy decoding of the conversation
    rendered with it."""
    from openai import OpenAI
    from ray import serve
    from transformers import AutoModelForCausalLM

    from jobs.evaluate import evaluate
    from jobs.ppo import PPOTrainer
    from jobs.serve import resolve, start
    from tests.live_ray import free_port

    chats = reverse_chats(48)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": conversation + [{"role": "assistant", "content": answer}]}
                                               for conversation, answer, _ in chats])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": conversation, "chosen": [{"role": "assistant", "content": answer}],
         "rejected": [{"role": "assistant", "content": copy}]} for conversation, answer, copy in chats])
    run_dir = tmp_path / "run"
    overrides = [
        "tiny_model=null", f"policy.model={bpe_model}", f"data.chat_template={json.dumps(RUN_TEMPLATE)}",
        "data.apply_chat_template=true", "run.iterations=1", "data.eval_prompts=4",
        f"warm_start.data={sft}", "warm_start.steps=4", "warm_start.batch_size=8",
        "warm_start.resources.cpus_per_rank=0.5",
        f"reward_model_training.data={pairs}", "reward_model_training.steps=4", "reward_model_training.batch_size=8",
        "reward_model_training.dtype=float32", "reward_model_training.resources.cpus_per_rank=0.5",
        "reward.type=model", "reward.dtype=float32",
    ]
    config = tiny_run_config(run_dir, *overrides)
    trainer = PPOTrainer(config)
    try:
        summary = trainer.fit()
    finally:
        trainer.shutdown()

    # Every model the run wrote carries the run's template and its pad (EOS) beside the weights.
    saved = {"warm start": summary["reference_model"], "reward model": summary["reward_model"],
             **{name: run_dir / name for name in ("checkpoints/iter_000001/policy", "checkpoints/iter_000001/critic",
                                                   "policy", "policy_best")}}
    for name, path in saved.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.chat_template == RUN_TEMPLATE, name
        assert tokenizer.pad_token_id == tokenizer.eos_token_id, name

    # relay eval, the final policy against the run's reference, with the run's reward model: what training's own
    # evaluation measured, the same samples scored at the same tokens.
    report = evaluate(run_dir / "config.yaml", [str(run_dir)], None, tmp_path / "eval" / "eval.json", [])
    evaluated = report["results"][str(run_dir)]
    assert evaluated["eval/reward"] == pytest.approx(summary["eval_after"]["eval/reward"], abs=1e-4)
    assert evaluated["eval/score"] == pytest.approx(summary["eval_after"]["eval/score"])

    # relay serve, told nothing about templates: the chat is rendered as training rendered its prompts.
    served = resolve(str(run_dir), None, None, "bpe")
    port = free_port()
    start(served, "127.0.0.1", port, None)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        conversation = chats[0][0]
        completion = client.chat.completions.create(model="bpe", messages=conversation, max_tokens=8, temperature=0)
    finally:
        serve.shutdown()
    tokenizer = load_tokenizer(served.path)
    ids = tokenize_prompt(tokenizer, render_chat(conversation, tokenizer, RUN_TEMPLATE, add_generation_prompt=True))
    assert completion.usage.prompt_tokens == len(ids)  # the run's template, its system line included
    answer = completion.choices[0].message.content
    model = AutoModelForCausalLM.from_pretrained(served.path, dtype=torch.float32)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.decode(greedy[0, len(ids):], skip_special_tokens=True)
