"""ActorGroup: the N ranks of one Ray role, placed together, called together.

A learner role (policy, critic) is one placement group of `num_nodes × ranks_per_node` bundles (PACK), and its
ranks form one torch.distributed process group. The rollout fleet is different: each vLLM engine gets a placement
group of its own, so the fleet grows and shrinks a group at a time (a placement group cannot be resized).
"""

from __future__ import annotations

import socket
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay.config import Resources


def bundle(cpus: float, gpus: int) -> dict[str, float]:
    resources: dict[str, float] = {"CPU": cpus}
    if gpus:
        resources["GPU"] = gpus
    return resources


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@ray.remote(num_cpus=0)
def _master_address() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port()


class ActorGroup:
    """`world_size` actors of `actor_class`, named `{name}-{rank}` in `namespace`, in one placement group.

    Each actor's constructor gets `rank` and `world_size` as keywords, plus the environment that
    torch.distributed reads (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK).
    """

    def __init__(
        self,
        actor_class: type,
        name: str,
        resources: Resources,
        *,
        use_gpu: bool,
        namespace: str,
        gpus_per_rank: float = 1.0,
        colocated_cpus_per_rank: float = 0.0,
        share_placement_group: PlacementGroup | None = None,
        env: dict[str, str] | None = None,
        **actor_kwargs: Any,
    ) -> None:
        """`share_placement_group`: place rank i in bundle i of another role's group (colocation; that role
        reserved `colocated_cpus_per_rank` extra CPUs per bundle and left `1 - gpus_per_rank` of each GPU free)."""
        self.name = name
        self.world_size = resources.world_size
        gpus = gpus_per_rank if use_gpu else 0
        self.owns_placement_group = share_placement_group is None
        if share_placement_group is None:
            rank_bundle = bundle(resources.cpus_per_rank + colocated_cpus_per_rank, 1 if use_gpu else 0)
            self.placement_group: PlacementGroup = placement_group([rank_bundle] * self.world_size, strategy="PACK")
        else:
            self.placement_group = share_placement_group
        ray.get(self.placement_group.ready())
        # The rendezvous lives where rank 0 will run: the node of bundle 0.
        master_addr, master_port = ray.get(
            _master_address.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, 0)
            ).remote()
        )
        remote_class = ray.remote(actor_class)
        self.actors = []
        for rank in range(self.world_size):
            rank_env = {
                **(env or {}),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
                "RANK": str(rank),
                "WORLD_SIZE": str(self.world_size),
                # Ray gives each GPU actor only its own device (CUDA_VISIBLE_DEVICES), which it sees as cuda:0.
                "LOCAL_RANK": "0",
            }
            self.actors.append(
                remote_class.options(
                    name=f"{name}-{rank}",
                    namespace=namespace,
                    num_cpus=resources.cpus_per_rank,
                    num_gpus=gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
                    runtime_env={"env_vars": rank_env},
                ).remote(rank=rank, world_size=self.world_size, **actor_kwargs)
            )


    def wait_ready(self) -> None:
        """Block until every rank's constructor has finished (model loaded, engine built)."""
        ray.get([actor.__ray_ready__.remote() for actor in self.actors])

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method` on every rank with the same arguments; one reference per rank, in rank order."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return ray.get(self.call(method, *args, **kwargs))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.owns_placement_group:
            remove_placement_group(self.placement_group)
