"""What the jobs share: joining Ray, the checks before it, the base model, and the Ray Train worker set-up and final
save that the warm start and the reward model run alike. Imports flow one way: every job may import this module,
and it imports no job (tests/test_layout.py lists which jobs import which: the driver its rooms and the two
training jobs it runs, `relay bench` and `relay eval` the driver)."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray
import ray.train
import torch
from ray.train import Checkpoint, LoggingConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from relay.config import Dtype, RelayConfig, Resources
from actors.group import free_port
from relay.models import QUIET_ENV, ModelKind, build_tiny_model, load_tokenizer
from relay.placement import resource_shortfall
from relay.prompts import data_alphabet
from relay.zero import deepspeed_config, init_distributed, init_engine, load_for_training, save_pretrained

if TYPE_CHECKING:  # relay.zero imports deepspeed itself, after choosing its accelerator
    import deepspeed


def connect_ray(config: RelayConfig) -> None:
    """Join the job's cluster (Ray Jobs sets RAY_ADDRESS) or config.ray.address; otherwise start a local Ray."""
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=config.ray.namespace)
    else:
        # "local": a private instance, never a stale cluster left behind by an earlier `ray start`. Its GCS port is
        # chosen here and its address put in the environment its processes inherit (captured when it starts): those
        # that look the cluster up by themselves, such as Ray Train's PlacementGroupCleaner, otherwise fail with
        # "Found multiple active Ray instances" as soon as another local run is up on the machine.
        port = free_port()
        instance_env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"}
        saved = {name: os.environ.get(name) for name in instance_env}
        os.environ.update(instance_env)
        try:
            ray.init(address="local", num_cpus=config.ray.local_num_cpus, namespace=config.ray.namespace)
        finally:  # this process knows its instance now; a later local instance must not reuse the port
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def check_output_dir(path: Path) -> None:
    """`path` is, or can be made, a writable directory: tried for real (permission bits do not stop root)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"run.output_dir {path}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ValueError(f"run.output_dir {path}: cannot write in {existing} ({error.strerror})") from None


def check_device(config: RelayConfig) -> None:
    """`device: cuda` on a local Ray instance needs a GPU on this machine (a cluster's are checked once joined)."""
    on_a_cluster = bool(config.ray.address or os.environ.get("RAY_ADDRESS"))
    if config.device == "cuda" and not on_a_cluster and not torch.cuda.is_available():
        raise ValueError("device: cuda, but this machine has no GPU that torch can see, and no Ray cluster is named "
                         "(ray.address or RAY_ADDRESS) to run on; use device: cpu or a GPU machine")


def check_cluster_resources(config: RelayConfig) -> None:
    """Once connected: a local instance that cannot hold the run fails now, naming the roles; on a cluster, which may
    autoscale, the run says what it will wait for."""
    shortfall = resource_shortfall(config, ray.cluster_resources())
    if shortfall is None:
        return
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        print(f"waiting for resources: {shortfall}; the run starts when the cluster (or its autoscaler) has them",
              flush=True)
        return
    raise ValueError(f"{shortfall}; give the local Ray more (ray.local_num_cpus) or the roles less (*.resources)")


def resolve_model_path(name_or_path: str) -> str:
    """Local paths made absolute (actors run in other working directories); Hub names left as they are."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (a `.partial` directory is one that was cut off while writing)."""
    return sorted(path for path in (run_dir / "checkpoints").glob("iter_*") if not path.name.endswith(".partial"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, if any."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def policy_path(name: str) -> str:
    """A model directory for a run directory (its final policy), a checkpoint, a model directory or a Hub name."""
    path = Path(name).expanduser()
    for candidate in (path / "policy", path):
        if (candidate / "config.json").is_file():
            return str(candidate.resolve())
    if path.exists() or name.startswith(("/", "./", "../", "~")):
        raise ValueError(f"{name}: neither a run directory, a checkpoint nor a model directory (no config.json in "
                         f"it or in its policy/)")
    return resolve_model_path(name)  # a Hub name


def run_directory(name: str) -> Path | None:
    """The run directory a model belongs to: itself (a run directory), or the run of a checkpoint."""
    path = Path(name).expanduser().resolve()
    for candidate in (path, *path.parents[:3]):
        if (candidate / "checkpoints").is_dir() and (candidate / "config.yaml").is_file():
            return candidate
    return None


def prepare_base_model(config: RelayConfig, run_dir: Path) -> str:
    """The policy's starting weights: config.policy.model, or a tiny model built once into the run directory."""
    if config.tiny_model is None:
        assert config.policy.model is not None
        return resolve_model_path(config.policy.model)
    path = run_dir.resolve() / "base"
    if not path.exists():
        build_tiny_model(config.tiny_model, data_alphabet(config), path, config.run.seed)
    return str(path)


def fit_on_ray_train(name: str, loop: Callable[[dict[str, Any]], None], config: RelayConfig, resources: Resources,
                     run_dir: Path, loop_config: dict[str, Any]) -> Result:
    """Run `loop` on `resources.world_size` Ray Train workers; the result always carries a checkpoint."""
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.world_size,
            use_gpu=config.device == "cuda",
            resources_per_worker={"CPU": resources.cpus_per_rank},
        ),
        run_config=RunConfig(
            name=name, storage_path=str(run_dir.resolve() / "ray_train"),
            # Ray Train's print patch sends each print of a worker to its stdout and, through `logging`, to its
            # stderr: every line reached the log twice, and tqdm_ray's closing state, read twice, re-opened the
            # finished bar on the driver, which then redrew it in front of every later line of the log.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **QUIET_ENV}},
            # Ray Train's INFO lines (resources, worker group, every report) are its own bookkeeping.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint (error: {result.error})")
    return result


@dataclass
class TrainWorker:
    """One Ray Train worker's DeepSpeed engine, with what its loop needs to know about its place in the group."""

    rank: int
    world_size: int
    per_rank_batch_size: int  # this rank's share of the global batch
    zero_stage: int
    tokenizer: Any
    engine: "deepspeed.DeepSpeedEngine"


def start_train_worker(model_path: str, kind: ModelKind, *, chat_template: str | None, zero_stage: int, dtype: Dtype,
                       batch_size: int, learning_rate: float) -> TrainWorker:
    """Inside a Ray Train loop: join the process group and build the DeepSpeed engine for one global batch of
    `batch_size` rows per optimizer step, split evenly over the workers. The tokenizer is the run's
    (`chat_template`: RelayConfig.chat_template), which the final save writes beside the model."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    init_distributed()
    tokenizer = load_tokenizer(model_path, chat_template)
    per_rank = max(1, batch_size // world_size)
    ds_config = deepspeed_config(
        zero_stage=zero_stage, offload=False, dtype=dtype, micro_batch_size=per_rank,
        gradient_accumulation_steps=1, world_size=world_size, max_grad_norm=1.0,
    )
    model = load_for_training(model_path, kind, ds_config, dtype, tokenizer.pad_token_id)
    engine = init_engine(model, ds_config, learning_rate, weight_decay=0.0)
    engine.train()
    return TrainWorker(rank, world_size, per_rank, zero_stage, tokenizer, engine)


def save_and_report(worker: TrainWorker, metrics: dict[str, Any]) -> None:
    """The loop's last act on every worker: the model in Hugging Face format (gathered, written by rank 0) as the
    run's checkpoint, with the final metrics. Every rank must call it (ZeRO-3 gathers from all)."""
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "model"
        save_pretrained(worker.engine.module, worker.tokenizer, worker.zero_stage, worker.rank, target)
        checkpoint = Checkpoint.from_directory(str(target)) if worker.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def start_training_job(config: RelayConfig, section: str) -> Path:
    """A training job run on its own (`relay sft`, `relay reward-model`): its config section set, the device and
    the run directory checked before Ray starts, then Ray connected. Returns the run directory, created."""
    if getattr(config, section) is None:
        sys.exit(f"the config has no {section} section; nothing to train")
    run_dir = Path(config.run.output_dir)
    try:
        check_device(config)
        check_output_dir(run_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    run_dir.mkdir(parents=True, exist_ok=True)
    connect_ray(config)
    return run_dir
