"""Run the fit on a ray.cluster_utils.Cluster of four nodes with small object stores,
eight workers, and the same loop in this process on the same rows
(``ops.dataset.ArrayData``: one machine, no Ray); print JSON. Twice: with the exact
search (k = 8), and with ``--search approx`` (k = 64), where each worker keeps its rows'
last labels and the driver ships the neighbour graph. Both reduce-scatter their
statistics (``--reduce scatter``): each worker sends slice j of its sums to worker j,
through the object store (objects above 1 KiB go there, not inline through the driver).

Its own process: the multi-node cluster needs a fresh ray.init, and the rest of the
suite shares one local Ray. Used by test_multinode.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.read import iter_batches
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards

FITS = {
    "flat": KMeansParams(k=8, iterations=6, tol=0, seed=3),
    "approx": KMeansParams(k=64, iterations=6, tol=0, seed=3, search="approx"),
}


NODES, CPUS_PER_NODE, WORKERS = 4, 2, 8
OBJECT_STORE_BYTES = 80 << 20  # per node: about Ray's minimum
INLINE_BYTES = 1024  # Ray returns smaller objects inline to their owner, the driver


def fit_on(address: str, root: str, workers: int) -> tuple[list, dict]:
    ray.init(address=address, logging_level="ERROR")
    try:
        plan = make_plan(root, ReadSettings())
        settings, spec = ReadSettings(dim=plan.dim), WorkerSpec("l2")
        data = ResidentShards.from_plan(plan, settings, spec, workers, reduce="scatter")
        try:
            states = {name: fit(data, p, init_state(data, p)[0]) for name, p in FITS.items()}
            return [i["node"] for i in data.infos], states
        finally:
            data.shutdown()
    finally:
        ray.shutdown()


def fit_here(root: str) -> dict:
    """The same fits on one machine: the rows in the plan's global order, in memory."""
    plan = make_plan(root, ReadSettings())
    settings = ReadSettings(dim=plan.dim)
    x = np.concatenate([b.x for s in plan.split(1)[0] for b in iter_batches(s, settings)])
    here = {**FITS, "approx_flat": dataclasses.replace(FITS["approx"], search="flat")}
    states = {}
    for name, params in here.items():
        data = ArrayData(x)
        states[name] = fit(data, params, init_state(data, params)[0])
    return states


def main() -> None:
    root = sys.argv[1]
    node = {"num_cpus": CPUS_PER_NODE, "object_store_memory": OBJECT_STORE_BYTES}
    system = {"max_direct_call_object_size": INLINE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "_system_config": system})
    for _ in range(NODES - 1):
        cluster.add_node(**node)
    try:
        nodes, spread = fit_on(cluster.address, root, WORKERS)
    finally:
        cluster.shutdown()
    single = fit_here(root)
    diff = {n: float(np.abs(spread[n].centroids - single[n].centroids).max()) for n in FITS}
    approx = spread["approx"].history
    print(json.dumps({
        "nodes": nodes,
        "max_diff": diff,
        "approx_changed": [r.changed for r in approx],
        "approx_over_flat": approx[-1].inertia / single["approx_flat"].history[-1].inertia,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
