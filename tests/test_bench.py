"""`relay bench` on a tiny setting, side by side with TRL: the report is whole and its phases add up. The figures
are printed, never asserted: a benchmark is not a timed test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.bench import bench

pytestmark = pytest.mark.slow

BENCH_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "bench-cpu.yaml"


def test_bench_reports_every_phase_its_raw_passes_and_trl_on_the_same_work(tmp_path, capsys):
    output = tmp_path / "bench"  # not runs/bench/, which belongs to the user's own runs
    overrides = ["tiny_model.hidden_size=128", "tiny_model.num_layers=2", "tiny_model.num_heads=2",
                 "tiny_model.intermediate_size=256", "rollout.max_new_tokens=16", "data.prompts_per_iteration=4",
                 *[f"{role}.micro_batch_size=8" for role in ("policy", "critic", "reference", "reward")],
                 f"reward.model={tmp_path / 'reward_model'}",
                 "run.roles_in_parallel=false"]  # the one-after-another layout (every other test runs in parallel)
    report = bench(BENCH_CONFIG, overrides, iterations=2, output=output, vs="trl")
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed[printed.index("relay bench:"):])

    written = json.loads((output / "bench.json").read_text())
    assert written == json.loads(json.dumps(report))
    for field in ("iteration_seconds", "phases", "tokens_per_s", "samples_per_s", "startup_seconds", "baseline",
                  "ratio_vs_baseline", "overhead_ratio", "raw_passes", "peak_memory_mib", "roles"):
        assert field in written, field
    phases = written["phases"]
    assert set(phases) == {"control", "generate", "score", "advantages", "train", "generate_wait", "sync", "accounting",
                           "other"}
    # The phases are timed one by one in the driver, the iteration as a whole around them: what no phase timer
    # saw ("other") is under 5% of it.
    measured = sum(seconds for name, seconds in phases.items() if name != "other")
    assert measured == pytest.approx(written["iteration_seconds"], rel=0.05)
    assert set(written["raw_passes"]) == {"generate", "policy_score", "reference_score", "reward_score",
                                          "critic_score", "critic_train", "policy_train"}
    assert written["baseline"]["name"] == "trl" and written["baseline"]["version"] == "0.29.0"
    assert written["baseline"]["dtype"] == "bfloat16"  # the policy's, as bench-cpu.yaml sets it
    assert written["ratio_vs_baseline"] == pytest.approx(
        written["iteration_seconds"] / written["baseline"]["iteration_seconds"])
    assert {"policy", "critic", "reference", "reward", "rollout"} <= set(written["peak_memory_mib"])
    assert written["startup_seconds"] > 0
    # One role at a time: a phase lasts at least as long as its roles' busy times together.
    assert phases["score"] >= sum(written["roles"]["score"].values())
    assert (output / "bench.png").stat().st_size > 0
    # Every sample had exactly rollout.max_new_tokens tokens: both sides did the same work.
    rows = [json.loads(line) for line in (output / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["response/length_mean"] == 16 for row in rows)


@pytest.mark.parametrize("setting, message", [
    ("policy.dtype=float16", "float32 or bfloat16"),
    ("algorithm.mini_batches=2 algorithm.reuse_scoring_forward=false policy.micro_batch_size=32 "
     "critic.micro_batch_size=32", "mini_batches=1"),
])
def test_a_setting_trl_cannot_run_is_refused_before_relays_run(tmp_path, setting, message):
    overrides = ["tiny_model.hidden_size=64", "tiny_model.num_layers=1", "tiny_model.num_heads=1",
                 "tiny_model.intermediate_size=128", f"reward.model={tmp_path / 'reward_model'}", *setting.split()]
    with pytest.raises(ValueError, match=message):
        bench(BENCH_CONFIG, overrides, iterations=1, output=tmp_path / "bench", vs="trl")
    assert not (tmp_path / "bench" / "run" / "metrics.jsonl").exists()  # relay never ran
