"""What every section of the config tree shares: the base class (unknown keys refused, assignments validated),
the dtype and device literals, and Resources, where the ranks of one role run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(Section):
    """Where the ranks of one role run. On `device: cuda` each rank holds one GPU."""

    num_nodes: int = Field(1, ge=1, description="nodes this role spans")
    gpus_per_node: int = Field(0, ge=0, description="GPU ranks per node; 0 on device: cpu")
    cpu_ranks_per_node: int = Field(1, ge=1, description="ranks per node on device: cpu")
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs each rank reserves (fractions are fine)")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_ranks_per_node

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.ranks_per_node
