"""Bad input to a PPO run ends with one clear line, before Ray starts and before the run directory is touched.

Each case runs the real entry point as a user would,

    python -m jobs.ppo --config jobs/configs/demo.yaml run.output_dir=<tmp>/run <overrides>

and passes when the process exits non-zero, prints no Python traceback, its last non-empty line of stderr names
the field, file or file:line and says what is wrong (the case's regex), no Ray instance was started, and the run
directory was not created (or, for a run that already exists, not changed).

Ray is kept from starting at all: a `sitecustomize` put on the subprocess's PYTHONPATH replaces `ray.init` with a
guard that prints GUARD_MARK and exits 97. A case that gets as far as `ray.init` therefore fails at once, saying so,
instead of starting a local Ray instance and training the demo until the timeout. Nothing of relay is patched.

The subprocesses (each imports torch, transformers, vLLM and Ray: ~6 s) run a few at a time from one module
fixture; only the selected cases run (`-k` works).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # 27 subprocesses of ~6 s of imports each: ~1.5 min on 2 cores

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)
DEMO = "jobs/configs/demo.yaml"
TIMEOUT_S = 120  # a hang detector only: a case takes ~6 s alone, but the machine may be busy
GUARD_MARK = "BAD-INPUT-TEST-GUARD: ray.init was called, so Ray would have started here"
GUARD_EXIT = 97

SITECUSTOMIZE = f'''
"""Test guard (tests/test_bad_input.py): `ray.init` prints a marker and exits instead of starting Ray."""
import importlib.abc
import importlib.machinery
import os
import sys


def _guard(*args, **kwargs):
    sys.stdout.flush()
    sys.stderr.write({GUARD_MARK!r} + "\\n")
    sys.stderr.flush()
    os._exit({GUARD_EXIT})


class _PatchRayOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "ray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.init = _guard
            sys.modules["ray._private.worker"].init = _guard

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchRayOnImport())
'''

RULES = ["reward.type=rules", "reward.rules=[{check: exact_match, column: answer}]"]


def dataset_args(prompts: str, *extra: str) -> list[str]:
    """Overrides for PPO on a local prompt file with the demo's tiny model (rules reward, no warm start)."""
    return [f"data.prompts={prompts}", "warm_start=null", *RULES, *extra]


def jsonl(*rows) -> bytes:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()


GOOD_ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (2, 2), (3, 4), (5, 5), (6, 1), (7, 2)]]

# Data files every case may point at, as {data}/<name>.
DATA_FILES: dict[str, bytes] = {
    "good.jsonl": jsonl(*GOOD_ROWS),
    "empty.jsonl": b"",
    "malformed.jsonl": jsonl(GOOD_ROWS[0], GOOD_ROWS[1], '{"prompt": "3+4=", "answer": "7"', GOOD_ROWS[3]),
    "no_prompt_key.jsonl": jsonl(GOOD_ROWS[0], {"question": "2+2=", "answer": "4"}, GOOD_ROWS[2]),
    "number_prompt.jsonl": jsonl(GOOD_ROWS[0], GOOD_ROWS[1], {"prompt": 34, "answer": "7"}),
    "latin1.jsonl": jsonl(GOOD_ROWS[0]) + '{"prompt": "caf\u00e9 1+1=", "answer": "2"}\n'.encode("latin-1"),
    "empty_prompt.jsonl": jsonl(GOOD_ROWS[0], GOOD_ROWS[1], {"prompt": "   ", "answer": "0"}),
    "chat.jsonl": jsonl(*[{"messages": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]}
                          for row in GOOD_ROWS]),
    "prompts.csv": b"prompt,answer\n1+2=,3\n",
    "bad_yaml.yaml": b"run:\n  name: demo\n  iterations: [1, 2\n",
    "afile": b"a regular file, not a directory\n",
}


def write_parquet(directory: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(row) for row in GOOD_ROWS]
    rows[2] = {"prompt": None, "answer": "7"}
    pq.write_table(pa.Table.from_pylist(rows), directory / "null_prompt.parquet")


def write_finished_checkpoint(run_dir: Path) -> None:
    """A run directory as a run with tiny_model.hidden_size 256 left it: its config and one checkpoint."""
    from relay.config import dump_config, load_config

    config = load_config(REPO / DEMO, [f"run.output_dir={run_dir}", "tiny_model.hidden_size=256"])
    checkpoint = run_dir / "checkpoints" / "iter_000020"
    (checkpoint / "policy").mkdir(parents=True)
    (checkpoint / "critic").mkdir()
    (checkpoint / "driver_state.json").write_text(json.dumps({"iteration": 20, "policy_version": 20}))
    (run_dir / "config.yaml").write_text(dump_config(config))


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]  # overrides after run.output_dir; {data} is the data folder, {case} this case's own folder
    error: str  # a regex the last non-empty line of stderr must match (re.search)
    config: str = DEMO
    output_dir: str = "{case}/run"
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None  # called with the run directory before the run

    def __str__(self) -> str:
        return self.id


CASES = [
    # --- the config file and its overrides (relay/config/loading.py load_config / config_from_command_line)
    Case("unknown-key", ["run.bogus=1"], r"run\.bogus: unknown key"),
    Case("bad-value-type", ["algorithm.kl_coef=lots"], r"algorithm\.kl_coef: .*(number|float)"),
    Case("config-file-missing", [], r"config file \S*nope\.yaml does not exist", config="{case}/nope.yaml"),
    Case("config-not-yaml", [], r"config file \S*bad_yaml\.yaml is not valid YAML", config="{data}/bad_yaml.yaml"),
    Case("max-new-tokens-too-long", ["rollout.max_new_tokens=64"],
         r"rollout\.max_new_tokens \(64\) leaves no room .*rollout\.max_model_len \(64\)"),
    # --- the model
    Case("policy-model-missing", ["tiny_model=null", "policy.model=/nonexistent/model", "warm_start=null"],
         r"policy\.model '?/nonexistent/model'?.*(does not exist|no such|not found)"),
    Case("device-cuda-without-gpu",
         ["device=cuda", "warm_start=null", "policy.resources.gpus_per_node=1", "critic.resources.gpus_per_node=1",
          "reference.resources.gpus_per_node=1"],
         r"device.*cuda.*(no (CUDA )?GPU|GPU.*not available|not available|no .*GPU)"),
    # --- the run directory
    Case("output-dir-under-a-file", [], r"afile/run.*(not a directory|cannot be created|not writable)",
         output_dir="{data}/afile/run"),
    Case("resume-with-changed-config", [], r"tiny_model\.hidden_size.*(256.*128|changed|differs)",
         prepare=write_finished_checkpoint),
    # --- the task and the reward
    Case("unknown-task", ["data.task=nosuch"], r"data\.task 'nosuch' is neither a built-in task"),
    Case("reward-function-module-missing", ["reward.function=nosuch_module_xyz:score"],
         r"reward\.function 'nosuch_module_xyz:score': cannot import module 'nosuch_module_xyz'"),
    Case("reward-function-not-callable", ["reward.function=relay.tasks.reverse:DIGITS"],
         r"reward\.function 'relay\.tasks\.reverse:DIGITS'.*not (callable|a function)"),
    Case("dataset-reward-function-module-missing",
         ["data.prompts={data}/good.jsonl", "warm_start=null", "reward.function=nosuch_module_xyz:score"],
         r"reward\.function 'nosuch_module_xyz:score': cannot import module 'nosuch_module_xyz'"),
    Case("reward-rules-unknown-column",
         ["data.prompts={data}/good.jsonl", "warm_start=null", "reward.type=rules",
          "reward.rules=[{check: exact_match, column: solution}]"],
         r"reward\.rules: no column 'solution' in \S*good\.jsonl"),
    # --- prompt data (relay/prompts.py, relay/data.py)
    Case("prompts-file-missing", dataset_args("{case}/missing.jsonl"),
         r"\S*missing\.jsonl.*(does not exist|doesn't exist|no such file|not found|[Cc]ouldn't find)"),
    Case("prompts-file-empty", dataset_args("{data}/empty.jsonl"), r"\S*empty\.jsonl.*(no prompts|empty|no rows)"),
    Case("jsonl-malformed-line", dataset_args("{data}/malformed.jsonl"), r"\S*malformed\.jsonl:3: not valid JSON"),
    Case("row-missing-prompt-key", dataset_args("{data}/no_prompt_key.jsonl"),
         r"\S*no_prompt_key\.jsonl:2: missing key 'prompt'"),
    Case("prompt-not-a-string", dataset_args("{data}/number_prompt.jsonl"),
         r"\S*number_prompt\.jsonl:3: 'prompt' must be a string, got int"),
    Case("prompt-null-in-parquet", dataset_args("{data}/null_prompt.parquet"),
         r"\S*null_prompt\.parquet row 2: 'prompt' must be a string, got NoneType"),
    Case("jsonl-not-utf8", dataset_args("{data}/latin1.jsonl"), r"\S*latin1\.jsonl(:2)?: .*(UTF-8|utf-8)"),
    Case("prompt-empty-string", dataset_args("{data}/empty_prompt.jsonl"), r"\S*empty_prompt\.jsonl:3: 'prompt' is empty"),
    Case("chat-rows-without-chat-template", dataset_args("{data}/chat.jsonl"),
         r"\S*chat\.jsonl:\d+: chat-format rows, but the tokenizer has no chat template; set data\.chat_template"),
    Case("eval-data-split-with-local-files", dataset_args("{data}/good.jsonl", "data.eval_data=test"),
         r"data\.eval_data 'test' is no file or directory, and data\.prompts \S*good\.jsonl is local files"),
    # --- evaluation
    Case("eval-text-data-malformed", ["eval.text_data={data}/no_prompt_key.jsonl"],
         r"eval\.text_data: \S*no_prompt_key\.jsonl:1: missing key 'response'"),
    Case("early-stop-on-bleu-without-answers",
         [*dataset_args("{data}/good.jsonl"), "run.early_stop.metric=eval/bleu", "eval.answer_key=solution"],
         r"run\.early_stop\.metric eval/bleu needs reference answers.*no column 'solution' \(eval\.answer_key\)"),
    # No network here; HF_HUB_OFFLINE=1 makes `datasets` fail at once instead of retrying the Hub.
    Case("hub-dataset-unreachable", dataset_args("nosuchorg/nosuchdataset"),
         r"nosuchorg/nosuchdataset.*(cannot|can't|could not|not).*(reach|load|found|access|offline)",
         env={"HF_HUB_OFFLINE": "1"}),
]


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    output_dir: Path
    before: dict | None  # the output directory's listing before the run (None: it did not exist)
    after: dict | None


def listing(path: Path) -> dict | None:
    if not path.exists():
        return None
    if not path.is_dir():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(item.relative_to(path)): (item.stat().st_size, item.stat().st_mtime_ns) for item in path.rglob("*")}


def run_case(case: Case, data: Path, case_dir: Path, guard_dir: Path) -> Outcome:
    case_dir.mkdir(parents=True, exist_ok=True)

    def fill(text: str) -> str:  # not str.format: overrides hold YAML braces
        return text.replace("{data}", str(data)).replace("{case}", str(case_dir))

    output_dir = Path(fill(case.output_dir))
    if case.prepare is not None:
        case.prepare(output_dir)
    before = listing(output_dir)
    command = [str(PYTHON), "-m", "jobs.ppo", "--config", fill(case.config),
               f"run.output_dir={output_dir}", *(fill(arg) for arg in case.args)]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(case.env)
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, errors="replace", check=False,
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = None
        stdout = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = (expired.stderr or b"").decode(errors="replace") if isinstance(expired.stderr, bytes) else (expired.stderr or "")
    return Outcome(returncode, stdout, stderr, time.monotonic() - started, output_dir, before, listing(output_dir))


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> Iterator[dict[str, Future]]:
    root = tmp_path_factory.mktemp("bad_input")
    data = root / "data"
    data.mkdir()
    for name, content in DATA_FILES.items():
        (data / name).write_bytes(content)
    write_parquet(data)
    guard_dir = root / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {case.id: pool.submit(run_case, case, data, root / case.id, guard_dir) for case in selected}
        yield futures
        for future in futures.values():
            future.cancel()


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_fails_before_ray_with_one_clear_line(case: Case, outcomes) -> None:
    outcome: Outcome = outcomes[case.id].result()
    output = outcome.stdout + outcome.stderr
    line = last_line(outcome.stderr)
    seen = f"exit code {outcome.returncode} after {outcome.seconds:.0f} s; stderr ends:\n" + "\n".join(
        outcome.stderr.strip().splitlines()[-6:])
    problems = []
    if outcome.returncode is None:
        problems.append(f"still running after {TIMEOUT_S} s (killed)")
    if GUARD_MARK in output or "Started a local Ray instance" in output:
        problems.append("not caught before Ray: the run went on to ray.init")
    elif outcome.returncode == 0:
        problems.append("exit code 0")
    if "Traceback" in output:
        problems.append("a Python traceback in the output")
    if GUARD_MARK not in line and not re.search(case.error, line):
        problems.append(f"the last line of stderr, {line!r}, does not match {case.error!r}")
    if outcome.after != outcome.before:
        problems.append(f"the run directory {outcome.output_dir} was "
                        f"{'created' if outcome.before is None else 'changed'}: {sorted(outcome.after or {})[:8]}")
    if problems:
        pytest.fail("; ".join(problems) + "\n" + seen, pytrace=False)
