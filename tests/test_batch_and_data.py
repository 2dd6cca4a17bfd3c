import random

import pytest
import torch

from relay.batch import RolloutBatch, concat_batches, pad_left, pad_right, request_seeds
from relay.data import IGNORE_INDEX, collate_sft, tokenize_sft_example
from relay.models import build_tokenizer
from relay.tasks import get_task, split_examples


def make_batch() -> RolloutBatch:
    query_ids, query_mask = pad_left([[1, 5], [1, 6, 7]], pad_id=0)
    response_ids, response_mask = pad_right([[8, 2], [9]], pad_value=0, dtype=torch.long)
    sampler_logprobs, _ = pad_right([[-0.1, -0.2], [-0.3]], pad_value=0.0, dtype=torch.float32)
    return RolloutBatch(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                        response_mask=response_mask, sampler_logprobs=sampler_logprobs,
                        prompts=["a", "b"], responses=["x", "y"], metadata=[{"i": 0}, {"i": 1}], policy_version=3)


def test_padding_layout_and_positions():
    batch = make_batch()
    # Prompts end at the same column (left padding); responses start right after it.
    assert batch.query_ids.tolist() == [[0, 1, 5], [1, 6, 7]]
    assert batch.response_ids.tolist() == [[8, 2], [9, 0]]
    assert batch.input_ids.tolist() == [[0, 1, 5, 8, 2], [1, 6, 7, 9, 0]]
    # Positions count real tokens only: row 0 starts at its first real token.
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]
    assert batch.response_mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_shards_concatenate_back_to_the_batch():
    batch = make_batch()
    shards = [batch.shard(rank, 2) for rank in range(2)]
    assert [shard.metadata for shard in shards] == [[{"i": 0}], [{"i": 1}]]
    assert torch.equal(torch.cat([shard.response_ids for shard in shards]), batch.response_ids)
    assert shards[1].policy_version == 3
    picked = batch.select(torch.tensor([1, 0]))
    assert picked.prompts == ["b", "a"] and picked.response_ids[0, 0].item() == 9
    # Over more ranks than rows: the first ranks take one row each, the last none; nothing lost or doubled.
    uneven = [batch.shard(rank, 3) for rank in range(3)]
    assert [len(shard) for shard in uneven] == [1, 1, 0]
    assert sum((shard.prompts for shard in uneven), []) == ["a", "b"]
    # Padded for scoring: every rank the largest shard's length (the same forwards), filled with the first row.
    padded = [batch.padded_shard(rank, 3) for rank in range(3)]
    assert [(shard.prompts, real) for shard, real in padded] == [(["a"], 1), (["b"], 1), (["a"], 0)]
    assert torch.equal(padded[2][0].response_ids, batch.response_ids[:1])


def test_request_seeds_depend_on_run_seed_iteration_and_prompt_index_only():
    seeds = request_seeds(0, 1, 64)
    assert seeds == request_seeds(0, 1, 64) and seeds[:10] == request_seeds(0, 1, 10)  # not on the batch size
    assert len(set(seeds + request_seeds(0, 2, 64) + request_seeds(1, 1, 64))) == 3 * 64  # no two alike
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_sft_loss_only_on_response_tokens():
    tokenizer = build_tokenizer("0123456789=")
    input_ids, labels = tokenize_sft_example(tokenizer, "123=", "321")
    prompt_ids = tokenizer("123=").input_ids  # <s> 1 2 3 =
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == tokenizer("321", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    batch = collate_sft([(input_ids, labels), ([1, 4], [IGNORE_INDEX, 4])], tokenizer.pad_token_id)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(input_ids) - 2)
    assert (batch["labels"][1, 2:] == IGNORE_INDEX).all()


def test_reverse_task_reward_and_held_out_split():
    task = get_task("reverse")
    metadata = [{"answer": "543"}] * 4
    # exact: 1; first two digits right of three: 0.5 * 2/3; first digit wrong: 0; longer than the answer: prefix only
    assert task.reward(["345="] * 4, ["543", "541", "345", "5439"], metadata) == [1.0, 0.5 * 2 / 3, 0.0, 0.5]
    train, held_out = split_examples(task, 500, 50, seed=0)
    assert len(held_out) == 50
    assert not {example.prompt for example in train} & {example.prompt for example in held_out}
    demonstrations = {task.demonstrate(held_out[0], random.Random(seed)) for seed in range(50)}
    assert demonstrations == {held_out[0].metadata["answer"], held_out[0].prompt[:-1]} - {""}


def test_unknown_task_and_bad_reward_function():
    import pytest

    from relay.tasks import load_object

    with pytest.raises(ValueError, match="neither a built-in task"):
        get_task("sorting")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_object("relay.tasks.reverse:nope", "reward.function")
    with pytest.raises(ValueError, match="cannot import module"):
        get_task("no_such_module:TASK")


def test_request_seeds_of_a_later_sampling_round_differ_and_round_zero_is_unchanged():
    assert request_seeds(0, 1, 4, round_index=0) == request_seeds(0, 1, 4)
    assert not set(request_seeds(0, 1, 4, round_index=1)) & set(request_seeds(0, 1, 4))


def test_concat_batches_pads_anew_and_keeps_row_order():
    wide_query, wide_mask = pad_left([[1, 5, 6, 7]], pad_id=0)
    long_response, long_mask = pad_right([[8, 8, 8]], pad_value=0, dtype=torch.long)
    other = RolloutBatch(query_ids=wide_query, query_mask=wide_mask, response_ids=long_response,
                         response_mask=long_mask, sampler_logprobs=torch.full((1, 3), -0.5), prompts=["c"],
                         responses=["z"], metadata=[{"i": 2}], policy_version=3)
    joined = concat_batches([make_batch(), other], pad_id=0)
    assert joined.prompts == ["a", "b", "c"] and [row["i"] for row in joined.metadata] == [0, 1, 2]
    # Prompts stay right-aligned (left padding), responses left-aligned (right padding).
    assert joined.query_ids.tolist() == [[0, 0, 1, 5], [0, 1, 6, 7], [1, 5, 6, 7]]
    assert joined.response_ids.tolist() == [[8, 2, 0], [9, 0, 0], [8, 8, 8]]
    assert joined.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert joined.sampler_logprobs[0].tolist() == pytest.approx([-0.1, -0.2, 0.0])
