"""The Bradley–Terry reward model: its math by hand, preference loading and its errors, and the whole job on Ray
Train + DeepSpeed with a tiny model, its checkpoint loaded the way RewardScorer loads it."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from relay.preferences import (
    PreferencePair,
    bradley_terry_loss,
    collate_preferences,
    load_preferences,
    mean_margin,
    pair_accuracy,
    simulated_preferences,
    split_pairs,
)
from relay.tasks import get_task

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


# --- the math, by hand -------------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])
    # margins 2, 0, -2; -log σ(m) = log(1 + e^-m):
    #   log(1 + e^-2) = 0.126928, log 2 = 0.693147, log(1 + e^2) = 2.126928; mean = 2.947003 / 3 = 0.982334
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.982334, abs=1e-6)
    # A wide correct margin costs almost nothing: log(1 + e^-20) ≈ 2.06e-9.
    assert bradley_terry_loss(torch.tensor([10.0]), torch.tensor([-10.0])).item() < 1e-8


def test_bradley_terry_loss_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dc −log σ(c − r) = −(1 − σ(0)) = −0.5; d/dr = +0.5
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


def test_pair_accuracy_and_margin_by_hand():
    chosen = torch.tensor([1.0, 2.0, 0.5, 3.0])
    rejected = torch.tensor([0.0, 2.0, 1.0, -1.0])
    # c > r in rows 0 and 3 (the tie in row 1 counts as wrong): 2 / 4 = 0.5
    assert pair_accuracy(chosen, rejected) == pytest.approx(0.5)
    # margins 1, 0, -0.5, 4: sum 4.5 / 4 = 1.125
    assert mean_margin(chosen, rejected) == pytest.approx(1.125)


# --- loading -----------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_loads_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "12=", "chosen": "21", "rejected": "12"},
        {"prompt": "345=", "chosen": "543", "rejected": "345", "extra": 1},
    ])
    assert load_preferences(path) == [PreferencePair("12=", "21", "12"), PreferencePair("345=", "543", "345")]


def test_jsonl_missing_key_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    # Line 2 is blank (skipped, but still counted); the bad row is on line 3.
    path.write_text(
        json.dumps({"prompt": "1=", "chosen": "1", "rejected": "2"}) + "\n\n"
        + json.dumps({"prompt": "2=", "chosen": "2"}) + "\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:3: missing key 'rejected'"):
        load_preferences(path)


def test_jsonl_empty_chosen_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "1=", "chosen": "1", "rejected": "2"},
        {"prompt": "2=", "chosen": "", "rejected": "3"},
    ])
    with pytest.raises(ValueError, match=rf"{path}:2: 'chosen' is empty"):
        load_preferences(path)


def test_jsonl_non_string_and_bad_json(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1=", "chosen": 5, "rejected": "2"}])
    with pytest.raises(ValueError, match=rf"{path}:1: 'chosen' must be a string, got int"):
        load_preferences(path)
    path.write_text('{"prompt": "1=", "chosen": "1", "rejected": "2"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        load_preferences(path)


def test_parquet_loads_and_reports_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["1=", "23="], "chosen": ["1", "32"], "rejected": ["2", "23"]}), path)
    assert load_preferences(path) == [PreferencePair("1=", "1", "2"), PreferencePair("23=", "32", "23")]

    pq.write_table(pa.table({"prompt": ["1=", "23="], "chosen": ["1", "  "], "rejected": ["2", "23"]}), path)
    with pytest.raises(ValueError, match=rf"{path} row 1: 'chosen' is empty"):
        load_preferences(path)


def test_hugging_face_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["1="], "chosen": ["1"], "rejected": ["2"]}).save_to_disk(tmp_path / "ds")
    assert load_preferences(tmp_path / "ds") == [PreferencePair("1=", "1", "2")]


def test_chat_pairs_render_with_template(tmp_path, tiny_model):
    from relay.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    path = write_jsonl(tmp_path / "chat.jsonl", [{
        "prompt": [{"role": "user", "content": "12="}],
        "chosen": [{"role": "assistant", "content": "21"}],
        "rejected": [{"role": "user", "content": "12="}, {"role": "assistant", "content": "12"}],
    }])
    # The prompt is prepended to chosen (which lacks it) and not repeated in rejected (which has it); as a PPO
    # prompt, the conversation before the answers is rendered with the generation prompt, and the answers are the
    # last messages' contents.
    assert load_preferences(path, tokenizer, CHAT_TEMPLATE) == [PreferencePair("<user>12=\n<assistant>", "21", "12")]


def test_chat_pairs_without_template_fail_clearly(tmp_path, tiny_model):
    from relay.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    assert not tokenizer.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [{
        "chosen": [{"role": "user", "content": "1="}, {"role": "assistant", "content": "1"}],
        "rejected": [{"role": "user", "content": "1="}, {"role": "assistant", "content": "2"}],
    }])
    with pytest.raises(ValueError, match=rf"{path}:1: .*no chat template.*reward_model_training.chat_template"):
        load_preferences(path, tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": [{"role": "user"}], "rejected": []}])
    with pytest.raises(ValueError, match=rf"{bad}:1: chosen\[0\] must be a {{role, content}} message"):
        load_preferences(bad, tokenizer, CHAT_TEMPLATE)


def test_simulated_preferences_follow_the_task_reward():
    task = get_task("reverse")
    pairs = simulated_preferences(task, 200, random.Random(0))
    assert len(pairs) == 200
    for pair in pairs:
        meta = {"answer": pair.prompt.removesuffix("=")[::-1]}
        chosen, rejected = task.reward([pair.prompt] * 2, [pair.chosen, pair.rejected], [meta] * 2)
        assert chosen > rejected


def test_split_keeps_prompts_apart_and_collate_pads_right(tiny_model):
    from relay.models import load_tokenizer

    pairs = simulated_preferences(get_task("reverse"), 100, random.Random(1))
    train, held_out = split_pairs(pairs, 0.2, seed=0)
    assert len(train) + len(held_out) == 100 and held_out
    assert not {pair.prompt for pair in train} & {pair.prompt for pair in held_out}

    tokenizer = load_tokenizer(str(tiny_model))
    batch = collate_preferences(tokenizer, [PreferencePair("12=", "21", "1"), PreferencePair("3=", "3", "4")], 16)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = {char: tokenizer.convert_tokens_to_ids(char) for char in "12345="}
    # rows: chosen "12=21", "3=3", then rejected "12=1", "3=4"; BOS first, EOS last (where PPO's reward model reads
    # a finished sample's score), right-padded to 7
    assert batch["input_ids"].tolist() == [
        [bos, ids["1"], ids["2"], ids["="], ids["2"], ids["1"], eos],
        [bos, ids["3"], ids["="], ids["3"], eos, pad, pad],
        [bos, ids["1"], ids["2"], ids["="], ids["1"], eos, pad],
        [bos, ids["3"], ids["="], ids["4"], eos, pad, pad],
    ]
    assert batch["attention_mask"].sum(dim=1).tolist() == [7, 5, 6, 5]


# --- the job, end to end -----------------------------------------------------------------------------------------


def separable_pairs(count: int, rng: random.Random) -> list[dict[str, str]]:
    """Chosen responses end in 7, rejected ones in 2: a preference a tiny model can learn in a few steps."""
    rows = []
    for _ in range(count):
        prompt = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6))) + "="
        body = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4)))
        rows.append({"prompt": prompt, "chosen": body + "7", "rejected": body + "2"})
    return rows


@pytest.mark.slow
def test_reward_model_job_learns_separable_preferences(ray_session, tiny_model, tmp_path):
    from jobs.reward_model import run_reward_model_training
    from relay.models import load_model, load_tokenizer
    from relay.preferences import pair_scores
    from tests.conftest import tiny_run_config

    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(400, random.Random(0)))
    config = tiny_run_config(
        tmp_path / "rm",
        f"reward_model_training.data={data}",
        "reward_model_training.eval_fraction=0.2",
        "reward_model_training.steps=40",
        "reward_model_training.batch_size=16",
        "reward_model_training.learning_rate=1e-3",
        "reward_model_training.dtype=float32",
        "reward_model_training.max_length=32",
        "reward_model_training.resources.cpus_per_rank=0.5",
    )
    started = time.monotonic()
    result = run_reward_model_training(config, str(tiny_model), tmp_path / "rm")
    print(f"reward model: {result} in {time.monotonic() - started:.1f}s")
    assert result["accuracy"] >= 0.85
    assert result["mean_margin"] > 0

    # Loaded as RewardScorer loads it: score read at the last non-pad token of a right-padded sequence.
    tokenizer = load_tokenizer(result["path"])
    model = load_model(result["path"], "reward", "float32", tokenizer.pad_token_id).eval()
    pairs = [PreferencePair("4821=", "1287", "1282"), PreferencePair("55=", "7", "2")]
    with torch.no_grad():
        chosen, rejected = pair_scores(model, collate_preferences(tokenizer, pairs, 32))
    assert (chosen > rejected).all(), (chosen, rejected)

    # The PPO reward actor's own class, on a rollout batch laid out as the driver lays it out (left-padded prompt,
    # right-padded response ending in EOS): the chosen answers score higher.
    from actors.reward import RewardScorer
    from relay.batch import RolloutBatch, pad_left, pad_right

    ppo_config = tiny_run_config(tmp_path / "ppo", "reward.type=model", f"reward.model={result['path']}",
                                 "reward.dtype=float32")
    scorer = RewardScorer(ppo_config, rank=0, world_size=1, model_path=result["path"])
    prompts = [tokenizer(pair.prompt).input_ids for pair in pairs for _ in range(2)]
    answers = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for pair in pairs for text in (pair.chosen, pair.rejected)]
    query_ids, query_mask = pad_left(prompts, tokenizer.pad_token_id)
    response_ids, response_mask = pad_right(answers, tokenizer.pad_token_id, torch.long)
    batch = RolloutBatch(query_ids, query_mask, response_ids, response_mask, torch.zeros(response_ids.shape),
                         [""] * 4, [""] * 4, [{}] * 4, policy_version=0)
    rewards = scorer.score(batch)
    assert rewards[0] > rewards[1] and rewards[2] > rewards[3], rewards
