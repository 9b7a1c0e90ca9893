"""Run the fit on a ray.cluster_utils.Cluster of three nodes, and the same loop in this
process on the same rows (``ops.dataset.ArrayData``: one machine, no Ray); print JSON.

Its own process: the multi-node cluster needs a fresh ray.init, and the rest of the
suite shares one local Ray. Used by test_multinode.py.
"""

from __future__ import annotations

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

PARAMS = KMeansParams(k=8, iterations=6, tol=0, seed=3)


def fit_on(address: str, root: str, workers: int) -> tuple[list, np.ndarray]:
    ray.init(address=address, logging_level="ERROR")
    try:
        plan = make_plan(root, ReadSettings())
        data = ResidentShards.from_plan(plan, ReadSettings(dim=plan.dim), WorkerSpec("l2"), workers)
        try:
            state = fit(data, PARAMS, init_state(data, PARAMS)[0])
            return [i["node"] for i in data.infos], state.centroids
        finally:
            data.shutdown()
    finally:
        ray.shutdown()


def fit_here(root: str) -> np.ndarray:
    """The same fit on one machine: the rows in the plan's global order, in memory."""
    plan = make_plan(root, ReadSettings())
    settings = ReadSettings(dim=plan.dim)
    x = np.concatenate([b.x for s in plan.split(1)[0] for b in iter_batches(s, settings)])
    data = ArrayData(x)
    return fit(data, PARAMS, init_state(data, PARAMS)[0]).centroids


def main() -> None:
    root = sys.argv[1]
    three = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    three.add_node(num_cpus=1)
    three.add_node(num_cpus=1)
    try:
        nodes, spread = fit_on(three.address, root, 3)
    finally:
        three.shutdown()
    single = fit_here(root)
    print(json.dumps({"nodes": nodes, "max_diff": float(np.abs(spread - single).max())}))


if __name__ == "__main__":
    main()
