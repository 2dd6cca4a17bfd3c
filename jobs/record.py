"""The run's record on disk: what a run directory holds, and how it is read, resumed and pruned.

    <run_dir>/config.yaml                      the config the run was started (or last resumed) with
    <run_dir>/checkpoints/iter_NNNNNN/         policy/, critic/ (Hugging Face), deepspeed/ (the learners' states),
                                               driver_state.json (DriverState); written whole under a `.partial`
                                               name, then renamed: a `.partial` directory is no checkpoint
    <run_dir>/policy, <run_dir>/policy_best    links to a checkpoint's policy/: the final and the best
    <run_dir>/pins/<name>                      a checkpoint's name, for as long as someone serves it
    <run_dir>/summary.json                     written last: the run is complete

The driver (jobs/ppo.py) writes it; relay eval, serve and label read it. These names are a public interface:
users' scripts read them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from jobs.common import complete_checkpoints, latest_checkpoint
from relay.config import RelayConfig, dump_config, load_config
from relay.metrics import plot_reward_curve
from relay.storage import publish_directory, write_atomic

# driver_state.json's format: a relay reads every format up to its own, and refuses a newer one in one line.
DRIVER_STATE_FORMAT = 1


@dataclass
class DriverState:
    """What the driver needs, beside the learners' DeepSpeed states, to continue a run from a checkpoint."""

    iteration: int = 0
    data_epoch: int = 0
    data_cursor: int = 0
    policy_version: int = 0
    samples: int = 0
    kl_coef: float = 0.0
    reference_model: str = ""
    eval_score_base: float | None = None
    eval_score_before: float | None = None
    eval_points: list[tuple[int, float]] | None = None  # (iteration, eval/score), for the reward curve
    eval_before: dict[str, float] | None = None  # the evaluation PPO started from
    eval_baseline_rewards: list[float] | None = None  # its samples' rewards: eval/win_rate compares against them
    early_stop: dict | None = None  # relay.evaluation.EarlyStopping's state
    eval_last: dict[str, float] | None = None  # the newest evaluation
    stop_reason: str | None = None  # why the run ended before run.iterations (early stopping, the KL budget)
    reward_stats: dict | None = None  # the reward normalizer's running mean/std
    reward_model: str | None = None  # reward.model, or the one trained at the start of the run
    reward_model_accuracy: float | None = None  # its held-out pair accuracy, when trained here
    format: int = DRIVER_STATE_FORMAT  # absent from the files of relay before it: format 1

    @classmethod
    def read(cls, checkpoint: Path) -> DriverState:
        path = checkpoint / "driver_state.json"
        saved = json.loads(path.read_text())
        if saved.get("format", 1) > DRIVER_STATE_FORMAT:
            raise ValueError(f"{path} is of format {saved['format']}, written by a newer relay than this one (which "
                             f"reads formats up to {DRIVER_STATE_FORMAT}): upgrade relay to resume or read this run")
        known = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in saved.items() if name in known})

    def write(self, checkpoint: Path) -> None:
        (checkpoint / "driver_state.json").write_text(json.dumps(asdict(self), indent=1))

    def done(self, iterations: int) -> bool:
        """Trained to `iterations`, or stopped early (early stopping, the KL budget)."""
        return self.iteration >= iterations or self.stop_reason is not None


# What a checkpoint's learner states are tied to: resuming with other values cannot load them.
RESUME_FIXED: dict[str, Callable[[RelayConfig], object]] = {
    "tiny_model": lambda config: config.tiny_model and config.tiny_model.model_dump(),
    "policy.model": lambda config: config.policy.model,
    "critic.model": lambda config: config.critic.model,
    "policy.zero_stage": lambda config: config.policy.zero_stage,
    "critic.zero_stage": lambda config: config.critic.zero_stage,
    "the policy's world size (policy.resources)": lambda config: config.policy.resources.world_size,
    "the critic's world size (critic.resources)": lambda config: config.critic.resources.world_size,
    "a critic (algorithm.advantage)": lambda config: config.algorithm.uses_critic,
    # The adapters' shapes and scale (not their dropout): DeepSpeed's states hold the adapters' weights alone.
    "policy.lora": lambda config: config.policy.lora and config.policy.lora.model_dump(exclude={"dropout"}),
    "critic.lora": lambda config: config.critic.lora and config.critic.lora.model_dump(exclude={"dropout"}),
}


def check_resumable(config: RelayConfig, run_dir: Path) -> None:
    """A run directory with checkpoints is resumed (run.resume: auto) only by a config its checkpoints fit."""
    saved_path = run_dir / "config.yaml"
    if config.run.resume != "auto" or latest_checkpoint(run_dir) is None or not saved_path.exists():
        return
    saved = load_config(saved_path)
    for name, value_of in RESUME_FIXED.items():
        for path, old, new in differences(name, value_of(saved), value_of(config)):
            raise ValueError(
                f"run.output_dir {run_dir} holds checkpoints of a run with {path} = {old!r}, and this config has "
                f"{new!r}; they cannot resume it: put the old value back, or use a new run.output_dir (to start "
                f"from its weights: policy.model={latest_checkpoint(run_dir) / 'policy'})"
            )


def differences(path: str, old: object, new: object) -> Iterator[tuple[str, object, object]]:
    """(dotted path, old, new) of each leaf where two config values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            yield from differences(f"{path}.{key}", old.get(key), new.get(key))
    elif old != new:
        yield path, old, new


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return run_dir / "checkpoints" / f"iter_{iteration:06d}"


def link_policy(run_dir: Path, name: str, iteration: int) -> None:
    """Point `<run_dir>/<name>` at a checkpoint's policy, replacing the link in one rename."""
    temporary = run_dir / f"{name}.link"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(checkpoint_path(run_dir, iteration).relative_to(run_dir) / "policy")
    os.replace(temporary, run_dir / name)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (all when 0), and every older one that is still named: by a
    link in the run directory (`policy`, `policy_best`) or by a pin, a file under `<run_dir>/pins/` that holds a
    checkpoint's name (whoever serves a checkpoint pins it while it does)."""
    named = {link.resolve().parent.name for link in run_dir.glob("policy*") if link.is_symlink()}
    named |= {pin.read_text().strip() for pin in (run_dir / "pins").glob("*") if pin.is_file()}
    for old in complete_checkpoints(run_dir)[:-keep] if keep else []:
        if old.name not in named:
            shutil.rmtree(old)


class RunRecord:
    """The run directory of one run, as the driver writes it."""

    def __init__(self, config: RelayConfig, run_dir: Path) -> None:
        self.config, self.run_dir = config, run_dir

    def completed_summary(self) -> dict | None:
        """The summary of a run that is complete (trained to run.iterations, or stopped early), read before any role
        is placed; None when there is training left, or a summary left to write."""
        checkpoint = latest_checkpoint(self.run_dir) if self.config.run.resume == "auto" else None
        summary_path = self.run_dir / "summary.json"
        if checkpoint is None or not summary_path.exists():
            return None
        state = DriverState.read(checkpoint)
        if not state.done(self.config.run.iterations):
            return None
        print(f"{self.run_dir} is complete at iteration {state.iteration}; use a new run.output_dir to rerun")
        return json.loads(summary_path.read_text())

    def prepare(self) -> Path | None:
        """Create the run directory and record the config; the checkpoint to resume from, if any."""
        resume = self.config.run.resume
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.run_dir) if resume == "auto" else None
        if resume == "never" and (self.run_dir / "checkpoints").exists():
            raise FileExistsError(f"{self.run_dir} already holds checkpoints; set run.resume=auto or a new output_dir")
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        return checkpoint

    def checkpoint_path(self, iteration: int) -> Path:
        return checkpoint_path(self.run_dir, iteration)

    def save_checkpoint(self, iteration: int, state: DriverState, save_learners: Callable[[Path], None]) -> Path:
        """The learners' weights and states (`save_learners` writes them into a directory) and the driver's state,
        written whole or not at all; then older checkpoints pruned (run.keep_checkpoints)."""
        final = self.checkpoint_path(iteration)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_learners(partial)
        state.write(partial)
        publish_directory(partial, final)
        prune_checkpoints(self.run_dir, self.config.run.keep_checkpoints)
        return final

    def link_policy(self, name: str, iteration: int) -> None:
        link_policy(self.run_dir, name, iteration)

    def finish(self, summary: dict, state: DriverState, best_iteration: int | None, metrics_path: Path) -> None:
        """The final and best policies linked, the reward curve drawn, summary.json written (the run is complete)."""
        self.link_policy("policy", state.iteration)
        if best_iteration is not None:  # again: a crash may have come between its checkpoint and link
            self.link_policy("policy_best", best_iteration)
        plot_reward_curve(metrics_path, self.run_dir / "reward_curve.png", state.eval_points or [])
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
