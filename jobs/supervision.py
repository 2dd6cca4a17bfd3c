"""Supervision of a run: in-job restarts when a role dies, SIGTERM, and the control actor through which
`relay scale`, `relay status` and `relay stop --finish` reach the driver (actors/control.py).

Every wait on a role has a deadline (run.call_timeout_s): actors.group.Deadline, used by every wait loop.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from actors.control import RunControl
from actors.group import get_within
from relay.config import RelayConfig
from relay.naming import CONTROL_NAMESPACE, control_actor_name, current_run_id


class Terminated(Exception):
    """The run ended on SIGTERM, after writing its checkpoint."""


def log_line(line: str) -> None:
    """One line into the job's log at once: above the progress bar on a terminal, and flushed, so a file or Ray's
    log forwarding gets it the moment it is written rather than when a buffer fills."""
    tqdm.write(line)
    sys.stdout.flush()


class Supervisor:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.terminate_requested = False
        self.control: ActorHandle | None = None

    def catch_sigterm(self) -> None:
        """SIGTERM (`relay stop`, `ray job stop`, a preempted node) is acted on at the next iteration boundary.
        Installed after ray.init, which installs a handler of its own that aborts."""
        def on_sigterm(signum: int, frame: object) -> None:
            self.terminate_requested = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def fit(self, train: Callable[[], dict], a_role_died: Callable[[], bool], tear_down: Callable[[], None],
            where: str) -> dict:
        """`train()` to the end. When a learner, reference or reward actor dies, `tear_down()` and train again
        from the newest checkpoint (in `where`), within run.max_restarts (the rollout fleet heals itself)."""
        restarts, max_restarts = 0, self.config.run.max_restarts
        while True:
            try:
                return train()
            except (RayActorError, RayTaskError) as error:
                # When a rank dies, its peers' calls fail too (a collective whose peer is gone), and their
                # RayTaskError may arrive before its RayActorError: either is a role's failure if a process died.
                if isinstance(error, RayTaskError) and not a_role_died():
                    raise
                if restarts == max_restarts:
                    raise RuntimeError(f"a role failed again after {restarts} restarts (run.max_restarts): {error}\n"
                                       f"Run the same command again to resume from the newest checkpoint in {where}"
                                       ) from error
                restarts += 1
                log_line(f"a role failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:300]}); "
                         f"restarting every role from the newest checkpoint ({restarts} of {max_restarts})")
                tear_down()

    # ---------------------------------------------------------------- the control actor
    def start_control(self) -> None:
        """The run's control actor, or the one a restart left (it keeps the requests it holds)."""
        self.control = ray.remote(RunControl).options(
            name=control_actor_name(current_run_id(self.config.run.name)), namespace=CONTROL_NAMESPACE,
            num_cpus=0, get_if_exists=True,
        ).remote(self.config.rollout.num_workers)

    def requests(self) -> dict[str, Any]:
        """What was asked since the run started: {"rollout_workers": n, "finish": bool}."""
        assert self.control is not None
        [requests] = get_within([self.control.requests.remote()], self.config.run.call_timeout_s, "control")
        return requests

    def report(self, status: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.report.remote(status)

    def shutdown(self) -> None:
        if self.control is not None:
            ray.kill(self.control)
            self.control = None
