"""What a run asks Ray for: each role's placement group (bundles and strategy) and what each of its rank actors
requests inside it, derived from the config alone. actors/group.py and actors/rollout.py create exactly these, and
the cluster tests check them against the node types of cluster/, so the two can never disagree.

- A learner role (policy, critic) and each unshared scoring role (reference, reward) is one PACK group of one
  bundle per rank; a rank holds a whole GPU on `device: cuda`.
- A scoring role with `colocate_with_policy` makes no group: rank i runs in bundle i of the policy's group, which
  reserves that role's CPUs too and leaves it COLOCATED_GPU_SHARE of each GPU (when the role uses a GPU at all).
- Each vLLM engine is a STRICT_PACK group of `tensor_parallel_size` bundles, the first holding the engine actor's
  CPUs; with tensor parallelism the engine's own Ray workers take the GPUs, so the actor requests none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from relay.config import InferenceSection, RelayConfig

COLOCATED_GPU_SHARE = 0.25  # of each policy GPU, per GPU-using role placed beside the policy learner
Role = Literal["policy", "critic", "reference", "reward"]
Strategy = Literal["PACK", "STRICT_PACK"]


@dataclass(frozen=True)
class Placement:
    """One role's ranks: the group it creates (none when it shares the policy's) and each rank's request."""

    world_size: int
    bundles: list[dict[str, float]]  # its own placement group, one bundle per rank; [] when colocated
    strategy: Strategy
    cpus_per_rank: float  # what each rank actor requests inside its bundle
    gpus_per_rank: float

    @property
    def colocated(self) -> bool:
        return not self.bundles


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


def uses_gpu(config: RelayConfig, role: Role) -> bool:
    """On `device: cuda` every role holds GPUs except a reward that is not a model (a function or an endpoint)."""
    return config.device == "cuda" and (role != "reward" or config.reward.uses_gpu_model)


def colocated_roles(config: RelayConfig) -> list[Role]:
    return [role for role in ("reference", "reward") if role in placed_roles(config)
            and scoring_section(config, role).colocate_with_policy]


def scoring_section(config: RelayConfig, role: Role) -> InferenceSection:
    return config.reference if role == "reference" else config.reward


def role_placement(config: RelayConfig, role: Role) -> Placement:
    if role in ("reference", "reward") and scoring_section(config, role).colocate_with_policy:
        return Placement(
            world_size=config.policy.resources.world_size, bundles=[], strategy="PACK",
            cpus_per_rank=scoring_section(config, role).resources.cpus_per_rank,
            gpus_per_rank=COLOCATED_GPU_SHARE if uses_gpu(config, role) else 0.0,
        )
    section = config.policy if role == "policy" else config.critic if role == "critic" else scoring_section(config, role)
    resources = section.resources
    gpu = 1.0 if uses_gpu(config, role) else 0.0
    cpus_in_bundle, actor_gpus = resources.cpus_per_rank, gpu
    if role == "policy":
        guests = colocated_roles(config)
        cpus_in_bundle += sum(scoring_section(config, guest).resources.cpus_per_rank for guest in guests)
        if gpu:
            actor_gpus = 1.0 - COLOCATED_GPU_SHARE * sum(uses_gpu(config, guest) for guest in guests)
    return Placement(
        world_size=resources.world_size, bundles=[bundle(cpus_in_bundle, gpu)] * resources.world_size,
        strategy="PACK", cpus_per_rank=resources.cpus_per_rank, gpus_per_rank=actor_gpus,
    )


def placed_roles(config: RelayConfig) -> list[Role]:
    """The roles a run places: a critic only for an estimator that needs values (GAE), a reference only when it
    is not the LoRA policy's own base model."""
    return ["policy", *(["critic"] if config.algorithm.uses_critic else []),
            *([] if config.reference_in_policy else ["reference"]), *(["reward"] if config.uses_reward_source else [])]


def engine_placement(config: RelayConfig) -> Placement:
    """One vLLM engine's group; the fleet makes one per engine."""
    rollout = config.rollout
    gpu = 1.0 if config.device == "cuda" else 0.0
    return Placement(
        world_size=1,
        bundles=[bundle(rollout.cpus_per_worker, gpu)] + [bundle(0, gpu)] * (rollout.tensor_parallel_size - 1),
        strategy="STRICT_PACK", cpus_per_rank=rollout.cpus_per_worker,
        gpus_per_rank=gpu if rollout.tensor_parallel_size == 1 else 0.0,
    )


def resource_shortfall(config: RelayConfig, available: dict[str, float]) -> str | None:
    """What the run's placement groups need to start beyond `available` (Ray's cluster resources), role by role,
    or None. A run starts with its learners and one rollout engine: further engines join when they place."""
    needs = {"a rollout engine": _totals([engine_placement(config).bundles])}
    for role in placed_roles(config):
        placement = role_placement(config, role)
        if not placement.colocated:
            needs[role] = _totals([placement.bundles])
    if config.env is not None:
        needs["the environments"] = {"CPU": config.env.num_actors * config.env.cpus_per_actor}
    total = _totals([[need] for need in needs.values()])
    short = [kind for kind in ("CPU", "GPU") if total.get(kind, 0.0) > available.get(kind, 0.0) + 1e-9]
    if not short:
        return None
    parts = ", ".join(f"{name} {', '.join(f'{need.get(kind, 0.0):g} {kind}' for kind in short)}"
                      for name, need in needs.items())
    has = ", ".join(f"{available.get(kind, 0.0):g} {kind}" for kind in short)
    return f"the run needs {', '.join(f'{total.get(kind, 0.0):g} {kind}' for kind in short)} ({parts}); the cluster has {has}"


def _totals(groups: list[list[dict[str, float]]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for bundles in groups:
        for item in bundles:
            for kind, amount in item.items():
                totals[kind] = totals.get(kind, 0.0) + amount
    return totals
