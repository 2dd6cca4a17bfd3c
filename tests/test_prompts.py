"""Prompt datasets for PPO (relay/prompts.py): every format, chat rows, metadata, long prompts, bad rows, the
held-out split, and the built-in task as a dataset of the same kind. No Ray: this is what runs before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relay.config import ConfigError, load_config
from relay.models import build_tokenizer
from relay.prompts import data_alphabet, export_task, load_prompt_data
from relay.tasks import get_task
from tests.conftest import DEMO_CONFIG

ALPHABET = "0123456789=+?abcdefghijklmnopqrstuvwxyz <>|#"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'][0] }}>{{ message['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)
ROWS = [
    {"prompt": "1+2=", "answer": "3", "source": "hand"},
    {"prompt": "2+2=", "answer": "4", "source": "hand"},
    {"prompt": "3+4=", "answer": "7", "source": "book"},
    {"prompt": "5+5=", "answer": "10", "source": "book"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def dataset_config(prompts: Path | str, *overrides: str):
    return load_config(DEMO_CONFIG, [f"data.prompts={prompts}", "reward.type=rules",
                                     "reward.rules=[{check: exact_match, column: answer}]", "warm_start=null",
                                     "data.eval_prompts=2", *overrides])


@pytest.fixture
def tokenizer():
    return build_tokenizer(ALPHABET)


def test_jsonl_rows_keep_every_other_column_as_metadata(tmp_path, tokenizer):
    data = load_prompt_data(dataset_config(write_jsonl(tmp_path / "p.jsonl", ROWS)), tokenizer)
    prompts = [data.train.get(i) for i in range(len(data.train))] + data.eval
    # Two of four are held out (data.eval_prompts=2), the rest train; together they are the file.
    assert len(data.train) == 2 and len(data.eval) == 2
    assert sorted((p.text, p.metadata["answer"], p.metadata["source"]) for p in prompts) == sorted(
        (row["prompt"], row["answer"], row["source"]) for row in ROWS)
    assert all(p.ids == tokenizer(p.text).input_ids for p in prompts)
    assert {p.text for p in data.eval}.isdisjoint(data.train.get(i).text for i in range(len(data.train)))


def test_parquet_a_directory_and_an_eval_file(tmp_path, tokenizer):
    directory = tmp_path / "shards"
    directory.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), directory / "a.parquet")
    write_jsonl(directory / "b.jsonl", ROWS[2:3])
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), tmp_path / "eval.parquet")
    data = load_prompt_data(dataset_config(directory, f"data.eval_data={tmp_path / 'eval.parquet'}"), tokenizer)
    assert [data.train.get(i).text for i in range(len(data.train))] == ["1+2=", "2+2=", "3+4="]
    assert [p.text for p in data.eval] == ["5+5="]
    assert data.source == str(directory)


def test_saved_hugging_face_dataset_with_an_eval_split(tmp_path, tokenizer):
    import datasets

    saved = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS[3:])}).save_to_disk(str(saved))
    data = load_prompt_data(dataset_config(saved, "data.eval_data=test"), tokenizer)
    assert [data.train.get(i).metadata["answer"] for i in range(len(data.train))] == ["3", "4", "7"]
    assert [p.text for p in data.eval] == ["5+5="]


def test_chat_rows_render_with_the_generation_prompt(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "add"}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "1+2="}], "answer": "3"},
            {"prompt": "2+2=", "answer": "4"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = dataset_config(path, "data.apply_chat_template=true", f"data.chat_template={json.dumps(CHAT_TEMPLATE)}",
                            "data.eval_prompts=1")
    data = load_prompt_data(config, tokenizer)
    texts = sorted(p.text for p in [data.train.get(0), *data.eval])
    # Messages through the template; a plain prompt as one user message (apply_chat_template); one BOS only.
    assert texts == ["<s><u>2+2=|<a>", "<s><u>add|<a>ok|<u>1+2=|<a>"]
    assert all(p.ids.count(tokenizer.bos_token_id) == 1 for p in [data.train.get(0), *data.eval])
    assert all("messages" not in p.metadata and p.metadata["answer"] for p in [data.train.get(0), *data.eval])


def test_chat_rows_without_a_template_name_the_setting(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+2="}]}] * 3)
    with pytest.raises(ValueError, match=rf"{path}:1: .*no chat template.*data.chat_template"):
        load_prompt_data(dataset_config(path, "data.eval_prompts=1"), tokenizer)


@pytest.mark.parametrize("line, problem", [
    ('{"answer": "3"}', "missing key 'prompt'"),
    ('{"prompt": 12}', "'prompt' must be a string, got int"),
    ('{"prompt": "  "}', "'prompt' is empty"),
    ('["1+2="]', "expected an object"),
    ('{"prompt": "1+2=",', "not valid JSON"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, tokenizer, line, problem):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: .*{problem}"):
        load_prompt_data(dataset_config(path, "data.eval_prompts=1"), tokenizer)


def test_long_prompts_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    rows = [*ROWS, {"prompt": "1234567890" * 3 + "=", "answer": "0"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # max_model_len 40 - max_new_tokens 10 = 30 tokens for a prompt; the long one is BOS + 31 characters = 32.
    limits = ["rollout.max_model_len=40", "rollout.max_new_tokens=10", "data.eval_prompts=1"]
    dropped = load_prompt_data(dataset_config(path, *limits), tokenizer)
    everything = [dropped.train.get(i) for i in range(len(dropped.train))] + dropped.eval
    assert (dropped.counts.dropped, dropped.counts.truncated) == (1, 0)
    assert len(everything) == 4 and all(len(p.ids) <= 30 for p in everything)

    truncated = load_prompt_data(dataset_config(path, *limits, "data.long_prompts=truncate"), tokenizer)
    everything = [truncated.train.get(i) for i in range(len(truncated.train))] + truncated.eval
    [cut] = [p for p in everything if p.metadata["answer"] == "0"]
    assert (truncated.counts.dropped, truncated.counts.truncated) == (0, 1)
    assert cut.ids == tokenizer(cut.text).input_ids[-30:]  # the last 30 tokens: the end the response follows


def test_a_bad_row_of_a_hub_scale_dataset_fails_up_front_when_sampled_and_is_skipped_when_drawn(tmp_path, tokenizer):
    import datasets

    saved = tmp_path / "hf"
    rows = [dict(row, prompt=row["prompt"]) for row in ROWS] * 5
    rows[7] = {"prompt": "", "answer": "x", "source": "broken"}
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    with pytest.raises(ValueError, match=rf"dataset {saved} \(train\) row 7: 'prompt' is empty"):
        load_prompt_data(dataset_config(saved, "data.eval_prompts=1"), tokenizer)
    # Checked on a sample of 1 row only: the bad one passes the check, and is skipped and counted when drawn.
    data = load_prompt_data(dataset_config(saved, "data.eval_prompts=1", "data.check_rows=1"), tokenizer)
    drawn = [data.train.get(i) for i in range(len(data.train))]
    assert drawn.count(None) == 1 and data.counts.bad_rows == 1


def test_the_task_and_its_exported_parquet_give_the_same_prompts(tmp_path, tokenizer):
    task_config = load_config(DEMO_CONFIG, ["data.train_prompts=300", "data.eval_prompts=20"])
    paths = export_task(get_task("reverse"), task_config.data, tmp_path)
    file_config = load_config(DEMO_CONFIG, [
        "data.train_prompts=300", "data.eval_prompts=20", f"data.prompts={paths['train.parquet']}",
        f"data.eval_data={paths['eval.parquet']}", "reward.function=relay.tasks.reverse:reward",
        f"warm_start.data={paths['demonstrations.jsonl']}",
    ])
    # One path, not two: the same alphabet (so the same tiny tokenizer and model), prompts, ids and metadata.
    assert data_alphabet(file_config) == "".join(sorted(data_alphabet(task_config)))
    from_task, from_file = load_prompt_data(task_config, tokenizer), load_prompt_data(file_config, tokenizer)
    assert len(from_task.train) == len(from_file.train) > 250
    assert [from_task.train.get(i) for i in range(len(from_task.train))] == [
        from_file.train.get(i) for i in range(len(from_file.train))]
    assert from_task.eval == from_file.eval
    with pytest.raises(ValueError, match="not overwriting"):
        export_task(get_task("reverse"), task_config.data, tmp_path)


def test_the_tiny_models_alphabet_is_every_character_of_the_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab=", "answer": "c", "tags": ["é"]}, {"prompt": "d?"}])
    assert data_alphabet(dataset_config(path)) == "".join(sorted("ab=cé" + "d?"))


@pytest.mark.parametrize("overrides, message", [
    (["data.prompts=x.jsonl", "warm_start=null"], "data.prompts is set, so there is no task reward"),
    (["data.prompts=x.jsonl", "reward.function=m:f"], "set warm_start.data"),
    (["reward.type=rules"], "reward.rules is empty"),
    (["reward.type=rules", "reward.rules=[{check: math_answer}]"], "needs the column"),
    (["reward.type=rules", "reward.rules=[{check: regex, pattern: '('}]"], "not a valid regular expression"),
    (["rollout.max_new_tokens=64", "rollout.max_model_len=64"], "leaves no room for a prompt"),
])
def test_config_errors_for_prompt_data(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO_CONFIG, overrides)


def test_an_eval_split_of_local_files_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match="data.eval_data 'test' is no file or directory"):
        load_prompt_data(dataset_config(path, "data.eval_data=test"), tokenizer)


CONFIGS = DEMO_CONFIG.parent


def chat_tokenizer():
    tokenizer = build_tokenizer(ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ.,'")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_the_gsm8k_config_reads_gsm8ks_columns_and_scores_with_the_math_checker(tmp_path):
    import datasets

    from relay.rewards import build_reward_source

    # GSM8K's columns, saved to disk: nothing can be downloaded here.
    rows = [{"question": f"Tom has {n} apples and buys {n} more. How many now?",
             "answer": f"He has {n} + {n} = <<{n}+{n}={2 * n}>>{2 * n} apples.\n#### {2 * n}"} for n in range(1, 9)]
    saved = tmp_path / "gsm8k"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:6]),
                          "test": datasets.Dataset.from_list(rows[6:])}).save_to_disk(str(saved))
    config = load_config(CONFIGS / "qwen2.5-1.5b-1node.yaml", [f"data.prompts={saved}"])
    data = load_prompt_data(config, chat_tokenizer())
    assert len(data.train) == 6 and len(data.eval) == 2  # GSM8K's test split is the held-out set
    first = data.train.get(0)
    assert first.text == "<s><u>Tom has 1 apples and buys 1 more. How many now?|<a>"  # a chat, ready to answer
    reward = build_reward_source(config.reward, None)
    assert reward.score([first.text] * 3, ["1 + 1 = 2, so #### 2", "The answer is 2.", "3"],
                        [first.metadata] * 3) == [1.0, 1.0, 0.0]


def test_the_ultrafeedback_config_takes_the_prompt_column_not_the_whole_conversation(tmp_path):
    import datasets

    def row(n):
        conversation = [{"role": "user", "content": f"tell me {n}"}, {"role": "assistant", "content": "no"}]
        return {"prompt": f"tell me {n}", "prompt_id": str(n), "chosen": conversation, "rejected": conversation,
                "messages": conversation, "score_chosen": 8.0, "score_rejected": 2.0}

    saved = tmp_path / "ultrafeedback"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([row(n) for n in range(5)]),
                          "test_prefs": datasets.Dataset.from_list([row(9)])}).save_to_disk(str(saved))
    config = load_config(CONFIGS / "llama3-8b-multinode.yaml", [f"data.prompts={saved}"])
    data = load_prompt_data(config, chat_tokenizer())
    assert [prompt.text for prompt in data.eval] == ["<s><u>tell me 9|<a>"]
    assert data.eval[0].metadata["messages"][1]["content"] == "no"  # kept as metadata, not rendered as the prompt


def test_the_local_jsonl_config_loads_its_shipped_data():
    config = load_config(CONFIGS / "sums-jsonl.yaml")
    data = load_prompt_data(config, build_tokenizer(data_alphabet(config)))
    assert (len(data.train), len(data.eval)) == (2000, 128)
    assert data.counts == type(data.counts)()  # nothing dropped, truncated or bad
    assert set(data.eval[0].metadata) == {"answer", "source"}
