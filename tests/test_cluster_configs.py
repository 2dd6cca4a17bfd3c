"""The cluster definitions under cluster/ against what they must agree with: Ray's own cluster-config schema
(shipped in the Ray wheel), the installed Ray version, pyproject.toml's dependencies, and the GPU job configs
whose placement groups must fit the GPU node types. No cluster is started; this takes about a second."""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from relay.config import RelayConfig, load_config
from relay.metrics import ray_metric_name
from tests.conftest import run_placement_groups

ROOT = Path(__file__).resolve().parents[1]
RAY_CLUSTER = ROOT / "cluster" / "ray-cluster.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
GPU_CONFIGS = ["jobs/configs/qwen2.5-1.5b-1node.yaml", "jobs/configs/llama3-8b-multinode.yaml"]
PRIVATE_PORTS = {6379: "GCS", 8080: "metrics", 8265: "dashboard / job API", 10001: "Ray client"}
RAY_START_COMMANDS = ("head_start_ray_commands", "worker_start_ray_commands")


# ---------------------------------------------------------------------------------------------------- helpers
def nodes_needed(config: RelayConfig, node: dict[str, float]) -> int:
    """Nodes of shape `node` that hold every placement group of `config`: first fit, largest group first (an
    upper bound on the optimum, so `nodes_needed <= max_workers` means the run fits)."""
    free: list[dict[str, float]] = []

    def fits(bundles, room):
        return all(sum(b.get(key, 0) for b in bundles) <= room.get(key, 0) + 1e-9 for key in ("CPU", "GPU"))

    def take(bundles, room):
        for key in ("CPU", "GPU"):
            room[key] -= sum(b.get(key, 0) for b in bundles)

    groups = sorted(run_placement_groups(config), key=lambda g: -sum(b.get("GPU", 0) for b in g[1]))
    for strategy, bundles in groups:
        units = [bundles] if strategy == "STRICT_PACK" else [[b] for b in bundles]
        for unit in units:
            assert fits(unit, node), f"a {strategy} unit {unit} does not fit one node {node}"
            room = next((room for room in free if fits(unit, room)), None)
            if room is None:
                room = dict(node)
                free.append(room)
            take(unit, room)
    return len(free)


def node_gpus(config: RelayConfig) -> int:
    """GPUs per node the config is written for: the per-node rank count of a role that spans nodes, or, when
    every role is on one node, everything the run asks for (it is a one-node config)."""
    spanning = [section.resources.gpus_per_node
                for section in (config.policy, config.critic, config.reference, config.reward)
                if section.resources.num_nodes > 1]
    if spanning:
        return max(spanning)
    return sum(bundle.get("GPU", 0) for _, bundles in run_placement_groups(config) for bundle in bundles)


def pyproject_requirements() -> dict[str, Requirement]:
    """pyproject.toml's dependencies plus the `gpu` extra, by normalized name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["gpu"]
    return {Requirement(spec).name.lower(): Requirement(spec) for spec in specs}


def same_requirement(a: Requirement, b: Requirement) -> bool:
    return (a.name.lower(), a.extras, a.specifier) == (b.name.lower(), b.extras, b.specifier)


def image_ray_version(image: str) -> str:
    """`rayproject/ray:2.60.0-py311-gpu` -> `2.60.0`."""
    repository, _, tag = image.rpartition(":")
    assert repository.endswith("rayproject/ray"), f"{image}: not Ray's image"
    return tag.split("-")[0]


def ports_of(rule: dict) -> range:
    if str(rule.get("IpProtocol")) == "-1":
        return range(0, 65536)
    return range(int(rule["FromPort"]), int(rule["ToPort"]) + 1)


def is_public(rule: dict) -> bool:
    return any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
        r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load(RAY_CLUSTER.read_text())


@pytest.fixture(scope="module")
def kuberay_docs() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(KUBERAY.glob("*.yaml"))}


@pytest.fixture(scope="module")
def raycluster(kuberay_docs) -> dict:
    (found,) = [doc for doc in kuberay_docs["raycluster.yaml"] if doc["kind"] == "RayCluster"]
    return found


@pytest.fixture(scope="module")
def rayjob(kuberay_docs) -> dict:
    (found,) = [doc for doc in kuberay_docs["rayjob.yaml"] if doc["kind"] == "RayJob"]
    return found


def gpu_node_types(cluster: dict) -> dict[str, dict]:
    return {name: spec for name, spec in cluster["available_node_types"].items()
            if name != cluster["head_node_type"]}


# -------------------------------------------------------------------------------------- ray up (cluster launcher)
def test_ray_cluster_config_passes_rays_own_schema_and_checks(cluster_yaml):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_yaml, schema)
    # What `ray up` does before it launches anything: fill in the provider's defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(cluster_yaml)))
    # The schema is strict enough to catch a typo (so the checks above are not vacuous).
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cluster_yaml, "max_worker": 4}, schema)


def test_ray_cluster_image_is_the_installed_ray_and_pyproject_allows_it(cluster_yaml):
    docker = cluster_yaml["docker"]
    images = [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]
    assert images
    for image in images:
        assert image_ray_version(image) == ray.__version__, image
        assert image.endswith("-gpu") or "-cu" in image, f"{image}: not a CUDA image"
    assert ray.__version__ in pyproject_requirements()["ray"].specifier


def test_ray_cluster_installs_exactly_pyprojects_dependencies(cluster_yaml):
    installs = [shlex.split(command) for command in cluster_yaml["setup_commands"] if "pip install" in command]
    assert len(installs) == 1
    installed = {Requirement(arg).name.lower(): Requirement(arg)
                 for arg in installs[0][2:] if not arg.startswith("-")}
    wanted = pyproject_requirements()
    assert installed.keys() == wanted.keys()
    for name, requirement in installed.items():
        if name == "ray":  # pinned to the image's Ray, which pyproject's range must allow
            assert str(requirement.specifier) == f"=={ray.__version__}"
            assert requirement.extras == wanted["ray"].extras
        else:
            assert same_requirement(requirement, wanted[name]), (requirement, wanted[name])


def test_ray_cluster_head_takes_no_work(cluster_yaml):
    head = cluster_yaml["available_node_types"][cluster_yaml["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0


def test_ray_cluster_gpu_worker_types_have_gpus_and_bounds(cluster_yaml):
    types = gpu_node_types(cluster_yaml)
    assert types
    for name, spec in types.items():
        assert spec["resources"]["GPU"] >= 1, name
        assert spec["resources"]["CPU"] >= 1, name
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= cluster_yaml["max_workers"], name


@pytest.mark.parametrize("config_path", GPU_CONFIGS)
def test_ray_cluster_fits_each_gpu_job_config(cluster_yaml, config_path):
    config = load_config(ROOT / config_path)
    assert config.device == "cuda"
    fitting = {name: nodes_needed(config, spec["resources"])
               for name, spec in gpu_node_types(cluster_yaml).items()
               if spec["resources"]["GPU"] == node_gpus(config)}
    assert any(needed <= gpu_node_types(cluster_yaml)[name]["max_workers"] for name, needed in fitting.items()), (
        f"{config_path}: no {node_gpus(config)}-GPU node type can hold it within max_workers: {fitting}")
    assert min(fitting.values()) <= cluster_yaml["max_workers"]


def test_ray_cluster_keeps_dashboard_and_job_api_private(cluster_yaml):
    rules = cluster_yaml["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in filter(is_public, rules):
        opened = ports_of(rule)
        exposed = {port: what for port, what in PRIVATE_PORTS.items() if port in opened}
        assert not exposed, f"security group rule opens {exposed} to the internet: {rule}"
    for node_type in cluster_yaml["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"], "a hand-made security group is not checked here"
    commands = " ".join(" ".join(cluster_yaml[key]) for key in RAY_START_COMMANDS)
    assert "--dashboard-host=127.0.0.1" in commands
    assert "0.0.0.0" not in commands
    docker_options = " ".join(sum((cluster_yaml["docker"].get(k, []) for k in
                                   ("run_options", "head_run_options", "worker_run_options")), []))
    assert not any(f"{port}:" in docker_options for port in PRIVATE_PORTS), "a port published by Docker"


def test_ray_cluster_token_auth_and_metrics_on_every_node(cluster_yaml):
    for key in RAY_START_COMMANDS:
        starts = [command for command in cluster_yaml[key] if "ray start" in command]
        assert starts, key
        for command in starts:
            assert "RAY_AUTH_MODE=token ray start" in " ".join(command.split()), command
            assert "--metrics-export-port=8080" in command, command
    assert any(remote.endswith("/.ray/auth_token") and local.endswith(".ray/auth_token")
               for remote, local in cluster_yaml["file_mounts"].items())
    assert "RAY_AUTH_MODE=disabled" not in RAY_CLUSTER.read_text()


# ------------------------------------------------------------------------------------------------------ KubeRay
def ray_containers(spec: dict) -> list[dict]:
    templates = [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]
    return [container for template in templates for container in template["spec"]["containers"]
            if container["name"].startswith("ray-")]


def gpu_group(spec: dict) -> dict:
    (group,) = [group for group in spec["workerGroupSpecs"]
                if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]]
    return group


def pod_resources(group: dict) -> dict[str, float]:
    resources = group["template"]["spec"]["containers"][0]["resources"]
    for key in ("cpu", "nvidia.com/gpu"):
        assert str(resources["requests"][key]) == str(resources["limits"][key]), key
    return {"CPU": float(resources["limits"]["cpu"]), "GPU": int(resources["limits"]["nvidia.com/gpu"])}


def rayjob_config_path(rayjob: dict) -> Path:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.ppo"], argv
    return ROOT / argv[argv.index("--config") + 1]


def test_kuberay_ray_version_and_images_match_the_installed_ray(raycluster, rayjob):
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        for container in ray_containers(spec):
            assert image_ray_version(container["image"]) == ray.__version__, container["image"]
            assert container["image"].endswith("-gpu") or "-cu" in container["image"]


def test_rayjob_cluster_is_the_raycluster(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


def test_rayjob_entrypoint_config_exists_and_validates(rayjob):
    path = rayjob_config_path(rayjob)
    assert path.is_file(), path
    assert load_config(path).device == "cuda"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_retries_a_failed_driver_which_resumes_from_the_shared_volume(rayjob):
    config = load_config(rayjob_config_path(rayjob))
    assert rayjob["spec"]["backoffLimit"] >= 1
    assert config.run.resume == "auto" and config.run.checkpoint_every > 0
    mounts = {mount["mountPath"] for group in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"],
                                               *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
              for container in group["template"]["spec"]["containers"] for mount in container.get("volumeMounts", [])}
    assert any(config.run.output_dir.startswith(mount + "/") for mount in mounts), (config.run.output_dir, mounts)


def test_rayjob_runtime_env_is_valid_and_brings_pyprojects_dependencies(rayjob):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "pip", "env_vars"}
    RuntimeEnv(**runtime_env)  # Ray's own checks: working_dir must be a remote .zip/.tar.gz URI here
    assert runtime_env["working_dir"].startswith(("https://", "s3://", "gs://"))
    packages = runtime_env["pip"]["packages"]
    wanted = {name: req for name, req in pyproject_requirements().items() if name != "ray"}  # Ray: the image's
    got = {Requirement(spec).name.lower(): Requirement(spec) for spec in packages}
    assert got.keys() == wanted.keys()
    assert all(same_requirement(got[name], wanted[name]) for name in got)


def test_kuberay_gpu_group_matches_the_job_config(raycluster, rayjob):
    config = load_config(rayjob_config_path(rayjob))
    group = gpu_group(rayjob["spec"]["rayClusterSpec"])
    node = pod_resources(group)
    assert node["GPU"] == node_gpus(config)
    assert nodes_needed(config, node) <= group["maxReplicas"]


@pytest.mark.parametrize("config_path", GPU_CONFIGS)
def test_raycluster_fits_each_gpu_job_config(raycluster, config_path):
    config = load_config(ROOT / config_path)
    group = gpu_group(raycluster["spec"])
    node = pod_resources(group)
    assert node["GPU"] == node_gpus(config)
    assert nodes_needed(config, node) <= group["maxReplicas"]


def test_kuberay_autoscaling_bounds(raycluster, rayjob):
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
            assert group["maxReplicas"] >= 1


def test_kuberay_head_takes_no_work_and_workers_export_metrics(raycluster):
    spec = raycluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for params in [head["rayStartParams"]] + [group["rayStartParams"] for group in spec["workerGroupSpecs"]]:
        assert params["metrics-export-port"] == "8080"


def test_kuberay_nothing_is_exposed_outside_the_cluster(kuberay_docs, raycluster, rayjob):
    for name, docs in kuberay_docs.items():
        for doc in docs:
            assert doc["kind"] not in {"Ingress", "Gateway", "HTTPRoute"}, name
            if doc["kind"] == "Service":
                assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)


def test_kuberay_token_auth_is_on(raycluster, rayjob):
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        for container in ray_containers(spec):
            for env in container.get("env", []):
                assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token"), env


# ---------------------------------------------------------------------------------------------------------------
# cluster/grafana: relay's Grafana dashboard


def test_grafana_dashboard_is_what_grafanas_schema_library_builds():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    spec = importlib.util.spec_from_file_location("relay_dashboard", ROOT / "cluster" / "grafana" / "relay_dashboard.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    committed = json.loads((ROOT / "cluster" / "grafana" / "relay-dashboard.json").read_text())
    assert committed == builder.build()  # regenerate with: python cluster/grafana/relay_dashboard.py
    # It parses as Grafana's dashboard model and encodes back to itself (nothing the schema does not know).
    assert json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(committed))) == committed


def test_grafana_dashboard_covers_the_runs_metrics():
    board = json.loads((ROOT / "cluster" / "grafana" / "relay-dashboard.json").read_text())
    queries = " ".join(target["expr"] for panel in board["panels"] for target in panel["targets"])
    for metric in ("reward/mean", "eval/score", "eval/win_rate", "policy/kl_ref", "eval/kl_ref", "policy/entropy",
                   "losses/clipfrac", "critic/value_error", "perf/tokens_per_s", "policy/version",
                   "rollout/workers_active", "rollout/workers_pending", "rollout/worker_failures"):
        assert ray_metric_name(metric) in queries, metric
    assert all('run=~"$run"' in target["expr"] for panel in board["panels"] for target in panel["targets"])
    assert [variable["name"] for variable in board["templating"]["list"]] == ["datasource", "run"]


# ---------------------------------------------------------------------------------------------------------------
# cluster/serve.yaml: the policy as a Serve application


def test_serve_config_passes_serves_schema_and_builds_the_application(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    import jobs.serve
    from relay.config import dump_config

    deploy = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text()))
    [application] = deploy.applications
    assert application.import_path == "jobs.serve:app" and deploy.http_options.port == 8000
    assert deploy.proxy_location.value == "HeadOnly"  # one entry point, reached through the head like the dashboard
    args = jobs.serve.AppArgs.model_validate(application.args)
    assert args.follow and args.autoscaling["max_replicas"] >= args.autoscaling["min_replicas"] >= 1

    # What the builder makes of those arguments (it runs where Serve imports it, on the cluster: here, its parts
    # that need no Ray), on a run directory: a run's GPU config and its newest checkpoint.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "iter_000003" / "policy").mkdir(parents=True)
    (run_dir / "checkpoints" / "iter_000003" / "policy" / "config.json").write_text("{}")
    (run_dir / "config.yaml").write_text(dump_config(load_config(ROOT / GPU_CONFIGS[0])))
    served = jobs.serve.resolve(str(run_dir), args.checkpoint, None, args.model_id, follow=args.follow)
    config = jobs.serve.llm_config(served, args.autoscaling)
    assert config.deployment_config["autoscaling_config"] == application.args["autoscaling"]
    assert config.model_loading_config.model_source == str((run_dir / "checkpoints" / "iter_000003" / "policy").resolve())
    assert config.engine_kwargs["dtype"] == load_config(ROOT / GPU_CONFIGS[0]).policy.dtype
    assert config.experimental_configs["relay_follow"]["checkpoint"] == "iter_000003"
    assert config.server_cls is jobs.serve.FollowingLLMServer
