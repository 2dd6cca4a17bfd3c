"""Model helpers that decide numbers: where a reward model reads its score, and dropout switched off."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, LlamaConfig

from relay.models import disable_dropout, last_token_scores

EOS = 2


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(**dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                              vocab_size=16, num_labels=1) | extra)


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


def test_weight_buckets_keep_each_decoder_block_whole_and_hold_the_state_once():
    from transformers import AutoModelForCausalLM

    from relay.zero import sync_unit, weight_buckets

    assert sync_unit("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert sync_unit("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight") == (
        "base_model.model.model.layers.0")
    assert sync_unit("base_model.model.lm_head.lora_B.default.weight") == "base_model.model.lm_head"
    assert sync_unit("base_model.model.score.modules_to_save.default.weight") == "base_model.model.score"
    assert sync_unit("model.embed_tokens.weight") == "model.embed_tokens"

    model = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=4, tie_word_embeddings=False))
    block_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    for bucket_bytes in (1, block_bytes, 2 * block_bytes + 1, 2**40):
        buckets = list(weight_buckets(model, zero_stage=2, rank=0, bucket_bytes=bucket_bytes))
        blocks = [{sync_unit(name) for name in bucket} for bucket in buckets]
        # A block lies in exactly one bucket; a bucket passes the size only when it is a single unit.
        for unit in {sync_unit(name) for name, _ in model.named_parameters()}:
            assert sum(unit in names for names in blocks) == 1
        assert all(len(names) == 1 or sum(t.numel() * 4 for t in bucket.values()) <= bucket_bytes
                   for names, bucket in zip(blocks, buckets))
        state = {name: tensor for bucket in buckets for name, tensor in bucket.items()}
        assert sum(map(len, buckets)) == len(state) == len(model.state_dict())
        assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    # Greedy: [embeddings, block 0], [block 1, block 2], [block 3, final norm, head].
    assert len(list(weight_buckets(model, zero_stage=2, rank=0, bucket_bytes=2 * block_bytes + 1))) == 3
    assert list(weight_buckets(model, zero_stage=2, rank=1, bucket_bytes=1)) == []  # only rank 0 holds weights
