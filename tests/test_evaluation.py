"""Tier 1: the evaluation metrics and the trainer's decisions from them, against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from relay.evaluation import EarlyStopping, bleu, chrf, over_kl_budget, perplexity, sequence_kl, win_rate


def test_perplexity_of_a_known_distribution_pools_tokens_and_ignores_padding():
    # A uniform choice among 4 tokens: perplexity 4.
    assert perplexity(torch.full((3, 5), math.log(1 / 4)), torch.ones(3, 5)) == pytest.approx(4.0)
    # Probabilities 1/2 and 1/8: mean negative log-likelihood (ln 2 + ln 8) / 2 = 2 ln 2, so perplexity 4 again —
    # and padding (-inf here) is not a token.
    logprobs = torch.tensor([[math.log(1 / 2), -math.inf], [math.log(1 / 8), -math.inf]])
    assert perplexity(logprobs, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(logprobs, torch.zeros(2, 2))


def test_bleu_and_chrf_of_known_pairs():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # Matches of 1- to 4-grams: 5/6, 3/5, 2/4, 1/3, the same length (no brevity penalty): their geometric mean.
    assert bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(
        100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # Sentence-level and averaged: one-word answers are scored (corpus BLEU would be 0: no 4-gram to match).
    assert bleu(["51413", "12345"], ["51413", "54321"]) == pytest.approx(50.0)
    # chrF of "ab" against "ac": characters P = R = 1/2, bigrams P = R = 0; averaged 1/4, so F2 = 1/4.
    assert chrf(["ab"], ["ac"]) == pytest.approx(25.0)
    assert chrf(["51413"], ["51413"]) == pytest.approx(100.0)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_sequence_kl_sums_tokens_of_each_response_and_means_over_responses():
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, float("nan")]])
    reference = torch.tensor([[-2.0, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert sequence_kl(logprobs, reference, mask, "k1") == pytest.approx((1.0 + -1.0) / 2)
    # k3 = exp(-r) - 1 + r of the log-ratios r = 1, 0 and -1: (e^-1 + e - 2) / 2, the same estimator as training's.
    assert sequence_kl(logprobs, reference, mask, "k3") == pytest.approx((math.exp(-1) + math.e - 2) / 2)


def test_early_stopping_on_a_scripted_sequence():
    stopping = EarlyStopping(mode="max", min_delta=0.01, patience=2)
    decisions = []
    for iteration, value in zip(range(10, 70, 10), [0.2, 0.5, 0.505, 0.55, 0.54, 0.53]):
        decisions.append((stopping.update(iteration, value), stopping.should_stop))
    # 0.505 is not better than 0.5 by more than min_delta; 0.55 is, and resets the count; two worse ones end it.
    assert decisions == [(True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (stopping.best, stopping.best_iteration) == (0.55, 40)

    resumed = EarlyStopping(mode="max", min_delta=0.01, patience=2)
    resumed.load_state_dict(stopping.state_dict())
    assert resumed == stopping

    lower_is_better = EarlyStopping(mode="min")  # e.g. perplexity; without patience it only tracks the best
    for iteration, value in enumerate([3.0, 2.0, float("nan"), 2.5, 1.9]):
        lower_is_better.update(iteration, value)
    assert (lower_is_better.best, lower_is_better.best_iteration, lower_is_better.should_stop) == (1.9, 4, False)


def test_kl_budget():
    assert not over_kl_budget(5.0, None)
    assert not over_kl_budget(0.5, 0.5) and over_kl_budget(0.51, 0.5)
    assert over_kl_budget(float("nan"), 0.5)


def test_an_evaluation_reports_every_metric_its_scorers_and_data_allow(tmp_path):
    from relay.batch import RolloutBatch, pad_left, pad_right
    from relay.evaluation import EvalScorers, Evaluation
    from relay.models import build_tokenizer
    from relay.prompts import data_alphabet, load_prompt_data
    from tests.conftest import tiny_run_config

    config = tiny_run_config(tmp_path, "data.eval_prompts=3", "data.eval_samples_per_prompt=2")
    tokenizer = build_tokenizer(data_alphabet(config))
    prompts = load_prompt_data(config, tokenizer).eval
    evaluation = Evaluation(config, tokenizer, prompts)
    # The perplexity's texts: the task's demonstrations of the held-out prompts (a reversal or a copy), with EOS.
    assert evaluation.texts is not None and evaluation.texts.prompts == [prompt.text for prompt in prompts]
    assert evaluation.texts.response_mask.sum(dim=1).tolist() == [len(p.text) for p in prompts]  # digits + EOS

    def generate(chosen, samples, seed):  # every sample answers right (the reversal)
        rows = [prompt for prompt in chosen for _ in range(samples)]
        answers = [prompt.metadata["answer"] for prompt in rows]
        query_ids, query_mask = pad_left([prompt.ids for prompt in rows], tokenizer.pad_token_id)
        response_ids, response_mask = pad_right([tokenizer(a, add_special_tokens=False).input_ids for a in answers],
                                                tokenizer.pad_token_id, torch.long)
        return RolloutBatch(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                            response_mask=response_mask, sampler_logprobs=torch.zeros(response_ids.shape),
                            prompts=[p.text for p in rows], responses=answers, metadata=[p.metadata for p in rows],
                            policy_version=0)

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.9])
    scorers = EvalScorers(
        generate=generate,
        scores=lambda batch: torch.full((len(batch),), 0.75),
        rewards=lambda batch: rewards,
        policy_logprobs=lambda batch, temperature: torch.full(batch.response_ids.shape, math.log(1 / 4)),
        reference_logprobs=lambda batch, temperature: torch.full(batch.response_ids.shape, math.log(1 / 4) - 0.5),
    )
    result = evaluation.run(scorers, baseline_rewards=[0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    batch = result.batch
    assert result.rewards == rewards.tolist()
    assert result.metrics == pytest.approx({
        "eval/score": 0.75,
        "eval/reward": rewards.mean().item(),
        "eval/win_rate": (1 + 0 + 0.5 + 0.5 + 0 + 1) / 6,
        "eval/kl_ref": 0.5 * batch.response_mask.sum(dim=1).mean().item(),  # 0.5 per token, summed per answer
        "eval/perplexity": 4.0,
        "eval/bleu": 100.0,  # sentence-level: every one-word answer is right
        "eval/chrf": 100.0,
    })

    # eval/kl_ref is the run's own estimator's, as policy/kl_ref is: k3 of the log-ratio 0.5 on each token.
    k3_config = tiny_run_config(tmp_path, "data.eval_prompts=3", "data.eval_samples_per_prompt=2",
                                "algorithm.kl_estimator=k3")
    k3 = Evaluation(k3_config, tokenizer, prompts).run(scorers).metrics["eval/kl_ref"]
    assert k3 == pytest.approx((math.exp(-0.5) - 1 + 0.5) * batch.response_mask.sum(dim=1).mean().item())

    # Without the roles (the base model, before any is placed): only what the driver scores itself.
    assert evaluation.run(EvalScorers(generate=generate, scores=scorers.scores)).metrics.keys() == {
        "eval/score", "eval/bleu", "eval/chrf"}


def test_relay_eval_command_line_and_its_errors_before_ray(tmp_path, monkeypatch, capsys, tiny_model, bpe_model):
    import jobs.evaluate
    from relay.cli import main as relay_main
    from tests.conftest import DEMO_CONFIG

    calls = []
    monkeypatch.setattr(jobs.evaluate, "evaluate", lambda *args: calls.append(args) or {})
    relay_main(["eval", "--config", "c.yaml", "runs/a", "runs/b", "data.eval_prompts=8", "--against", "base",
                "eval.text_rows=4"])
    assert calls == [(Path("c.yaml"), ["runs/a", "runs/b"], "base", Path("runs/eval/eval.json"),
                      ["data.eval_prompts=8", "eval.text_rows=4"])]
    # `relay serve` passes its whole command line to jobs/serve.py's parser, --follow included.
    import jobs.serve

    served = []
    monkeypatch.setattr(jobs.serve, "main", served.append)
    relay_main(["serve", "runs/a", "--follow", "--port", "9000"])
    assert served == [["runs/a", "--follow", "--port", "9000"]]
    monkeypatch.undo()

    def error_of(*argv):
        with pytest.raises(SystemExit) as exit_info:
            jobs.evaluate.main(["--config", str(DEMO_CONFIG), *argv, "--output", str(tmp_path / "eval.json")])
        return str(exit_info.value.code)

    assert error_of(str(tmp_path / "nowhere")) == (
        f"error: {tmp_path / 'nowhere'}: neither a run directory, a checkpoint nor a model directory (no "
        "config.json in it or in its policy/)")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # A model outside any run, and the config's run directory holds no checkpoint: the reference must be named.
    assert "name it with --against" in error_of(str(model), f"run.output_dir={tmp_path / 'no-run'}")
    # A policy whose tokenizer is not the reference's: its samples could not be scored in the reference's ids.
    assert error_of(str(bpe_model), "--against", str(tiny_model)).startswith(
        f"error: {bpe_model} does not read the token ids of the reference {tiny_model}: ")
    assert not (tmp_path / "eval.json").exists()


def test_the_perplexity_text_set_from_a_users_file_and_its_errors(tmp_path):
    import json

    from relay.evaluation import Evaluation
    from relay.models import build_tokenizer
    from relay.prompts import data_alphabet, load_prompt_data
    from tests.conftest import tiny_run_config

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"prompt": f"{n}=", "response": str(n)[::-1]}) + "\n" for n in (123, 4567, 89)))
    config = tiny_run_config(tmp_path, f"eval.text_data={texts}", "eval.text_rows=2")
    tokenizer = build_tokenizer(data_alphabet(config))
    evaluation = Evaluation(config, tokenizer, load_prompt_data(config, tokenizer).eval)
    assert evaluation.texts is not None
    assert evaluation.texts.prompts == ["123=", "4567="] and evaluation.texts.responses == ["321", "7654"]
    assert evaluation.texts.response_mask.sum(dim=1).tolist() == [4, 5]  # the answer's digits and EOS

    texts.write_text(json.dumps({"prompt": "1=", "response": "1"}) + "\n" + json.dumps({"prompt": "2="}) + "\n")
    with pytest.raises(ValueError, match=rf"eval.text_data: {texts}:2: missing key 'response'"):
        Evaluation(config, tokenizer, [])


def test_serving_a_runs_checkpoint_resolves_it_and_pins_it_while_served(tmp_path):
    from jobs.serve import resolve
    from relay.config import dump_config
    from tests.conftest import tiny_run_config

    run_dir = tmp_path / "run"
    for name in ("iter_000001", "iter_000002"):
        (run_dir / "checkpoints" / name / "policy").mkdir(parents=True)
        (run_dir / "checkpoints" / name / "policy" / "config.json").write_text("{}")
    (run_dir / "policy").symlink_to("checkpoints/iter_000002/policy")
    (run_dir / "config.yaml").write_text(dump_config(tiny_run_config(run_dir)))

    final = resolve(str(run_dir), None, None, None)
    assert final.path == str((run_dir / "checkpoints" / "iter_000002" / "policy").resolve())
    assert final.model_id == "run"  # the run's name
    served = resolve(str(run_dir), "iter_000001", None, "mine")
    assert (served.path, served.model_id) == (str((run_dir / "checkpoints" / "iter_000001" / "policy").resolve()), "mine")
    with served.pinned():
        [pin] = (run_dir / "pins").iterdir()
        assert pin.read_text().strip() == "iter_000001"  # run.keep_checkpoints spares it (tests/test_resumable.py)
    assert not list((run_dir / "pins").iterdir())

    with pytest.raises(ValueError, match=r"has no checkpoint iter_000009 \(it has: iter_000001, iter_000002\)"):
        resolve(str(run_dir), "iter_000009", None, None)
    with pytest.raises(ValueError, match="--checkpoint needs a run directory"):
        resolve(str(run_dir / "checkpoints" / "iter_000001" / "policy" / "config.json"), "iter_000001", None, None)
    outside = tmp_path / "model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not in a run directory: name the engine's settings with --config"):
        resolve(str(outside), None, None, None)


def test_an_evaluation_scores_the_reward_once(tmp_path):
    # Without a task, the held-out score is the run's reward: with the reward actors placed, only they score it (a
    # remote endpoint used to be called twice per evaluation: by them, and by the driver for eval/score).
    from jobs.ppo import PPOTrainer, driver_scores
    from relay.prompts import export_task
    from relay.tasks import get_task
    from tests.conftest import tiny_run_config

    paths = export_task(get_task("reverse"), tiny_run_config(tmp_path).data, tmp_path / "data")
    dataset = tiny_run_config(tmp_path / "run", f"data.prompts={paths['train.parquet']}",
                              "reward.function=relay.tasks.reverse:reward")
    trainer = PPOTrainer(dataset)
    scorers = trainer.eval_scorers()  # before the roles are placed: the driver scores
    assert scorers.scores is not None and scorers.rewards is None
    assert driver_scores(dataset, trainer.eval_scorer, rewards_placed=True) is None  # placed: only they score
    # With a task, eval/score is the task's own score beside the run's reward: both are asked for.
    task_run = PPOTrainer(tiny_run_config(tmp_path / "task-run"))
    assert driver_scores(task_run.config, task_run.eval_scorer, rewards_placed=True) is not None


def test_relay_eval_measures_perplexity_on_the_text_set_training_did(tmp_path, tiny_model):
    # Training's text set is the warm start's data; relay eval drops the warm start, and used to fall back to the
    # task's demonstrations (in the BPE pipeline test: perplexity 233 in relay eval against 105 in training).
    from jobs.evaluate import eval_config
    from tests.conftest import DEMO_CONFIG

    demonstrations = tmp_path / "sft.jsonl"
    demonstrations.write_text('{"prompt": "12=", "response": "21"}\n')
    config = eval_config(DEMO_CONFIG, [f"warm_start.data={demonstrations}"], str(tiny_model), tmp_path,
                         tmp_path / "eval" / "eval.json")
    assert config.warm_start is None and config.eval.text_data == str(demonstrations)
    assert eval_config(DEMO_CONFIG, [], str(tiny_model), tmp_path, tmp_path / "e.json").eval.text_data is None
