"""What a run starts from: its prompts (a dataset or a task), the tiny random model it may build instead of loading
one, and the stages that may come before PPO (supervised warm start, reward model training)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from relay.config.base import Dtype, Resources, Section


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
