"""Balanced labels on Ray: the distributed solve equals the in-process one, the label
pass applies its duals row by row, sizes meet their targets, and the contract's columns
are written."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pseudolabel.ops.hard_balance import BoundaryBlock, balanced_duals, integer_targets
from pseudolabel.ops.sampling import row_keys
from pseudolabel.ops.sinkhorn import RowBlock, proportions, sample_tolerance, sinkhorn
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.balance import BalanceShards
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.runtime.sources import FileRows
from pseudolabel.pipelines.runtime.workers import ShardWorker
from tests.pipelines.conftest import BALANCED_K as K
from tests.pipelines.conftest import cli, fast_config


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
        rows = BalanceShards(data, centroids, cache_bytes=2**30)
        got = sinkhorn(rows, proportions(K))
        assert rows.cached == [True] * 4
        uncached = sinkhorn(BalanceShards(data, centroids, cache_bytes=0), proportions(K))
    finally:
        data.shutdown()
    assert got.iterations == expected.iterations and got.marginal_error < 1e-3
    # log-duals are O(100) at eps = 0.005 x score std: equal to 1e-5 relatively.
    np.testing.assert_allclose(got.log_duals, expected.log_duals, rtol=1e-5, atol=0)
    np.testing.assert_allclose(uncached.log_duals, expected.log_duals, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(single.labels(got.beta), single.labels(expected.beta))


def test_sample_solve_and_corrections_on_workers_match_in_process(ray_local, dominant):
    """Sinkhorn on half the rows (chosen by row key: the same rows on 4 workers as in one
    process), then size corrections over all rows, in both settings."""
    root, x, _ = dominant
    n, seed = len(x), 3
    centroids = x[np.random.default_rng(1).choice(n, K, replace=False)]
    sample = x[row_keys(np.arange(n), seed) < 0.5]
    expected = balanced_duals(
        RowBlock(sample, centroids, "l2", len(sample)),
        BoundaryBlock(x, centroids, "l2"),
        proportions(K),
        n,
    )
    plan = make_plan(str(root), ReadSettings())
    data = ResidentShards.from_plan(
        plan, ReadSettings(dim=plan.dim), WorkerSpec("l2", num_cpus=0.5), 4
    )
    try:
        shards = BalanceShards(data, centroids, 2**30, fraction=0.5, seed=seed)
        got = balanced_duals(shards, shards, proportions(K), n)
        # The sample gathered for a solve on the driver: the same rows, solved in process.
        gathered = shards.sample_block("l2")
        on_driver = balanced_duals(gathered, shards, proportions(K), n)
    finally:
        data.shutdown()
    assert shards.sample_rows == len(sample) == len(gathered.x)
    assert {r.tobytes() for r in gathered.x} == {r.tobytes() for r in sample}
    # Float32 sums taken in another order: steps within one, labels 99.9% the same.
    block = RowBlock(x, centroids, "l2", n)
    for solved in (got, on_driver):
        assert abs(solved.sinkhorn.iterations - expected.sinkhorn.iterations) <= 1
        assert solved.converged and expected.converged
        assert (block.labels(solved.beta) == block.labels(expected.beta)).mean() >= 0.999
    targets = integer_targets(proportions(K), n)
    assert (np.abs(np.bincount(block.labels(got.beta), minlength=K) - targets) <= 8).all()


def test_worker_rebuilds_a_lost_block(dominant):
    root, x, _ = dominant
    plan = make_plan(str(root), ReadSettings())
    worker = ShardWorker(
        FileRows(tuple(plan.split(1)[0])), ReadSettings(dim=plan.dim), WorkerSpec("l2")
    )
    problem = {
        "centroids": x[:K].copy(),
        "rows": len(x),
        "cache_bytes": 2**30,
        "fraction": 1.0,
        "seed": 0,
        "token": "t",
    }
    stage = (3, np.zeros(K), 5.0)
    first = worker.sinkhorn_column_sums(np.ones(K), problem, stage)
    worker.sinkhorn_release()  # what a restart leaves: rows reloaded, no block
    np.testing.assert_array_equal(worker.sinkhorn_column_sums(np.ones(K), problem, stage), first)


def test_balanced_run_end_to_end(ray_local, dominant, balanced_run, tmp_path):
    root, x, _ = dominant
    out, manifest = balanced_run
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
    # Sinkhorn on the sample stops at 0.3 of the sample's own error in the cluster shares.
    tol = sample_tolerance(1e-3, proportions(K), b["sample_rows"], n)
    assert 1e-3 < tol == b["sinkhorn"]["tol_used"] and b["sinkhorn"]["tol"] == 1e-3
    assert b["converged"] and b["sinkhorn"]["marginal_error"] < tol
    assert b["restarted"] is False  # the passes corrected the loose solution
    # Sinkhorn's sample: 256 rows per cluster in expectation (binomial, sd 42).
    assert b["epsilon_relative"] == 0.005 and abs(b["sample_rows"] - 256 * K) < 200
    assert b["sinkhorn_on"] == "driver"  # ~2,560 x 10 scores: a few hundred kB
    # --balance-tol 0.01: every size within 1% (8 rows) of n / k.
    assert np.abs(sizes - n // K).max() <= 8 and b["sizes"]["max_deviation"] <= 0.01
    assert manifest["clusters"]["balance"]["max_over_min"] <= 808 / 792
    assert manifest["clusters"]["nearest"]["balance"]["max_over_min"] > 3
    assert set(manifest["metrics"]["truth"]) == {"label", "nearest_label"}
    saved = json.loads((out / "manifest.json").read_text())["balance"]
    assert saved["sinkhorn"]["iterations"] > 0 and saved["sizes"]["passes"] >= 1
    assert not b["warm_start"]

    # The next night starts from these centroids, and Sinkhorn from these duals.
    night = run(
        fast_config(
            input=str(root),
            output=str(tmp_path / "night2"),
            k=K,
            balanced=True,
            init_centroids=str(out / "centroids.npy"),
            iterations=2,
            balance_sample=0,
        )
    )
    warm = night["balance"]
    assert warm["warm_start"] and warm["converged"] and warm["sample_rows"] == n
    assert len(warm["sinkhorn"]["stages"]) == 1  # no annealing from the score scale
    assert warm["sinkhorn"]["iterations"] < b["sinkhorn"]["iterations"] / 3


def test_label_command_reproduces_the_runs_labels(ray_local, dominant, balanced_run, tmp_path):
    """`pseudolabel label` with the run's output: the run's balanced rule (its centroids,
    duals and eps), so every row gets the label the run gave it, as with its centroids.npy
    and duals.npy given; unit centroids alone with --spherical: the nearest by cosine.
    Rerun: reused; other centroids: refused as stale."""
    from pseudolabel.pipelines.cli import main

    root, x, _ = dominant
    out, manifest = balanced_run
    flags = ["--input", str(root), "--label-workers", "1", "--cpus-per-worker", "0.5"]
    relabel = tmp_path / "relabel"
    # --no-spherical: as the run was (the default is the run's own setting)
    assert main(["label", *flags, "--centroids", str(out), "--output", str(relabel),
                 "--topk", "3", "--truth-column", "truth", "--no-spherical"]) == 0  # fmt: skip
    ran, again = (pq.read_table(p / "labels").sort_by("id") for p in (out, relabel))
    for column in ("id", "label", "nearest_label", "topk_labels", "truth"):
        assert ran.column(column).equals(again.column(column)), column
    given = json.loads((relabel / "manifest.json").read_text())
    assert given["fit"]["algorithm"] == "given" and given["fit"]["iterations_run"] == 0
    assert given["balance"] == {"given": str(out), "epsilon": manifest["balance"]["epsilon"]}
    assert given["metrics"]["truth"] == manifest["metrics"]["truth"]
    assert (relabel / "_SUCCESS").exists() and (relabel / "report.html").exists()

    # A .npy alone, with --spherical: unit rows, the nearest unit centroid by cosine.
    nearest = tmp_path / "nearest"
    centroids = np.load(out / "centroids.npy")
    unit_c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    np.save(tmp_path / "unit.npy", unit_c)
    assert main(["label", *flags, "--centroids", str(tmp_path / "unit.npy"), "--output",
                 str(nearest), "--spherical"]) == 0  # fmt: skip
    table = pq.read_table(nearest / "labels")
    assert set(table.column_names) == {"id", "label", "distance", "cosine"}
    unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = (unit_x[table.column("id").to_numpy()] @ unit_c.T).argmax(1)
    assert (table.column("label").to_numpy() == expected).mean() >= 0.999  # BLAS near-ties

    # A .npy with --duals and --epsilon: the run's balanced rule again, row for row.
    dual = tmp_path / "duals"
    assert main(["label", *flags, "--centroids", str(out / "centroids.npy"), "--output",
                 str(dual), "--duals", str(out / "duals.npy"), "--epsilon",
                 repr(manifest["balance"]["epsilon"])]) == 0  # fmt: skip
    again = pq.read_table(dual / "labels").sort_by("id")
    assert ran.column("label").equals(again.column("label"))

    assert main(["label", *flags, "--centroids", str(tmp_path / "unit.npy"),
                 "--output", str(nearest), "--spherical"]) == 0  # fmt: skip  # the same: reused
    np.save(tmp_path / "other.npy", centroids[::-1].copy())
    with pytest.raises(ConfigError, match="centroids_sha256"):
        from pseudolabel.pipelines.commands.label import label
        from pseudolabel.pipelines.config import LabelConfig

        label(LabelConfig(input=str(root), output=str(nearest), spherical=True,
                          centroids=str(tmp_path / "other.npy")))  # fmt: skip


def test_label_command_refuses_what_it_cannot_label(dominant, tmp_path):
    from pseudolabel.pipelines.commands.label import label
    from pseudolabel.pipelines.config import LabelConfig
    from pseudolabel.pipelines.errors import InputError

    root, _, _ = dominant

    def attempt(**kw):
        return label(LabelConfig(input=str(root), output=str(tmp_path / "out"), **kw))

    np.save(tmp_path / "wide.npy", np.zeros((4, 13), np.float32))
    with pytest.raises(InputError, match="has dimension 13; the input rows have 12"):
        attempt(centroids=str(tmp_path / "wide.npy"))
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(InputError, match=r"neither a \.npy file nor a finished run"):
        attempt(centroids=str(tmp_path / "unfinished"))
    np.save(tmp_path / "c.npy", np.zeros((4, 12), np.float32))
    np.save(tmp_path / "duals.npy", np.zeros(5))
    with pytest.raises(ConfigError, match="--duals need --epsilon"):
        attempt(centroids=str(tmp_path / "c.npy"), duals=str(tmp_path / "duals.npy"))
    with pytest.raises(InputError, match="need 4 finite values"):
        attempt(centroids=str(tmp_path / "c.npy"), duals=str(tmp_path / "duals.npy"), epsilon=1.0)
    with pytest.raises(ConfigError, match="--topk 5 exceeds the 4 centroids"):
        attempt(centroids=str(tmp_path / "c.npy"), topk=5)
    assert not (tmp_path / "out" / "labels").exists()  # refused before any labelling


def test_balanced_on_a_minibatch_spherical_fit(ray_local, dominant, tmp_path):
    """Balance after a mini-batch fit (no resident workers: the sample and the passes read
    the rows again) on cosine scores: sizes within --balance-tol of n / k, and the labels
    are argmax_j S_ij / eps + log v_j with S the cosine of the unit rows and centroids."""
    root, x, _ = dominant
    out = tmp_path / "run"
    manifest = cli(
        "run", "--input", root, "--output", out, "--k", K, "--balanced", "--spherical",
        "--algorithm", "minibatch", "--batch-rows", "500", "--iterations", "3",
        "--balance-tol", "0.02", "--balance-sample", "100",
    )  # fmt: skip
    n, b = len(x), manifest["balance"]
    table = pq.read_table(out / "labels")
    sizes = np.bincount(table.column("label").to_numpy(), minlength=K)
    assert manifest["fit"]["algorithm"] == "minibatch" and b["converged"]
    assert np.abs(sizes - n // K).max() <= 0.02 * n / K  # --balance-tol 0.02
    # --balance-sample 100: Sinkhorn on a Bernoulli sample of 100 rows per cluster
    # (1,000 of 8,000, standard deviation 30).
    assert abs(b["sample_rows"] - 100 * K) < 150, b["sample_rows"]
    c = np.load(out / "centroids.npy")
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    S = unit[table.column("id").to_numpy()] @ c.T
    expected = (S / b["epsilon"] + np.load(out / "duals.npy")).argmax(1)
    # Another BLAS path than the label pass's: a near-tie may fall the other way.
    assert (table.column("label").to_numpy() == expected).mean() >= 0.999


def test_sinkhorn_steps_and_size_passes_are_capped_by_their_flags(ray_local, dominant, tmp_path):
    """--sinkhorn-iterations and --balance-passes bound the work; a run that hits a bound
    says so in its manifest (and in a warning), and still labels every row once."""
    root, x, _ = dominant
    manifest = cli("run", "--input", root, "--output", tmp_path / "run", "--k", K,
                   "--balanced", "--iterations", "3", "--sinkhorn-iterations", "5",
                   "--balance-passes", "1")  # fmt: skip
    b = manifest["balance"]
    assert b["sinkhorn"]["iterations"] <= 5 and not b["sinkhorn"]["converged"]
    assert b["sizes"]["passes"] <= 1
    assert manifest["rows"]["output"] == len(x) == sum(manifest["clusters"]["sizes"])


def test_cluster_proportions_file(ray_local, dominant, tmp_path):
    """Sizes as a .npy (or a JSON list: read to the same proportions) says."""
    from pseudolabel.pipelines.stages.balance import target_proportions

    root, x, _ = dominant
    weights = np.arange(K, dtype=np.float64)  # cluster 0: no rows at all
    path = tmp_path / "w.npy"
    np.save(path, weights)
    (tmp_path / "w.json").write_text(json.dumps(weights.tolist()))
    from_json = fast_config(input=str(root), output="o", k=K, balanced=True,
                            cluster_proportions=str(tmp_path / "w.json"))  # fmt: skip
    np.testing.assert_allclose(target_proportions(from_json), weights / weights.sum(), rtol=1e-12)
    cli("run", "--input", root, "--output", tmp_path / "run", "--k", K, "--balanced",
        "--cluster-proportions", path, "--iterations", "5")  # fmt: skip
    sizes = np.bincount(
        pq.read_table(tmp_path / "run" / "labels").column("label").to_numpy(), minlength=K
    )
    targets = integer_targets(weights / weights.sum(), len(x))
    assert (np.abs(sizes - targets) <= np.maximum(1, 0.01 * targets)).all()


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
