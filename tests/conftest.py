"""Shared fixtures: a local Ray instance per test module and one tiny model built on disk.

Two tiers, split by one marker: `pytest -m "not slow"` (make test-fast) runs the math, config, data, batch, CLI
and manifest tests with no Ray, vLLM or DeepSpeed start; `make test` runs everything. A test that asks for a Ray
instance must be marked slow, which collection checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import relay.cluster  # noqa: F401 - sets RAY_AUTH_MODE=token before Ray loads its configuration
from relay.config import RelayConfig, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


# The demo config cut down to seconds: few prompts, short responses, no warm start.
TINY_RUN_OVERRIDES = [
    "run.iterations=2",
    "run.eval_every=0",
    "run.checkpoint_every=0",
    "data.train_prompts=256",
    "data.prompts_per_iteration=8",
    "data.eval_prompts=8",
    "data.eval_samples_per_prompt=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "policy.micro_batch_size=4",
    "critic.micro_batch_size=4",
    "algorithm.mini_batches=1",
    "warm_start=null",
]


def tiny_run_overrides(output_dir: Path, *overrides: str) -> list[str]:
    return [f"run.output_dir={output_dir}", f"run.name={Path(output_dir).name}", *TINY_RUN_OVERRIDES, *overrides]


def tiny_run_config(output_dir: Path, *overrides: str) -> RelayConfig:
    return load_config(DEMO_CONFIG, tiny_run_overrides(output_dir, *overrides))


def pytest_collection_modifyitems(items):
    unmarked = [item.nodeid for item in items
                if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that start Ray must be marked slow (the fast tier runs without it): {unmarked}")


# Module scope: a local instance must not outlive its module, or its dashboard agent would still hold the default
# agent ports when tests/test_cluster.py and tests/test_autoscaling.py start real clusters (whose job API then
# answers "No available agent").
@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="local", num_cpus=8, namespace="relay-tests", include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from relay.config import TinyModelSection
    from relay.models import build_tiny_model
    from relay.tasks import get_task

    path = tmp_path_factory.mktemp("models") / "tiny"
    return build_tiny_model(TinyModelSection(), get_task("reverse").alphabet, path, seed=0)
