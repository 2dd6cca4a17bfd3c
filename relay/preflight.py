"""Every check a run can make before it trains: `relay check`, and the first thing `relay train` does.

    relay check --config jobs/configs/demo.yaml [dotted.key=value ...]

One row per check, `ok`, `error` or `skipped` (why it cannot be made here: `device: cuda` without a GPU, a Hub name
offline, a cluster's resources): the algorithm and roles; each model's config and tokenizer (never its weights: the
parameter count is of a model built on the meta device); each data source, parsed whole by training's own loaders,
so a bad row is named by file:line; the reward; the resources a local Ray would have; the run directory and its
checkpoints. Nothing is written and no Ray starts. The run directory's checks live with the jobs that write it
(jobs/common.py check_output_dir, jobs/record.py check_resumable): callers pass them in, as this module imports no job.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import requests
import torch
from huggingface_hub import constants as hub
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from relay.config import RelayConfig
from relay.data import load_sft_examples, open_dataset, read_rows
from relay.labels import is_label_store
from relay.models import apply_run_policy, build_tokenizer, check_same_tokenizer, tiny_model_config
from relay.envs import load_env_class
from relay.placement import placed_roles, resource_shortfall, role_placement
from relay.preferences import load_preferences
from relay.prompts import PromptData, data_alphabet, load_prompt_data, max_prompt_tokens
from relay.rewards import build_reward_source
from relay.tasks import task_of

Status = Literal["ok", "error", "skipped"]
OutputDirCheck = Callable[[Path], None]  # jobs/common.py check_output_dir: raises ValueError
ResumeCheck = Callable[[RelayConfig, Path], None]  # jobs/record.py check_resumable: raises ValueError
HUB_PROBE_TIMEOUT_S = 3.0  # one request to the Hub decides whether Hub names are checked (its own retries take ~30 s)
URL_PROBE_TIMEOUT_S = 5.0
MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM, "critic": AutoModelForTokenClassification,
                 "reward": AutoModelForSequenceClassification}
REWARD_FIELDS = {"function": "reward.function", "rules": "reward.rules", "remote": "reward.url"}


@dataclass(frozen=True)
class Check:
    name: str  # the config field checked (`reward.model`), or what is checked (`resources`)
    status: Status
    detail: str

    @property
    def line(self) -> str:
        """`error: reward.model /x: no such directory`: one line, naming the field."""
        text = self.detail if self.detail.startswith(self.name) else f"{self.name}: {self.detail}"
        return f"{self.status}: " + "; ".join(part.strip() for part in text.splitlines() if part.strip())


class Skipped(Exception):
    """A check that cannot be made here; the message says why."""


def attempt(name: str, check: Callable[[], str]) -> Check:
    """Run one check: its detail when it passes, the reason when it is skipped, the problem when it fails."""
    try:
        return Check(name, "ok", check())
    except Skipped as reason:
        return Check(name, "skipped", str(reason))
    except (ValueError, OSError) as error:
        return Check(name, "error", str(error))
    except Exception as error:  # a user's module or a model's config may raise anything: still one row, not a crash
        return Check(name, "error", f"{type(error).__name__}: {error}")


def run_checks(config: RelayConfig, output_dir_check: OutputDirCheck, resume_check: ResumeCheck) -> list[Check]:
    """Every check, in the table's order; none stops the others."""
    checks = [Check("algorithm", "ok", f"{config.algorithm.describe()}, {config.run.iterations} iterations of "
                                        f"{config.samples_per_iteration} samples"),
              Check("roles", "ok", roles_summary(config))]
    tokenizer, model_rows = model_checks(config)
    checks += model_rows
    prompts: dict[str, PromptData] = {}
    checks.append(attempt("data.prompts" if config.data.prompts else "data.task",
                          lambda: prompts_detail(config, tokenizer, prompts)))
    checks += data_checks(config, tokenizer)
    if config.reward.type in REWARD_FIELDS:  # a reward model has its model row; an env's step rewards, the env's
        checks.append(attempt(REWARD_FIELDS[config.reward.type], lambda: reward_detail(config, prompts.get("data"))))
    if config.env is not None:
        checks.append(attempt("env.name", lambda: f"{load_env_class(config.env.name).__name__}: reset and step"))
    checks += [attempt("device", lambda: device_detail(config)), attempt("resources", lambda: resources_detail(config))]
    checks.append(attempt("run.output_dir", lambda: output_detail(config, output_dir_check)))
    if checks[-1].status == "ok":  # a directory that cannot be written has no checkpoints to resume
        checks.append(attempt("run.resume", lambda: resume_detail(config, resume_check)))
    return checks


def errors(config: RelayConfig, output_dir_check: OutputDirCheck, resume_check: ResumeCheck) -> list[str]:
    """`error: ...` lines, one per failed check (none: the run may start)."""
    return problem_lines(run_checks(config, output_dir_check, resume_check))


def problem_lines(checks: list[Check]) -> list[str]:
    return [check.line for check in checks if check.status == "error"]


def print_table(checks: list[Check]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("check", "status", "detail", title="relay check", title_justify="left")
    colour = {"ok": "green", "error": "bold red", "skipped": "yellow"}
    for check in checks:
        table.add_row(check.name, f"[{colour[check.status]}]{check.status}[/]", check.detail)
    Console().print(table)


def roles_summary(config: RelayConfig) -> str:
    """`rollout 1 × 0.4 CPU, policy 1 × 0.4 CPU, …`: ranks and what each asks for; output directory last."""

    def each(cpus: float, gpus: float) -> str:
        return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")

    rollout = config.rollout
    engine_gpus = rollout.tensor_parallel_size if config.device == "cuda" else 0
    parts = [f"rollout {rollout.num_workers} × {each(rollout.cpus_per_worker, engine_gpus)}"]
    for role in placed_roles(config):
        placement = role_placement(config, role)
        parts.append(f"{role} {placement.world_size} × {each(placement.cpus_per_rank, placement.gpus_per_rank)}"
                     + (" beside the policy" if placement.colocated else ""))
    for stage in ("warm_start", "reward_model_training"):
        section = getattr(config, stage)
        if section is not None:
            parts.append(f"{stage} {section.resources.world_size} × {each(section.resources.cpus_per_rank, 0)}")
    return ", ".join(parts) + f"; device {config.device}; output {config.run.output_dir}"


# ---------------------------------------------------------------------------------------------------------------
# Models: config and tokenizer only


def model_checks(config: RelayConfig) -> tuple[PreTrainedTokenizerBase | None, list[Check]]:
    """The policy's row (and its tokenizer, which reads the data), then the critic, reference and reward model."""
    found: dict[str, PreTrainedTokenizerBase] = {}

    def policy() -> str:
        if config.tiny_model is not None:
            detail, found["tokenizer"], exact = tiny_model_detail(config)
        else:
            name = config.policy.model
            assert name is not None
            detail, tokenizer = model_detail("policy.model", name, "causal_lm")
            found["tokenizer"] = apply_run_policy(tokenizer, config.chat_template, f"policy.model {name}")
            exact = True
        if exact:  # the ids the scoring models must read
            found["ids"] = found["tokenizer"]
        return detail

    rows = [attempt("tiny_model" if config.tiny_model is not None else "policy.model", policy)]
    reward_model = config.reward.type == "model"
    trained = reward_model and config.reward_model_training is not None
    others = [  # (field, the name set, its kind, what the run uses when it is not set; None: no row)
        ("critic.model", config.critic.model, "critic", f"from {'the reward model' if reward_model else 'the policy'}"
         ", with a value head") if config.algorithm.uses_critic else None,
        ("reference.model", config.reference.model, "causal_lm", "the LoRA policy's base model"
         if config.reference_in_policy else "the policy's starting weights (after any warm start)"),
        ("reward.model", None if trained else config.reward.model, "reward",
         "trained by this run (reward_model_training), from the policy") if reward_model else None,
    ]
    policy_name = f"policy.model {config.policy.model}" if config.policy.model else "the tiny policy"
    for field, name, kind, default in filter(None, others):
        rows.append(Check(field, "ok", default) if name is None else attempt(
            field, lambda field=field, name=name, kind=kind: scorer_detail(field, name, kind, found.get("ids"),
                                                                            policy_name)))
    return found.get("tokenizer"), rows


def scorer_detail(field: str, name: str, kind: str, policy_tokenizer: PreTrainedTokenizerBase | None,
                  policy_name: str) -> str:
    """A model that scores the policy's samples, and whether it reads the policy's token ids."""
    detail, tokenizer = model_detail(field, name, kind)
    if policy_tokenizer is None:
        return detail
    check_same_tokenizer(policy_tokenizer, tokenizer, policy_name, f"{field} {name}")
    return f"{detail}; the policy's token ids"


def model_detail(field: str, name: str, kind: str) -> tuple[str, PreTrainedTokenizerBase]:
    """A local directory or a Hub name: its config and tokenizer load; a path that is not there names the field."""
    local = Path(name).expanduser()
    if not local.exists() and looks_local(name):
        raise ValueError(f"{field} {name}: no such directory")
    offline = None if local.exists() else hub_unreachable()
    source = str(local) if local.exists() else name
    try:
        model_config = AutoConfig.from_pretrained(source, local_files_only=offline is not None)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline is not None)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if offline is not None:
            raise Skipped(f"{name}: a Hub name, not in the local cache, and {offline}") from None
        where = "a directory" if local.exists() else "a Hub name"
        raise ValueError(f"{field} {name!r}: {where} transformers cannot load a model from ({first})") from None
    return (f"{model_config.model_type}, {parameters(model_config, kind)} parameters; "
            f"{tokenizer_summary(tokenizer)}"), tokenizer


def tiny_model_detail(config: RelayConfig) -> tuple[str, PreTrainedTokenizerBase, bool]:
    """The tiny Llama that the run builds at its start, described from its section (built on the meta device);
    its tokenizer, and whether that has the run's vocabulary (not when the data it comes from cannot be read)."""
    section = config.tiny_model
    assert section is not None
    note = ""
    try:
        for field, source in (("data.prompts", config.data.prompts),
                              ("warm_start.data", config.warm_start and config.warm_start.data)):
            if source:
                guard_source(field, source, config.data.split, config.data.subset)
        alphabet = data_alphabet(config)
    except (ValueError, Skipped):
        # One token per character, known or not: a tokenizer of no characters parses and counts the data the same.
        alphabet, note = "", "; its characters come from the data, which cannot be read here (see below)"
    tokenizer = build_tokenizer(alphabet, config.chat_template)
    llama = tiny_model_config(section, tokenizer)
    return (f"a tiny Llama built by the run (no download), {parameters(llama, 'causal_lm')} parameters; "
            f"{tokenizer_summary(tokenizer)}{note}"), tokenizer, not note


def parameters(model_config: PretrainedConfig, kind: str) -> str:
    """The parameter count of the model `model_config` describes, built on the meta device (no memory, no weights)."""
    if kind != "causal_lm":
        model_config.num_labels = 1
    with torch.device("meta"):
        model = MODEL_CLASSES[kind].from_config(model_config)
    count = sum(parameter.numel() for parameter in model.parameters())
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def tokenizer_summary(tokenizer: PreTrainedTokenizerBase) -> str:
    template = "a chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    pad = repr(tokenizer.pad_token) if tokenizer.pad_token is not None else "none (eos serves)"
    return f"tokenizer of {len(tokenizer)} tokens, {template}, eos {tokenizer.eos_token!r}, pad {pad}"


@functools.cache
def hub_unreachable() -> str | None:
    """Why Hub names cannot be checked here (offline mode, or no answer from the Hub), or None."""
    if hub.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        requests.head(hub.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except requests.RequestException as error:
        return f"the Hub ({hub.ENDPOINT}) cannot be reached ({type(error).__name__})"
    return None


def looks_local(name: str) -> bool:
    """A path rather than a Hub name (`org/name`): it starts like one, has a data file's suffix, or nests deeper."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or Path(name).suffix in (".jsonl", ".json", ".parquet", ".sqlite", ".db"))


# ---------------------------------------------------------------------------------------------------------------
# Data: read whole with the loaders training uses


def guard_source(field: str, source: str, split: str = "train", subset: str | None = None) -> None:
    """A local source must be there; a Hub dataset is read only where the Hub, or its local cache offline, answers."""
    if Path(source).expanduser().exists():
        return
    if looks_local(source):
        raise ValueError(f"{field} {source}: no such file or directory")
    reason = hub_unreachable()
    if reason is None:
        return
    if not hub.HF_HUB_OFFLINE:  # online, `datasets` would retry the Hub for half a minute
        raise Skipped(f"{source}: a Hub dataset, not read: {reason}")
    try:
        open_dataset(source, split, subset)
    except ValueError:
        raise Skipped(f"{source}: a Hub dataset, not in the local cache, and {reason}") from None


def prompts_detail(config: RelayConfig, tokenizer: PreTrainedTokenizerBase | None, found: dict[str, PromptData]) -> str:
    data = config.data
    if data.prompts is not None:
        guard_source("data.prompts", data.prompts, data.split, data.subset)
    if tokenizer is None:
        raise Skipped("needs the policy's tokenizer (see the policy's row)")
    try:
        prompts = found["data"] = load_prompt_data(config, tokenizer)
    except ValueError as error:
        if config.data.long_prompts == "drop" and fits_when_truncated(config, tokenizer):
            raise ValueError(f"{error}: every prompt is longer than {max_prompt_tokens(config)} tokens "
                             "(rollout.max_model_len - rollout.max_new_tokens) and data.long_prompts is drop") from None
        raise
    columns = [data.prompt_key, *sorted(prompts.eval[0].metadata)]
    held_out = f" ({data.eval_data})" if data.eval_data else ""
    detail = (f"{len(prompts.train)} training and {len(prompts.eval)} held-out{held_out} prompts of "
              f"{prompts.source}; columns: {', '.join(columns)}")
    counts = prompts.counts
    if counts.dropped or counts.truncated:
        detail += (f"; {counts.dropped} dropped and {counts.truncated} truncated, longer than "
                   f"{max_prompt_tokens(config)} tokens (rollout.max_model_len - rollout.max_new_tokens)")
    return detail


def fits_when_truncated(config: RelayConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the prompts would load if the long ones were cut instead of dropped: the reason they did not."""
    truncating = config.model_copy(update={"data": config.data.model_copy(update={"long_prompts": "truncate"})})
    try:
        load_prompt_data(truncating, tokenizer)
    except ValueError:
        return False
    return True


def data_checks(config: RelayConfig, tokenizer: PreTrainedTokenizerBase | None) -> list[Check]:
    """warm_start.data, reward_model_training.data and eval.text_data, where the config has them (the tokenizer
    carries the run's chat template)."""
    warm, pairs, task = config.warm_start, config.reward_model_training, config.data.task
    sources = [  # (field, the source set, how it loads, what its rows are, what the run uses when it is not set)
        ("warm_start.data", warm.data, lambda source: load_sft_examples(source, tokenizer), "examples",
         f"the demonstrations of task {task}") if warm is not None else None,
        ("reward_model_training.data", pairs.data,
         lambda source: load_preferences(source, tokenizer), "pairs",
         f"{pairs.simulated_pairs} pairs of a simulated annotator on task {task}") if pairs is not None else None,
        ("eval.text_data", config.eval.text_data, lambda source: load_sft_examples(
            source, tokenizer, limit=config.eval.text_rows), "texts (eval.text_rows at most)", None),
    ]
    return [Check(field, "ok", default) if source is None else
            attempt(field, lambda field=field, source=source, load=load, what=what:
                    rows_detail(field, source, tokenizer, load, what))
            for field, source, load, what, default in filter(None, sources) if source is not None or default]


def rows_detail(field: str, source: str, tokenizer: PreTrainedTokenizerBase | None,
                load: Callable[[str], list[Any]], what: str) -> str:
    guard_source(field, source)
    if tokenizer is None:
        raise Skipped("needs the policy's tokenizer (see the policy's row)")
    count = len(load(source))
    if is_label_store(source):
        return f"{count} {what} from the label store"
    first = [row for _, row in itertools.islice(read_rows(source), 1)]
    return f"{count} {what}; columns: {', '.join(first[0]) if first and isinstance(first[0], dict) else '?'}"


# ---------------------------------------------------------------------------------------------------------------
# Reward, device, resources, run directory


def reward_detail(config: RelayConfig, prompts: PromptData | None) -> str:
    reward = config.reward
    try:
        task = task_of(config.data)
    except ValueError:
        if reward.type == "function" and reward.function is None:
            raise Skipped("the task's own reward: the task cannot be loaded (see data.task)") from None
        task = None
    source = build_reward_source(reward, task, config.data.task)
    if reward.type == "function":
        return f"{reward.function}: imported, callable" if reward.function else f"the reward of {source.name}"
    if reward.type == "rules":
        described = ", ".join(f"{rule.check}({rule.column or rule.pattern})" for rule in reward.rules)
        if prompts is None:
            raise Skipped(f"{described}: their columns are not checked, the prompts cannot be read here")
        config.check_rule_columns(prompts.eval[0].metadata, prompts.source)
        return f"{described}: their columns are in the prompts"
    assert reward.url is not None
    try:
        answer = requests.head(reward.url, timeout=min(reward.timeout_s, URL_PROBE_TIMEOUT_S))
    except requests.RequestException as error:
        reason = getattr(error.args[0], "reason", None) if error.args else None
        raise ValueError(f"reward.url {reward.url} cannot be reached ({reason or error})") from None
    return f"{reward.url} answers (HTTP {answer.status_code} to a HEAD request)"


def cluster_address(config: RelayConfig) -> str | None:
    return config.ray.address or os.environ.get("RAY_ADDRESS")


def device_detail(config: RelayConfig) -> str:
    if config.device == "cpu":
        return "cpu"
    if gpus := torch.cuda.device_count():
        return f"cuda: {gpus} GPU(s) here ({torch.cuda.get_device_name(0)})"
    if address := cluster_address(config):
        raise Skipped(f"cuda: no GPU here; the GPUs are those of the cluster at {address}")
    raise Skipped("cuda: this machine has no GPU that torch can see, so the GPU roles cannot be checked here; the "
                  "run needs a GPU machine, or a cluster (ray.address or RAY_ADDRESS)")


def resources_detail(config: RelayConfig) -> str:
    """What a local Ray of `ray.local_num_cpus` (or this machine's CPUs) and this machine's GPUs would have."""
    if address := cluster_address(config):
        raise Skipped(f"the run joins the cluster at {address}, which may autoscale: it says what it waits for once "
                      "connected")
    gpus = torch.cuda.device_count()
    if config.device == "cuda" and not gpus:
        raise Skipped("device: cuda, and no GPU here (see device)")
    cpus = float(config.ray.local_num_cpus or os.cpu_count() or 1)
    problems = [shortfall] if (shortfall := resource_shortfall(config, {"CPU": cpus, "GPU": float(gpus)})) else []
    for stage in ("warm_start", "reward_model_training"):  # Ray Train runs each alone before PPO
        section = getattr(config, stage)
        if section is not None and section.resources.world_size * section.resources.cpus_per_rank > cpus + 1e-9:
            problems.append(f"{stage} needs {section.resources.world_size * section.resources.cpus_per_rank:g} CPU "
                            f"({stage}.resources) and the local Ray has {cpus:g}")
    if problems:
        raise ValueError("; ".join(problems) + "; give the local Ray more (ray.local_num_cpus) or the roles less "
                         "(*.resources)")
    source = "ray.local_num_cpus" if config.ray.local_num_cpus else "this machine's CPUs"
    return f"fits a local Ray of {cpus:g} CPU ({source})" + (f" and {gpus} GPU" if gpus else "")


def output_detail(config: RelayConfig, output_dir_check: OutputDirCheck) -> str:
    run_dir = Path(config.run.output_dir).resolve()
    output_dir_check(run_dir)
    return f"{run_dir}: writable, " + ("exists" if run_dir.is_dir() else "made when the run starts")


def resume_detail(config: RelayConfig, resume_check: ResumeCheck) -> str:
    run_dir = Path(config.run.output_dir).resolve()
    has_checkpoints = (run_dir / "checkpoints").exists()
    if config.run.resume == "never" and has_checkpoints:
        raise ValueError(f"run.resume is never, and {run_dir} already holds checkpoints; set run.resume=auto or a "
                         "new run.output_dir")
    if config.run.resume == "never" or not has_checkpoints:
        return f"{config.run.resume}: a new run"
    resume_check(config, run_dir)
    return "auto: the run continues from its newest checkpoint, whose config fits this one"
