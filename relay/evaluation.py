"""What an evaluation measures, and what the trainer decides from it: pure functions on tensors and lists.

Used in training every `run.eval_every` iterations and by `relay eval`; the orchestration (which actor scores what)
is in jobs/evaluate.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import sacrebleu
from torch import Tensor

from relay import ppo


def perplexity(logprobs: Tensor, mask: Tensor) -> float:
    """exp of the mean negative log-likelihood per token, over every token where mask is 1 (the whole text set's
    tokens pooled, as a language model's perplexity is reported, not a mean of per-text perplexities)."""
    tokens = mask.sum()
    if tokens == 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(-(ppo.masked_sum(logprobs.float(), mask) / tokens).item())


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> float:
    """KL(policy || reference) per sequence, mean over sequences: the per-token log-ratio (k1, unbiased on samples
    drawn from the policy) summed over each response — the same number as training's `policy/kl_ref`."""
    return ppo.masked_sum(ppo.kl_penalty(logprobs, ref_logprobs, "k1"), mask, dim=1).mean().item()


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """The share of paired comparisons that `scores` wins against `baseline_scores`, a tie counting half
    (AlpacaEval's convention). Pairs are the same prompt and sample index, sampled with the same seed."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError(f"win rate needs paired scores: {len(scores)} against {len(baseline_scores)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))
    return wins / len(scores)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, 4-grams, exponential smoothing off), 0-100."""
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, β = 2; sacrebleu's defaults), 0-100: meaningful on short answers, where
    BLEU's word 4-grams find nothing to match."""
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score


@dataclass
class EarlyStopping:
    """Tracks the best value of one evaluation metric and counts the evaluations since it last improved by more
    than `min_delta`. Its state goes into the checkpoint, so a resumed run decides as the uninterrupted one."""

    mode: Literal["max", "min"]
    min_delta: float = 0.0
    patience: int | None = None  # evaluations without improvement that end the run; None: never
    best: float | None = None
    best_iteration: int | None = None
    evaluations_since_best: int = 0

    def update(self, iteration: int, value: float) -> bool:
        """Record an evaluation; True when it is the new best."""
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            improved = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if improved:
            self.best, self.best_iteration, self.evaluations_since_best = value, iteration, 0
        else:
            self.evaluations_since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evaluations_since_best >= self.patience

    def state_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key in ("best", "best_iteration",
                                                                           "evaluations_since_best")}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_iteration = state["best"], state["best_iteration"]
        self.evaluations_since_best = state["evaluations_since_best"]


def over_kl_budget(kl: float, budget: float | None) -> bool:
    """The policy drifted past the KL budget (a non-finite KL is past any budget)."""
    return budget is not None and not kl <= budget
