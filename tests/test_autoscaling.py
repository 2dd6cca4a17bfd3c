"""`relay scale` beyond the cluster's capacity brings up a node (Ray's fake multi-node autoscaler), the new
rollout worker runs on it, and scaling down lets the node go."""

from __future__ import annotations

import json
from functools import partial

import pytest

from relay import cluster
from relay.cli import main as relay_main
from tests.conftest import DEMO_CONFIG
from tests.live_ray import ray_head, running_job_status, wait_for

pytestmark = pytest.mark.slow

# The head has exactly the CPUs of one run with one rollout worker (0.5 + 0.5 + 0.5 + 0.3 + 0.2 = 2), so a second
# worker's placement group can only be placed on a node the autoscaler adds. The wheel lacks the example config
# that ray.cluster_utils.AutoscalingCluster loads, so the whole config is here.
AUTOSCALING_CONFIG = {
    "cluster_name": "relay-test",
    "max_workers": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
        "ray.worker.cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


def test_scale_beyond_capacity_adds_a_node_and_scale_down_releases_it(tmp_path, capsys):
    from ray.util.state import list_actors, list_nodes

    config_file = tmp_path / "autoscaling.json"
    config_file.write_text(json.dumps(AUTOSCALING_CONFIG))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    # The fake node provider starts its nodes against the default GCS port.
    with ray_head(["--num-cpus=2", f"--autoscaling-config={config_file}"], env, gcs_port=6379) as (address, _):
        alive_nodes = lambda: [node for node in list_nodes(address=address) if node.state == "ALIVE"]  # noqa: E731
        [head] = wait_for(alive_nodes, 30, "the head node in the state API")
        relay_main([
            "submit", str(DEMO_CONFIG), "--address", address, f"run.output_dir={tmp_path / 'run'}",
            "run.name=autoscaled", "run.iterations=1000000", "run.eval_every=0", "run.checkpoint_every=0",
            "warm_start=null", "data.train_prompts=256", "data.prompts_per_iteration=8", "data.eval_prompts=8",
            "data.eval_samples_per_prompt=1", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
            "policy.micro_batch_size=4", "critic.micro_batch_size=4", "algorithm.mini_batches=1",
            "rollout.cpus_per_worker=0.5", "policy.resources.cpus_per_rank=0.5",
            "critic.resources.cpus_per_rank=0.5", "reference.resources.cpus_per_rank=0.3",
            "reward.resources.cpus_per_rank=0.2",
        ])
        job_id = capsys.readouterr().out.strip().splitlines()[-1]
        client = cluster.job_client(address)
        run_status = partial(running_job_status, job_id, address)

        wait_for(lambda: (s := run_status()) and s.get("iteration", 0) >= 1, 300, "the first iteration", 3)
        relay_main(["scale", job_id, "--rollout-workers", "2", "--address", address])
        # The pending worker's placement group makes the autoscaler add a node; the run goes on meanwhile.
        wait_for(lambda: len(alive_nodes()) == 2, 120, "the autoscaler to add a node", 2)
        wait_for(lambda: (s := run_status()) and len(s["rollout_workers_active"]) == 2, 240, "rollout-1 to join", 3)
        [worker] = [actor for actor in list_actors(address=address, filters=[("name", "=", "rollout-1")])
                    if actor.state == "ALIVE"]
        assert worker.node_id != head.node_id

        relay_main(["scale", job_id, "--rollout-workers", "1", "--address", address])
        wait_for(lambda: (s := run_status()) and len(s["rollout_workers_active"]) == 1, 120, "the scale-down", 3)
        wait_for(lambda: len(alive_nodes()) == 1, 120, "the idle node to be removed", 2)
        run_status()  # the node went while the run was still going (it is never near its last iteration)
        relay_main(["stop", job_id, "--address", address])
        wait_for(lambda: client.get_job_status(job_id) in ("STOPPED", "FAILED", "SUCCEEDED"), 60, "the job to stop")
