"""One place that records a metric and feeds every sink: the Ray dashboard (`ray.util.metrics`), TensorBoard and
a JSONL log. Names are namespaced (`losses/policy`, `time/generate`); Ray's name is derived by one fixed rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from relay.config import TrackingSection

RAY_METRIC_PREFIX = "relay_"


def ray_metric_name(name: str) -> str:
    """`losses/clipfrac` → `relay_losses_clipfrac` (Ray accepts only [a-zA-Z_:][a-zA-Z0-9_:]*)."""
    return RAY_METRIC_PREFIX + re.sub(r"[^a-zA-Z0-9_:]", "_", name)


# The role a metric describes, by its namespace (first match wins); Ray tags each series with it.
METRIC_ROLES = [
    ("losses/value", "critic"), ("critic/", "critic"), ("losses/", "policy"), ("policy/", "policy"),
    ("reward/", "reward"), ("rollout/", "rollout"), ("perf/", "rollout"), ("response/", "rollout"),
]


def metric_role(name: str) -> str:
    return next((role for prefix, role in METRIC_ROLES if name.startswith(prefix)), "driver")


class MetricsLogger:
    def __init__(self, run_dir: Path, run_name: str, resumed_at: int = 0, algorithm: str = "",
                 tracking: TrackingSection | None = None, params: dict[str, Any] | None = None) -> None:
        """`resumed_at`: the iteration of the checkpoint a run continues from (0: none). What an earlier attempt
        logged after it is dropped from metrics.jsonl and TensorBoard, so each iteration is there once, as this run
        trains it. MLflow and W&B (`tracking`) cannot drop what they hold: they keep the earlier attempt's values
        of the iterations trained again, and get only the iterations past them (on CPU, resumed runs train those
        iterations bitwise alike anyway, all but the timings). `params`: the run's config, for their run pages."""
        from torch.utils.tensorboard import SummaryWriter

        self.tags = {"run": run_name, "algorithm": algorithm}  # on every Ray series, with its role
        self.jsonl_path = run_dir / "metrics.jsonl"
        logged_through = 0  # the last iteration an earlier attempt logged
        if self.jsonl_path.exists():
            rows = [(json.loads(line)["iteration"], line)
                    for line in self.jsonl_path.read_text().splitlines(keepends=True) if line.strip()]
            logged_through = max((iteration for iteration, _ in rows), default=0)
            kept = [line for iteration, line in rows if iteration <= resumed_at]
            partial = self.jsonl_path.with_name(self.jsonl_path.name + ".partial")
            partial.write_text("".join(kept))
            os.replace(partial, self.jsonl_path)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_at + 1)
        self.gauges: dict[str, Any] = {}
        self.trackers = open_trackers(tracking, run_dir, run_name, params or {}, logged_through)

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        with self.jsonl_path.open("a") as sink:
            sink.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, iteration)
            self._gauge(name).set(value, tags={**self.tags, "role": metric_role(name)})
        self.writer.flush()
        for tracker in self.trackers:
            if iteration > tracker.logged_through:
                tracker.log(iteration, metrics)

    def _gauge(self, name: str) -> Any:
        if name not in self.gauges:
            from ray.util.metrics import Gauge

            self.gauges[name] = Gauge(ray_metric_name(name), description=name, tag_keys=("run", "role", "algorithm"))
        return self.gauges[name]

    def close(self) -> None:
        self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class MLflowTracker:
    """One MLflow run per relay run, found again by its run directory when the run resumes."""

    def __init__(self, section: TrackingSection, run_dir: Path, run_name: str, params: dict[str, Any],
                 logged_through: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.logged_through = logged_through
        if section.mlflow_tracking_uri is None:
            # A plain directory in the run directory (`mlflow ui --backend-store-uri <run_dir>/mlruns`): MLflow 3
            # keeps its file store in maintenance mode and asks for this opt-in; a server or database needs none.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=section.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name(section.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(section.mlflow_experiment))
        directory = str(run_dir.resolve())
        found = self.client.search_runs([experiment_id], filter_string=f"tags.relay_run_dir = '{directory}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                 tags={"relay_run_dir": directory}).info.run_id
            self.client.log_batch(self.run_id, params=[Param(key, str(value)[:6000])
                                                       for key, value in flatten(params).items()])

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, now, iteration) for name, value in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run per relay run (its id derived from the run directory, so a resumed run continues it); offline
    by default, under <run_dir>/wandb, for `wandb sync` later."""

    def __init__(self, section: TrackingSection, run_dir: Path, run_name: str, params: dict[str, Any],
                 logged_through: int) -> None:
        import wandb

        self.logged_through = logged_through
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=section.wandb_project, name=run_name, id=run_id, resume="allow",
                              dir=str(run_dir), mode=section.wandb_mode, config=params,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=iteration)

    def close(self) -> None:
        self.run.finish()


def open_trackers(section: TrackingSection | None, run_dir: Path, run_name: str, params: dict[str, Any],
                  logged_through: int) -> list[MLflowTracker | WandbTracker]:
    if section is None:
        return []
    kinds = [kind for kind, wanted in ((MLflowTracker, section.mlflow), (WandbTracker, section.wandb)) if wanted]
    return [kind(section, run_dir, run_name, params, logged_through) for kind in kinds]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: the config's dotted names, as overrides spell them."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(jsonl_path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]


def plot_reward_curve(jsonl_path: Path, png_path: Path, eval_points: list[tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in read_metrics(jsonl_path) if "reward/mean" in row]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([row["iteration"] for row in rows], [row["reward/mean"] for row in rows], label="training reward (mean)")
    if eval_points:
        axis.plot(*zip(*eval_points), "o-", label="held-out task score")
    axis.set_xlabel("PPO iteration")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
