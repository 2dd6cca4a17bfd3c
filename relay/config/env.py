"""The environment section: what a multi-turn (agent) run acts in (relay/envs/__init__.py has the contract)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from relay.config.base import Section


class EnvSection(Section):
    """An environment class the policy acts in over several turns: one instance per episode, run in a pool of Ray
    actors beside the engines, many episodes per actor at once."""

    name: str = Field(..., description="`module:Class` with reset(row, seed) and step(action): yours, or relay.envs'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="the class's constructor arguments")
    max_turns: int = Field(4, ge=1, description="model turns per episode at most (calls to step)")
    num_actors: int = Field(1, ge=1, description="environment actors; episodes are spread over them")
    cpus_per_actor: float = Field(0.25, gt=0, description="each actor's CPUs (I/O-bound envs need little)")
    max_error_rate: float = Field(0.1, ge=0, le=1, description="share of an iteration's episodes whose env may "
                                                                 "raise or time out before the run stops")
    timeout_s: float = Field(60.0, gt=0, description="seconds a reset or step may take before the episode ends")
