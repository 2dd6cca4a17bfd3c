"""Learner: one rank of a DeepSpeed ZeRO trainer. The policy and the critic are two roles of it.

Surface, the same for both roles: `score(batch)` (old log-probs, or values, of this rank's shard; with LoRA the
policy also gives the reference's, `score_reference`, its adapters switched off), `train(batch)`
(PPO epochs, this rank on its share of each mini-batch), `weight_buckets()` (for the weight sync), `save(dir)` / `load(dir)`.
Every rank gets the whole batch by reference and takes its own contiguous shard, so the driver never splits
tensors. Under ZeRO-3 every collective must run on every rank: all methods here are called on all ranks at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

from actors.usage import Usage
from relay import ppo
from relay.batch import RolloutBatch, shard_bounds
from relay.config import RelayConfig
from relay.losses import Objective, policy_objective, value_objective
from relay.models import add_lora, load_tokenizer, response_logits, response_values, score_in_micro_batches
from relay.zero import (
    deepspeed_config,
    init_distributed,
    init_engine,
    load_for_training,
    lr_scheduler,
    save_pretrained,
    weight_buckets,
)

Role = Literal["policy", "critic"]


class NonFiniteLoss(RuntimeError):
    """More non-finite losses and gradients than run.max_nonfinite_steps allows."""


@dataclass(frozen=True)
class GatherSummary:
    buckets: int
    bytes: int
    seconds: float


@dataclass
class _Tally:
    """A train call's figures: each mini-batch's (the sum of its micro-batches' shares), added over its steps."""

    totals: dict[str, float] = field(default_factory=dict)
    nonfinite_losses: int = 0
    skipped_steps: int = 0

    def add(self, figures: dict[str, torch.Tensor], world_size: int) -> None:
        # A rank's shares add up to its part of the mini-batch's figure; times the world size, the driver's mean
        # over the ranks is the mini-batch's figure.
        for name, value in figures.items():
            self.totals[name] = self.totals.get(name, 0.0) + value.item() * world_size

    def means(self, role: Role, steps: int) -> dict[str, float]:
        """Each figure's mean over the optimizer steps (the mini-batches of every epoch), and the skip counts."""
        return {name: total / steps for name, total in self.totals.items()} | {
            f"losses/{role}_nonfinite": float(self.nonfinite_losses),
            f"losses/{role}_skipped_steps": float(self.skipped_steps)}


class Learner(Usage):
    def __init__(self, role: Role, config: RelayConfig, model_path: str, rank: int, world_size: int) -> None:
        self.role = role
        self.rank = rank
        self.world_size = world_size
        self.algorithm = config.algorithm
        self.temperature = config.rollout.temperature
        self.seed = config.run.seed
        self.section = config.policy if role == "policy" else config.critic
        self.max_nonfinite = config.run.max_nonfinite_steps
        self.nonfinite_count = 0  # micro-batches with a non-finite loss + optimizer steps with a non-finite gradient
        self.reuse_scoring_forward = config.algorithm.reuse_scoring_forward
        # The scoring pass's outputs with their graphs, by micro-batch, for the first epoch (reuse_scoring_forward).
        self._kept: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        init_distributed(timeout_s=config.run.call_timeout_s)
        torch.manual_seed(self.seed + rank)

        samples_per_rank = config.samples_per_iteration // world_size
        micro_batches_per_step = samples_per_rank // (self.algorithm.mini_batches * self.section.micro_batch_size)
        self.ds_config = deepspeed_config(
            zero_stage=self.section.zero_stage,
            offload=self.section.offload,
            dtype=self.section.dtype,
            micro_batch_size=self.section.micro_batch_size,
            gradient_accumulation_steps=micro_batches_per_step,
            world_size=world_size,
            max_grad_norm=self.section.max_grad_norm,
            persistence_threshold=self.section.zero3_persistence_threshold,
            scheduler=lr_scheduler(self.section, total_steps=config.run.iterations * self.algorithm.epochs
                                   * self.algorithm.mini_batches),
        )
        self.tokenizer = load_tokenizer(model_path, config.chat_template)  # the run's: every save writes it
        kind = "causal_lm" if role == "policy" else "critic"
        model = load_for_training(model_path, kind, self.ds_config, self.section.dtype, self.tokenizer.pad_token_id,
                                  dropout=self.section.dropout)
        if self.section.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.section.lora is not None:
            if self.section.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
            model = add_lora(model, self.section.lora, kind)
        self.engine = init_engine(model, self.ds_config, self.section.learning_rate, self.section.weight_decay)
        self.device = self.engine.device

    def _forward(self, batch: RolloutBatch, temperature: float | None = None) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.role == "policy":
            return response_logits(self.engine, batch, temperature or self.temperature)
        return response_values(self.engine, batch)

    def score(self, batch: RolloutBatch, temperature: float | None = None) -> torch.Tensor:
        """Policy: log-probs [b, Lr] of this rank's shard, at the sampler's temperature unless one is given (1 for
        a perplexity); critic: values [b, Lr]. An evaluation gives the temperature: its pass is never kept for
        training."""
        with self.busy("score"):
            if self.reuse_scoring_forward and temperature is None:
                return self._score_keeping_graph(batch)
            return self._score(batch, temperature)

    def _score_keeping_graph(self, batch: RolloutBatch) -> torch.Tensor:
        """The scoring pass as the first epoch's forward: in training mode (dropout is off, so it computes the same
        numbers), with gradients, each micro-batch's output kept for `train`."""
        self.engine.train()
        start, end = shard_bounds(len(batch), self.rank, self.world_size)
        kept, scores = [], []
        for rows in torch.arange(start, end).split(self.section.micro_batch_size):  # rows of the whole batch
            part = batch.select(rows).to(self.device)
            output = self._forward(part)
            kept.append((rows, output))
            detached = output.detach()
            scores.append((ppo.token_logprobs(detached, part.response_ids) if self.role == "policy" else detached).cpu())
        self._kept = (batch.response_ids[start:end], kept)
        return torch.cat(scores)

    def _score(self, batch: RolloutBatch, temperature: float | None = None) -> torch.Tensor:
        self.engine.eval()
        shard, real_rows = batch.padded_shard(self.rank, self.world_size)  # every rank the same forwards (ZeRO-3)

        def score_micro_batch(micro: RolloutBatch) -> torch.Tensor:
            output = self._forward(micro, temperature)
            if self.role == "policy":
                output = ppo.token_logprobs(output, micro.response_ids.to(self.device))
            return output.cpu()

        return score_in_micro_batches(shard, self.section.micro_batch_size, score_micro_batch)[:real_rows]

    def score_reference(self, batch: RolloutBatch, temperature: float | None = None) -> torch.Tensor:
        """A LoRA policy's reference log-probs [b, Lr] of this rank's shard: its base model, adapters switched off,
        so the reference needs no copy of its own."""
        with self.busy("score_reference"), self.engine.module.disable_adapter():
            return self._score(batch, temperature)

    def train(self, batch: RolloutBatch, iteration: int) -> dict[str, float]:
        """`algorithm.epochs` passes over the batch, each in `mini_batches` shuffled mini-batches with one optimizer
        step apiece, this rank training on its share of each (gradients accumulated over its micro-batches);
        returns mean statistics."""
        with self.busy("train"):
            return self._train(batch, iteration)

    def _train(self, batch: RolloutBatch, iteration: int) -> dict[str, float]:
        self.engine.train()
        kept, self._kept = self._kept, None
        start, end = shard_bounds(len(batch), self.rank, self.world_size)
        if kept is not None and not torch.equal(kept[0], batch.response_ids[start:end]):
            kept = None  # scored another batch: forward again
        # One shuffle of the whole batch, the same on every rank, so the mini-batches (and the steps) do not
        # depend on how many ranks share them: each rank takes its contiguous share of each mini-batch.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + iteration * 101)
        mini_batch_rows = len(batch) // self.algorithm.mini_batches  # the config checks that all divide evenly
        tally = _Tally()
        for epoch in range(self.algorithm.epochs):
            order = torch.randperm(len(batch), generator=generator).split(mini_batch_rows)
            # The scoring pass's micro-batches and outputs (the whole batch, as the one mini-batch).
            reused = kept[1] if kept is not None and epoch == 0 else None
            mini_batches = ([[rows for rows, _ in reused]] if reused
                            else [self._share(mini_batch).split(self.section.micro_batch_size) for mini_batch in order])
            for micro_batches, counts in zip(mini_batches, self._count(batch, mini_batches), strict=True):
                outputs = [output for _, output in reused] if reused else [None] * len(micro_batches)
                self._step(batch, micro_batches, outputs, counts, tally)
        return tally.means(self.role, steps=self.algorithm.epochs * len(mini_batches)) | {
            f"{self.role}/lr": self.engine.get_lr()[0]}

    def _share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a mini-batch's `rows`."""
        return rows[slice(*shard_bounds(len(rows), self.rank, self.world_size))]

    def _count(self, batch: RolloutBatch, mini_batches: list[list[torch.Tensor]]) -> list[ppo.LossCounts]:
        """Each mini-batch's real tokens and sequences over all ranks (one all-reduce for the epoch's mini-batches):
        what every loss of its micro-batches is divided by (relay.losses)."""
        local = torch.tensor([[float(batch.action_mask[torch.cat(rows)].sum()), float(sum(map(len, rows)))]
                              for rows in mini_batches], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(local)
        return [ppo.LossCounts(tokens=tokens, sequences=sequences) for tokens, sequences in local.tolist()]

    def _step(self, batch: RolloutBatch, micro_batches: list[torch.Tensor], outputs: list[torch.Tensor | None],
              counts: ppo.LossCounts, tally: _Tally) -> None:
        """One optimizer step on one mini-batch, its gradient accumulated over `micro_batches` (rows of `batch`)."""
        for position, (rows, output) in enumerate(zip(micro_batches, outputs, strict=True)):
            objective, output = self._loss(batch.select(rows).to(self.device), counts, output)
            loss = objective.loss
            if not torch.isfinite(loss):
                # Nothing trains on a non-finite loss: this micro-batch's gradient is exactly zero (through
                # the finite model output, so every rank and ZeRO stage keeps its step), and it is counted.
                tally.nonfinite_losses += 1
                self._count_nonfinite("a non-finite loss")
                loss = (output * 0.0).sum()
            else:
                tally.add(objective.figures, self.world_size)
            # The loss is this micro-batch's share of the mini-batch's: DeepSpeed's division by the accumulation
            # steps is switched off and its average over the ranks undone, so the shares' gradients add up.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            # DeepSpeed counts micro-steps itself and updates at its accumulation boundary: that must be
            # this mini-batch's last micro-batch, or gradients would leak into the next step (or iteration).
            boundary = position == len(micro_batches) - 1
            if self.engine.is_gradient_accumulation_boundary() != boundary:
                raise RuntimeError(
                    f"{self.role} learner: DeepSpeed's accumulation boundary is out of step with mini-batch "
                    f"of {len(micro_batches)} micro-batches at micro-batch {position}"
                )
            self.engine.step()
            if boundary and not self.engine.was_step_applied():
                # A finite loss can still give a non-finite gradient. ZeRO computes the global gradient norm
                # (over all ranks) before it steps and drops the step and its gradients when the norm is
                # not finite, on every rank alike: the weights and optimizer state stay as they were.
                tally.skipped_steps += 1
                self._count_nonfinite("a non-finite gradient")

    def _count_nonfinite(self, what: str) -> None:
        self.nonfinite_count += 1
        if self.nonfinite_count > self.max_nonfinite:
            raise NonFiniteLoss(f"{self.role} learner rank {self.rank}: {what} makes {self.nonfinite_count} "
                                f"non-finite losses or gradients, more than run.max_nonfinite_steps="
                                f"{self.max_nonfinite}")

    def _loss(self, part: RolloutBatch, counts: ppo.LossCounts, output: torch.Tensor | None = None
              ) -> tuple[Objective, torch.Tensor]:
        """(the objective on `part`, a micro-batch of the mini-batch of `counts`; the model output it came from:
        `output` when given, else a forward pass)."""
        output = self._forward(part) if output is None else output
        if self.role == "policy":
            return policy_objective(output, part, self.algorithm, counts), output
        return value_objective(output, part, self.algorithm, counts), output

    def usage(self) -> dict[str, float]:
        """Usage's figures, and the parameter elements this rank holds (under ZeRO-3 its partition only)."""
        held = sum(getattr(p, "ds_tensor", p).numel() for p in self.engine.module.parameters())
        return super().usage() | {"local_parameters": float(held)}

    def weight_buckets(self, bucket_mb: float) -> Iterator[dict[str, torch.Tensor] | GatherSummary]:
        """Called as a Ray streaming generator, on all ranks together: rank 0 yields the whole model in buckets
        (see relay.zero.weight_buckets), then every rank yields its `GatherSummary`."""
        started = time.perf_counter()
        buckets = size = 0
        for bucket in weight_buckets(self.engine.module, self.section.zero_stage, self.rank,
                                      int(bucket_mb * 2**20)):
            buckets += 1
            size += sum(tensor.numel() * tensor.element_size() for tensor in bucket.values())
            yield bucket
        seconds = time.perf_counter() - started
        self.add_busy("gather", seconds)
        yield GatherSummary(buckets, size, seconds)

    def save(self, checkpoint_dir: str) -> None:
        """Hugging Face weights (rank 0) under `<dir>/<role>` and DeepSpeed states under `<dir>/deepspeed/<role>`."""
        directory = Path(checkpoint_dir)
        save_pretrained(self.engine.module, self.tokenizer, self.section.zero_stage, self.rank, directory / self.role)
        self.engine.save_checkpoint(str(directory / "deepspeed" / self.role), tag="state")

    def load(self, checkpoint_dir: str) -> None:
        load_path, _ = self.engine.load_checkpoint(str(Path(checkpoint_dir) / "deepspeed" / self.role), tag="state")
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed state for {self.role} under {checkpoint_dir}/deepspeed")

