"""Training data: reading rows from files, rendering chat, and supervised (prompt, response) examples.

Sources are jsonl (one JSON object per line), parquet, or a Hugging Face dataset (a saved directory or a Hub
name). Every row is reported by where it came from, "file:line" (jsonl, 1-based) or "file row i" (parquet,
dataset; 0-based), and every error about a row starts with it.

A supervised row is either `{"prompt": str, "response": str}` or `{"messages": [{role, content}, ...]}` ending in
an assistant message: the prompt is the conversation before that message rendered with the chat template and the
generation prompt, the response is its content. The loss is on response tokens only.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # transformers' causal-LM loss skips labels equal to this


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


def read_rows(source: str | Path, split: str = "train", subset: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a .jsonl/.json or .parquet file, a directory of such files (in name order), or
    a Hugging Face dataset (saved with `save_to_disk`, or a Hub name with an optional `subset`)."""
    path = Path(source)
    if path.is_file():
        return _file_rows(path)
    if path.is_dir() and not is_saved_dataset(path):
        return _directory_rows(path)
    return (item for item in enumerate_dataset(open_dataset(str(source), split, subset), str(source), split))


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl or .parquet")


def _directory_rows(path: Path) -> Iterator[tuple[str, Any]]:
    files = sorted(item for item in path.iterdir() if item.suffix in (".jsonl", ".json", ".parquet"))
    if not files:
        raise ValueError(f"{path}: a directory with no .jsonl or .parquet files and no saved Hugging Face dataset")
    for file in files:
        yield from _file_rows(file)


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def open_dataset(name: str, split: str, subset: str | None = None) -> Any:
    """A Hugging Face `datasets.Dataset`: memory-mapped Arrow on disk, so its rows are read as they are indexed
    and a Hub-scale dataset is never held whole in memory."""
    import datasets

    if is_saved_dataset(Path(name)):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{name}: no split {split!r} (it has {', '.join(dataset)})")
            dataset = dataset[split]
        return dataset
    try:
        return datasets.load_dataset(name, subset, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        # datasets says "doesn't exist on the Hub or cannot be accessed" (no such name, or no network), or names
        # an unknown split or subset.
        raise ValueError(f"{name}: not a data file, a directory or a Hugging Face dataset it can load ({error})") from None


def dataset_row_where(name: str, split: str, index: int) -> str:
    return f"dataset {name} ({split}) row {index}"


def enumerate_dataset(dataset: Any, name: str, split: str) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(dataset):
        yield dataset_row_where(name, split, index), row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {index}", row


def check_text(value: Any, key: str, where: str) -> str:
    """`value` if it is a non-blank string, else a ValueError naming `where` and `key`."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {key!r} is empty")
    return value


def check_messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    """`value` as a non-empty list of {role, content} string messages (extra fields dropped), else a ValueError."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} must be a list of {{role, content}} messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: {key!r} is empty")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise ValueError(f"{where}: {key}[{index}] must be a {{role, content}} message")
        for field in ("role", "content"):
            if not isinstance(message[field], str):
                raise ValueError(f"{where}: {key}[{index}].{field} must be a string")
    if not value[-1]["content"].strip():
        raise ValueError(f"{where}: {key!r} ends with an empty message")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def render_chat(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase | None,
    chat_template: str | None = None,
    where: str = "chat messages",
    add_generation_prompt: bool = False,
    template_setting: str = "chat_template",
) -> str:
    """The conversation as text, through `chat_template` if given, else the tokenizer's own template.

    `template_setting` is the config field a user sets when the tokenizer has no template; the error names it.
    """
    if tokenizer is None:
        raise ValueError(f"{where}: chat-format rows need a tokenizer to render them")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: chat-format rows, but the tokenizer has no chat template; "
            f"set {template_setting} to a Jinja template string"
        )
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


# ---------------------------------------------------------------------------------------------------------------
# Supervised examples


def load_sft_examples(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[tuple[str, str | list[tuple[str, str]]]]:
    """(prompt, response) pairs from prompt/response or chat `messages` rows (the first `limit` of them); see the
    module docstring.

    Raises ValueError naming the file and line (or row) of the first malformed row. `tokenizer` (and
    `chat_template`, which overrides the tokenizer's own) is needed only for chat rows.
    """
    examples = [parse_sft_row(row, where, tokenizer, chat_template)
                for where, row in itertools.islice(read_rows(source, split), limit)]
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples


def parse_sft_row(
    row: Any, where: str, tokenizer: PreTrainedTokenizerBase | None = None, chat_template: str | None = None
) -> tuple[str, str | list[tuple[str, str]]]:
    """One validated (prompt, response); `where` ("file:line" or "file row i") starts every error message. A chat
    row trains on its last assistant message, the messages before it its prompt; one with `tool` messages after its
    first assistant message is a multi-turn episode instead: its response is the turns from that message on, as
    (role, text), of which the assistant's are trained."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with prompt/response or messages, got {type(row).__name__}")
    if "messages" in row:
        messages = check_messages(row["messages"], "messages", where)
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"{where}: the last message is from {messages[-1]['role']!r}, not 'assistant'; "
                "a chat example trains on its last assistant message"
            )
        if len(messages) < 2:
            raise ValueError(f"{where}: 'messages' holds only the assistant's reply; it needs a message before it")
        roles = [message["role"] for message in messages]
        first = roles.index("assistant")
        if first == 0 or "tool" not in roles[first:]:  # a conversation: its history is the prompt
            first = len(messages) - 1
        prompt = render_chat(
            messages[:first], tokenizer, chat_template, where, add_generation_prompt=True,
            template_setting="warm_start.chat_template",
        )
        if first == len(messages) - 1:
            return prompt, messages[-1]["content"]
        return prompt, [(message["role"], message["content"]) for message in messages[first:]]
    for key in ("prompt", "response"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r} (rows need prompt and response, or messages)")
    if not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    return row["prompt"], check_text(row["response"], "response", where)


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids as the policy sees them at generation time (the tokenizer's special tokens included)."""
    ids = tokenizer(prompt).input_ids
    # A rendered chat prompt often starts with the template's own BOS; the tokenizer would add a second one.
    bos = tokenizer.bos_token_id
    if bos is not None and prompt.startswith(tokenizer.bos_token) and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of prompt + response + EOS, laid out as a PPO sample: the prompt as the policy is
    given it (tokenize_prompt), then the response's tokens (no special tokens added: a rendered chat prompt already
    ends in the template's generation prompt), then EOS, where the policy stops. The one tokenisation of a
    (prompt, response) for the warm start, reward-model pairs and evaluation, so the three see what PPO sees.

    Truncation to `max_length` tokens cuts what a PPO sample would lack, never inventing what it would not have:
    the prompt gives way first, losing its first tokens (as `data.long_prompts: truncate` cuts a prompt) but
    keeping at least its last one; if the response and its EOS still do not fit, the response keeps its first
    tokens and has no EOS, an unfinished answer, as a sample cut at rollout.max_new_tokens ends. So the warm start
    never learns to stop where the text did not, and a reward model's score, read at the last real token, is read
    at EOS exactly when PPO's is.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so a response cannot end; give it one (eos_token)")
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if max_length is None or len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    kept_prompt = max(min(1, len(prompt_ids)), max_length - len(response_ids))
    return prompt_ids[len(prompt_ids) - kept_prompt :], response_ids[: max_length - kept_prompt]


def tokenize_sft_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + response + EOS (tokenize_example, which also says how a sequence longer
    than `max_length` is cut); labels are IGNORE_INDEX on every prompt token."""
    prompt_ids, response_ids = tokenize_example(tokenizer, prompt, response, max_length)
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into input_ids, attention_mask and labels [B, L]."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
