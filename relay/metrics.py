"""One place that records a metric and feeds every sink: the Ray dashboard (`ray.util.metrics`), TensorBoard and
a JSONL log. Names are namespaced (`losses/policy`, `time/generate`); Ray's name is derived by one fixed rule.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

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
    def __init__(self, run_dir: Path, run_name: str, resumed_at: int = 0, algorithm: str = "") -> None:
        """`resumed_at`: the iteration of the checkpoint a run continues from (0: none). What an earlier attempt
        logged after it is dropped from metrics.jsonl and TensorBoard, so each iteration is there once, as this run
        trains it."""
        from torch.utils.tensorboard import SummaryWriter

        self.tags = {"run": run_name, "algorithm": algorithm}  # on every Ray series, with its role
        self.jsonl_path = run_dir / "metrics.jsonl"
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["iteration"] <= resumed_at]
            partial = self.jsonl_path.with_name(self.jsonl_path.name + ".partial")
            partial.write_text("".join(kept))
            os.replace(partial, self.jsonl_path)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_at + 1)
        self.gauges: dict[str, Any] = {}

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        with self.jsonl_path.open("a") as sink:
            sink.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, iteration)
            self._gauge(name).set(value, tags={**self.tags, "role": metric_role(name)})
        self.writer.flush()

    def _gauge(self, name: str) -> Any:
        if name not in self.gauges:
            from ray.util.metrics import Gauge

            self.gauges[name] = Gauge(ray_metric_name(name), description=name, tag_keys=("run", "role", "algorithm"))
        return self.gauges[name]

    def close(self) -> None:
        self.writer.close()


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
