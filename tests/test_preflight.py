"""`relay check` (relay/preflight.py): every problem of a config listed at once, each naming its field, file or
line; what cannot be checked here (a GPU, the Hub) is `skipped`, not failed; nothing is written. No Ray starts."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from jobs.common import check_output_dir
from jobs.record import check_resumable
from relay import preflight
from relay.cli import main as relay_main
from relay.config import RelayConfig, dump_config, load_config
from actors.group import free_port
from tests.conftest import DEMO_CONFIG, tiny_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
RULES = ["reward.type=rules", "reward.rules=[{check: exact_match, column: answer}]"]
GOOD_ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (2, 2), (3, 4), (5, 5), (6, 1), (7, 2)]]


@pytest.fixture(autouse=True)
def no_hub_no_gpu_no_cluster(monkeypatch):
    """The same outcome on every machine: the Hub unreachable, no GPU, a local run."""
    monkeypatch.setattr(preflight, "hub_unreachable", lambda: "the Hub cannot be reached (test)")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def run(config: RelayConfig) -> dict[str, preflight.Check]:
    return {check.name: check for check in preflight.run_checks(config, check_output_dir, check_resumable)}


def problems(config: RelayConfig) -> list[str]:
    return preflight.errors(config, check_output_dir, check_resumable)


def jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def on_prompts(tmp_path: Path, prompts: Path, *overrides: str) -> RelayConfig:
    return tiny_run_config(tmp_path / "run", f"data.prompts={prompts}", *RULES, *overrides)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_passes_what_cannot_be_checked_here_is_skipped(path, tmp_path, tiny_model):
    overrides = [f"run.output_dir={tmp_path / 'run'}"]
    if path.stem == "bench-cpu":  # `relay bench` makes its reward model first, and points reward.model at it
        bare = load_config(path, overrides)
        assert problems(bare) == [f"error: reward.model {bare.reward.model}: no such directory"]
        overrides.append(f"reward.model={tiny_model}")
    config = load_config(path, overrides)
    checks = run(config)
    assert problems(config) == []
    if config.device == "cuda":  # no GPU and no Hub here: skipped with the reason
        assert checks["device"].status == checks["resources"].status == checks["policy.model"].status == "skipped"
        assert "no GPU" in checks["device"].detail and "Hub" in checks["policy.model"].detail
        assert checks["data.prompts"].status == "skipped"
    else:
        assert {check.status for check in checks.values()} == {"ok"}


def test_demo_rows_describe_the_run(tmp_path):
    checks = run(load_config(DEMO_CONFIG, [f"run.output_dir={tmp_path / 'run'}"]))
    assert checks["algorithm"].detail.startswith("gae (KL k1 in the reward")
    assert "policy 1 × 0.4 CPU" in checks["roles"].detail and "warm_start 1 × 0.5 CPU" in checks["roles"].detail
    # hidden 128, 2 layers, intermediate 256, untied: 2·(4·128² + 3·128·256 + 2·128) + 128 + 2·15·128 = 332,160
    assert "0.33M parameters" in checks["tiny_model"].detail and "no chat template" in checks["tiny_model"].detail
    assert "eos '</s>', pad '<pad>'" in checks["tiny_model"].detail
    assert checks["data.task"].detail.startswith("4057 training and 128 held-out prompts of task reverse; columns: "
                                                 "prompt, answer")
    assert checks["resources"].detail == "fits a local Ray of 2 CPU (ray.local_num_cpus)"


def test_a_missing_data_file_and_a_malformed_line_are_named(tmp_path):
    missing = on_prompts(tmp_path, tmp_path / "missing.jsonl")
    assert problems(missing) == [f"error: data.prompts {tmp_path / 'missing.jsonl'}: no such file or directory"]
    malformed = jsonl(tmp_path / "malformed.jsonl", GOOD_ROWS[0], GOOD_ROWS[1], '{"prompt": "3+4=", "answer"',
                      GOOD_ROWS[3])
    assert problems(on_prompts(tmp_path, malformed)) == [f"error: data.prompts: {malformed}:3: not valid JSON "
                                                         "(Expecting ':' delimiter)"]


def test_warm_start_preference_and_text_data_are_read_whole(tmp_path):
    prompts = jsonl(tmp_path / "good.jsonl", *GOOD_ROWS)
    demonstrations = jsonl(tmp_path / "demos.jsonl", {"prompt": "1+2=", "response": "3"}, {"prompt": "2+2="})
    pairs = jsonl(tmp_path / "pairs.jsonl", {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
                  {"prompt": "2+2=", "chosen": "4", "rejected": 5})
    config = on_prompts(tmp_path, prompts, f"warm_start={{data: {demonstrations}}}",
                        f"reward_model_training={{data: {pairs}}}", f"eval.text_data={demonstrations}")
    lines = problems(config)
    assert [line.split(": ", 2)[1:] for line in lines] == [
        ["warm_start.data", f"{demonstrations}:2: missing key 'response' (rows need prompt and response, or "
                            "messages)"],
        ["reward_model_training.data", f"{pairs}:2: 'rejected' must be a string, got int"],
        ["eval.text_data", f"{demonstrations}:2: missing key 'response' (rows need prompt and response, or "
                           "messages)"],
    ]
    assert run(config)["data.prompts"].status == "ok"


def test_a_reward_model_path_that_does_not_exist_is_found_before_the_warm_start(tmp_path):
    config = load_config(DEMO_CONFIG, [f"run.output_dir={tmp_path / 'run'}", "reward.type=model",
                                       f"reward.model={tmp_path / 'nope'}"])
    assert config.warm_start is not None
    assert problems(config) == [f"error: reward.model {tmp_path / 'nope'}: no such directory"]


def test_a_local_model_is_described_from_its_config_and_tokenizer(tmp_path, tiny_model):
    checks = run(tiny_run_config(tmp_path / "run", "tiny_model=null", f"policy.model={tiny_model}",
                                 "reward.type=model", f"reward.model={tiny_model}"))
    assert checks["policy.model"].detail.startswith("llama, 0.33M parameters; tokenizer of ")
    # The reward model's head is one score instead of the 15-token LM head: 332,160 - 15·128 + 128 parameters.
    assert checks["reward.model"].detail.startswith("llama, 0.33M parameters")
    assert checks["critic.model"].detail == "from the reward model, with a value head"


def test_a_scoring_model_must_read_the_policys_token_ids(tmp_path, tiny_model):
    # The tiny policy's characters are those of the data (digits, '+', '='); the model's are the reverse task's.
    [line] = problems(on_prompts(tmp_path, jsonl(tmp_path / "good.jsonl", *GOOD_ROWS), "reward.type=model",
                                 f"reward.model={tiny_model}"))
    assert line.startswith(f"error: reward.model {tiny_model} does not read the token ids of the tiny policy: ")


def test_a_hub_name_that_cannot_be_resolved_offline_is_skipped(tmp_path):
    checks = run(tiny_run_config(tmp_path / "run", "tiny_model=null", "policy.model=nosuchorg/nosuchmodel"))
    assert checks["policy.model"].status == "skipped"
    assert "nosuchorg/nosuchmodel: a Hub name, not in the local cache" in checks["policy.model"].detail
    assert checks["data.task"].status == "skipped"  # it needs the policy's tokenizer


def test_an_output_dir_under_a_file_is_an_error(tmp_path):
    (tmp_path / "afile").write_text("")
    checks = run(tiny_run_config(tmp_path / "afile" / "run"))
    assert checks["run.output_dir"].line == (f"error: run.output_dir {tmp_path / 'afile' / 'run'}: "
                                             f"{tmp_path / 'afile'} is a file, not a directory")
    assert "run.resume" not in checks


def test_a_resume_with_a_changed_zero_stage_is_refused_and_a_fitting_one_passes(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "iter_000004").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(tiny_run_config(run_dir, "policy.zero_stage=3")))
    [line] = problems(tiny_run_config(run_dir))
    assert line.startswith(f"error: run.resume: run.output_dir {run_dir} holds checkpoints of a run with "
                           "policy.zero_stage = 3, and this config has 2")
    assert run(tiny_run_config(run_dir, "policy.zero_stage=3"))["run.resume"].status == "ok"
    assert problems(tiny_run_config(run_dir, "policy.zero_stage=3", "run.resume=never")) == [
        f"error: run.resume is never, and {run_dir} already holds checkpoints; set run.resume=auto or "
        "a new run.output_dir"]


def test_too_many_cpus_for_a_local_ray_is_an_error_and_a_cluster_is_skipped(tmp_path, monkeypatch):
    [line] = problems(tiny_run_config(tmp_path / "run", "ray.local_num_cpus=1"))
    assert line.startswith("error: resources: the run needs 1.5 CPU (a rollout engine 0.4 CPU, policy 0.4 CPU")
    assert line.endswith("the cluster has 1 CPU; give the local Ray more (ray.local_num_cpus) or the roles less "
                         "(*.resources)")
    warm = problems(load_config(DEMO_CONFIG, [f"run.output_dir={tmp_path / 'run'}", "ray.local_num_cpus=1",
                                              "warm_start.resources.cpu_ranks_per_node=4"]))
    assert "warm_start needs 2 CPU (warm_start.resources) and the local Ray has 1" in warm[0]
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    checks = run(tiny_run_config(tmp_path / "run", "ray.local_num_cpus=1"))
    assert checks["resources"].status == "skipped" and "ray://head:10001" in checks["resources"].detail


def test_device_cuda_without_a_gpu_is_skipped_not_failed(tmp_path):
    config = tiny_run_config(tmp_path / "run", "device=cuda", "policy.resources.gpus_per_node=1",
                             "critic.resources.gpus_per_node=1", "reference.resources.gpus_per_node=1")
    checks = run(config)
    assert problems(config) == []
    assert checks["device"].status == checks["resources"].status == "skipped"
    assert "no GPU that torch can see" in checks["device"].detail


def test_a_remote_reward_is_probed(tmp_path):
    closed = free_port()  # nothing listens on it
    [line] = problems(tiny_run_config(tmp_path / "run", "reward.type=remote",
                                      f"reward.url=http://127.0.0.1:{closed}"))
    assert line.startswith(f"error: reward.url http://127.0.0.1:{closed} cannot be reached (")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to HEAD
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        checks = run(tiny_run_config(tmp_path / "run", "reward.type=remote", f"reward.url={url}"))
    finally:
        server.shutdown()
        server.server_close()
    assert checks["reward.url"].line == f"ok: reward.url: {url} answers (HTTP 501 to a HEAD request)"


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    (tmp_path / "afile").write_text("")
    config = on_prompts(tmp_path, tmp_path / "missing.jsonl", "ray.local_num_cpus=1",
                        f"run.output_dir={tmp_path / 'afile' / 'run'}", "reward.rules=[{check: exact_match, column: x}]")
    lines = problems(config)
    assert [line.split(":")[1].split()[0] for line in lines] == ["data.prompts", "resources", "run.output_dir"]
    assert all(line.startswith("error: ") and "\n" not in line for line in lines)
    # The rules' columns cannot be checked without the prompts: skipped, not a second error about the same file.
    assert run(config)["reward.rules"].status == "skipped"


def test_one_cause_is_one_error(tmp_path):
    """An unknown task breaks the tiny model's alphabet, the prompts and the task's reward: one line says so."""
    assert problems(tiny_run_config(tmp_path / "run", "data.task=nosuch")) == [
        "error: data.task 'nosuch' is neither a built-in task (reverse, multiply) nor module:attribute"]
    assert problems(tiny_run_config(tmp_path / "run", "reward.function=nosuch_module_xyz:score"))[0].startswith(
        "error: reward.function 'nosuch_module_xyz:score': cannot import module 'nosuch_module_xyz'")
    assert problems(on_prompts(tmp_path, jsonl(tmp_path / "good.jsonl", *GOOD_ROWS),
                               "reward.rules=[{check: exact_match, column: solution}]")) == [
        f"error: reward.rules: no column 'solution' in {tmp_path / 'good.jsonl'} (its columns besides the prompt: "
        "answer)"]


def test_prompts_too_long_for_the_engine_are_counted_and_all_too_long_is_an_error(tmp_path):
    # The tiny run: max_model_len 64 - max_new_tokens 8 = 56 tokens, one a character plus BOS.
    long_row = {"prompt": "9" * 60 + "=", "answer": "0"}
    some = jsonl(tmp_path / "some.jsonl", *GOOD_ROWS, long_row, long_row)
    detail = run(on_prompts(tmp_path, some))["data.prompts"].detail
    assert detail.endswith("; 2 dropped and 0 truncated, longer than 56 tokens (rollout.max_model_len - "
                           "rollout.max_new_tokens)")
    truncated = run(on_prompts(tmp_path, some, "data.long_prompts=truncate"))["data.prompts"].detail
    assert "0 dropped and 2 truncated" in truncated
    every = jsonl(tmp_path / "every.jsonl", long_row, long_row, long_row, long_row)
    assert problems(on_prompts(tmp_path, every)) == [
        f"error: data.prompts: {every}: no training prompts: every prompt is longer than 56 tokens "
        "(rollout.max_model_len - rollout.max_new_tokens) and data.long_prompts is drop"]


def test_relay_check_prints_the_table_writes_nothing_and_exits_with_every_error(tmp_path, capsys):
    before = sorted(tmp_path.rglob("*"))
    relay_main(["check", "--config", str(DEMO_CONFIG), f"run.output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert "relay check" in out and "tiny_model" in out and "run.resume" in out
    assert not (tmp_path / "run").exists() and sorted(tmp_path.rglob("*")) == before
    with pytest.raises(SystemExit) as exit_:
        relay_main(["check", "--config", str(DEMO_CONFIG), f"run.output_dir={tmp_path / 'run'}",
                    "ray.local_num_cpus=1", f"warm_start.data={tmp_path / 'nope.jsonl'}"])
    lines = str(exit_.value.code).splitlines()
    assert [line.split()[1] for line in lines] == ["warm_start.data", "resources:"]
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:
        relay_main(["check", "--config", str(DEMO_CONFIG), "run.bogus=1", "algorithm.kl_coef=lots"])
    assert str(exit_.value.code).splitlines() == [
        "error: run.bogus: unknown key", "error: algorithm.kl_coef: Input should be a valid number, unable to parse "
        "string as a number"]
