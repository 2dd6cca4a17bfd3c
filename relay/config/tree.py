"""RelayConfig, the root of the tree: one field per section, the checks that span sections (each its own
validator, run in the order they are written; the first that fails is the error), the checks that need the prompt
data's columns, and the properties derived from several sections."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field, model_validator

from relay.config.algorithm import AlgorithmSection
from relay.config.base import Device, Resources, Section
from relay.config.env import EnvSection
from relay.config.inputs import DataSection, RewardModelSection, TinyModelSection, WarmStartSection
from relay.config.roles import InferenceSection, RewardSection, RolloutSection, TrainerSection
from relay.config.run import EvalSection, RaySection, RunSection, TrackingSection

REFERENCE_ANSWER_METRICS = ("eval/bleu", "eval/chrf")  # the eval metrics that score against eval.answer_key


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
    env: EnvSection | None = None
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="before")
    @classmethod
    def _an_environment_rewards_unless_told(cls, tree: Any) -> Any:
        """With an environment, the reward section is optional: unless it names a source, the env's step rewards
        are the whole reward (written out, so a saved config reads back the same)."""
        if isinstance(tree, dict) and tree.get("env") is not None and tree.get("reward") is None:
            return {**tree, "reward": {"type": "none"}}
        return tree

    # --- Checks across sections, in the order they run ----------------------------------------------------------

    @model_validator(mode="after")
    def _one_policy_source(self) -> RelayConfig:
        if (self.policy.model is None) == (self.tiny_model is None):
            raise ValueError("set exactly one of policy.model (a Hub name or path) and tiny_model")
        return self

    @model_validator(mode="after")
    def _reused_forward_needs_zero_2(self) -> RelayConfig:
        if self.algorithm.reuse_scoring_forward and 3 in (self.policy.zero_stage, self.critic.zero_stage):
            raise ValueError("algorithm.reuse_scoring_forward needs policy.zero_stage and critic.zero_stage 2 (ZeRO-3 "
                             "re-gathers each layer in the order of its forward passes)")
        return self

    @model_validator(mode="after")
    def _placed_roles_match_the_device(self) -> RelayConfig:
        for role, resources in self._placed_roles().items():
            if self.device == "cuda" and resources.gpus_per_node == 0:
                raise ValueError(f"{role}.resources.gpus_per_node must be >= 1 with device: cuda")
            if self.device == "cpu" and resources.gpus_per_node > 0:
                raise ValueError(f"{role}.resources.gpus_per_node must be 0 with device: cpu")
        return self

    def _placed_roles(self) -> dict[str, Resources]:
        """The roles placed on resources of their own (a colocated scorer shares the policy's), by section name."""
        roles = {"policy": self.policy.resources}
        if self.algorithm.uses_critic:  # critic-free estimators place no critic
            roles["critic"] = self.critic.resources
        if not self.reference.colocate_with_policy:
            roles["reference"] = self.reference.resources
        if self.reward.uses_gpu_model and not self.reward.colocate_with_policy:
            roles["reward"] = self.reward.resources
        if self.warm_start is not None:
            roles["warm_start"] = self.warm_start.resources
        if self.reward_model_training is not None:
            roles["reward_model_training"] = self.reward_model_training.resources
        return roles

    @model_validator(mode="after")
    def _reward_source_is_usable(self) -> RelayConfig:
        if self.reward.type == "model" and not self.reward.model and self.reward_model_training is None:
            raise ValueError("reward.type is 'model': set reward.model, or reward_model_training to train one")
        if not self.reward.uses_gpu_model and self.reward.resources.gpus_per_node:
            raise ValueError(f"reward.resources.gpus_per_node must be 0: a {self.reward.type} reward runs on CPUs")
        if self.reward.colocate_with_policy and not self.reward.uses_gpu_model:
            raise ValueError("reward.colocate_with_policy needs reward.type: model")
        return self

    @model_validator(mode="after")
    def _an_environment_fits_the_run(self) -> RelayConfig:
        if self.reward.type == "none" and self.env is None:
            raise ValueError("reward.type is 'none' (no reward source): only a run with an env, whose step rewards "
                             "reward the policy, may have none")
        if self.env is not None and self.algorithm.dynamic_sampling:
            raise ValueError("algorithm.dynamic_sampling takes single answers, not an env's episodes: set one of "
                             "them")
        return self

    @model_validator(mode="after")
    def _generating_ahead_fits_the_sampling(self) -> RelayConfig:
        if self.rollout.generate_ahead and self.algorithm.dynamic_sampling:
            raise ValueError("rollout.generate_ahead cannot be used with algorithm.dynamic_sampling, which scores "
                             "rewards while it generates")
        return self

    @model_validator(mode="after")
    def _rollout_leaves_room_for_a_prompt(self) -> RelayConfig:
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) leaves no room for a prompt within "
                f"rollout.max_model_len ({self.rollout.max_model_len})"
            )
        return self

    @model_validator(mode="after")
    def _a_dataset_names_what_a_task_would_give(self) -> RelayConfig:
        if self.data.prompts is None:
            return self
        # A dataset has no task behind it: no task reward, demonstrations or simulated annotator.
        if self.reward.type == "function" and self.reward.function is None:
            raise ValueError("data.prompts is set, so there is no task reward: set reward.function, or "
                             "reward.type: rules with reward.rules, model or remote")
        if self.warm_start is not None and self.warm_start.data is None:
            raise ValueError("data.prompts is set, so there are no task demonstrations: set warm_start.data")
        if self.reward_model_training is not None and self.reward_model_training.data is None:
            raise ValueError("data.prompts is set, so there is no simulated annotator: set "
                             "reward_model_training.data")
        return self

    @model_validator(mode="after")
    def _perplexity_has_a_text_set(self) -> RelayConfig:
        if self.run.early_stop.metric == "eval/perplexity" and not (
                self.eval.text_data or self.warm_start is not None or self.data.prompts is None):
            raise ValueError("run.early_stop.metric eval/perplexity needs a text set: set eval.text_data (or "
                             "warm_start.data, or prompts from a task, whose demonstrations serve)")
        return self

    @model_validator(mode="after")
    def _tensor_parallel_needs_cuda(self) -> RelayConfig:
        if self.device == "cpu" and self.rollout.tensor_parallel_size > 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs device: cuda")
        return self

    @model_validator(mode="after")
    def _batch_divides_over_the_scorers(self) -> RelayConfig:
        samples = self.samples_per_iteration
        for role in ("reference", "reward") if self.uses_reward_source else ("reference",):
            scorer: InferenceSection = getattr(self, role)
            ranks = self.policy.resources.world_size if scorer.colocate_with_policy else scorer.resources.world_size
            if samples % ranks:
                raise ValueError(
                    f"data.prompts_per_iteration × rollout.samples_per_prompt = {samples} samples must divide evenly "
                    f"over the {ranks} {role} ranks"
                )
        return self

    @model_validator(mode="after")
    def _group_baselines_have_groups(self) -> RelayConfig:
        if self.algorithm.advantage in ("grpo", "rloo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"algorithm.advantage {self.algorithm.advantage} compares the samples of a prompt: "
                             "rollout.samples_per_prompt must be at least 2")
        return self

    @model_validator(mode="after")
    def _batch_divides_into_learner_steps(self) -> RelayConfig:
        samples = self.samples_per_iteration
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

    # --- Checks that need the prompt data's columns (known only once the prompts are read) ----------------------

    def check_prompt_columns(self, columns: Iterable[str], source: str) -> None:
        """Raise ValueError unless the prompts' columns besides the prompt (`columns`, of the data at `source`) hold
        what the run reads from them: the reference answers of the BLEU/chrF early-stop metric, and the rules'
        columns."""
        columns = frozenset(columns)
        self.check_answer_column(columns)
        self.check_rule_columns(columns, source)

    def check_answer_column(self, columns: Iterable[str]) -> None:
        """run.early_stop.metric eval/bleu or eval/chrf needs eval.answer_key among the held-out prompts' columns."""
        columns = frozenset(columns)
        metric, key = self.run.early_stop.metric, self.eval.answer_key
        if metric in REFERENCE_ANSWER_METRICS and key not in columns:
            raise ValueError(f"run.early_stop.metric {metric} needs reference answers, and the held-out prompts have "
                             f"no column {key!r} (eval.answer_key); their columns besides the prompt: "
                             f"{', '.join(sorted(columns)) or 'none'}")

    def check_rule_columns(self, columns: Iterable[str], source: str) -> None:
        """reward.type rules: every rule's column must be among the prompts' columns (those of the data at `source`)."""
        if self.reward.type != "rules":
            return
        columns = frozenset(columns)
        for rule in self.reward.rules:
            if rule.column is not None and rule.column not in columns:
                raise ValueError(f"reward.rules: no column {rule.column!r} in {source} (its columns besides the "
                                 f"prompt: {', '.join(sorted(columns)) or 'none'})")

    # --- Derived from several sections --------------------------------------------------------------------------

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
    def uses_reward_source(self) -> bool:
        """Whether reward actors score each sample: every run but an environment's whose step rewards are all."""
        return self.reward.type != "none"

    @property
    def samples_per_iteration(self) -> int:
        return self.data.prompts_per_iteration * self.rollout.samples_per_prompt
