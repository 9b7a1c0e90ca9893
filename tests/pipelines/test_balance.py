"""Balanced labels on Ray: the distributed Sinkhorn equals the in-process one, the label
pass applies its duals row by row, and the contract's columns are written."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pseudolabel.ops.sinkhorn import RowBlock, proportions, sinkhorn
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.runtime.sinkhorn import SinkhornShards
from pseudolabel.pipelines.runtime.sources import FileRows
from pseudolabel.pipelines.runtime.workers import ShardWorker
from tests.data import mixture, write_parquet_shards
from tests.pipelines.conftest import fast_config

K = 10


@pytest.fixture(scope="module")
def dominant(tmp_path_factory):
    """8,000 rows, half of them in one component: plain k-means sizes are far from even."""
    w = np.full(K, 0.5 / (K - 1))
    w[0] = 0.5
    x, truth = mixture(8000, 12, K, seed=7, weights=w)
    root = tmp_path_factory.mktemp("dominant") / "input"
    write_parquet_shards(root, x, shards=4, truth=truth, row_group_rows=500)
    return root, x, truth


def test_distributed_sinkhorn_equals_single_process(ray_local, dominant):
    root, x, _ = dominant
    centroids = x[np.random.default_rng(0).choice(len(x), K, replace=False)]
    single = RowBlock(x, centroids, "l2", len(x))
    expected = sinkhorn(single, proportions(K))
    plan = make_plan(str(root), ReadSettings())
    data = ResidentShards.from_plan(
        plan, ReadSettings(dim=plan.dim), WorkerSpec("l2", num_cpus=0.5), 4
    )
    try:
        rows = SinkhornShards(data, centroids, cache_bytes=2**30)
        got = sinkhorn(rows, proportions(K))
        assert rows.cached == [True] * 4
        uncached = sinkhorn(SinkhornShards(data, centroids, cache_bytes=0), proportions(K))
    finally:
        data.shutdown()
    assert got.iterations == expected.iterations and got.marginal_error < 1e-3
    # log-duals are O(100) at eps = 0.005 x score std: equal to 1e-5 relatively.
    np.testing.assert_allclose(got.log_duals, expected.log_duals, rtol=1e-5, atol=0)
    np.testing.assert_allclose(uncached.log_duals, expected.log_duals, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(single.labels(got.beta), single.labels(expected.beta))


def test_worker_rebuilds_a_lost_block(dominant):
    root, x, _ = dominant
    plan = make_plan(str(root), ReadSettings())
    worker = ShardWorker(
        FileRows(tuple(plan.split(1)[0])), ReadSettings(dim=plan.dim), WorkerSpec("l2")
    )
    problem = {"centroids": x[:K].copy(), "rows": len(x), "cache_bytes": 2**30}
    stage = (3, np.zeros(K), 5.0)
    first = worker.sinkhorn_column_sums(np.ones(K), problem, stage)
    worker.sinkhorn_release()  # what a restart leaves: rows reloaded, no block
    np.testing.assert_array_equal(worker.sinkhorn_column_sums(np.ones(K), problem, stage), first)


def test_balanced_run_end_to_end(ray_local, dominant, tmp_path):
    root, x, _ = dominant
    out = tmp_path / "run"
    manifest = run(
        fast_config(
            input=str(root),
            output=str(out),
            k=K,
            balanced=True,
            topk=3,
            truth_column="truth",
            iterations=15,
        )
    )
    n = len(x)
    table = pq.read_table(out / "labels")
    assert {
        "id",
        "label",
        "distance",
        "nearest_label",
        "topk_labels",
        "topk_distances",
        "topk_probs",
    } <= set(table.column_names)
    sizes = np.bincount(table.column("label").to_numpy(), minlength=K)
    nearest = np.bincount(table.column("nearest_label").to_numpy(), minlength=K)
    assert np.abs(sizes / (n / K) - 1).max() <= 0.10  # within +-10% of n/k
    assert np.abs(nearest / (n / K) - 1).max() > 0.5  # plain k-means: far from it
    probs = np.stack(table.column("topk_probs").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    topk = np.stack(table.column("topk_labels").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(topk[:, 0], table.column("label").to_numpy())

    duals = np.load(out / "duals.npy", allow_pickle=False)
    assert duals.shape == (K,) and np.isfinite(duals).all()
    # The label pass applies argmax_j S_ij / eps + log v_j row by row.
    c = np.load(out / "centroids.npy")
    eps = manifest["balance"]["epsilon"]
    S = 2 * x @ c.T - (c * c).sum(1)
    ids = table.column("id").to_numpy()
    np.testing.assert_array_equal(
        table.column("label").to_numpy(), (S[ids] / eps + duals).argmax(1)
    )
    b = manifest["balance"]
    assert b["converged"] and b["marginal_error"] < 1e-3 and b["epsilon_relative"] == 0.005
    assert manifest["clusters"]["balance"]["max_over_min"] <= 1.25
    assert manifest["clusters"]["nearest"]["balance"]["max_over_min"] > 3
    assert set(manifest["metrics"]["truth"]) == {"label", "nearest_label"}
    assert json.loads((out / "manifest.json").read_text())["balance"]["iterations"] > 0


def test_cluster_proportions_file(ray_local, dominant, tmp_path):
    root, x, _ = dominant
    weights = np.arange(1, K + 1, dtype=np.float64)
    (tmp_path / "w.json").write_text(json.dumps(weights.tolist()))
    run(
        fast_config(
            input=str(root),
            output=str(tmp_path / "run"),
            k=K,
            balanced=True,
            cluster_proportions=str(tmp_path / "w.json"),
            iterations=5,
        )
    )
    sizes = np.bincount(
        pq.read_table(tmp_path / "run" / "labels").column("label").to_numpy(), minlength=K
    )
    np.testing.assert_allclose(sizes / len(x), weights / weights.sum(), rtol=0.10)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "has 2 weights; --k is 10"),
        ("[-1" + ", 1" * 9 + "]", "must be finite, >= 0"),
        ("{bad json", "not a list of numbers"),
    ],
)
def test_bad_cluster_proportions(dominant, tmp_path, content, message):
    root, _, _ = dominant
    (tmp_path / "w.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        from pseudolabel.pipelines.stages.balance import target_proportions

        target_proportions(
            fast_config(
                input=str(root), output="o", k=K, cluster_proportions=str(tmp_path / "w.json")
            )
        )
