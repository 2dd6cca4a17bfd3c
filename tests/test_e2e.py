"""Tier 2, whole driver: a few PPO iterations on the tiny model through real Ray, vLLM and DeepSpeed, with
2 ZeRO-3 policy ranks, 2 critic ranks and 2 rollout workers; then a resume from the saved checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from jobs.evaluate import main as evaluate_main
from jobs.common import latest_checkpoint
from jobs.ppo import PPOTrainer
from relay.metrics import read_metrics
from tests.conftest import tiny_run_config
from tests.live_ray import train_to_end as run

pytestmark = pytest.mark.slow




def test_ppo_end_to_end_then_resume(ray_session, tmp_path):
    overrides = [
        "rollout.num_workers=2",
        "policy.resources.cpu_ranks_per_node=2",
        "policy.zero_stage=3",
        "policy.zero3_persistence_threshold=0",
        "critic.resources.cpu_ranks_per_node=2",
        "policy.learning_rate=0.001",
        "run.checkpoint_every=1",
        "reference.colocate_with_policy=true",
        "reward.normalize=true",
        # k3 = exp(-r) - 1 + r is >= 0 on every token and 0 only where policy and reference agree, so "the policy
        # moved" reads as kl > 0; k1's mean over 16 samples can come out negative after a real update.
        "algorithm.kl_estimator=k3",
    ]
    straight = run(tiny_run_config(tmp_path, *overrides, "run.iterations=3"))
    run_dir = tmp_path

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(value) for row in rows for value in row.values())
    assert rows[0]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-5)  # the first batch comes from the reference
    assert rows[1]["policy/kl_ref"] > 0  # after one update the policy has moved away from it
    assert rows[1]["policy/version"] == 2.0
    for name in ("losses/policy", "losses/value", "losses/clipfrac", "policy/entropy", "time/generate", "time/sync"):
        assert name in rows[0]
    assert straight["samples"] == 3 * 8 * 2
    state = json.loads((run_dir / "checkpoints" / "iter_000002" / "driver_state.json").read_text())
    assert state["reward_stats"]["stats"]["count"] == 2 * 8 * 2  # the normalizer saw every reward, and is saved
    assert state["iteration"] == 2 and state["data_cursor"] == 16
    assert (run_dir / "reward_curve.png").stat().st_size > 0
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # The final policy is a Hugging Face model that differs from where PPO started.
    final = AutoModelForCausalLM.from_pretrained(run_dir / "policy").state_dict()
    start = AutoModelForCausalLM.from_pretrained(straight["reference_model"])
    changed = [name for name, tensor in final.items() if not torch.equal(tensor, start.state_dict()[name])]
    assert changed

    # A crash after iteration 2's checkpoint: the same command resumes from it and trains iteration 3 again, giving
    # bitwise the same numbers (all but the timings) and the same final weights as the run without the crash.
    shutil.rmtree(run_dir / "checkpoints" / "iter_000003")
    (run_dir / "summary.json").unlink()
    assert latest_checkpoint(run_dir).name == "iter_000002"
    resumed = run(tiny_run_config(tmp_path, *overrides, "run.iterations=3"))
    assert [row["iteration"] for row in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert resumed["samples"] == 3 * 8 * 2
    assert resumed["eval_score_before"] == straight["eval_score_before"]
    assert resumed["eval_score_after"] == straight["eval_score_after"]
    assert latest_checkpoint(run_dir).name == "iter_000003"

    def numbers(row):
        return {name: value for name, value in row.items() if not name.startswith(("time/", "perf/"))
                or name == "perf/samples"}

    assert [numbers(row) for row in read_metrics(run_dir / "metrics.jsonl")] == [numbers(row) for row in rows]
    final_resumed = AutoModelForCausalLM.from_pretrained(run_dir / "policy").state_dict()
    assert all(torch.equal(final[name], final_resumed[name]) for name in final)
    straight_dir = run_dir

    # A crash after the final checkpoint but before summary.json: the next start trains nothing and finishes.
    (straight_dir / "summary.json").unlink()
    (straight_dir / "policy").unlink()
    finished = run(tiny_run_config(straight_dir, *overrides, "run.iterations=3"))
    timings = {"wall_seconds": 0, "startup_seconds": 0}
    assert {**finished, **timings} == {**straight, **timings}
    assert json.loads((straight_dir / "summary.json").read_text()) == finished
    assert [row["iteration"] for row in read_metrics(straight_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (straight_dir / "policy").resolve() == (straight_dir / "checkpoints" / "iter_000003" / "policy").resolve()


def test_generating_ahead_trains_one_version_behind_and_resumes_at_its_prompts(ray_session, tmp_path):
    # A cap of 1: each token's weight is min(π_old / π_sampler, 1), below 1 wherever the update made the token less
    # likely and exactly 1 (capped) wherever it made it more likely; both happen among a batch's tokens.
    overrides = ["rollout.generate_ahead=true", "run.checkpoint_every=1", "algorithm.behavior_weight_cap=1.0"]
    run(tiny_run_config(tmp_path, *overrides))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["policy/staleness"] for row in rows] == [0.0, 1.0]  # iteration 2 trains on the version-0 samples
    assert "policy/behavior_weight_mean" not in rows[0]
    # All 1 (no correction, or the sampler's own policy taken for π_old) or uncapped would fail one of these.
    assert 0.0 < rows[1]["policy/behavior_weight_mean"] < 1.0
    assert 0.0 < rows[1]["policy/behavior_weight_capped"] < 1.0
    assert rows[1]["policy/sampler_logprob_gap"] > rows[0]["policy/sampler_logprob_gap"]
    assert "time/generate_wait" in rows[0] and "time/generate_wait" not in rows[1]  # nothing ahead of the last
    # Each checkpoint's data cursor leaves out the prompts of the batch generated ahead: a resumed run draws them.
    cursors = [json.loads((tmp_path / "checkpoints" / name / "driver_state.json").read_text())["data_cursor"]
               for name in ("iter_000001", "iter_000002")]
    assert cursors == [8, 16]
    run(tiny_run_config(tmp_path, *overrides, "run.iterations=3"))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert rows[2]["policy/staleness"] == 0.0  # generated after the resume, by the resumed weights


def test_ppo_on_a_prompt_file_with_a_users_reward_then_resume(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from relay.prompts import export_task
    from relay.tasks import get_task

    data_dir = tmp_path / "data"
    config = tiny_run_config(tmp_path / "task")
    paths = export_task(get_task("reverse"), config.data, data_dir)
    train = pq.read_table(paths["train.parquet"]).to_pylist()
    # Every row gets a `source` column the user's reward insists on, and one prompt is too long for the engine
    # (rollout.max_model_len 64 - max_new_tokens 8 = 56 tokens), so it is dropped and counted.
    rows = [dict(row, source="exported") for row in train] + [{"prompt": "1" * 60 + "=", "answer": "1" * 60,
                                                                "source": "exported"}]
    pq.write_table(pa.Table.from_pylist(rows), data_dir / "train-with-source.parquet")
    eval_rows = [dict(row, source="exported") for row in pq.read_table(paths["eval.parquet"]).to_pylist()]
    pq.write_table(pa.Table.from_pylist(eval_rows), data_dir / "eval-with-source.parquet")
    run_dir = tmp_path / "run"
    overrides = [f"data.prompts={data_dir / 'train-with-source.parquet'}",
                 f"data.eval_data={data_dir / 'eval-with-source.parquet'}",
                 "reward.function=tests.user_reward:score", "run.checkpoint_every=1", "tracking.mlflow=true"]

    summary = run(tiny_run_config(run_dir, *overrides))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2]
    assert rows[-1]["data/prompts_dropped"] == 1.0
    assert summary["eval_metric"] == "reward tests.user_reward:score"
    assert summary["prompts"] == str(data_dir / "train-with-source.parquet")
    assert 0.0 <= summary["eval_score_after"] <= 1.0

    state = json.loads((latest_checkpoint(run_dir) / "driver_state.json").read_text())
    assert state["iteration"] == 2 and (state["data_epoch"], state["data_cursor"]) == (0, 16)
    resumed = run(tiny_run_config(run_dir, *overrides, "run.iterations=3"))
    assert resumed["samples"] == 3 * 8 * 2
    state = json.loads((latest_checkpoint(run_dir) / "driver_state.json").read_text())
    assert (state["data_epoch"], state["data_cursor"]) == (0, 24)  # the data position went on from the checkpoint

    # The metrics went to MLflow too (a local store in the run directory): one run, each iteration once.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("relay").experiment_id])
    assert mlflow_run.data.params["reward.function"] == "tests.user_reward:score"
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "reward/mean")) == [
        (row["iteration"], row["reward/mean"]) for row in read_metrics(run_dir / "metrics.jsonl")]


def test_sigterm_checkpoints_the_last_iteration_and_the_run_resumes_from_it(tmp_path):
    """As `relay stop` or a preempted node ends a job: the driver gets SIGTERM, checkpoints, exits 143."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import DEMO_CONFIG, tiny_run_overrides
    from tests.live_ray import wait_for

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "jobs.ppo", "--config", str(DEMO_CONFIG),
               *tiny_run_overrides(run_dir, "run.iterations=100000", "ray.local_num_cpus=4")]
    root = DEMO_CONFIG.parents[2]
    log = (tmp_path / "driver.log").open("w+")
    driver = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"})
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: driver.poll() is None and metrics.exists() and len(read_metrics(metrics)) >= 2, 300,
                 "two iterations", interval_s=1)
        driver.send_signal(signal.SIGTERM)
        returncode = driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    log.seek(0)
    output = log.read()
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    last = read_metrics(run_dir / "metrics.jsonl")[-1]["iteration"]
    assert f"stopped by SIGTERM after iteration {last}" in output
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == f"iter_{last:06d}"
    assert json.loads((checkpoint / "driver_state.json").read_text())["samples"] == last * 8 * 2
    assert not (run_dir / "summary.json").exists()  # stopped, not finished


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_pp"])
def test_critic_free_estimators_train_without_a_critic(ray_session, tmp_path, advantage):
    config = tiny_run_config(tmp_path, f"algorithm.advantage={advantage}", "rollout.samples_per_prompt=4",
                             "data.prompts_per_iteration=4")
    trainer = PPOTrainer(config)
    try:
        summary = trainer.fit()
        assert not hasattr(trainer, "critic")  # no critic actors, placement group or checkpoint
    finally:
        trainer.shutdown()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2]
    assert all(math.isfinite(value) for row in rows for value in row.values())
    assert "losses/value" not in rows[0] and "losses/kl_ref" not in rows[0]  # the KL is in the reward here
    assert rows[1]["policy/kl_ref"] != 0.0
    assert summary["samples"] == 2 * 4 * 4


def test_grpo_with_a_lora_policy_dynamic_sampling_and_a_kl_loss_then_resume(ray_session, tmp_path):
    """No critic (GRPO) and no reference copy (the LoRA policy's base model, adapters off): only the policy's
    actors, the reward's and the engines'."""
    overrides = ["algorithm.advantage=grpo", "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3",
                 "algorithm.kl_placement=loss", "algorithm.kl_estimator=k3", "rollout.samples_per_prompt=4",
                 "data.prompts_per_iteration=4", "policy.lora={rank: 4, alpha: 8}", "policy.learning_rate=0.01",
                 "policy.lr_warmup_steps=1", "policy.lr_schedule=cosine", "run.checkpoint_every=1"]
    trainer = PPOTrainer(tiny_run_config(tmp_path, *overrides))
    try:
        summary = trainer.fit()
        assert not hasattr(trainer, "critic") and not hasattr(trainer, "reference")
    finally:
        trainer.shutdown()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2]
    assert all(math.isfinite(value) for row in rows for value in row.values())
    assert "losses/value" not in rows[0] and "losses/kl_ref" in rows[0]  # the KL is a loss term here
    assert rows[1]["policy/lr"] < rows[0]["policy/lr"]  # cosine decay after one warm-up step
    # The random-init model's samples mostly all score 0: such groups are dropped and more prompts sampled; the
    # batch is full all the same (samples below), and the data cursor moved past every prompt drawn.
    assert all(0.0 <= row["sampling/dropped_share"] <= 1.0 and 1 <= row["sampling/rounds"] <= 3 for row in rows)
    checkpoint = tmp_path / "checkpoints" / "iter_000002"
    assert json.loads((checkpoint / "driver_state.json").read_text())["data_cursor"] == 4 * sum(
        row["sampling/rounds"] for row in rows)
    assert sorted(path.name for path in checkpoint.iterdir()) == [
        "deepspeed", "driver_state.json", "policy", "policy_adapter"]
    assert summary["samples"] == 2 * 4 * 4
    # The saved policy is the merged model, a plain transformers checkpoint that differs from the base.
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert set(final) == set(base) and any(not torch.equal(final[name], base[name]) for name in final)
    # The adapter, in PEFT's format, applied to the base model gives the merged policy.
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                        checkpoint / "policy_adapter").merge_and_unload().state_dict()
    assert all(torch.allclose(adapted[name], final[name], atol=1e-6) for name in final)
    # The adapters and their optimizer state are in the DeepSpeed checkpoint: the run resumes from it. The engines
    # restart on the checkpoint's merged policy; the learner's log-probs of their samples equal the sampler's only
    # if it resumed the trained adapters (fresh ones would score the base model, which lr 0.01 has left behind).
    resumed = run(tiny_run_config(tmp_path, *overrides, "run.iterations=3"))
    assert resumed["samples"] == 3 * 4 * 4
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    assert rows[2]["policy/sampler_logprob_gap"] < 1e-5
    adapters = [load_file(str(tmp_path / "checkpoints" / name / "policy_adapter" / "adapter_model.safetensors"))
                for name in ("iter_000002", "iter_000003")]
    assert any(not torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])  # trained on


def test_early_stopping_keeps_the_best_checkpoint_and_the_kl_budget_stops_the_run(ray_session, tmp_path):
    # No score in [0, 1] improves by more than 1: the first evaluation is the best, the second ends the run.
    early = tmp_path / "early"
    overrides = ["run.iterations=5", "run.eval_every=1", "run.early_stop.patience=1", "run.early_stop.min_delta=1.0",
                 "run.keep_checkpoints=1"]
    summary = run(tiny_run_config(early, *overrides))
    rows = read_metrics(early / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2]
    for name in ("eval/score", "eval/reward", "eval/win_rate", "eval/kl_ref", "eval/perplexity", "eval/bleu",
                 "eval/chrf", "time/eval"):
        assert all(math.isfinite(row[name]) for row in rows), name
    assert 1.0 < rows[0]["eval/perplexity"] < 20  # of the demonstrations, under the 20-odd symbols' uniform guess
    assert summary["iterations"] == 2 and "run.early_stop" in summary["stopped_early"]
    assert (summary["best_iteration"], summary["eval_score_best"]) == (1, rows[0]["eval/score"])
    assert summary["eval_after"] == {name: value for name, value in rows[1].items() if name.startswith("eval/")}
    # keep_checkpoints=1 keeps the newest, and the best, which policy_best names.
    assert sorted(path.name for path in (early / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert (early / "policy_best").resolve() == (early / "checkpoints" / "iter_000001" / "policy").resolve()
    assert summary["policy_best"] == str(early / "policy_best")
    # A run that stopped early is complete: running it again trains nothing.
    assert run(tiny_run_config(early, *overrides)) == summary
    assert len(read_metrics(early / "metrics.jsonl")) == 2

    # relay eval on the run (its final policy) and its first checkpoint, against the run's reference, answers as
    # the evaluations in training did: the same samples (the same weights and seed), so the same scores and win
    # rates; log-probs from frozen models instead of the learner, so KL and perplexity within float error.
    report = evaluate_main(["--config", str(early / "config.yaml"), str(early), str(early / "checkpoints" / "iter_000001"),
                            "--output", str(tmp_path / "eval" / "eval.json")])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == report
    assert report["reference"] == summary["reference_model"]
    final, first = report["results"][str(early)], report["results"][str(early / "checkpoints" / "iter_000001")]
    for evaluated, row in ((final, rows[1]), (first, rows[0])):
        for name in ("eval/score", "eval/reward", "eval/win_rate", "eval/bleu", "eval/chrf"):
            assert evaluated[name] == row[name], name
        for name in ("eval/kl_ref", "eval/perplexity"):
            assert evaluated[name] == pytest.approx(row[name], rel=1e-4, abs=1e-5), name
    [reference_row] = [row for name, row in report["results"].items() if name.startswith("reference")]
    assert reference_row["eval/score"] == summary["eval_before"]["eval/score"] and reference_row["eval/kl_ref"] == 0

    # The KL budget: the run ends at the first iteration whose KL to the reference passes it.
    budget = 1e-4
    kl_run = tmp_path / "kl"
    summary = run(tiny_run_config(kl_run, "run.iterations=3", f"algorithm.kl_budget={budget}",
                                  "algorithm.kl_estimator=k3", "policy.learning_rate=0.01"))
    kls = [row["policy/kl_ref"] for row in read_metrics(kl_run / "metrics.jsonl")]
    assert len(kls) < 3 and all(kl <= budget for kl in kls[:-1]) and kls[-1] > budget
    assert summary["iterations"] == len(kls) and "algorithm.kl_budget" in summary["stopped_early"]
    assert latest_checkpoint(kl_run).name == f"iter_{len(kls):06d}"
