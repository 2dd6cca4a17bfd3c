"""What a role's process spends: the seconds each of its passes took since the driver last asked, and its peak
memory. Every role class mixes this in; the driver logs it per iteration (`busy/…`, `memory/…`), and `relay bench`
splits the parallel phases of an iteration by it."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Usage:
    _busy_seconds: dict[str, float] | None = None  # each process's own, from its first busy pass

    @contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """Count the block's wall seconds as this process's `what` (on a GPU, once its kernels have finished)."""
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.add_busy(what, time.perf_counter() - started)

    def add_busy(self, what: str, seconds: float) -> None:
        """Count `seconds` as this process's `what` (for work timed by itself, such as a generator's)."""
        if self._busy_seconds is None:
            self._busy_seconds = {}
        self._busy_seconds[what] = self._busy_seconds.get(what, 0.0) + seconds

    def usage(self) -> dict[str, float]:
        """Seconds per pass since the last call (then reset), and peak memory so far: resident (MiB) and, on a
        GPU, allocated by torch (MiB)."""
        seconds, self._busy_seconds = self._busy_seconds or {}, {}
        peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
        if torch.cuda.is_available():
            peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return {**{f"busy/{what}": value for what, value in seconds.items()}, **peak}
