"""Tier 2: each role through real Ray actors, vLLM and DeepSpeed on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.group import ActorGroup
from actors.learner import Learner
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.rollout import RolloutFleet
from jobs.ppo import eval_scorer
from jobs.roles import gather_policy_weights
from jobs.rollout_source import RolloutSource
from relay import ppo
from relay.batch import request_seeds
from relay.config import LoraSection
from relay.data import tokenize_prompt
from relay.models import load_tokenizer
from relay.prompts import load_prompt_data
from relay.placement import role_placement
from tests.conftest import tiny_run_config
from tests.live_ray import wait_for

pytestmark = pytest.mark.slow

BUCKET_MB = 0.25


@pytest.fixture(scope="module")
def setup(ray_session, tiny_model, tmp_path_factory):
    config = tiny_run_config(
        tmp_path_factory.mktemp("run"),
        "rollout.num_workers=2",
        "policy.resources.cpu_ranks_per_node=2",
        "policy.zero_stage=3",
        "policy.zero3_persistence_threshold=0",
        "policy.learning_rate=0.01",
        f"rollout.sync_bucket_mb={BUCKET_MB}",  # less than a decoder block: the sync sends a bucket per block
    )
    fleet = RolloutFleet(config, str(tiny_model))
    policy = ActorGroup(Learner, "policy-learner", role_placement(config, "policy"), namespace=config.actor_namespace,
                        role="policy", config=config, model_path=str(tiny_model))
    wait_for(lambda: fleet.join_ready() + len(fleet.active) == 2, 300, "both rollout engines to join")
    yield config, fleet, policy
    fleet.shutdown()
    policy.shutdown()


def make_batch(config, fleet, tiny_model):
    """A real rollout batch, built the way the driver's rollout source builds it."""
    tokenizer = load_tokenizer(str(tiny_model))
    source = RolloutSource(config, load_prompt_data(config, tokenizer), tokenizer)
    source.fleet = fleet
    return source, source.generate([source.data.train.get(i) for i in range(8)], samples_per_prompt=2, seed=7,
                                   iteration=1, policy_version=0)


def test_the_fleet_starts_with_the_engines_that_place_and_the_others_wait(setup, tiny_model, tmp_path):
    # Two engines of 4.5 CPUs on an 8-CPU instance: one places, the other cannot until resources free up.
    config = tiny_run_config(tmp_path, "rollout.num_workers=2", "rollout.cpus_per_worker=4.5")
    fleet = RolloutFleet(config, str(tiny_model))
    try:
        assert len(fleet.active) == 1 and len(fleet.pending) == 1
        tokenizer = load_tokenizer(str(tiny_model))
        prompts = [tokenize_prompt(tokenizer, f"{n:04d}=") for n in range(3)]
        samples = fleet.generate(prompts, samples_per_prompt=2, temperature=1.0, seeds=request_seeds(0, 1, 3))
        assert [len(prompt_samples) for prompt_samples in samples] == [2, 2, 2]
        assert fleet.join_ready() == 0 and len(fleet.pending) == 1  # still unplaced: no failure, no replacement
        assert fleet.failures == 0
    finally:
        fleet.shutdown()


def test_fleet_splits_prompts_and_returns_each_once_in_order(setup, tiny_model):
    config, fleet, _ = setup
    tokenizer = load_tokenizer(str(tiny_model))
    prompts = [[*tokenize_prompt(tokenizer, f"{n:0{3 + n % 3}d}=")] for n in range(7)]  # 7 prompts over 2 workers
    seeds = request_seeds(0, 1, len(prompts))
    # Sampled at temperature 1: each prompt's seed decides its samples, whichever engine serves it, so the fleet's
    # split answers exactly as worker 0 alone does, prompt by prompt.
    split = fleet.generate(prompts, samples_per_prompt=3, temperature=1.0, seeds=seeds)
    alone = ray.get(fleet.workers[0].generate.remote(prompts, 3, 1.0, seeds))
    assert len(split) == len(prompts) and [len(samples) for samples in split] == [3] * len(prompts)
    assert [[s.token_ids for s in samples] for samples in split] == [[s.token_ids for s in samples] for samples in alone]
    assert all(len(s.logprobs) == len(s.token_ids) > 0 for samples in split for s in samples)
    # Other seeds draw other samples (a prompt's 3 samples are not all the same either).
    again = fleet.generate(prompts, samples_per_prompt=3, temperature=1.0, seeds=request_seeds(0, 2, len(prompts)))
    assert [[s.token_ids for s in samples] for samples in again] != [[s.token_ids for s in samples] for samples in split]


def greedy_hf(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy decoding of each prompt, as vLLM's rollout settings bound it (8 new tokens)."""
    outputs = []
    for prompt in prompts:
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def sync(policy, fleet, policy_version: int) -> tuple[list, dict[str, torch.Tensor]]:
    """The driver's weight sync: gather the policy's buckets, load them into the fleet. Returns the buckets' refs
    and the whole state they hold."""
    buckets = gather_policy_weights(policy, BUCKET_MB, timeout_s=300)
    fleet.load_weights(buckets, policy_version)
    state: dict[str, torch.Tensor] = {}
    for bucket in ray.get(buckets):
        assert not state.keys() & bucket.keys()
        state |= bucket
    return buckets, state


def greedy_vllm(worker, prompts: list[list[int]]) -> list[list[int]]:
    return [samples[0].token_ids for samples in ray.get(worker.generate.remote(prompts, 1, 0.0, [0] * len(prompts)))]


def test_zero3_partitions_and_weight_sync_matches_transformers(setup, tiny_model):
    config, fleet, policy = setup
    full_count = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_model)).parameters())
    shard_counts = [rank["local_parameters"] for rank in ray.get(policy.call("usage"))]
    assert all(count < full_count for count in shard_counts)  # really partitioned
    assert sum(shard_counts) >= full_count

    source, batch = make_batch(config, fleet, tiny_model)
    tokenizer = source.tokenizer
    prompts = [tokenize_prompt(tokenizer, text) for text in ("31415=", "2718=", "16180339=", "4669=", "112358=")]
    greedy_before = [greedy_vllm(worker, prompts) for worker in fleet.workers]

    old = torch.cat(ray.get(policy.call("score", ray.put(batch))))
    mask = batch.response_mask
    advantages = ppo.masked_whiten(torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)), mask)
    train_ref = ray.put(replace(batch, old_logprobs=old, advantages=advantages))
    stats = ray.get(policy.call("train", train_ref, 1))
    assert all(torch.isfinite(torch.tensor(list(rank.values()))).all() for rank in stats)

    buckets, state = sync(policy, fleet, policy_version=1)
    block_bytes = sum(tensor.numel() * tensor.element_size() for name, tensor in state.items()
                      if name.startswith("model.layers.0."))
    assert block_bytes > config.rollout.sync_bucket_mb * 2**20 and len(buckets) > config.tiny_model.num_layers
    start = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert any(not torch.equal(state[name], start.state_dict()[name]) for name in state)  # training changed the weights

    trained = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    trained.load_state_dict(state, strict=True)
    expected = greedy_hf(trained, tokenizer, prompts)
    # The update is large enough to change what greedy decoding says, so a sync that loaded nothing would fail below.
    assert expected != greedy_hf(start, tokenizer, prompts)
    for worker, before in zip(fleet.workers, greedy_before):
        assert greedy_vllm(worker, prompts) == expected
        assert before != expected

    # Why a bucket holds whole blocks: vLLM rebuilds each fused layer (qkv_proj, gate_up_proj) a reload touches from
    # that reload's weights alone, so a bucket per parameter leaves the engine with wrong weights.
    worker = fleet.workers[0]
    ray.get(worker.load_weights.remote([ray.put({name: tensor}) for name, tensor in state.items()], 1))
    assert greedy_vllm(worker, prompts) != expected
    ray.get(worker.load_weights.remote(buckets, 1))
    assert greedy_vllm(worker, prompts) == expected


def test_an_engine_that_generated_nan_generates_right_with_the_next_weights(setup, tiny_model):
    _, fleet, _ = setup
    worker = fleet.workers[1]
    tokenizer = load_tokenizer(str(tiny_model))
    prompts = [tokenize_prompt(tokenizer, text) for text in ("31415=", "2718=", "16180339=")]
    ray.get(worker.load_weights_from.remote(str(tiny_model), 0))
    base = greedy_vllm(worker, prompts)
    state = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    nan_attention = {name: torch.full_like(tensor, float("nan")) for name, tensor in state.items()
                     if name.startswith("model.layers.0.self_attn.")}
    ray.get(worker.load_weights.remote([ray.put(nan_attention)], 1))
    samples = ray.get(worker.generate.remote(prompts, 1, 0.0, [0] * len(prompts)))
    assert all(math.isnan(logprob) for prompt in samples for logprob in prompt[0].logprobs)  # NaN in the KV cache
    ray.get(worker.load_weights_from.remote(str(tiny_model), 0))
    assert greedy_vllm(worker, prompts) == base


def test_a_non_finite_loss_trains_nothing_and_is_counted(setup, tiny_model):
    config, fleet, policy = setup
    source, batch = make_batch(config, fleet, tiny_model)
    mask = batch.response_mask
    # Old log-probs of -1e4 make every ratio overflow to inf; with negative advantages the loss is +inf.
    poisoned = replace(batch, old_logprobs=torch.full(mask.shape, -1e4), advantages=-torch.ones(mask.shape))
    stats = ray.get(policy.call("train", ray.put(poisoned), 2))
    micro_batches_per_rank = config.algorithm.epochs * (len(batch) // 2 // config.policy.micro_batch_size)
    assert [rank["losses/policy_nonfinite"] for rank in stats] == [float(micro_batches_per_rank)] * 2
    assert all("losses/policy" not in rank for rank in stats)  # no statistic of a skipped micro-batch
    _, state = sync(policy, fleet, policy_version=2)
    assert all(torch.isfinite(tensor).all() for tensor in state.values())


def test_reference_learner_and_sampler_agree_on_the_same_weights(ray_session, tiny_model, tmp_path):
    config = tiny_run_config(tmp_path)
    fleet = RolloutFleet(config, str(tiny_model))
    namespace = config.actor_namespace
    reference = ActorGroup(Reference, "reference", role_placement(config, "reference"), namespace=namespace,
                           config=config, model_path=str(tiny_model))
    critic = ActorGroup(Learner, "critic-learner", role_placement(config, "critic"), namespace=namespace,
                        role="critic", config=config, model_path=str(tiny_model))
    reward = ActorGroup(RewardScorer, "reward", role_placement(config, "reward"), namespace=namespace, config=config)
    try:
        source, batch = make_batch(config, fleet, tiny_model)
        batch_ref = ray.put(batch)
        [ref_logprobs], [values], [rewards] = (ray.get(g.call("score", batch_ref)) for g in (reference, critic, reward))
        mask = batch.response_mask.bool()
        # vLLM's sampling log-probs and transformers' recomputation agree on the same weights (fp32).
        assert torch.allclose(ref_logprobs[mask], batch.sampler_logprobs[mask], atol=1e-4)
        assert values.shape == batch.response_ids.shape and torch.isfinite(values).all()
        assert rewards.tolist() == eval_scorer(config)[0].score(batch.prompts, batch.responses, batch.metadata)
    finally:
        for group in (fleet, reference, critic, reward):
            group.shutdown()


def test_reference_colocated_with_policy_runs_in_the_policy_bundles(ray_session, tiny_model, tmp_path):
    config = tiny_run_config(tmp_path, "policy.resources.cpu_ranks_per_node=2", "reference.colocate_with_policy=true")
    policy = ActorGroup(Learner, "policy-learner", role_placement(config, "policy"), namespace=config.actor_namespace,
                        role="policy", config=config, model_path=str(tiny_model))
    reference = ActorGroup(Reference, "reference", role_placement(config, "reference"), namespace=config.actor_namespace,
                           share_placement_group=policy.placement_group, config=config, model_path=str(tiny_model))
    try:
        reference.wait_ready()
        assert reference.world_size == 2
        def placement_of(actor) -> str:
            return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_placement_group_id()))

        policy_group = policy.placement_group.id.hex()
        assert [placement_of(actor) for actor in reference.actors] == [policy_group, policy_group]
        assert placement_of(policy.actors[0]) == policy_group
    finally:
        reference.shutdown()
        policy.shutdown()


def test_lora_policy_trains_adapters_only_gives_the_reference_and_syncs_merged_weights(setup, tiny_model):
    config, fleet, _ = setup
    config = config.model_copy(update={"policy": config.policy.model_copy(
        update={"lora": LoraSection(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])})})
    lora_policy = ActorGroup(Learner, "lora-policy-learner", role_placement(config, "policy"),
                             namespace=config.actor_namespace, role="policy", config=config,
                             model_path=str(tiny_model))
    try:
        fleet.load_weights_from(str(tiny_model), policy_version=0)  # earlier tests synced trained weights
        source, batch = make_batch(config, fleet, tiny_model)
        batch_ref = ray.put(batch)
        # The reference is the policy's own base model, adapters off: before training both are the base model.
        reference = torch.cat(ray.get(lora_policy.call("score_reference", batch_ref)))
        old = torch.cat(ray.get(lora_policy.call("score", batch_ref)))
        mask = batch.response_mask.bool()
        assert torch.allclose(reference[mask], batch.sampler_logprobs[mask], atol=1e-4)
        assert torch.allclose(old[mask], reference[mask], atol=1e-5)  # LoRA's B starts at zero

        advantages = ppo.masked_whiten(torch.randn(mask.shape), batch.response_mask)
        ray.get(lora_policy.call("train", ray.put(replace(batch, old_logprobs=old, advantages=advantages)), 1))
        after = torch.cat(ray.get(lora_policy.call("score_reference", batch_ref)))
        assert torch.allclose(after[mask], reference[mask], atol=1e-5)  # the base model stayed frozen
        trained = torch.cat(ray.get(lora_policy.call("score", batch_ref)))
        assert not torch.allclose(trained[mask], reference[mask], atol=1e-4)  # the adapters learned

        # The sync carries merged weights under the plain model's names: only adapted matrices changed.
        _, state = sync(lora_policy, fleet, policy_version=2)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
        assert set(state) == set(base)
        changed = {name for name in state if not torch.equal(state[name], base[name])}
        assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
        merged = AutoModelForCausalLM.from_pretrained(str(tiny_model))
        merged.load_state_dict(state, strict=True)
        prompts = [tokenize_prompt(source.tokenizer, text) for text in ("31415=", "2718=", "16180339=")]
        expected = greedy_hf(merged, source.tokenizer, prompts)
        assert all(greedy_vllm(worker, prompts) == expected for worker in fleet.workers)
    finally:
        lora_policy.shutdown()
