"""Load the models of a run from a Hub name or a local path, and build the tiny model the demo and tests use.

Model kinds, all plain transformers classes so every checkpoint is Hugging Face format:
- policy and reference: `AutoModelForCausalLM`;
- critic: `AutoModelForTokenClassification` with one label, a value per token. Its head is named `score`, like
  the reward model's, so a critic initialised from a reward model starts from the reward head;
- reward model: `AutoModelForSequenceClassification` with one label (the score of the last real token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from relay.batch import RolloutBatch
from relay.config import Dtype, LoraSection, RelayConfig, TinyModelSection

ModelKind = Literal["causal_lm", "critic", "reward"]
# For the processes that load and save models (learners, scorers, Ray Train workers): transformers' bars for every
# load and save ("Loading weights", "Writing model shards") are read once at import, hence an environment variable.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: Dtype) -> torch.dtype:
    return TORCH_DTYPES[dtype]


def load_tokenizer(path: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of the model at `path` (a directory or a Hub name) under the run's policy, decided here once
    for every model a run loads and saved with every checkpoint it writes (so `relay serve`, `relay label` and
    `relay eval` render chats as training did): `chat_template` (the run's, RelayConfig.chat_template) replaces
    the tokenizer's own when given; pad is EOS where the tokenizer has no pad token (Llama-3 style)."""
    return apply_run_policy(AutoTokenizer.from_pretrained(path), chat_template, path)


def apply_run_policy(tokenizer: PreTrainedTokenizerFast, chat_template: str | None,
                     name: str) -> PreTrainedTokenizerFast:
    """`tokenizer` with the run's chat template and EOS/pad policy (see load_tokenizer); `name` is the model, for
    the error."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name}: the tokenizer has no EOS token, so no response could end; give it one "
                         "(tokenizer_config.json eos_token) before training on it")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        # Padding never reaches a loss (masks cover it), and every score is read at the last position the attention
        # mask marks, never by looking for the pad id: reusing EOS is safe, and what TRL and OpenRLHF do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(policy_tokenizer: PreTrainedTokenizerBase, other_tokenizer: PreTrainedTokenizerBase,
                         policy_name: str, other_name: str) -> None:
    """A model that scores the policy's samples (reward model, critic, reference) reads the policy's token ids:
    its tokenizer must map text to the same ids, the same vocabulary and the same BOS and EOS. ValueError in one
    line naming both models otherwise."""
    policy_vocab, other_vocab = policy_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    problems = []
    if policy_vocab != other_vocab:
        differing = sorted(token for token in policy_vocab.keys() | other_vocab.keys()
                           if policy_vocab.get(token) != other_vocab.get(token))
        problems.append(f"{len(differing)} tokens differ in id or presence (e.g. {differing[:3]}; vocabularies of "
                        f"{len(policy_vocab)} and {len(other_vocab)})")
    for special in ("BOS", "EOS"):
        attribute = f"{special.lower()}_token_id"
        policy_id, other_id = getattr(policy_tokenizer, attribute), getattr(other_tokenizer, attribute)
        if policy_id != other_id:
            problems.append(f"{special} id {policy_id} against {other_id}")
    if problems:
        raise ValueError(f"{other_name} does not read the token ids of {policy_name}: {'; '.join(problems)}; "
                         f"use a model with the policy's tokenizer (trained from the same base model)")


def check_scoring_tokenizers(config: RelayConfig, policy_tokenizer: PreTrainedTokenizerBase) -> None:
    """Before Ray starts: the models the config names to score the policy's samples (reward.model, critic.model,
    reference.model) share its token ids (check_same_tokenizer). A reward model trained in the run starts from
    the policy's own base model, and a function or remote reward reads text: neither is checked."""
    policy_name = f"policy.model {config.policy.model}" if config.policy.model else "the tiny policy"
    scorers = {"reference.model": config.reference.model}
    if config.algorithm.uses_critic:
        scorers["critic.model"] = config.critic.model
    if config.reward.type == "model" and config.reward_model_training is None:
        scorers["reward.model"] = config.reward.model
    for field, model in scorers.items():
        if model is None:
            continue
        name, local = f"{field} {model}", Path(model).expanduser()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else model)
        except (OSError, ValueError) as error:
            raise ValueError(f"{name}: no tokenizer can be loaded from it ({error})") from None
        check_same_tokenizer(policy_tokenizer, tokenizer, policy_name, name)


def load_model(path: str, kind: ModelKind, dtype: Dtype, pad_token_id: int | None = None) -> PreTrainedModel:
    dtype_ = torch_dtype(dtype)
    if kind == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype_)
    model_class = AutoModelForTokenClassification if kind == "critic" else AutoModelForSequenceClassification
    # Starting a critic or reward model from a causal LM drops its lm_head and adds a fresh score head, as meant;
    # transformers reports that as a warning table in every rank's log.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(path, num_labels=1, dtype=dtype_)
    finally:
        hf_logging.set_verbosity(verbosity)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


PEFT_PREFIX = "base_model.model."


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's full state dict -> the plain model's, each adapted weight merged: W + scaling · B @ A.

    PEFT names the frozen weight `….base_layer.weight` beside `….lora_A.default.weight` [r, in] and
    `….lora_B.default.weight` [out, r], and a trained head `….modules_to_save.default.…` beside its frozen
    `….original_module.…`; the result has the names the model has without PEFT, so transformers and vLLM load it.
    """
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        name = name.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            module, kind = name.split(".base_layer.")
            if kind == "weight":
                down = state[f"{PEFT_PREFIX}{module}.lora_A.default.weight"].float()
                up = state[f"{PEFT_PREFIX}{module}.lora_B.default.weight"].float()
                tensor = (tensor.float() + scaling * up @ down).to(tensor.dtype)
            name = f"{module}.{kind}"
        merged[name.replace(".modules_to_save.default.", ".")] = tensor
    return merged


def add_lora(model: PreTrainedModel, section: LoraSection, kind: ModelKind) -> PreTrainedModel:
    """`model` with PEFT LoRA adapters on `section.target_modules`, everything else frozen (but a critic's or
    reward model's score head, which is new and trained whole)."""
    from peft import LoraConfig, get_peft_model

    task_type = "CAUSAL_LM" if kind == "causal_lm" else "TOKEN_CLS" if kind == "critic" else "SEQ_CLS"
    config = LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                        target_modules=section.target_modules, task_type=task_type)
    return get_peft_model(model, config)


def lora_scaling(section: LoraSection) -> float:
    return section.alpha / section.rank


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of `model` off: nn.Dropout layers and the probabilities attention layers keep as attributes.
    PPO compares log-probs and values of train-mode passes with eval-mode ones (ratios, value clipping): dropout
    would make them differ by noise, and its random draws would make a resumed run differ from an uninterrupted one."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def build_tokenizer(alphabet: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `alphabet`, with BOS prepended, that transformers and vLLM both load; with
    the run's `chat_template`, if any."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(set(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return apply_run_policy(tokenizer, chat_template, "the tiny model")


def build_tiny_model(section: TinyModelSection, alphabet: str, path: Path, seed: int) -> Path:
    """Save a random-init Llama and its character tokenizer to `path` (written whole, then renamed)."""
    tokenizer = build_tokenizer(alphabet)
    return save_random_model(tiny_model_config(section, tokenizer), tokenizer, path, seed)


def tiny_model_config(section: TinyModelSection, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The Llama that `section` describes, over `tokenizer`'s vocabulary and special tokens."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_layers,
        num_attention_heads=section.num_heads,
        num_key_value_heads=section.num_heads,
        max_position_embeddings=section.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def save_random_model(config: LlamaConfig, tokenizer: PreTrainedTokenizerBase, path: Path, seed: int) -> Path:
    """A random-init Llama of `config` (seeded) and `tokenizer`, saved to `path` whole (then renamed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    partial = path.with_name(path.name + ".partial")
    hf_logging.disable_progress_bar()  # a bar for a one-shard save
    try:
        model.save_pretrained(partial)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    partial.rename(path)
    return path


def response_logits(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """Logits [B, Lr, V] that predicted each response token, scaled as the sampler scaled them."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    query_length = batch.query_ids.shape[1]
    return output.logits[:, query_length - 1 : -1].float() / temperature


def response_values(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """The critic's value [B, Lr] of the state before each response token."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    query_length = batch.query_ids.shape[1]
    return output.logits[:, query_length - 1 : -1, 0].float()


def last_token_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A sequence-classification model's score [B] of each row, read at its last real token: the rightmost position
    where attention_mask is 1. (transformers reads it at the rightmost token that is not pad_token_id, which skips
    the final EOS whenever the pad token is the EOS token, as with Llama-3-style tokenizers.)"""
    model = getattr(model, "module", model)  # a DeepSpeed engine's model
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state  # [B, L, H]
    last = attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).float().argmax(dim=1)  # [B]
    return model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0].float()


def sequence_scores(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """A reward model's score [B] of each whole sequence (prompt and response), read at its last real token."""
    return last_token_scores(model, batch.input_ids, batch.attention_mask, batch.position_ids)


@torch.no_grad()
def score_in_micro_batches(
    batch: RolloutBatch, micro_batch_size: int, score: Callable[[RolloutBatch], torch.Tensor]
) -> torch.Tensor:
    """Apply `score` to slices of at most `micro_batch_size` rows and concatenate the results in order."""
    parts = [score(batch.select(slice(start, start + micro_batch_size))) for start in range(0, len(batch), micro_batch_size)]
    return torch.cat(parts, dim=0)
