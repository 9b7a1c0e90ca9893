"""Check a KubeRay manifest the way the API server would, without a cluster.

The schemas are KubeRay's published CRDs, kept gzipped beside this file
(``kuberay_crds/README.md`` says where from). Kubernetes prunes fields a structural schema does not
declare, silently: here an undeclared field is an error, since it would do nothing.
``x-kubernetes-*`` keys are annotations to jsonschema (Draft 7), except that
``x-kubernetes-preserve-unknown-fields`` lets an object keep any field, as it does there.
"""

from __future__ import annotations

import copy
import gzip
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).parent / "kuberay_crds"
FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}


def schema_for(kind: str, api_version: str) -> dict[str, Any]:
    """The OpenAPI v3 schema of ``kind`` at ``api_version`` (e.g. ray.io/v1), strict."""
    crd = load_crd(FILES[kind])
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, (crd["spec"]["group"], group)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))


@cache
def load_crd(name: str) -> dict[str, Any]:
    with gzip.open(CRDS / f"{name}.gz", "rt") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _strict(node: Any) -> Any:
    """Forbid undeclared properties wherever the schema lists properties and does not
    itself say what else is allowed (structural pruning, made loud)."""
    if isinstance(node, dict):
        for value in node.values():
            _strict(value)
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


def errors(manifest: dict[str, Any]) -> list[str]:
    """Every schema violation of ``manifest``, as 'path: message' lines."""
    schema = schema_for(manifest["kind"], manifest["apiVersion"])
    validator = jsonschema.Draft7Validator(schema)
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(manifest)
    )
