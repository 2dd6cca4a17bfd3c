"""Tokenising training data: supervised (prompt, response) pairs with the loss on response tokens only."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # transformers' causal-LM loss skips labels equal to this


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids as the policy sees them at generation time (the tokenizer's special tokens included)."""
    return tokenizer(prompt).input_ids


def tokenize_sft_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + response + EOS; labels are IGNORE_INDEX on every prompt token."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
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
