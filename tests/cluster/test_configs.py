"""Every file under cluster_configs/ parses, carries the keys its tool needs, and every
entrypoint names our real command with real flags (parsed by our own CLI parser)."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pseudolabel.pipelines.cli import build_parser, config_from_args

ROOT = Path(__file__).parents[2] / "cluster_configs"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/rayjob.yaml", "kuberay/raycronjob.yaml"]


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


@pytest.mark.parametrize("name", LAUNCHERS)
def test_cluster_launcher_files(name):
    cfg = load(name)
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in cfg, key
    assert cfg["provider"]["type"] in ("aws", "gcp")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no work on the head
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert {"gpu_worker", "cpu_worker"} <= set(workers)
    assert all(v["min_workers"] == 0 for v in workers.values())  # scale from zero
    assert all(
        "node_config" in v and "max_workers" in v
        for v in types.values()
        if v is not types[cfg["head_node_type"]]
    )
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert any("pseudolabel" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayCronJob":
        spec = doc["spec"]
        assert len(spec["schedule"].split()) == 5
        job = spec["jobTemplate"]
    else:
        assert doc["kind"] == "RayJob"
        job = doc["spec"]
    check_entrypoint(job["entrypoint"])
    cluster = job["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]


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
