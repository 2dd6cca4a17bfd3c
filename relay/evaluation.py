"""Evaluation: what it measures (pure functions on tensors and lists), what the trainer decides from it (early
stopping, the KL budget), and the evaluation itself — the held-out prompts sampled with a fixed seed, then scored
every way the run can score them.

`Evaluation.run` is the same in training (every `run.eval_every` iterations; the policy learner and the reference
actors score) and in `relay eval` (frozen checkpoints score): who scores what is handed in as `EvalScorers`.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import sacrebleu
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from relay import ppo
from relay.batch import RolloutBatch, pad_left, pad_right
from relay.config import RelayConfig
from relay.data import IGNORE_INDEX, load_sft_examples, tokenize_example
from relay.envs.render import TurnRenderer, tokenize_turns
from relay.prompts import Prompt
from relay.tasks import Example, task_of


def perplexity(logprobs: Tensor, mask: Tensor) -> float:
    """exp of the mean negative log-likelihood per token, over every token where mask is 1 (the whole text set's
    tokens pooled, as a language model's perplexity is reported, not a mean of per-text perplexities)."""
    tokens = mask.sum()
    if tokens == 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(-(ppo.masked_sum(logprobs.float(), mask) / tokens).item())


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: ppo.KLEstimator) -> float:
    """KL(policy || reference) per sequence, mean over sequences: `estimator`'s per-token estimate (the run's
    algorithm.kl_estimator) summed over each response — the number training logs as `policy/kl_ref`."""
    return ppo.masked_sum(ppo.kl_penalty(logprobs, ref_logprobs, estimator), mask, dim=1).mean().item()


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """The share of paired comparisons that `scores` wins against `baseline_scores`, a tie counting half
    (AlpacaEval's convention). Pairs are the same prompt and sample index, sampled with the same seed."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError(f"win rate needs paired scores: {len(scores)} against {len(baseline_scores)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))
    return wins / len(scores)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Sentence-level BLEU averaged over the samples, 0-100 (sacrebleu's sentence_bleu: 13a tokenisation, n-grams
    up to 4 but no longer than the sentence, exponential smoothing). Corpus BLEU is 0 whenever the answers are
    shorter than 4 words, as single-word answers are: no 4-gram can match."""
    if not hypotheses:
        raise ValueError("BLEU of no samples")
    return sum(sacrebleu.sentence_bleu(hypothesis, [reference]).score
               for hypothesis, reference in zip(hypotheses, references, strict=True)) / len(hypotheses)


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


# ---------------------------------------------------------------------------------------------------------------
# The evaluation of a policy

EVAL_SEED = 1_234_567  # the same sampling seed for every evaluation, so scores differ by the policy alone


@dataclass
class EvalScorers:
    """What an evaluation calls. Log-prob scorers take the temperature to score at (1 for a perplexity)."""

    generate: Callable[[list[Prompt], int, int], RolloutBatch]  # (prompts, samples per prompt, seed)
    scores: Callable[[RolloutBatch], torch.Tensor] | None = None  # eval/score: the task's score, or a reward function
    rewards: Callable[[RolloutBatch], torch.Tensor] | None = None  # the run's reward source, raw
    policy_logprobs: Callable[[RolloutBatch, float], torch.Tensor] | None = None
    reference_logprobs: Callable[[RolloutBatch, float], torch.Tensor] | None = None


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/<name>
    rewards: list[float] | None  # each sample's reward-source score: the baseline of later win rates
    batch: RolloutBatch  # the samples, for a report


class Evaluation:
    def __init__(self, config: RelayConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> None:
        self.config = config
        self.prompts = prompts
        self.texts = text_batch(config, tokenizer, prompts)

    def run(self, scorers: EvalScorers, baseline_rewards: list[float] | None = None) -> EvalResult:
        """eval/score (the task's score, else the reward source's), eval/reward, eval/win_rate against
        `baseline_rewards`, eval/kl_ref, eval/perplexity, eval/bleu and eval/chrf: each that the scorers and the
        data allow."""
        config = self.config
        batch = scorers.generate(self.prompts, config.data.eval_samples_per_prompt, EVAL_SEED)
        metrics: dict[str, float] = {}
        rewards = None
        if scorers.rewards is not None:
            rewards = scorers.rewards(batch).tolist()
            metrics["eval/reward"] = sum(rewards) / len(rewards)
            if baseline_rewards is not None:
                metrics["eval/win_rate"] = win_rate(rewards, baseline_rewards)
        if batch.step_rewards is not None:  # an environment's episodes: the score is their mean return
            returns = batch.step_rewards.sum(dim=1) + (torch.tensor(rewards) if rewards is not None else 0.0)
            metrics["eval/score"] = returns.mean().item()
        elif scorers.scores is not None:
            metrics["eval/score"] = scorers.scores(batch).mean().item()
        elif rewards is not None:
            metrics["eval/score"] = metrics["eval/reward"]
        if scorers.policy_logprobs is not None and scorers.reference_logprobs is not None:
            temperature = config.rollout.temperature  # as sampled: the KL that training's penalty measures
            metrics["eval/kl_ref"] = sequence_kl(scorers.policy_logprobs(batch, temperature),
                                                 scorers.reference_logprobs(batch, temperature),
                                                 batch.action_mask, config.algorithm.kl_estimator)
        if scorers.policy_logprobs is not None and self.texts is not None:
            metrics["eval/perplexity"] = perplexity(scorers.policy_logprobs(self.texts, 1.0),
                                                               self.texts.action_mask)
        answers = [row.get(config.eval.answer_key) for row in batch.metadata]
        if all(isinstance(answer, str) for answer in answers):
            metrics["eval/bleu"] = bleu(batch.responses, answers)
            metrics["eval/chrf"] = chrf(batch.responses, answers)
        return EvalResult(metrics=metrics, rewards=rewards, batch=batch)


def text_batch(config: RelayConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> RolloutBatch | None:
    """The perplexity's text set as a batch (each response's tokens and EOS are scored, given its prompt):
    eval.text_data, else warm_start.data, else the task's demonstrations of the held-out prompts; None when there
    is none. Rows longer than rollout.max_model_len are cut as relay.data.tokenize_example cuts them."""
    section, rows = config.eval, config.eval.text_rows
    source = section.text_data or (config.warm_start.data if config.warm_start is not None else None)
    if source is not None:
        chat_template = config.chat_template
        setting = "eval.text_data" if section.text_data else "warm_start.data"
        try:
            pairs = load_sft_examples(source, tokenizer, chat_template, limit=rows)
        except ValueError as error:
            raise ValueError(f"{setting}: {error}") from None
    else:
        task = task_of(config.data)
        if task is None:
            return None
        rng = random.Random(config.data.seed)
        pairs = [(prompt.text, task.demonstrate(Example(prompt.text, prompt.metadata), rng)) for prompt in prompts[:rows]]
    examples = [text_example(tokenizer, config, prompt, response) for prompt, response in pairs]
    query_ids, query_mask = pad_left([ids for ids, _, _ in examples], tokenizer.pad_token_id)
    response_ids, response_mask = pad_right([ids for _, ids, _ in examples], tokenizer.pad_token_id, torch.long)
    action_mask, _ = pad_right([mask for _, _, mask in examples], 0.0, torch.float32)
    return RolloutBatch(
        query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
        sampler_logprobs=torch.zeros(response_ids.shape), prompts=[prompt for prompt, _ in pairs],
        responses=[response if isinstance(response, str) else "".join(text for _, text in response)
                   for _, response in pairs],
        metadata=[{} for _ in pairs], policy_version=0, action_mask=action_mask,
    )


def text_example(tokenizer: PreTrainedTokenizerBase, config: RelayConfig, prompt: str,
                 response: str | list[tuple[str, str]]) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, response ids, the mask of the policy's tokens among them) of a text-set example: one response,
    or a multi-turn demonstration, whose environment turns the perplexity does not count."""
    if isinstance(response, str):
        prompt_ids, response_ids = tokenize_example(tokenizer, prompt, response, config.rollout.max_model_len)
        return prompt_ids, response_ids, [1.0] * len(response_ids)
    renderer = TurnRenderer(tokenizer, config.chat_template)
    ids, labels = tokenize_turns(renderer, prompt, response, config.rollout.max_model_len)
    start = len(renderer.prompt_ids(prompt))
    return ids[:start], ids[start:], [float(label != IGNORE_INDEX) for label in labels[start:]]
