"""The learner in this process, one rank, no Ray: what it does with a gradient that is not finite.

A finite loss can still give a NaN or infinite gradient (an overflow in the backward pass). No such step may reach
the weights or the optimizer state, and each is counted against run.max_nonfinite_steps like a non-finite loss."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from relay.batch import RolloutBatch
from relay.config import RelayConfig
from actors.group import free_port
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.slow  # DeepSpeed engines, ZeRO-2 and ZeRO-3


@pytest.fixture(scope="module")
def one_rank_group():
    """A fresh one-rank gloo process group for the learners built here; gone with the module. Whatever an earlier
    module of this process left (a group, DeepSpeed's comm backend and its cached groups: an in-process vLLM
    engine destroys its group when it is collected, at no fixed time) is cleared first, so that DeepSpeed starts
    afresh instead of reaching for a group that no longer exists."""
    import deepspeed.comm.comm
    import deepspeed.utils.groups

    port = free_port()
    environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                   "LOCAL_RANK": "0"}
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    deepspeed.comm.comm.cdb = None
    importlib.reload(deepspeed.utils.groups)  # its module-level group caches
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        yield
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def synthetic_batch(config: RelayConfig, vocab_size: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(0)
    rows, prompt_length, response_length = config.samples_per_iteration, 5, config.rollout.max_new_tokens
    response_mask = torch.ones(rows, response_length)
    response_mask[::2, -3:] = 0  # some responses end early
    return RolloutBatch(
        query_ids=torch.randint(3, vocab_size, (rows, prompt_length), generator=generator),
        query_mask=torch.ones(rows, prompt_length),
        response_ids=torch.randint(3, vocab_size, (rows, response_length), generator=generator),
        response_mask=response_mask,
        sampler_logprobs=torch.full((rows, response_length), -2.0),
        prompts=[""] * rows, responses=[""] * rows, metadata=[{}] * rows, policy_version=0,
        old_logprobs=torch.full((rows, response_length), -2.0),
        advantages=torch.randn(rows, response_length, generator=generator),
    )


def nan_gradient(loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged in value, with a NaN gradient: sqrt's derivative at 0 is infinite, times 0 is NaN."""
    return loss + (output.sum() * 0.0).clamp(min=0.0).sqrt()


@pytest.mark.timeout(180)
def test_a_cpu_learner_starts_past_a_stale_deepspeed_build_lock(one_rank_group, tiny_model, tmp_path, monkeypatch):
    # What a learner killed while DeepSpeed JIT-built its shared-memory op leaves behind. Every later learner used to
    # wait on it forever; the op serves only inference all-reduces, so CPU learners do without it.
    import deepspeed.comm.comm
    from actors.learner import Learner

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    (tmp_path / "extensions" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "extensions" / "deepspeed_shm_comm" / "lock").touch()
    Learner("policy", tiny_run_config(tmp_path), str(tiny_model), rank=0, world_size=1)
    assert deepspeed.comm.comm.cdb.shm_comm_op is None


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_finite_loss_with_a_non_finite_gradient_changes_nothing_and_is_counted(
        one_rank_group, tiny_model, tmp_path, zero_stage):
    from actors.learner import Learner, NonFiniteLoss
    from relay.zero import full_state_dict

    config = tiny_run_config(tmp_path, f"policy.zero_stage={zero_stage}", "run.max_nonfinite_steps=2",
                             "algorithm.mini_batches=2", "algorithm.epochs=1")
    learner = Learner("policy", config, str(tiny_model), rank=0, world_size=1)
    batch = synthetic_batch(config, learner.tokenizer.vocab_size)
    before = full_state_dict(learner.engine.module, zero_stage, rank=0)
    assert before is not None

    loss = learner._loss

    def loss_with_a_nan_gradient(part, counts, output=None):
        objective, output = loss(part, counts, output)
        return replace(objective, loss=nan_gradient(objective.loss, output)), output

    learner._loss = loss_with_a_nan_gradient
    stats = learner.train(batch, iteration=1)
    # Two mini-batches, two optimizer steps, both dropped; every loss was finite, so none was zeroed.
    assert stats["losses/policy_skipped_steps"] == 2.0 and stats["losses/policy_nonfinite"] == 0.0
    assert torch.isfinite(torch.tensor(stats["losses/policy"]))
    after = full_state_dict(learner.engine.module, zero_stage, rank=0)
    assert after is not None and all(torch.equal(before[name], after[name]) for name in before)

    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient makes 3 .* run\.max_nonfinite_steps=2"):
        learner.train(batch, iteration=2)

    learner._loss = loss  # a healthy step trains again: the dropped ones left no gradient or state behind
    stats = learner.train(batch, iteration=3)
    assert stats["losses/policy_skipped_steps"] == 0.0
    trained = full_state_dict(learner.engine.module, zero_stage, rank=0)
    assert trained is not None and all(torch.isfinite(tensor).all() for tensor in trained.values())
    assert any(not torch.equal(before[name], trained[name]) for name in before)


@pytest.mark.parametrize("role", ["policy", "critic"])
def test_the_scoring_forward_reused_for_training_gives_the_same_scores_and_update(one_rank_group, tiny_model,
                                                                                  tmp_path, role):
    from actors.learner import Learner
    from relay.zero import full_state_dict

    # One micro-batch per mini-batch: both ways train on the same rows in one micro-batch.
    settings = ["algorithm.epochs=2", "algorithm.mini_batches=1", f"{role}.micro_batch_size=16"]
    learners = {reuse: Learner(role, tiny_run_config(tmp_path / f"reuse-{reuse}", *settings,
                                                     f"algorithm.reuse_scoring_forward={str(reuse).lower()}"),
                               str(tiny_model), rank=0, world_size=1) for reuse in (False, True)}
    batch = synthetic_batch(tiny_run_config(tmp_path), learners[False].tokenizer.vocab_size)
    scores = {reuse: learner.score(batch) for reuse, learner in learners.items()}
    assert torch.equal(scores[False], scores[True])
    assert learners[True]._kept is not None and learners[False]._kept is None
    if role == "policy":
        batch = replace(batch, old_logprobs=scores[True])
    else:
        batch = replace(batch, values=scores[True], returns=scores[True] + batch.advantages)
    stats = {reuse: learner.train(batch, iteration=1) for reuse, learner in learners.items()}
    assert learners[True]._kept is None  # used once, then dropped
    loss = "losses/policy" if role == "policy" else "losses/value"
    assert stats[True][loss] == pytest.approx(stats[False][loss], rel=1e-5)
    weights = {reuse: full_state_dict(learner.engine.module, 2, rank=0) for reuse, learner in learners.items()}
    # Equal but for summation order (the rows of the one micro-batch come in another order).
    assert all(torch.allclose(weights[True][name], weights[False][name], atol=1e-5) for name in weights[True])

    # A train call for a batch the learner did not score forwards again rather than reuse a stale graph: it trains
    # on `batch` as the learner that never keeps a graph does (a stale graph would give the other batch's loss).
    for learner in learners.values():
        learner.score(synthetic_batch(tiny_run_config(tmp_path), 7))
    assert learners[True]._kept is not None
    stats = {reuse: learner.train(batch, iteration=2) for reuse, learner in learners.items()}
    assert learners[True]._kept is None
    assert stats[True][loss] == pytest.approx(stats[False][loss], rel=1e-5)
    weights = {reuse: full_state_dict(learner.engine.module, 2, rank=0) for reuse, learner in learners.items()}
    assert all(torch.allclose(weights[True][name], weights[False][name], atol=1e-5) for name in weights[True])
