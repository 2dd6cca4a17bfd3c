"""One typed config tree for a relay run, loaded from YAML plus `dotted.key=value` overrides.

    cfg = load_config("jobs/configs/demo.yaml", ["algorithm.kl_coef=0.05", "rollout.num_workers=2"])

Every section forbids unknown keys, and every error names the field's dotted path, so a typo fails at load time,
before any cluster resource is taken.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(Section):
    """Where the ranks of one role run. On `device: cuda` each rank holds one GPU."""

    num_nodes: int = Field(1, ge=1, description="nodes this role spans")
    gpus_per_node: int = Field(0, ge=0, description="GPU ranks per node; 0 on device: cpu")
    cpu_ranks_per_node: int = Field(1, ge=1, description="ranks per node on device: cpu")
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs each rank reserves (fractions are fine)")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_ranks_per_node

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.ranks_per_node


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

    type: Literal["function", "rules", "model", "remote"] = "function"
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


class AlgorithmSection(Section):
    """Every setting of the RL algorithm, in one place: the advantage estimator, the KL to the reference (its
    estimator, coefficient and placement), clipping, epochs and how the loss is aggregated."""

    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae", description="gae: PPO with a critic; grpo, rloo: group baselines; reinforce_pp: batch-whitened returns"
    )
    norm_by_std: bool = Field(True, description="grpo: divide by the group's reward std (false: Dr. GRPO)")
    kl_coef: float = Field(0.05, ge=0, description="β of the KL to the reference")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_placement: Literal["reward", "loss"] = Field(
        "reward", description="reward: −β·KL per token in the reward; loss: β·KL as a term of the policy loss"
    )
    kl_target: float | None = Field(None, gt=0, description="set to adapt β towards this KL (Ziegler et al.)")
    kl_horizon: int = Field(10_000, ge=1, description="adaptive KL horizon in samples")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="gae: the λ of GAE")
    clip_ratio: float = Field(0.2, gt=0)
    value_clip: float | None = Field(0.2, gt=0, description="gae: the critic's value clipping")
    epochs: int = Field(1, ge=1, description="passes over each batch")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch; the batch is split into this many")
    entropy_coef: float = Field(0.0, ge=0)
    whiten_advantages: bool = Field(True, description="gae: whiten advantages over the batch")
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = Field(
        "token_mean", description="how per-token losses become one number (see relay.ppo.aggregate)"
    )
    dynamic_sampling: bool = Field(
        False, description="grpo, rloo: drop prompts whose samples all scored alike, sample more to fill the batch"
    )
    max_sampling_rounds: int = Field(4, ge=1, description="dynamic sampling: generation rounds per iteration at most")
    kl_budget: float | None = Field(
        None, gt=0, description="the most KL to the reference (policy/kl_ref, per sequence) the run may reach: past "
        "it the run stops, checkpointing the iteration that crossed it (policy_best keeps the best before it)"
    )
    behavior_weight_cap: float = Field(
        2.0, gt=0, description="rollout.generate_ahead: each token's policy loss is weighted by "
        "min(π_old / π_sampler, this cap), π_sampler being the older policy that generated it"
    )
    reuse_scoring_forward: bool = Field(
        False, description="the policy's and critic's scoring pass keeps its graph and serves as the first epoch's "
        "forward (one mini-batch only; the scored batch's activations stay in memory until then)"
    )

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmSection:
        if self.kl_placement == "loss" and self.kl_estimator == "k1":
            raise ValueError("algorithm.kl_placement loss needs kl_estimator k3 or k2: k1's gradient has zero mean")
        if self.dynamic_sampling and self.advantage not in ("grpo", "rloo"):
            raise ValueError("algorithm.dynamic_sampling drops groups of samples: it needs advantage grpo or rloo")
        if self.kl_placement == "loss" and self.kl_target is not None:
            raise ValueError("algorithm.kl_target (adaptive β) applies to the KL in the reward, not as a loss")
        if self.reuse_scoring_forward and self.mini_batches != 1:
            raise ValueError("algorithm.reuse_scoring_forward needs mini_batches 1: the first mini-batch must be the "
                             "whole batch the scoring pass saw")
        return self

    def describe(self) -> str:
        """One line for logs and status: `grpo (KL k3 in the loss, β 0.01, token_mean)`."""
        return (f"{self.advantage} (KL {self.kl_estimator} in the {self.kl_placement}, β {self.kl_coef:g}, "
                f"{self.loss_aggregation})")


class DataSection(Section):
    """Where PPO's prompts come from: a prompt dataset (`prompts`), or else a built-in or user task (`task`)."""

    prompts: str | None = Field(
        None, description="jsonl/parquet file, a directory of them, a saved Hugging Face dataset or a Hub name"
    )
    split: str = Field("train", description="the split of a Hugging Face `prompts` dataset")
    subset: str | None = Field(None, description="the subset (config name) of a Hub dataset, e.g. 'main'")
    eval_data: str | None = Field(
        None, description="held-out prompts: a file or directory, or a split of `prompts`; None: hold out eval_prompts"
    )
    prompt_key: str = Field("prompt", description="the column holding the prompt text")
    messages_key: str | None = Field(
        "messages", description="the column holding chat messages, when rows are chats; None: rows are never chats"
    )
    apply_chat_template: bool = Field(False, description="render plain prompts as one user message of a chat")
    chat_template: str | None = Field(
        None, description="the run's Jinja chat template (see RelayConfig.chat_template); None: the tokenizer's own")
    long_prompts: Literal["drop", "truncate"] = Field(
        "drop", description="prompts longer than max_model_len - max_new_tokens: drop, or keep their last tokens"
    )
    check_rows: int = Field(
        1000, ge=1, description="rows of a Hub dataset checked before Ray starts; the rest as they are drawn"
    )
    task: str = Field("reverse", description="without `prompts`: built-in task name or `module:attribute` Task")
    train_prompts: int = Field(4096, ge=1, description="task: training prompts generated")
    prompts_per_iteration: int = Field(16, ge=1)
    eval_prompts: int = Field(64, ge=1, description="held-out prompts (at most this many of eval_data)")
    eval_samples_per_prompt: int = Field(4, ge=1, description="samples per held-out prompt (the score is their mean)")
    seed: int = 0


class TinyModelSection(Section):
    """Build a small random-init Llama and a character tokenizer for the task, instead of loading a model."""

    hidden_size: int = Field(128, ge=64)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=1)
    max_position_embeddings: int = Field(128, ge=16)

    @model_validator(mode="after")
    def _head_dim_supported(self) -> TinyModelSection:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 64:
            raise ValueError("hidden_size / num_heads must be a whole number >= 64 (vLLM's CPU attention needs it)")
        return self


class WarmStartSection(Section):
    """Supervised fine-tuning on the task's demonstrations before PPO (Ray Train TorchTrainer + DeepSpeed)."""

    data: str | None = Field(
        None, description="prompt/response or chat `messages` data (jsonl, parquet, HF dataset); None: the task's"
    )
    chat_template: str | None = Field(
        None, description="the run's Jinja chat template (see RelayConfig.chat_template); None: the tokenizer's own")
    max_length: int = Field(1024, ge=8, description="tokens per example; see relay.data.tokenize_example for cuts")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1, description="sequences per step across all ranks")
    learning_rate: float = Field(1e-3, gt=0)
    resources: Resources = Field(default_factory=Resources)
    zero_stage: Literal[2, 3] = 2


class RaySection(Section):
    address: str | None = Field(None, description="None: the cluster of the job (or RAY_ADDRESS), else local")
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance started by relay")
    namespace: str = "relay"


EvalMetric = Literal["eval/score", "eval/reward", "eval/win_rate", "eval/kl_ref", "eval/perplexity", "eval/bleu",
                     "eval/chrf"]
LOWER_IS_BETTER: frozenset[str] = frozenset({"eval/kl_ref", "eval/perplexity"})


class EvalSection(Section):
    """What an evaluation measures besides the held-out score (in training every run.eval_every iterations, and in
    `relay eval`): the reward source's score, the win rate against the policy PPO started from, the KL to the
    reference, the perplexity of a text set, and BLEU/chrF where the held-out prompts carry reference answers."""

    text_data: str | None = Field(
        None, description="texts for the perplexity: prompt/response or chat `messages` rows (jsonl, parquet, a "
        "dataset); None: warm_start.data, else the task's demonstrations of the held-out prompts"
    )
    text_rows: int = Field(256, ge=1, description="the first this many rows of the text set")
    answer_key: str = Field(
        "answer", description="the held-out prompts' column with a reference answer (BLEU and chrF when present)"
    )


class EarlyStopSection(Section):
    """The evaluation metric that picks the best checkpoint (`<output_dir>/policy_best`) and, with `patience`, ends
    the run when it stops improving."""

    metric: EvalMetric = "eval/score"
    mode: Literal["max", "min"] | None = Field(
        None, description="None: min for eval/kl_ref and eval/perplexity, max for the others"
    )
    patience: int | None = Field(
        None, ge=1, description="evaluations in a row without improvement that end the run; None: never stop early"
    )
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or ("min" if self.metric in LOWER_IS_BETTER else "max")


class RunSection(Section):
    name: str = "relay"
    output_dir: str = Field("runs/relay", description="run directory: metrics, checkpoints, final model")
    iterations: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="evaluate every N iterations (0: only at start and end)")
    early_stop: EarlyStopSection = Field(default_factory=EarlyStopSection)
    checkpoint_every: int = Field(
        10, ge=0, description="checkpoint every N iterations (0: only at the end); restarts resume from the newest"
    )
    max_restarts: int = Field(2, ge=0, description="restarts of every role from the newest checkpoint when one dies")
    max_nonfinite_steps: int = Field(
        10, ge=0, description="non-finite losses (micro-batch trained with zero gradient) and gradients (optimizer "
        "step dropped) a learner skips before the run stops"
    )
    stop_grace_s: int = Field(
        300, ge=3, description="relay submit: how long `relay stop` lets the driver checkpoint before Ray kills it"
    )
    keep_checkpoints: int = Field(0, ge=0, description="keep the newest K checkpoints (0: all)")
    roles_in_parallel: bool = Field(
        True, description="score, and train, the roles at the same time; false: one after another, each with every "
        "core on device cpu (on 2 cores the two took the same time within noise: relay bench)"
    )
    resume: Literal["auto", "never"] = "auto"
    call_timeout_s: float = Field(
        1800.0, gt=0, description="the longest the driver waits on one call to a role before naming it as stuck"
    )
    seed: int = 0


class TrackingSection(Section):
    """Where the metrics go besides metrics.jsonl, TensorBoard and Ray's dashboard: MLflow and Weights & Biases,
    each one run per relay run (a resumed run continues it)."""

    mlflow: bool = Field(False, description="log to MLflow (pip install mlflow-skinny, or relay's `tracking` extra)")
    mlflow_tracking_uri: str | None = Field(
        None, description="an MLflow server or store; None: a local store in <run.output_dir>/mlruns"
    )
    mlflow_experiment: str = "relay"
    wandb: bool = Field(False, description="log to Weights & Biases (pip install wandb, or the `tracking` extra)")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: written under <run.output_dir>/wandb, for `wandb sync` later"
    )
    wandb_project: str = "relay"


class RewardModelSection(Section):
    """A Bradley–Terry reward model trained on preference pairs (Ray Train TorchTrainer + DeepSpeed)."""

    data: str | None = Field(
        None, description="jsonl/parquet path, Hugging Face dataset name, or a label store of `relay label` "
        "(.sqlite); None: simulated pairs from data.task"
    )
    simulated_pairs: int = Field(2048, ge=2, description="pairs the simulated annotator makes when data is None")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of pairs held out for accuracy and margin")
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="preference pairs per step across all ranks")
    learning_rate: float = Field(1e-4, gt=0)
    resources: Resources = Field(default_factory=Resources)
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    dtype: Dtype = Field("bfloat16", description="training dtype of the reward model")
    chat_template: str | None = Field(
        None, description="the run's Jinja chat template (see RelayConfig.chat_template); None: the tokenizer's own")
    max_length: int = Field(512, ge=8, description="tokens per prompt+response; see relay.data.tokenize_example")


class RelayConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    device: Device = "cpu"
    ray: RaySection = Field(default_factory=RaySection)
    data: DataSection = Field(default_factory=DataSection)
    tiny_model: TinyModelSection | None = None
    warm_start: WarmStartSection | None = None
    reward_model_training: RewardModelSection | None = None
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    policy: TrainerSection = Field(default_factory=TrainerSection)
    critic: TrainerSection = Field(default_factory=TrainerSection)
    reference: InferenceSection = Field(default_factory=InferenceSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        if (self.policy.model is None) == (self.tiny_model is None):
            raise ValueError("set exactly one of policy.model (a Hub name or path) and tiny_model")
        learner_roles = {"policy": self.policy.resources}
        if self.algorithm.uses_critic:  # critic-free estimators place no critic
            learner_roles["critic"] = self.critic.resources
        if not self.reference.colocate_with_policy:
            learner_roles["reference"] = self.reference.resources
        if self.reward.uses_gpu_model and not self.reward.colocate_with_policy:
            learner_roles["reward"] = self.reward.resources
        if self.warm_start is not None:
            learner_roles["warm_start"] = self.warm_start.resources
        if self.reward_model_training is not None:
            learner_roles["reward_model_training"] = self.reward_model_training.resources
        if self.algorithm.reuse_scoring_forward and 3 in (self.policy.zero_stage, self.critic.zero_stage):
            raise ValueError("algorithm.reuse_scoring_forward needs policy.zero_stage and critic.zero_stage 2 (ZeRO-3 "
                             "re-gathers each layer in the order of its forward passes)")
        for role, resources in learner_roles.items():
            if self.device == "cuda" and resources.gpus_per_node == 0:
                raise ValueError(f"{role}.resources.gpus_per_node must be >= 1 with device: cuda")
            if self.device == "cpu" and resources.gpus_per_node > 0:
                raise ValueError(f"{role}.resources.gpus_per_node must be 0 with device: cpu")
        if self.reward.type == "model" and not self.reward.model and self.reward_model_training is None:
            raise ValueError("reward.type is 'model': set reward.model, or reward_model_training to train one")
        if not self.reward.uses_gpu_model and self.reward.resources.gpus_per_node:
            raise ValueError(f"reward.resources.gpus_per_node must be 0: a {self.reward.type} reward runs on CPUs")
        if self.reward.colocate_with_policy and not self.reward.uses_gpu_model:
            raise ValueError("reward.colocate_with_policy needs reward.type: model")
        if self.rollout.generate_ahead and self.algorithm.dynamic_sampling:
            raise ValueError("rollout.generate_ahead cannot be used with algorithm.dynamic_sampling, which scores "
                             "rewards while it generates")
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) leaves no room for a prompt within "
                f"rollout.max_model_len ({self.rollout.max_model_len})"
            )
        if self.data.prompts is not None:
            # A dataset has no task behind it: no task reward, demonstrations or simulated annotator.
            if self.reward.type == "function" and self.reward.function is None:
                raise ValueError("data.prompts is set, so there is no task reward: set reward.function, or "
                                 "reward.type: rules with reward.rules, model or remote")
            if self.warm_start is not None and self.warm_start.data is None:
                raise ValueError("data.prompts is set, so there are no task demonstrations: set warm_start.data")
            if self.reward_model_training is not None and self.reward_model_training.data is None:
                raise ValueError("data.prompts is set, so there is no simulated annotator: set "
                                 "reward_model_training.data")
        if self.run.early_stop.metric == "eval/perplexity" and not (
                self.eval.text_data or self.warm_start is not None or self.data.prompts is None):
            raise ValueError("run.early_stop.metric eval/perplexity needs a text set: set eval.text_data (or "
                             "warm_start.data, or prompts from a task, whose demonstrations serve)")
        if self.device == "cpu" and self.rollout.tensor_parallel_size > 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs device: cuda")
        samples = self.data.prompts_per_iteration * self.rollout.samples_per_prompt
        for role in ("reference", "reward"):
            scorer: InferenceSection = getattr(self, role)
            ranks = self.policy.resources.world_size if scorer.colocate_with_policy else scorer.resources.world_size
            if samples % ranks:
                raise ValueError(
                    f"data.prompts_per_iteration × rollout.samples_per_prompt = {samples} samples must divide evenly "
                    f"over the {ranks} {role} ranks"
                )
        if self.algorithm.advantage in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"algorithm.advantage {self.algorithm.advantage} compares the samples of a prompt: "
                             "rollout.samples_per_prompt must be at least 2")
        for role in ("policy", "critic") if self.algorithm.uses_critic else ("policy",):
            section: TrainerSection = getattr(self, role)
            per_step = section.resources.world_size * section.micro_batch_size * self.algorithm.mini_batches
            if samples % per_step:
                raise ValueError(
                    f"data.prompts_per_iteration × rollout.samples_per_prompt = {samples} samples must divide evenly "
                    f"into {role}: world_size {section.resources.world_size} × micro_batch_size "
                    f"{section.micro_batch_size} × algorithm.mini_batches {self.algorithm.mini_batches} = {per_step}"
                )
        return self

    @model_validator(mode="after")
    def _one_chat_template(self) -> RelayConfig:
        templates = {field: template for field, template in self._chat_templates().items() if template is not None}
        if len(set(templates.values())) > 1:
            raise ValueError(f"{' and '.join(templates)} differ: a run renders every chat with one template (its "
                             "prompts, warm start and reward pairs, and its checkpoints); set it in one of them")
        return self

    def _chat_templates(self) -> dict[str, str | None]:
        return {"data.chat_template": self.data.chat_template,
                "warm_start.chat_template": self.warm_start and self.warm_start.chat_template,
                "reward_model_training.chat_template": (self.reward_model_training
                                                        and self.reward_model_training.chat_template)}

    @property
    def chat_template(self) -> str | None:
        """The run's one chat template, whichever section sets it (they must agree); None: the policy tokenizer's
        own. relay.models.load_tokenizer applies it, and every checkpoint the run writes carries it."""
        return next((template for template in self._chat_templates().values() if template is not None), None)

    @property
    def actor_namespace(self) -> str:
        """Ray namespace of the run's named actors (`rollout-0`, `policy-learner-1`, …): one per run name."""
        return f"{self.ray.namespace}-{self.run.name}"

    @property
    def reference_in_policy(self) -> bool:
        """With a LoRA policy the reference is its base model, the adapters switched off, in the policy's actors."""
        return self.policy.lora is not None and self.reference.model is None

    @property
    def samples_per_iteration(self) -> int:
        return self.data.prompts_per_iteration * self.rollout.samples_per_prompt


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries in a nested dict; values are parsed as YAML (so `0.1`, `true`, `null` work)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parents[: depth + 1])} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return tree


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RelayConfig:
    """Read a YAML file (or start from defaults) and apply overrides; raise ConfigError naming the bad field."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {where}{problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(tree).__name__}")
    tree = apply_overrides(tree, overrides or [])
    try:
        return RelayConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def dump_config(config: RelayConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_from_command_line(description: str, argv: list[str] | None = None) -> RelayConfig:
    """`--config FILE [dotted.key=value ...]` as every job entrypoint takes it; a bad config exits with its message."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. algorithm.kl_coef=0.1")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(str(error))
