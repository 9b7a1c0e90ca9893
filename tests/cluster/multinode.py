"""Run the fit on a ray.cluster_utils.Cluster of three nodes and on one node; print JSON.

Its own process: the multi-node cluster needs a fresh ray.init, and the rest of the
suite shares one local Ray. Used by test_multinode.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards


def fit_on(address: str, root: str, workers: int) -> tuple[list, np.ndarray]:
    ray.init(address=address, logging_level="ERROR")
    try:
        plan = make_plan(root, ReadSettings())
        data = ResidentShards.from_plan(plan, ReadSettings(dim=plan.dim), WorkerSpec("l2"), workers)
        try:
            params = KMeansParams(k=8, iterations=6, tol=0, seed=3)
            state = fit(data, params, init_state(data, params)[0])
            return [i["node"] for i in data.infos], state.centroids
        finally:
            data.shutdown()
    finally:
        ray.shutdown()


def main() -> None:
    root = sys.argv[1]
    three = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    three.add_node(num_cpus=1)
    three.add_node(num_cpus=1)
    try:
        nodes, spread = fit_on(three.address, root, 3)
    finally:
        three.shutdown()
    one = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        single_nodes, single = fit_on(one.address, root, 3)
    finally:
        one.shutdown()
    print(
        json.dumps(
            {
                "nodes": nodes,
                "single_nodes": single_nodes,
                "max_diff": float(np.abs(spread - single).max()),
            }
        )
    )


if __name__ == "__main__":
    main()
