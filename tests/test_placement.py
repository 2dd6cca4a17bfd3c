"""relay/placement.py: what a run asks Ray for, worked out by hand for the shapes that matter."""

from __future__ import annotations

from relay.config import load_config
from relay.placement import COLOCATED_GPU_SHARE, engine_placement, role_placement
from tests.conftest import run_placement_groups
from tests.conftest import DEMO_CONFIG


def test_demo_on_cpu_reserves_its_cpus_and_no_gpu():
    config = load_config(DEMO_CONFIG)
    # demo.yaml: 1 engine of 0.4 CPU, policy 0.4, critic 0.4, reference 0.2, reward 0.1: 1.5 CPUs, under 2.
    assert run_placement_groups(config) == [
        ("STRICT_PACK", [{"CPU": 0.4}]),
        ("PACK", [{"CPU": 0.4}]),
        ("PACK", [{"CPU": 0.4}]),
        ("PACK", [{"CPU": 0.2}]),
        ("PACK", [{"CPU": 0.1}]),
    ]
    assert role_placement(config, "policy").gpus_per_rank == 0


def test_colocated_scorers_share_the_policy_gpus_and_a_function_reward_takes_none():
    gpu_run = ["device=cuda", "warm_start=null", "policy.resources.gpus_per_node=4", "policy.resources.cpus_per_rank=2",
               "critic.resources.gpus_per_node=2", "reference.resources.gpus_per_node=4",
               "reference.colocate_with_policy=true", "reference.resources.cpus_per_rank=1",
               "rollout.tensor_parallel_size=2", "data.prompts_per_iteration=64",
               "policy.micro_batch_size=4", "critic.micro_batch_size=4"]
    config = load_config(DEMO_CONFIG, gpu_run)
    policy, reference, reward = (role_placement(config, role) for role in ("policy", "reference", "reward"))
    # Each policy bundle holds its own 2 CPUs plus the reference's 1, and one GPU, of which the reference takes
    # a quarter. The function reward (demo.yaml: 0.1 CPU) has a group of its own with no GPU.
    assert policy.bundles == [{"CPU": 3.0, "GPU": 1.0}] * 4 and policy.cpus_per_rank == 2
    assert policy.gpus_per_rank == 1 - COLOCATED_GPU_SHARE == 0.75
    assert reference.colocated and reference.world_size == 4 and reference.gpus_per_rank == COLOCATED_GPU_SHARE
    assert reward.bundles == [{"CPU": 0.1}] and reward.gpus_per_rank == 0
    # A tensor-parallel engine: two GPU bundles packed on one node; its own Ray workers take the GPUs.
    engine = engine_placement(config)
    assert engine.strategy == "STRICT_PACK"
    assert engine.bundles == [{"CPU": config.rollout.cpus_per_worker, "GPU": 1.0}, {"CPU": 0, "GPU": 1.0}]
    assert engine.gpus_per_rank == 0
    # The colocated reference makes no group of its own: engine, policy, critic, reward.
    assert [strategy for strategy, _ in run_placement_groups(config)] == ["STRICT_PACK", "PACK", "PACK", "PACK"]

    # A reward model beside them takes another quarter of each policy GPU, and half a CPU more per bundle.
    with_model = load_config(DEMO_CONFIG, [*gpu_run, "reward.type=model", "reward.model=some/reward-model",
                                           "reward.colocate_with_policy=true", "reward.resources.cpus_per_rank=0.5"])
    policy = role_placement(with_model, "policy")
    assert policy.bundles == [{"CPU": 3.5, "GPU": 1.0}] * 4 and policy.gpus_per_rank == 0.5
    assert role_placement(with_model, "reward").gpus_per_rank == COLOCATED_GPU_SHARE
    assert len(run_placement_groups(with_model)) == 3


def test_resource_shortfall_names_each_role_and_what_the_cluster_has():
    from relay.placement import resource_shortfall

    config = load_config(DEMO_CONFIG)
    assert resource_shortfall(config, {"CPU": 2.0}) is None  # demo.yaml fits a 2-CPU machine (1.5 CPUs)
    assert resource_shortfall(config, {"CPU": 1.0}) == (
        "the run needs 1.5 CPU (a rollout engine 0.4 CPU, policy 0.4 CPU, critic 0.4 CPU, reference 0.2 CPU, "
        "reward 0.1 CPU); the cluster has 1 CPU")
    # Engines beyond the first may wait for resources (they join when placed), as when scaling up.
    assert resource_shortfall(load_config(DEMO_CONFIG, ["rollout.num_workers=4"]), {"CPU": 2.0}) is None
    gpu = load_config(DEMO_CONFIG, ["device=cuda", "warm_start=null", "policy.resources.gpus_per_node=1",
                                    "critic.resources.gpus_per_node=1", "reference.resources.gpus_per_node=1"])
    assert resource_shortfall(gpu, {"CPU": 8.0}).startswith("the run needs 4 GPU (a rollout engine 1 GPU, policy")


def test_an_output_dir_under_a_file_is_refused(tmp_path):
    import pytest

    from jobs.common import check_output_dir

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"afile is a file, not a directory"):
        check_output_dir(tmp_path / "afile" / "run")
    check_output_dir(tmp_path / "new" / "run")  # creatable: fine, and nothing is created by the check
    assert not (tmp_path / "new").exists()
