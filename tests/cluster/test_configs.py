"""Every file under cluster_configs/ parses, carries the keys its tool needs, and every
entrypoint names our real command with real flags (parsed by our own CLI parser)."""

from __future__ import annotations

import gzip
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pseudolabel.pipelines.cli import build_parser, config_from_args
from tests.cluster import crd

ROOT = Path(__file__).parents[2] / "cluster_configs"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/rayjob.yaml", "kuberay/raycronjob.yaml"]
IMAGE = "your-registry/pseudolabel:0.1.0-gpu"  # cluster_configs/Dockerfile, pushed


def load(name):
    return yaml.safe_load((ROOT / name).read_text())


def check_entrypoint(command: str) -> None:
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "pseudolabel"]:
        argv = argv[3:]
    else:
        assert argv[0] == "pseudolabel", command
        argv = argv[1:]
    args = build_parser().parse_args(argv)  # unknown flags exit here
    config = config_from_args(args)  # and bad values here
    assert "{" not in config.input + config.output  # placeholders were filled in


def prepared(name: str) -> dict:
    """The launcher file as ``ray up`` sees it: defaults filled in, then Ray's own schema
    check (``validate_config`` needs the prepared form)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)
    return config


def nodes_to_launch(config: dict, demand: dict) -> dict[str, int]:
    """What Ray's autoscaler (v1 ``ResourceDemandScheduler``) would launch for one
    ``demand`` on a cluster that is only its head: {} where no node type fits."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    scheduler = ResourceDemandScheduler(
        provider=None,  # consulted only about existing nodes, and there are none
        node_types=config["available_node_types"],
        max_workers=config["max_workers"],
        head_node_type=config["head_node_type"],
        upscaling_speed=config["upscaling_speed"],
    )
    launch, _ = scheduler.get_nodes_to_launch(
        nodes=[],
        launching_nodes={config["head_node_type"]: 1},
        resource_demands=[demand],
        unused_resources_by_ip={},
        pending_placement_groups=[],
        max_resources_by_ip={},
        ensure_min_cluster_size=[],
        node_availability_summary=NodeAvailabilitySummary({}),
    )
    return launch


# What a worker or labeler actor asks for with --gpus-per-worker 1 (and the defaults).
GPU_ACTOR = {"CPU": 1, "GPU": 1}
READ_TASK = {"CPU": 1}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_rays_validator_and_scales_gpus_from_zero(name):
    config = prepared(name)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}  # no work on the head
    workers = {k: v for k, v in types.items() if k != head}
    assert {"gpu_worker", "cpu_worker"} <= set(workers)
    for worker_type, spec in workers.items():
        assert spec["min_workers"] == 0, worker_type  # scale from zero
        # Declared, not detected: GCP's provider fills in no GPUs, AWS's needs the cloud.
        assert spec["resources"].get("CPU", 0) >= 1, worker_type
        assert nodes_to_launch(config, spec["resources"]) == {worker_type: 1}
    assert nodes_to_launch(config, GPU_ACTOR) == {"gpu_worker": 1}
    assert "gpu_worker" not in nodes_to_launch(config, READ_TASK)  # GPUs kept for GPU work


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_without_declared_resources_cannot_get_a_gpu(name):
    """The check above can fail: ``resources: {}`` (the old files) leaves the GPU
    demand infeasible, and the run would wait out --startup-timeout."""
    from ray.autoscaler._private.util import prepare_config

    config = load(name)
    for spec in config["available_node_types"].values():
        if spec.get("min_workers") is not None:
            spec["resources"] = {}
    assert nodes_to_launch(prepare_config(config), GPU_ACTOR) == {}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_share_the_token_and_run_the_image(name):
    config = load(name)
    # The folder with the operator's token goes to the head, which copies it to the
    # workers (a folder: Docker would pin a single file's inode).
    assert config["file_mounts"] == {"~/.pseudolabel-auth": "~/.pseudolabel-auth"}
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    token = "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.pseudolabel-auth/auth_token ray start"
    assert all(token in c for c in ray_starts)  # token mode, or no start at all
    (head_start,) = [c for c in ray_starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start  # job server on loopback only
    assert "0.0.0.0" not in " ".join(starts)
    # Every node runs the project's image; nothing is installed per node.
    assert config["docker"]["image"] == IMAGE
    assert not config.get("setup_commands")
    assert "pip install" not in yaml.safe_dump(config)
    # Workers read and write the bucket: each has its own cloud identity (Ray gives its
    # own only to the head).
    for worker_type in ("gpu_worker", "cpu_worker"):
        node = config["available_node_types"][worker_type]["node_config"]
        assert "IamInstanceProfile" in node or "serviceAccounts" in node, worker_type


def test_gcp_gpu_nodes_get_a_driver():
    gpu = load("gcp.yaml")["available_node_types"]["gpu_worker"]
    node = gpu["node_config"]
    assert node["guestAccelerators"][0]["acceleratorCount"] == gpu["resources"]["GPU"]
    assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"]
    assert node["scheduling"] == {"onHostMaintenance": "TERMINATE"}  # an object in the API
    assert any("nvidia-smi" in c for c in gpu["initialization_commands"])


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_matches_the_crd_schema(name):
    assert crd.errors(load(name)) == []


def test_crd_check_reports_unknown_and_mistyped_fields():
    """The schema check can fail: a misspelt field (which the API server would prune
    silently) and a wrongly typed one are both reported."""
    doc = load("kuberay/rayjob.yaml")
    doc["spec"]["activeDeadline"] = 60
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "on"
    found = crd.errors(doc)
    assert any("'activeDeadline' was unexpected" in e for e in found), found
    assert any(e.startswith("spec.rayClusterSpec.authOptions.mode") for e in found), found


def job_of(doc: dict) -> dict:
    if doc["kind"] == "RayCronJob":
        assert len(doc["spec"]["schedule"].split()) == 5
        return doc["spec"]["jobTemplate"]
    assert doc["kind"] == "RayJob"
    return doc["spec"]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_authenticates_and_ends(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    job = job_of(doc)
    check_entrypoint(job["entrypoint"])
    assert job["activeDeadlineSeconds"] > 0  # a stuck run ends
    assert job["shutdownAfterJobFinishes"] is True
    cluster = job["rayClusterSpec"]
    # KubeRay makes the token and hands it to every Ray container and the submitter pod;
    # a token set by hand would reach the cluster but not the submitter.
    assert cluster["authOptions"] == {"mode": "token"}
    env = {e["name"] for c in containers(cluster) for e in c.get("env", [])}
    assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert {c["image"] for c in containers(cluster)} == {IMAGE}
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]


def test_kuberay_versions_and_feature_gate_are_stated():
    """authOptions needs KubeRay 1.5.1 and RayCronJob's timeZone 1.7.0, behind the
    alpha RayCronJob gate: the files and the README say so, and the operator values
    turn the gate on."""
    readme = (ROOT / "README.md").read_text()
    assert "KubeRay >= 1.5.1" in (ROOT / "kuberay/rayjob.yaml").read_text()
    assert "KubeRay >= 1.7.0" in (ROOT / "kuberay/raycronjob.yaml").read_text()
    assert "1.5.1" in readme and "1.7.0" in readme and "RayCronJob" in readme
    gates = {g["name"]: g["enabled"] for g in load("kuberay/operator-values.yaml")["featureGates"]}
    assert gates["RayCronJob"] is True
    assert "operator-values.yaml" in (ROOT / "kuberay/raycronjob.yaml").read_text()


def test_vendored_crds_equal_the_shared_ones():
    shared = ROOT.parents[1] / "shared/kuberay/crds"
    if not shared.is_dir():
        pytest.skip(f"no shared KubeRay CRDs at {shared} to compare with (not the team's set-up)")
    for name in crd.FILES.values():
        with gzip.open(crd.CRDS / f"{name}.gz") as vendored:
            assert vendored.read() == (shared / name).read_bytes(), name


def test_image_builds_the_package_as_the_readme_setup_does():
    dockerfile = (ROOT / "Dockerfile").read_text()
    repo = ROOT.parent
    makefile = (repo / "Makefile").read_text()
    torch = re.search(r"^TORCH \?= (\S+)$", makefile, re.M).group(1)
    assert f"ARG TORCH={torch}" in dockerfile  # the same pinned torch, first
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+)\.\d+-py311-gpu$", dockerfile, re.M)
    pyproject = (repo / "pyproject.toml").read_text()
    assert f'"ray[default,data,train]>={base.group(1)},' in pyproject  # Ray matches
    assert "COPY --chown=ray:users . /home/ray/pseudolabel" in dockerfile
    assert '"/home/ray/pseudolabel[gpu,gcs]"' in dockerfile  # this checkout, not a URL
    assert "git+" not in dockerfile
    # .gitignore's patterns match at any depth unless anchored with "/"; Docker's match
    # at the root unless written "**/...": compare them in those terms.
    ignored = {
        line.strip().rstrip("/")
        for line in (repo / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for line in (repo / ".gitignore").read_text().splitlines():
        line = line.strip().rstrip("/")
        if not line or line.startswith("#"):
            continue
        if line.startswith("/") or line in ("build", "dist", ".venv"):  # top-level only
            assert line.lstrip("/") in ignored, line
        else:
            assert f"**/{line}" in ignored, line
    assert ".git" in ignored


def test_runtime_env():
    env = load("runtime_env.yaml")
    assert set(env) <= {"working_dir", "pip", "env_vars", "py_modules", "excludes"}
    assert env["working_dir"] == "."
    assert any(p.startswith("faiss") for p in env["pip"]["packages"])
    # Every dependency (as installed from pyproject.toml) but what a Ray image with
    # torch already has.
    required = {name(r) for r in importlib.metadata.requires("pseudolabel") if "extra" not in r}
    provided = {"ray", "torch", "numpy", "pyarrow", "fsspec"}
    assert {name(p) for p in env["pip"]["packages"]} == required - provided


def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=;]", requirement, maxsplit=1)[0].lower()


def test_readme_names_every_file():
    text = (ROOT / "README.md").read_text()
    for path in sorted(ROOT.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(ROOT)) in text, path


def test_readme_and_design_entrypoints_parse():
    check_entrypoint(
        "pseudolabel run --input s3://b/emb/date={previous_date}/ "
        "--output s3://b/runs/{date}/ --k 10 --run-date 2026-11-22"
    )
