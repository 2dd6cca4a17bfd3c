"""DeepSpeed ZeRO set-up shared by every trainer in relay: the PPO learners, the SFT warm start, the reward model.

One config builder, one engine factory, one way to get full weights out of a (possibly partitioned) model, so the
three jobs cannot drift apart.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch

# Without a GPU, DeepSpeed warns "Setting accelerator to CPU" in every process that imports it; naming the
# accelerator it would pick anyway keeps that line out of the log.
if torch.cuda.device_count() == 0:  # NVML, so no CUDA context before a fork
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from relay.config import Dtype, TrainerSection
from relay.models import ModelKind, disable_dropout, load_model, merge_lora_state
from relay.storage import publish_directory


def deepspeed_config(
    *,
    zero_stage: int,
    offload: bool,
    dtype: Dtype,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    persistence_threshold: int = 100_000,
    scheduler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        **({"scheduler": scheduler} if scheduler else {}),
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_scheduler(section: TrainerSection, total_steps: int) -> dict[str, Any] | None:
    """DeepSpeed's scheduler for `section.lr_schedule` after `section.lr_warmup_steps` of linear warm-up (None:
    a constant rate). DeepSpeed steps it with the optimizer and keeps it in its checkpoints."""
    warmup, peak = section.lr_warmup_steps, section.learning_rate
    if section.lr_schedule == "constant":
        if not warmup:
            return None
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": peak, "warmup_num_steps": warmup, "warmup_type": "linear"}
        return {"type": "WarmupLR", "params": params}
    if section.lr_schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": peak,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear",
                                                    "total_num_steps": max(total_steps, warmup + 1)}}
    return {"type": "WarmupCosineLR", "params": {"total_num_steps": max(total_steps, warmup + 1),
                                                 "warmup_num_steps": max(1, warmup), "warmup_min_ratio": 0.0,
                                                 "cos_min_ratio": 0.0, "warmup_type": "linear"}}


def init_distributed(timeout_s: float = 1800) -> None:
    """Join the process group described by MASTER_ADDR/PORT, RANK, WORLD_SIZE (set by ActorGroup or Ray Train).
    A collective that waits longer than `timeout_s` on a rank (a dead or stuck peer) raises instead of hanging."""
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles its shared-memory op (used only by inference_all_reduce, never in
        # training) in every new process, behind a lock file in ~/.cache/torch_extensions: a learner killed
        # mid-build leaves that lock behind and every later learner waits on it forever (seen: CI hung for an
        # hour). DeepSpeed keeps this dict in its module so that edits persist; the all-reduces stay on gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def load_for_training(
    path: str, kind: ModelKind, ds_config: dict[str, Any], dtype: Dtype, pad_token_id: int | None = None,
    dropout: bool = False,
) -> PreTrainedModel:
    """Load weights; under ZeRO-3 they are partitioned as they load, so no rank ever holds the whole model.
    Dropout is switched off unless `dropout` (see relay.models.disable_dropout)."""
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers' from_pretrained enters deepspeed.zero.Init while this object is alive.
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841
        model = load_model(path, kind, dtype, pad_token_id)
    else:
        model = load_model(path, kind, dtype, pad_token_id)
    if not dropout:
        disable_dropout(model)
    return model


def init_engine(
    model: PreTrainedModel, ds_config: dict[str, Any], learning_rate: float, weight_decay: float
) -> deepspeed.DeepSpeedEngine:
    # torch's AdamW needs no JIT build, unlike DeepSpeed's fused/CPU Adam (1.5-2 min on a CPU machine).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=weight_decay
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def sync_unit(parameter_name: str) -> str:
    """The unit a weight sync must not split: a decoder block (`….layers.<i>`), whose projections inference
    engines fuse (vLLM's qkv_proj, gate_up_proj, and reloads a fused layer only whole); otherwise the parameter's own
    module, a LoRA model's adapters with their base weight."""
    block = re.match(r"(.*?\.layers\.\d+)\.", parameter_name)
    if block:
        return block.group(1)
    module = parameter_name.rpartition(".")[0]
    return re.sub(r"\.(base_layer|original_module|modules_to_save\.\w+|lora_[AB]\.\w+)$", "", module)


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy; from a GPU through pinned memory (a pageable copy runs at a fraction of the link's speed), to be
    synchronised by the caller. torch's host allocator caches the pinned blocks for the next sync."""
    if not tensor.is_cuda:
        return tensor.detach().to("cpu", copy=True)
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor.detach(), non_blocking=True)


def weight_buckets(model: torch.nn.Module, zero_stage: int, rank: int, bucket_bytes: int,
                   merge_lora: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """The whole model's weights as CPU buckets of about `bucket_bytes` (more when one sync unit is larger), on
    rank 0 only; the other ranks yield nothing but, under ZeRO-3, must iterate in step (they gather with rank 0,
    one collective per unit). A bucket never splits a `sync_unit`, so an engine can load bucket by bucket. Buffers
    that the state dict holds come in the last bucket. A LoRA model's adapters come merged into its weights, under
    the names of the model without them (unless `merge_lora` is false: then PEFT's own names, adapters apart)."""
    lora = lora_config(model)
    units: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, parameter in model.named_parameters():
        units.setdefault(sync_unit(name), []).append((name, parameter))
    bucket: dict[str, torch.Tensor] = {}
    size = 0

    def finished(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return merge_lora_state(state, lora.lora_alpha / lora.r) if lora is not None and merge_lora else state

    for members in units.values():
        parameters = [parameter for _, parameter in members]
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None, enabled=zero_stage == 3):
            if rank == 0:  # only rank 0 keeps the weights: the others copy nothing
                unit = {name: cpu_copy(parameter) for name, parameter in members}
                if torch.cuda.is_available():
                    torch.cuda.current_stream().synchronize()  # the asynchronous copies have landed
        if rank != 0:
            continue
        unit_bytes = sum(tensor.numel() * tensor.element_size() for tensor in unit.values())
        if bucket and size + unit_bytes > bucket_bytes:
            yield finished(bucket)
            bucket, size = {}, 0
        bucket |= unit
        size += unit_bytes
    if rank != 0:
        return
    state_names = set(model.state_dict())
    bucket |= {name: cpu_copy(buffer) for name, buffer in model.named_buffers() if name in state_names}
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()
    if bucket:
        yield finished(bucket)


def full_state_dict(model: torch.nn.Module, zero_stage: int, rank: int,
                    merge_lora: bool = True) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); all ranks must call it together under ZeRO-3.
    LoRA as in `weight_buckets`."""
    state: dict[str, torch.Tensor] = {}
    for bucket in weight_buckets(model, zero_stage, rank, bucket_bytes=2**62, merge_lora=merge_lora):
        state |= bucket
    return state if rank == 0 else None


def lora_config(model: torch.nn.Module) -> Any:
    """The PEFT LoRA config of a model with adapters, else None."""
    peft_config = getattr(model, "peft_config", None)
    return peft_config["default"] if peft_config else None


def save_pretrained(model: PreTrainedModel, tokenizer: Any, zero_stage: int, rank: int, path: Path) -> None:
    """Hugging Face format, whole, written by rank 0 into `path.partial` and renamed when complete. A LoRA model is
    saved merged (a plain model, for transformers and vLLM), and its adapter beside it in PEFT's format under
    `<path>_adapter` (for PEFT, or vLLM's LoRA requests)."""
    raw = full_state_dict(model, zero_stage, rank, merge_lora=False)
    if rank != 0:
        return
    assert raw is not None
    lora = lora_config(model)
    if lora is not None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter_dir = path.with_name(path.name + "_adapter")
        adapter_partial = adapter_dir.with_name(adapter_dir.name + ".partial")
        adapter_partial.mkdir(parents=True, exist_ok=True)
        adapter = get_peft_model_state_dict(model, state_dict=raw)
        save_file({name: tensor.contiguous() for name, tensor in adapter.items()},
                  str(adapter_partial / "adapter_model.safetensors"))
        lora.save_pretrained(str(adapter_partial))
        publish_directory(adapter_partial, adapter_dir)
    state = merge_lora_state(raw, lora.lora_alpha / lora.r) if lora is not None else raw
    partial = path.with_name(path.name + ".partial")
    plain = model.get_base_model() if lora is not None else model  # saved merged, as a plain model
    plain.save_pretrained(partial, state_dict=state)
    tokenizer.save_pretrained(partial)
    publish_directory(partial, path)
