"""Preference pairs for a Bradley–Terry reward model: loading, a simulated annotator, tokenising, and the math.

A pair is a prompt and two responses, `chosen` (preferred by the annotator) and `rejected`. Sources:
- jsonl (one JSON object per line), parquet, or a Hugging Face dataset name/path (through `datasets`), each row
  holding `prompt`, `chosen`, `rejected` as strings;
- chat format: `chosen` and `rejected` are lists of `{role, content}` messages (the whole conversation, the prompt
  optionally split off into `prompt` as a string or a message list), the same conversation up to a last, assistant
  message each. As a PPO prompt is, the conversation before that message becomes the prompt, rendered with the
  run's chat template and the generation prompt; the two last messages' contents are the responses.

The reward model scores a right-padded prompt + response + EOS (relay.data.tokenize_example: laid out as a PPO
sample) and reads its score at the last real token, exactly as `relay.models.sequence_scores` reads it during PPO:
at EOS for a finished answer, whatever the pad token is. The math at the bottom is pure tensors: no Ray, no
DeepSpeed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from relay.data import check_messages, check_text, read_rows, render_chat, tokenize_example
from relay.labels import LabelStore, is_label_store
from relay.models import last_token_scores
from relay.tasks import Task


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # as the policy is given it: a chat pair's conversation before the answers, rendered
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_preferences(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: str | None = None,
    split: str = "train",
) -> list[PreferencePair]:
    """Pairs from a .jsonl or .parquet file, a Hugging Face dataset (a saved dataset directory or a Hub name), or a
    label store of `relay label` (.sqlite: each label that prefers one answer).

    Raises ValueError naming the file and line (jsonl, 1-based) or row (parquet, dataset; 0-based) of the first
    malformed row. `tokenizer` (and `chat_template`, which overrides the tokenizer's own) is needed only for
    chat-format rows.
    """
    if is_label_store(source):  # people's labels from `relay label`
        if not Path(source).is_file():
            raise ValueError(f"{source}: no such label store")
        rows = [(f"{source} label {index}", row) for index, row in enumerate(LabelStore(source).preference_rows())]
    else:
        rows = list(read_rows(source, split))
    pairs = [parse_row(row, where, tokenizer, chat_template) for where, row in rows]
    if not pairs:
        raise ValueError(f"{source}: no preference pairs")
    return pairs


def parse_row(
    row: Any, where: str, tokenizer: PreTrainedTokenizerBase | None = None, chat_template: str | None = None
) -> PreferencePair:
    """One validated pair; `where` ("file:line" or "file row i") starts every error message."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        return _parse_chat_row(row, where, tokenizer, chat_template)
    if "prompt" not in row:
        raise ValueError(f"{where}: missing key 'prompt' (text rows need prompt, chosen and rejected)")
    if not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    for key in ("chosen", "rejected"):
        check_text(row[key], key, where)
    return PreferencePair(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])


def _parse_chat_row(
    row: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase | None, chat_template: str | None
) -> PreferencePair:
    chosen = check_messages(row["chosen"], "chosen", where)
    rejected = check_messages(row["rejected"], "rejected", where)
    prompt = row.get("prompt")
    if prompt is None or prompt == "":
        prefix: list[dict[str, str]] = []
    elif isinstance(prompt, str):
        prefix = [{"role": "user", "content": prompt}]
    else:
        prefix = check_messages(prompt, "prompt", where)
    # Datasets differ on whether chosen/rejected repeat the prompt; prepend it only where they do not.
    chosen = chosen if chosen[: len(prefix)] == prefix else prefix + chosen
    rejected = rejected if rejected[: len(prefix)] == prefix else prefix + rejected
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: {key!r} ends with a message from {messages[-1]['role']!r}, not 'assistant'; "
                             "a pair is two answers to one conversation")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' differ before their last message; a pair is two "
                         "answers to one conversation (the messages before them the same)")
    if len(chosen) < 2:
        raise ValueError(f"{where}: 'chosen' and 'rejected' hold only the answers; give the conversation before "
                         "them (in 'prompt', or as their first messages)")
    return PreferencePair(
        prompt=render_chat(chosen[:-1], tokenizer, chat_template, where, add_generation_prompt=True,
                           template_setting="reward_model_training.chat_template"),
        chosen=chosen[-1]["content"],
        rejected=rejected[-1]["content"],
    )


def split_pairs(
    pairs: list[PreferencePair], eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held out), with no prompt in both, so accuracy is measured on prompts the model never saw."""
    groups: dict[str, list[PreferencePair]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(pair.prompt or f"#{index}", []).append(pair)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    eval_groups = min(len(keys) - 1, max(1, round(len(keys) * eval_fraction)))
    if eval_groups < 1:
        raise ValueError(f"{len(pairs)} pairs share one prompt: nothing left to hold out")
    held_out = [pair for key in keys[:eval_groups] for pair in groups[key]]
    train = [pair for key in keys[eval_groups:] for pair in groups[key]]
    return train, held_out


# ---------------------------------------------------------------------------------------------------------------
# A simulated annotator for the demo


def simulated_preferences(task: Task, count: int, rng: random.Random) -> list[PreferencePair]:
    """`count` pairs judged by the task's reward: two candidates per prompt, the higher-rewarded one chosen.

    Candidates are the task's (imperfect) demonstrations, half of the time with one character corrupted; pairs
    the reward cannot tell apart (ties) are skipped, as an annotator would skip them.
    """
    pairs: list[PreferencePair] = []
    attempts = 0
    while len(pairs) < count:
        attempts += 1
        if attempts > 50:
            raise ValueError(f"task {task.name!r}: its reward ties almost every candidate pair; cannot make pairs")
        for example in task.make_examples(count, rng):
            first, second = (episode_text(task.demonstrate(example, rng)) for _ in range(2))
            if rng.random() < 0.5 or second == first:
                second = _corrupt(first, task.alphabet, rng)
            first_reward, second_reward = task.reward([example.prompt] * 2, [first, second], [example.metadata] * 2)
            if first_reward == second_reward:
                continue
            chosen, rejected = (first, second) if first_reward > second_reward else (second, first)
            pairs.append(PreferencePair(prompt=example.prompt, chosen=chosen, rejected=rejected))
            if len(pairs) == count:
                break
    return pairs


def _corrupt(text: str, alphabet: str, rng: random.Random) -> str:
    if not text:
        return rng.choice(alphabet)
    position = rng.randrange(len(text))
    replacement = rng.choice([char for char in alphabet if char != text[position]] or list(alphabet))
    return text[:position] + replacement + text[position + 1 :]


# ---------------------------------------------------------------------------------------------------------------
# Tokenising
#
# A preference batch is one right-padded tensor: the chosen sequences in rows [0, B), the rejected ones in
# rows [B, 2B), so one forward scores both. Padding is pad_token_id with attention_mask 0; the model reads each
# score at the last position the attention mask marks (relay.models.last_token_scores), as PPO does.


def tokenize_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> list[int]:
    """prompt + response + EOS ids as PPO's reward model sees a finished sample, cut to `max_length` as
    relay.data.tokenize_example cuts (the prompt first; a response cut short ends without EOS, as PPO's do)."""
    prompt_ids, response_ids = tokenize_example(tokenizer, prompt, response, max_length)
    return prompt_ids + response_ids


def collate_preferences(
    tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], max_length: int
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [2B, L]: chosen rows first, then rejected rows in the same order."""
    sequences = [tokenize_response(tokenizer, pair.prompt, pair.chosen, max_length) for pair in pairs]
    sequences += [tokenize_response(tokenizer, pair.prompt, pair.rejected, max_length) for pair in pairs]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B]) of a batch from collate_preferences."""
    scores = last_token_scores(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


# ---------------------------------------------------------------------------------------------------------------
# The math


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """−mean log σ(c − r) over pairs, scores [B] each → scalar; Bradley–Terry's P(chosen ≻ rejected) is σ(c − r)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs [B] the model orders as the annotator did (c > r strictly; a tie counts as wrong)."""
    return (chosen_scores > rejected_scores).float().mean().item()


def mean_margin(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Mean of c − r over pairs [B]."""
    return (chosen_scores - rejected_scores).float().mean().item()


def episode_text(demonstration: str | list[tuple[str, str]]) -> str:
    """A demonstration as the text a reward reads: a multi-turn episode's turns concatenated."""
    return demonstration if isinstance(demonstration, str) else "".join(text for _, text in demonstration)
