"""A run directory is resumed only by a config its checkpoints fit (checked before Ray starts)."""

from __future__ import annotations

import json

import pytest

from jobs.record import check_resumable
from relay.config import dump_config, load_config
from tests.conftest import DEMO_CONFIG


def saved_run(run_dir, *overrides):
    (run_dir / "checkpoints" / "iter_000004").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config(DEMO_CONFIG, list(overrides))))


def test_learner_world_size_model_and_critic_are_fixed_the_rest_may_change(tmp_path):
    saved_run(tmp_path)
    changed = lambda *overrides: load_config(DEMO_CONFIG, [f"run.output_dir={tmp_path}", *overrides])  # noqa: E731
    # What the checkpoints do not depend on may change: CPUs per rank, iterations, learning rates, the KL.
    check_resumable(changed("policy.resources.cpus_per_rank=0.3", "run.iterations=200",
                            "policy.learning_rate=1e-5", "algorithm.kl_coef=0.1"), tmp_path)
    with pytest.raises(ValueError, match=r"the policy's world size \(policy.resources\) = 1, and this config has 2"):
        check_resumable(changed("policy.resources.cpu_ranks_per_node=2"), tmp_path)
    with pytest.raises(ValueError, match=r"tiny_model.num_layers = 2, and this config has 3"):
        check_resumable(changed("tiny_model.num_layers=3"), tmp_path)
    with pytest.raises(ValueError, match=r"a critic \(algorithm.advantage\) = True, and this config has False"):
        check_resumable(changed("algorithm.advantage=grpo"), tmp_path)
    check_resumable(changed("tiny_model.num_layers=3", "run.resume=never"), tmp_path)  # not resumed: no check
    # LoRA added, or its rank changed: DeepSpeed's load of the saved states would fail deep inside.
    with pytest.raises(ValueError, match=r"policy\.lora = None, and this config has \{'rank': 4"):
        check_resumable(changed("policy.lora={rank: 4, alpha: 8}"), tmp_path)


def test_a_lora_run_resumes_only_with_the_same_adapters(tmp_path):
    saved_run(tmp_path, "critic.lora={rank: 4, alpha: 8}")
    changed = lambda *overrides: load_config(DEMO_CONFIG, [f"run.output_dir={tmp_path}", *overrides])  # noqa: E731
    check_resumable(changed("critic.lora={rank: 4, alpha: 8, dropout: 0.1}"), tmp_path)
    with pytest.raises(ValueError, match=r"critic\.lora\.rank = 4, and this config has 8"):
        check_resumable(changed("critic.lora={rank: 8, alpha: 8}"), tmp_path)
    with pytest.raises(ValueError, match=r"critic\.lora = \{'rank': 4, .*\}, and this config has None"):
        check_resumable(changed(), tmp_path)


def test_keep_checkpoints_prunes_the_oldest_complete_ones_that_nothing_names(tmp_path):
    from jobs.record import prune_checkpoints

    for iteration in (2, 4, 6, 8, 10, 12):
        (tmp_path / "checkpoints" / f"iter_{iteration:06d}" / "policy").mkdir(parents=True)
    (tmp_path / "checkpoints" / "iter_000014.partial").mkdir()  # being written: not a checkpoint yet
    (tmp_path / "policy_best").symlink_to("checkpoints/iter_000004/policy")  # the best so far
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "serve-1234").write_text("iter_000006\n")  # being served
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [
        "iter_000004", "iter_000006", "iter_000010", "iter_000012", "iter_000014.partial"]


def test_driver_state_reads_older_files_and_refuses_newer_ones(tmp_path):
    from jobs.record import DRIVER_STATE_FORMAT, DriverState

    state = DriverState(iteration=3, data_cursor=24, reward_model="rm")
    state.write(tmp_path)
    assert DriverState.read(tmp_path) == state and state.format == DRIVER_STATE_FORMAT
    # A file of a relay before the format was written: no `format` key, read as format 1.
    saved = json.loads((tmp_path / "driver_state.json").read_text())
    del saved["format"]
    (tmp_path / "driver_state.json").write_text(json.dumps(saved))
    assert DriverState.read(tmp_path).iteration == 3
    saved["format"] = DRIVER_STATE_FORMAT + 1
    (tmp_path / "driver_state.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=rf"driver_state\.json is of format {DRIVER_STATE_FORMAT + 1}, written by a "
                                         r"newer relay .* upgrade relay"):
        DriverState.read(tmp_path)
