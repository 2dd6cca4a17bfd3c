"""The sections of PPO's roles: the learners (policy, critic, with optional LoRA), the frozen scorers (reference,
reward model), where the reward comes from, and the vLLM engines that generate."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from relay.config.base import Dtype, Resources, Section


class LoraSection(Section):
    """Low-rank adapters (PEFT's LoRA) trained instead of the whole model; the rest stays frozen."""

    rank: int = Field(8, ge=1, description="r, the adapters' rank")
    alpha: float = Field(16.0, gt=0, description="the adapters' scale is alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names to adapt (or all-linear)",
    )


class TrainerSection(Section):
    """A DeepSpeed ZeRO learner: the policy or the critic."""

    model: str | None = Field(None, description="Hub name or local path; None: see RelayConfig's defaults")
    resources: Resources = Field(default_factory=Resources)
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    offload: bool = Field(False, description="offload optimizer state (and ZeRO-3 params) to CPU memory")
    zero3_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3 keeps parameters smaller than this unpartitioned (0: shard all)"
    )
    dtype: Dtype = "bfloat16"
    learning_rate: float = Field(1e-6, gt=0, description="the peak rate, reached after the warm-up")
    lr_warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after the warm-up: constant, or a linear or cosine decay to 0 at the run's end"
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, ge=1, description="sequences per rank per forward/backward")
    gradient_checkpointing: bool = False
    dropout: bool = Field(False, description="keep the model's dropout in training (off: exact ratios and resume)")
    lora: LoraSection | None = Field(None, description="train LoRA adapters instead of every weight")


class InferenceSection(Section):
    """A frozen model that only scores: the reference policy, or a reward model."""

    model: str | None = None
    colocate_with_policy: bool = Field(
        False, description="share the policy learner's GPUs (one rank per policy rank) instead of its own"
    )
    resources: Resources = Field(default_factory=Resources)
    dtype: Dtype = "bfloat16"
    micro_batch_size: int = Field(8, ge=1)


class RewardRule(Section):
    """One built-in check of a response against the row's columns (relay/verifiers.py), weighted in the sum."""

    check: Literal["exact_match", "math_answer", "regex"]
    column: str | None = Field(None, description="exact_match, math_answer: the column holding the reference")
    pattern: str | None = Field(None, description="regex: a pattern the whole (stripped) response must match")
    weight: float = 1.0

    @model_validator(mode="after")
    def _complete(self) -> RewardRule:
        if self.check == "regex":
            if self.pattern is None:
                raise ValueError("a regex rule needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression ({error})") from None
        elif self.column is None:
            raise ValueError(f"a {self.check} rule needs the column that holds the reference answer")
        return self


class RewardSection(InferenceSection):
    """Where the sequence reward comes from: a function (the task's, yours, or built-in rules), a reward model,
    or an endpoint."""

    # none: no reward source, an environment's step rewards are the whole reward (the default with `env`)
    type: Literal["function", "rules", "model", "remote", "none"] = "function"
    function: str | None = Field(
        None, description="`module:function` scoring (prompts, responses, metadata) -> floats; None: the task's"
    )
    rules: list[RewardRule] = Field(default_factory=list, description="type rules: their weighted sum")
    url: str | None = Field(None, description="type remote: POST {prompts, responses, metadata} -> {rewards}")
    timeout_s: float = Field(30.0, gt=0, description="type remote: seconds per request")
    outage_budget_s: float = Field(
        300.0, ge=0, description="type remote: how long the endpoint may be down (retried) before the run fails"
    )
    request_batch_size: int | None = Field(None, ge=1, description="type remote: responses per request")
    normalize: bool = Field(False, description="whiten sequence rewards with running mean/std over the run")
    clip: float | None = Field(None, gt=0, description="clip sequence rewards to [-clip, clip] (after normalizing)")

    @model_validator(mode="after")
    def _source_is_named(self) -> RewardSection:
        if self.type == "remote" and not self.url:
            raise ValueError("reward.type is 'remote' but reward.url is not set")
        if self.type == "rules" and not self.rules:
            raise ValueError("reward.type is 'rules' but reward.rules is empty")
        return self

    @property
    def uses_gpu_model(self) -> bool:
        return self.type == "model"


class RolloutSection(Section):
    """The vLLM engines that generate."""

    num_workers: int = Field(1, ge=1, description="vLLM engines; each is its own placement group")
    tensor_parallel_size: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    dtype: Dtype = "bfloat16"
    samples_per_prompt: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature; PPO's ratio assumes 1.0")
    top_p: float = Field(1.0, gt=0, le=1, description="1 only: see RolloutSection._untruncated")
    max_new_tokens: int = Field(256, ge=1)
    ignore_eos: bool = Field(False, description="generate exactly max_new_tokens, past EOS (benchmarks)")
    cpu_threads: int | None = Field(
        None, ge=1, description="device cpu: an engine's threads (None: every core of the machine, since "
        "generation has its phase to itself; one with generate_ahead, which shares the cores with the learners)"
    )
    max_model_len: int = Field(2048, ge=16)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="share of a GPU for vLLM (cuda)")
    kv_cache_memory_mb: int = Field(256, ge=16, description="KV cache size on device: cpu")
    enforce_eager: bool = Field(False, description="skip CUDA graphs (always on for cpu)")
    max_failures: int = Field(10, ge=0, description="engine failures survived (each replaced) before the run stops")
    generate_ahead: bool = Field(
        False, description="generate the next iteration's batch while this one is scored and trained: its samples "
        "come from the policy one version behind, and decoupled PPO's weights (algorithm.behavior_weight_cap) "
        "correct the ratio for it"
    )
    sync_bucket_mb: float = Field(
        256, gt=0, description="weight sync: the policy goes to the engines in buckets of about this size (a decoder "
        "block is never split)"
    )

    @model_validator(mode="after")
    def _untruncated(self) -> RolloutSection:
        if self.top_p < 1:
            # vLLM's sampler log-probs are of the truncated distribution (logprobs_mode processed_logprobs), the
            # learners' and the reference's of the whole one: the PPO ratio, the KL and the behaviour weights
            # would all be biased by the truncation.
            raise ValueError(f"rollout.top_p {self.top_p:g}: PPO needs the learner's log-probs of the distribution "
                             "that sampled, and relay's learners score the untruncated one; leave top_p at 1 (shape "
                             "the distribution with rollout.temperature, which both sides apply)")
        return self
