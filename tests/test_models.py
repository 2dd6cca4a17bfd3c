"""Model helpers that decide numbers: where a reward model reads its score, and dropout switched off."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, LlamaConfig

from relay.models import disable_dropout, last_token_scores

EOS = 2


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                       vocab_size=16, num_labels=1, **extra)


def test_reward_score_is_read_at_the_final_eos_when_the_pad_token_is_the_eos():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(pad_token_id=EOS)).eval()
    # Right-padded with the pad (= EOS) token; each row ends with a real EOS at its last attended position.
    input_ids = torch.tensor([[1, 5, 6, 7, EOS, EOS, EOS], [1, 5, 8, 9, 10, 11, EOS]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        scores = last_token_scores(model, input_ids, attention_mask)
        per_token = model.score(model.model(input_ids, attention_mask=attention_mask).last_hidden_state)[..., 0]
        transformers_pooled = model(input_ids, attention_mask=attention_mask).logits[:, 0]
    assert torch.allclose(scores, per_token[[0, 1], [4, 6]])  # at the EOS: positions 4 and 6
    # transformers would read the token before the EOS (3 and 5), a different score.
    assert torch.allclose(transformers_pooled, per_token[[0, 1], [3, 5]])
    assert not torch.allclose(scores, transformers_pooled)


def test_disable_dropout_makes_train_mode_deterministic():
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(tiny_config(classifier_dropout=0.5, attention_dropout=0.5))
    model.train()
    input_ids = torch.tensor([[1, 5, 6, 7]])
    assert not torch.equal(model(input_ids).logits, model(input_ids).logits)  # dropout draws differ
    disable_dropout(model)
    assert torch.equal(model(input_ids).logits, model(input_ids).logits)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0
