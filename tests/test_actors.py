"""Tier 2: each role through real Ray actors, vLLM and DeepSpeed on the tiny model."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.group import ActorGroup
from actors.learner import Learner
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.rollout import RolloutFleet
from jobs.ppo import PPOTrainer
from relay import ppo
from relay.data import tokenize_prompt
from relay.models import load_tokenizer
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(ray_session, tiny_model, tmp_path_factory):
    config = tiny_run_config(
        tmp_path_factory.mktemp("run"),
        "rollout.num_workers=2",
        "policy.resources.cpu_ranks_per_node=2",
        "policy.zero_stage=3",
        "policy.zero3_persistence_threshold=0",
        "policy.learning_rate=0.01",
    )
    fleet = RolloutFleet(config, str(tiny_model))
    policy = ActorGroup(Learner, "policy-learner", config.policy.resources, use_gpu=False, namespace=config.actor_namespace,
                        role="policy", config=config, model_path=str(tiny_model))
    yield config, fleet, policy
    fleet.shutdown()
    policy.shutdown()


def make_batch(config, fleet, tiny_model):
    """A real rollout batch, built the way the driver builds it."""
    trainer = PPOTrainer(config)
    trainer.tokenizer = load_tokenizer(str(tiny_model))
    trainer.fleet = fleet
    return trainer, trainer.generate(trainer.train_examples[:8], samples_per_prompt=2, seed=7)


def test_fleet_splits_prompts_and_returns_each_once_in_order(setup, tiny_model):
    config, fleet, _ = setup
    tokenizer = load_tokenizer(str(tiny_model))
    prompts = [[*tokenize_prompt(tokenizer, f"{n:0{3 + n % 3}d}=")] for n in range(7)]  # 7 prompts over 2 workers
    split = fleet.generate(prompts, samples_per_prompt=1, temperature=0.0, seed=0)
    # The same prompts on worker 0 alone: greedy decoding makes the answers comparable prompt by prompt.
    alone = ray.get(fleet.workers[0].generate.remote(prompts, 1, 0.0, 0))
    assert len(split) == len(prompts)
    assert [[s.token_ids for s in samples] for samples in split] == [[s.token_ids for s in samples] for samples in alone]
    sampled = fleet.generate(prompts, samples_per_prompt=3, temperature=1.0, seed=0)
    assert [len(samples) for samples in sampled] == [3] * len(prompts)
    assert all(len(s.logprobs) == len(s.token_ids) > 0 for samples in sampled for s in samples)


def test_zero3_partitions_and_weight_sync_matches_transformers(setup, tiny_model):
    config, fleet, policy = setup
    full_count = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_model)).parameters())
    shard_counts = policy.run("local_parameter_count")
    assert all(count < full_count for count in shard_counts)  # really partitioned
    assert sum(shard_counts) >= full_count

    trainer, batch = make_batch(config, fleet, tiny_model)
    old = torch.cat(ray.get(policy.call("score", ray.put(batch))))
    mask = batch.response_mask
    advantages = ppo.masked_whiten(torch.randn(mask.shape), mask)
    from dataclasses import replace

    train_ref = ray.put(replace(batch, old_logprobs=old, advantages=advantages))
    stats = policy.run("train", train_ref, 1)
    assert all(torch.isfinite(torch.tensor(list(rank.values()))).all() for rank in stats)

    refs = policy.call("full_weights")
    fleet.load_weights(refs[0], policy_version=1)
    state, *others = ray.get(refs)
    assert others == [None]
    before = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    assert any(not torch.equal(state[name], before[name]) for name in state)  # training changed the weights

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.load_state_dict(state, strict=True)
    prompt = tokenize_prompt(trainer.tokenizer, "31415=")
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              eos_token_id=trainer.tokenizer.eos_token_id, pad_token_id=trainer.tokenizer.pad_token_id)
    expected_tokens = expected[0, len(prompt):].tolist()
    for worker in fleet.workers:
        [[greedy]] = ray.get(worker.generate.remote([prompt], 1, 0.0, 0))
        assert greedy.token_ids == expected_tokens[: len(greedy.token_ids)]
        assert len(greedy.token_ids) == len(expected_tokens) or greedy.token_ids[-1] == trainer.tokenizer.eos_token_id


def test_reference_learner_and_sampler_agree_on_the_same_weights(ray_session, tiny_model, tmp_path):
    config = tiny_run_config(tmp_path)
    fleet = RolloutFleet(config, str(tiny_model))
    reference = ActorGroup(Reference, "reference", config.reference.resources, use_gpu=False, namespace=config.actor_namespace,
                           config=config, model_path=str(tiny_model))
    critic = ActorGroup(Learner, "critic-learner", config.critic.resources, use_gpu=False, namespace=config.actor_namespace,
                        role="critic", config=config, model_path=str(tiny_model))
    reward = ActorGroup(RewardScorer, "reward", config.reward.resources, use_gpu=False, namespace=config.actor_namespace, config=config)
    try:
        trainer, batch = make_batch(config, fleet, tiny_model)
        batch_ref = ray.put(batch)
        [ref_logprobs], [values], [rewards] = (ray.get(g.call("score", batch_ref)) for g in (reference, critic, reward))
        mask = batch.response_mask.bool()
        # vLLM's sampling log-probs and transformers' recomputation agree on the same weights (fp32).
        assert torch.allclose(ref_logprobs[mask], batch.sampler_logprobs[mask], atol=1e-4)
        assert values.shape == batch.response_ids.shape and torch.isfinite(values).all()
        assert rewards.tolist() == trainer.task.reward(batch.prompts, batch.responses, batch.metadata)
    finally:
        for group in (fleet, reference, critic, reward):
            group.shutdown()


def test_reference_colocated_with_policy_runs_in_the_policy_bundles(ray_session, tiny_model, tmp_path):
    config = tiny_run_config(tmp_path, "policy.resources.cpu_ranks_per_node=2", "reference.colocate_with_policy=true")
    trainer = PPOTrainer(config)
    trainer.policy = ActorGroup(Learner, "policy-learner", config.policy.resources, use_gpu=False,
                                namespace=config.actor_namespace, colocated_cpus_per_rank=0.2,
                                role="policy", config=config, model_path=str(tiny_model))
    reference = ActorGroup(Reference, "reference", **trainer.placement_of(config.reference), use_gpu=False,
                           namespace=config.actor_namespace, config=config, model_path=str(tiny_model))
    try:
        reference.wait_ready()
        assert reference.world_size == 2
        def placement_of(actor) -> str:
            return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_placement_group_id()))

        policy_group = trainer.policy.placement_group.id.hex()
        assert [placement_of(actor) for actor in reference.actors] == [policy_group, policy_group]
        assert placement_of(trainer.policy.actors[0]) == policy_group
    finally:
        reference.shutdown()
        trainer.policy.shutdown()
