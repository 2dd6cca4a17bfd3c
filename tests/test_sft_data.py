"""Supervised data for the warm start: loading prompt/response and chat rows, masking, and a run on user data."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from relay.data import IGNORE_INDEX, collate_sft, load_sft_examples, tokenize_sft_example
from relay.models import build_tokenizer

ALPHABET = "0123456789=abcdefghijklmnopqrstuvwxyz <>|"
# Each turn is "<" + first letter of the role + ">" + content + "|"; the generation prompt is "<a>".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'][0] }}>{{ message['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def tokenizer():
    return build_tokenizer(ALPHABET)


def test_prompt_response_jsonl_and_parquet_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "12=", "response": "21"}, {"prompt": "", "response": "abc", "source": "extra keys are fine"}]
    assert load_sft_examples(write_jsonl(tmp_path / "data.jsonl", rows)) == [("12=", "21"), ("", "abc")]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data.parquet")
    assert load_sft_examples(tmp_path / "data.parquet") == [("12=", "21")]


def test_chat_messages_render_with_the_template(tmp_path, tokenizer):
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "12="},
        {"role": "assistant", "content": "21"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    [(prompt, response)] = load_sft_examples(path, tokenizer, CHAT_TEMPLATE)
    # The prompt is every message before the last assistant one, then the generation prompt; the response is
    # the last assistant message alone.
    assert prompt == "<s><u>hi|<a>yo|<u>12=|<a>"
    assert response == "21"


def test_chat_without_a_template_names_the_setting(tmp_path, tokenizer):
    assert not tokenizer.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match=rf"{path}:1: .*no chat template.*warm_start.chat_template"):
        load_sft_examples(path, tokenizer)


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"prompt": "12="}, "missing key 'response'"),
        ({"prompt": 12, "response": "21"}, "'prompt' must be a string, got int"),
        ({"prompt": "12=", "response": "  "}, "'response' is empty"),
        (["12=", "21"], "expected an object with prompt/response or messages, got list"),
        ({"messages": "hi"}, "'messages' must be a list of {role, content} messages, got str"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be a {role, content} message"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the last message is from 'user', not 'assistant'"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "'messages' holds only the assistant's reply"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, tokenizer, row, error):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1=", "response": "1"}, row])
    with pytest.raises(ValueError, match=rf"{path}:2: {error}"):
        load_sft_examples(path, tokenizer, CHAT_TEMPLATE)


def test_malformed_json_and_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1=", "response": "1"}\n\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        load_sft_examples(path)
    rows = [{"prompt": "1=", "response": "1"}, {"prompt": "2=", "response": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'data.parquet'} row 1: 'response' is empty"):
        load_sft_examples(tmp_path / "data.parquet")


def test_chat_example_trains_on_the_response_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "12="},
                                                               {"role": "assistant", "content": "21"}]}])
    [(prompt, response)] = load_sft_examples(path, tokenizer, CHAT_TEMPLATE)
    input_ids, labels = tokenize_sft_example(tokenizer, prompt, response)
    # "<s>" (one BOS: the template's, not a second from the tokenizer) + "<u>12=|<a>" (10 characters) = 11 prompt
    # tokens; then "2", "1", EOS.
    assert tokenizer.decode(input_ids) == "<s><u>12=|<a>21</s>"
    assert input_ids.count(tokenizer.bos_token_id) == 1
    assert labels[:11] == [IGNORE_INDEX] * 11
    assert labels[11:] == input_ids[11:] == tokenizer("21", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    # Truncation cuts the prompt first: in 12 tokens, the prompt's last 9 and the whole response with its EOS.
    truncated_ids, truncated_labels = tokenize_sft_example(tokenizer, prompt, response, max_length=12)
    assert truncated_ids == input_ids[2:] and truncated_labels == labels[2:]
    # In 3, the prompt's last token and the response's first two: no EOS, which the text did not reach.
    truncated_ids, truncated_labels = tokenize_sft_example(tokenizer, prompt, response, max_length=3)
    assert truncated_ids == input_ids[10:13] and truncated_labels == [IGNORE_INDEX, *input_ids[11:13]]


def reversal_pairs(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": digits + "=", "response": digits[::-1]})
    return rows


def mean_loss(model, tokenizer, rows: list[dict[str, str]]) -> float:
    batch = collate_sft([tokenize_sft_example(tokenizer, row["prompt"], row["response"]) for row in rows],
                        tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.slow
def test_warm_start_on_user_data_lowers_its_loss(ray_session, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from jobs.sft import run_warm_start
    from relay.models import load_tokenizer
    from tests.conftest import tiny_run_config

    rows = reversal_pairs(64, seed=0)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    # tiny_run_config sets warm_start=null; these overrides come after it and build the section again. Two ranks
    # so each trains on its own half of every batch.
    config = tiny_run_config(
        tmp_path, "warm_start.steps=30", f"warm_start.data={data}", "warm_start.batch_size=16",
        "warm_start.resources.cpu_ranks_per_node=2", "warm_start.resources.cpus_per_rank=0.5",
    )
    assert config.warm_start is not None and config.warm_start.data == str(data)
    started = time.monotonic()
    saved = run_warm_start(config, str(tiny_model), tmp_path)
    print(f"warm start on {len(rows)} pairs: {time.monotonic() - started:.1f} s")

    tokenizer = load_tokenizer(saved)
    base_loss = mean_loss(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), tokenizer, rows)
    tuned_loss = mean_loss(AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32), tokenizer, rows)
    print(f"response-token loss: base {base_loss:.3f}, warm-started {tuned_loss:.3f}")
    # A random-init model starts near ln(vocab); 30 steps on 64 pairs must take a clear bite out of that.
    assert tuned_loss < base_loss - 0.5
