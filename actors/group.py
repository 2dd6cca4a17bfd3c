"""ActorGroup: the N ranks of one Ray role, placed together, called together.

A learner role (policy, critic) is one placement group of `num_nodes × ranks_per_node` bundles (PACK), and its
ranks form one torch.distributed process group. The rollout fleet is different: each vLLM engine gets a placement
group of its own, so the fleet grows and shrinks a group at a time (a placement group cannot be resized).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay.models import QUIET_ENV
from relay.placement import Placement


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class Deadline:
    """One deadline for a wait on several results (run.call_timeout_s): each `ray.wait` is bounded by what is left
    of it, and passing it is a TimeoutError naming what did not answer."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def first_ready(self, refs: list[ray.ObjectRef], what: str,
                    hint: str = "stuck, or too slow for that deadline") -> ray.ObjectRef:
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.left())
        if not ready:
            raise TimeoutError(f"{what} did not answer within run.call_timeout_s={self.timeout_s:.0f} s ({hint})")
        return ready[0]


def get_within(refs: list[ray.ObjectRef], timeout_s: float, what: str,
               hint: str = "stuck, or too slow for that deadline") -> list[Any]:
    """`ray.get` of `refs` with a deadline: a TimeoutError naming `what` after `timeout_s` (run.call_timeout_s),
    and the first error raised as soon as it is in, since other ranks may be left waiting on a dead one."""
    deadline, pending = Deadline(timeout_s), list(refs)
    while pending:
        ready = deadline.first_ready(pending, what, hint)
        pending.remove(ready)
        ray.get(ready)
    return ray.get(refs)


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
        placement: Placement,
        *,
        namespace: str,
        share_placement_group: PlacementGroup | None = None,
        cpu_threads: int | None = None,
        timeout_s: float = 1800.0,
        **actor_kwargs: Any,
    ) -> None:
        """`placement` (relay/placement.py) says what to reserve; a colocated role reserves nothing and puts rank i
        in bundle i of `share_placement_group`, the policy learner's group. `cpu_threads`: each rank's OpenMP
        threads (None: Ray's, one for a fractional-CPU actor). `timeout_s` (run.call_timeout_s) bounds each wait:
        for the placement group, and for the ranks' constructors."""
        self.name = name
        self.timeout_s = timeout_s
        self.world_size = placement.world_size
        self.owns_placement_group = not placement.colocated
        if placement.colocated:
            if share_placement_group is None:
                raise ValueError(f"{name} is colocated with the policy but was given no placement group to share")
            self.placement_group: PlacementGroup = share_placement_group
        else:
            self.placement_group = placement_group(placement.bundles, strategy=placement.strategy)
        bundles = placement.bundles or "the policy learner's, shared"
        try:
            get_within([self.placement_group.ready()], timeout_s,
                       f"{name}: the placement group of its ranks ({bundles})",
                       hint="the cluster has not had the resources free for it, nor has its autoscaler added them")
        except TimeoutError:
            if self.owns_placement_group:  # no longer asked for: the autoscaler need not bring it up
                remove_placement_group(self.placement_group)
            raise
        # The rendezvous lives where rank 0 will run: the node of bundle 0.
        [(master_addr, master_port)] = get_within([
            _master_address.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, 0)
            ).remote()], timeout_s, f"{name}: the rendezvous address on the node of rank 0")
        remote_class = ray.remote(actor_class)
        self.actors = []
        for rank in range(self.world_size):
            rank_env = {
                **QUIET_ENV,
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
                "RANK": str(rank),
                "WORLD_SIZE": str(self.world_size),
                # Ray gives each GPU actor only its own device (CUDA_VISIBLE_DEVICES), which it sees as cuda:0.
                "LOCAL_RANK": "0",
                **({"OMP_NUM_THREADS": str(cpu_threads)} if cpu_threads else {}),
            }
            self.actors.append(
                remote_class.options(
                    name=f"{name}-{rank}",
                    namespace=namespace,
                    num_cpus=placement.cpus_per_rank,
                    num_gpus=placement.gpus_per_rank,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
                    runtime_env={"env_vars": rank_env},
                ).remote(rank=rank, world_size=self.world_size, **actor_kwargs)
            )

    def wait_ready(self) -> None:
        """Block until every rank's constructor has finished (model loaded, engine built), within `timeout_s`."""
        get_within([actor.__ray_ready__.remote() for actor in self.actors], self.timeout_s, f"{self.name} (start)")

    def dead_ranks(self, timeout_s: float = 30.0) -> list[int]:
        """The ranks whose process is gone: their actor answers a ping with RayActorError. (One that does not
        answer within `timeout_s` is alive, if stuck.)"""
        pings = [actor.__ray_ready__.remote() for actor in self.actors]
        dead = []
        for rank, ping in enumerate(pings):
            try:
                ray.get(ping, timeout=timeout_s)
            except RayActorError:
                dead.append(rank)
            except GetTimeoutError:
                pass
        return dead

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method` on every rank with the same arguments; one reference per rank, in rank order."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.owns_placement_group:
            remove_placement_group(self.placement_group)
