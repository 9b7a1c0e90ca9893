"""ShardWorker and the Ray-backed dataset: same math as in-process, independent of W."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.hierarchical import resample_refine
from pseudolabel.ops.kmeans import KMeansParams, KMeansState, fit, init_state
from pseudolabel.pipelines.config import build
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.runtime.sources import FileRows
from pseudolabel.pipelines.runtime.workers import ShardWorker
from pseudolabel.pipelines.stages.fit import start_workers

SPEC = WorkerSpec(metric="l2", num_cpus=0.5, batch_rows=500)


def plan_and_settings(root):
    plan = make_plan(str(root), ReadSettings())
    return plan, ReadSettings(dim=plan.dim)


def test_worker_in_process_matches_array_data(small_dataset):
    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    worker = ShardWorker(FileRows(tuple(plan.split(1)[0])), settings, SPEC)
    c = x[:12]
    ours, ref = worker.partial_stats(c), ArrayData(x).partial_stats(c)
    np.testing.assert_allclose(ours.sums, ref.sums, rtol=1e-12)
    np.testing.assert_array_equal(ours.counts, ref.counts)
    rows, got = worker.rows_at(np.array([0, 17, 5999]))
    np.testing.assert_array_equal(rows, [0, 17, 5999])
    np.testing.assert_array_equal(got, x[[0, 17, 5999]])


def test_worker_labels_refuse_rows_that_moved(small_dataset, tmp_path):
    """A worker writes the rows the driver planned its files from: one that holds another
    number of rows (rebuilt after its input changed) refuses instead of shifting them; one
    started without ids refuses too."""
    import dataclasses

    from pseudolabel.pipelines.errors import PseudolabelError
    from pseudolabel.pipelines.io.storage import resolve
    from pseudolabel.pipelines.runtime.labelling import LabelSpec

    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    source = FileRows(tuple(plan.split(1)[0]))
    worker = ShardWorker(source, settings, dataclasses.replace(SPEC, label_columns=True))
    centroids, target = x[:4], resolve(str(tmp_path / "w.parquet"))
    assert worker.write_labels(centroids, LabelSpec("l2"), {}, target, (0, 100, 6000), 64) == 100
    assert pq.read_table(tmp_path / "w.parquet").column("id").to_pylist() == list(range(100))
    with pytest.raises(PseudolabelError, match="loaded 6000 rows where it held 5999"):
        worker.write_labels(centroids, LabelSpec("l2"), {}, target, (0, 100, 5999), 64)
    bare = ShardWorker(source, settings, SPEC)
    with pytest.raises(PseudolabelError, match="holds no ids"):
        bare.write_labels(centroids, LabelSpec("l2"), {}, target, (0, 100, 6000), 64)


def test_worker_labels_its_rows_from_the_fits_bounds(small_dataset, tmp_path, caplog):
    """After steps that settled, a worker labels its rows from the fit's bounds against
    the final centroids: most rows are not searched, every label is the nearest (as a
    fresh worker's full search finds), distances agree to rounding."""
    import dataclasses

    from pseudolabel.ops.kmeans import lloyd_update, rng_for
    from pseudolabel.pipelines.io.storage import resolve
    from pseudolabel.pipelines.runtime.labelling import LabelSpec

    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    source = FileRows(tuple(plan.split(1)[0]))
    spec = dataclasses.replace(SPEC, label_columns=True)
    worker = ShardWorker(source, settings, spec)
    centroids = x[:: len(x) // 12][:12].copy()
    for step in range(12):
        stats = worker.partial_stats(centroids)
        centroids, _ = lloyd_update(centroids, stats, rng_for(0, 1, step), False)
    assert worker.bounds.usable(centroids)
    tables = []
    for who in (worker, ShardWorker(source, settings, spec)):  # the second has no bounds
        target = resolve(str(tmp_path / f"{len(tables)}.parquet"))
        caplog.clear()
        with caplog.at_level("INFO", logger="pseudolabel"):
            assert who.write_labels(centroids, LabelSpec("l2"), {}, target, (0, 6000, 6000),
                                    1000) == 6000  # fmt: skip
        tables.append(pq.read_table(tmp_path / f"{len(tables)}.parquet"))
        if who is worker:
            searched = int(caplog.text.split("labels: ")[1].split(" of ")[0])
            assert searched < 3000, caplog.text
        else:
            assert "rows searched" not in caplog.text
    bounded, searched = tables
    assert bounded.column("label").equals(searched.column("label"))
    np.testing.assert_allclose(
        bounded.column("distance").to_numpy(), searched.column("distance").to_numpy(),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_four_workers_equal_one_worker(ray_local, small_dataset):
    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    params = KMeansParams(k=12, iterations=6, tol=0, seed=5)
    results = {}
    for workers in (1, 4):
        data = ResidentShards.from_plan(plan, settings, SPEC, workers)
        try:
            assert len(data.actors) == workers and data.count() == 6000
            state, _ = init_state(data, params)
            results[workers] = (state.centroids.copy(), fit(data, params, state).centroids)
        finally:
            data.shutdown()
    np.testing.assert_array_equal(results[1][0], results[4][0])  # same sample, same seeds
    np.testing.assert_allclose(results[1][1], results[4][1], atol=1e-4)
    local = fit(ArrayData(x), params, KMeansState(results[1][0].copy()))
    np.testing.assert_allclose(results[4][1], local.centroids, atol=1e-4)


def test_streaming_minibatch_on_ray(ray_local, small_dataset):
    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    params = KMeansParams(k=12, algorithm="minibatch", iterations=2, tol=0, seed=1)
    config = build(input=str(root), output="unused", k=12, algorithm="minibatch", seed=1)
    data = start_workers(config, plan, settings, SPEC, workers=2)
    try:
        state, _ = init_state(data, params)
        state = fit(data, params, state)
    finally:
        data.shutdown()
    assert [r.rows for r in state.history] == [6000, 6000]  # every row once per epoch
    assert state.history[0].steps >= 6000 // (2 * 500)
    lloyd = fit(
        ArrayData(x),
        KMeansParams(k=12, iterations=20, seed=1),
        init_state(ArrayData(x), KMeansParams(k=12, seed=1))[0],
    )
    ours = ArrayData(x).partial_stats(state.centroids).inertia
    best = ArrayData(x).partial_stats(lloyd.centroids).inertia
    assert ours <= 1.05 * best


def test_too_many_workers_for_the_cluster_fail_fast(ray_local, small_dataset):
    from pseudolabel.pipelines.errors import ResourceError

    plan, settings = plan_and_settings(small_dataset[0])
    spec = WorkerSpec(metric="l2", num_cpus=1.5, startup_timeout=3)
    with pytest.raises(ResourceError, match=r"1 of 2 workers did not start within 3 s"):
        ResidentShards.from_plan(plan, settings, spec, workers=2)


def test_workers_get_the_threads_they_are_sized_for(ray_local, small_dataset):
    """Ray would give a 0.5-CPU actor one OpenMP thread; the sizing asks for two."""
    root, _, _ = small_dataset
    plan, settings = plan_and_settings(root)
    spec = WorkerSpec(metric="l2", num_cpus=0.5, threads=2)
    data = ResidentShards.from_plan(plan, settings, spec, 1)
    try:
        assert [i["threads"] for i in data.infos] == [2]
    finally:
        data.shutdown()


@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_resampling_on_workers_equals_in_process(ray_local, small_dataset, strategy):
    """The selection, its sample and the refit are the same on 3 workers as in one
    process: keys and row numbers decide, not the split (rows never leave the workers)."""
    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    params = KMeansParams(k=12, iterations=5, seed=3)
    local = ArrayData(x)
    c0 = fit(local, params, init_state(local, params)[0]).centroids
    expected_subset = local.cluster_subset(c0, 100, strategy, seed=4)
    expected = resample_refine(local, c0, params, steps=2, per_cluster=100, strategy=strategy)
    data = ResidentShards.from_plan(plan, settings, SPEC, 3)
    try:
        subset = data.cluster_subset(c0, 100, strategy, seed=4)
        assert subset.count() == expected_subset.count() == 1200
        np.testing.assert_array_equal(subset.sample(64, 5), expected_subset.sample(64, 5))
        got = resample_refine(data, c0, params, steps=2, per_cluster=100, strategy=strategy)
    finally:
        data.shutdown()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_more_than_eight_workers_are_summed_in_a_tree(ray_local):
    # 19 answers: a first layer of three sums (8, 8, 3), then the driver's. Integer-valued
    # float64 sums are exact in any order, so the tree must equal the plain sum exactly;
    # a dropped or repeated group would change every field.
    import ray

    from pseudolabel.ops.stats import REDUCE_FAN_IN, PartialStats
    from pseudolabel.pipelines.runtime.shards import tree_reduce

    rng = np.random.default_rng(0)
    parts = [
        PartialStats(
            rng.integers(-50, 50, (6, 4)).astype(np.float64),
            rng.integers(0, 20, 6).astype(np.int64),
            float(i + 1),
        )
        for i in range(19)
    ]
    assert len(parts) > 2 * REDUCE_FAN_IN
    total = tree_reduce([ray.put(p) for p in parts], timeout=60)
    np.testing.assert_array_equal(total.sums, sum(p.sums for p in parts))
    np.testing.assert_array_equal(total.counts, sum(p.counts for p in parts))
    assert total.inertia == sum(range(1, 20))


@pytest.mark.parametrize("spherical", [False, True])
def test_reduce_scatter_equals_gather(ray_local, small_dataset, monkeypatch, spherical):
    """--reduce scatter (slices summed and divided on the workers, and kept there) and
    gather (sums on the driver) give the same centroids, bit for bit, with empty clusters
    to split (two identical starting centroids) and k not a multiple of W. The scatter's
    driver receives counts and scalars a step, and fetches the centroids only for the
    split and at the end."""
    from pseudolabel.pipelines.runtime import held, shards

    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    params = KMeansParams(k=13, iterations=4, tol=0, seed=2, search="approx", spherical=spherical)
    start = x[:13].copy()
    start[1] = start[0]  # one of the two gets no rows: split in the first iteration
    received, fetches = [], []
    plain_gather, plain_fetch = shards.gather, held.SlicedCentroids.fetch

    def counting_gather(refs, timeout, what):
        got = plain_gather(refs, timeout, what)
        received.append(max(a.size for p in got for a in (p.sums, p.counts, p.means)
                            if isinstance(a, np.ndarray)))  # fmt: skip
        return got

    def counting_fetch(self):
        fetches.append(len(self))
        return plain_fetch(self)

    monkeypatch.setattr(shards, "gather", counting_gather)
    monkeypatch.setattr(held.SlicedCentroids, "fetch", counting_fetch)
    results = {}
    for reduce in ("gather", "scatter"):
        received.clear()
        data = ResidentShards.from_plan(plan, settings, SPEC, 3, reduce=reduce)
        try:
            state = fit(data, params, KMeansState(start.copy()))
        finally:
            data.shutdown()
        results[reduce] = state, list(received)
    (gather, gathered), (scatter, scattered) = results["gather"], results["scatter"]
    assert gather.history[0].n_split >= 1
    np.testing.assert_array_equal(scatter.centroids, gather.centroids)
    assert [r.inertia for r in scatter.history] == [r.inertia for r in gather.history]
    assert [r.changed for r in scatter.history] == [r.changed for r in gather.history]
    assert max(gathered) == 13 * 16  # the sums
    assert len(scattered) == 4 and max(scattered) <= 13  # counts: a slice's, or all k
    splits = sum(r.n_split > 0 for r in scatter.history)
    assert fetches == [13] * (splits + 1)


def test_auto_reduce_scatters_large_sums_across_nodes_only():
    from pseudolabel.pipelines.runtime.shards import reduce_mode

    # 8 workers x k = 65536 x d = 768 x 8 bytes = 3 GiB of sums a step.
    assert reduce_mode("auto", 8, 2, 65536, 768) == "scatter"
    assert reduce_mode("auto", 8, 1, 65536, 768) == "gather"  # one node: shared memory
    assert reduce_mode("auto", 8, 4, 1024, 128) == "gather"  # 8 MiB: one gather is cheap
    assert reduce_mode("scatter", 1, 1, 8, 2) == "scatter"
    with pytest.raises(ValueError, match="reduce must be one of"):
        reduce_mode("allreduce", 8, 2, 8, 2)


@pytest.mark.parametrize("search", ["flat", "approx"])
def test_reduce_scatter_reads_lost_centroids_back_from_the_checkpoint(
    ray_local, small_dataset, tmp_path, caplog, search
):
    """Centroids held on the workers are checkpointed by them, a file per slice; when
    the slices are lost (here: refs whose owner died, as a lost node loses them), the
    next step reads them back from that checkpoint: the fit ends as an undisturbed one,
    and the checkpoint resumes to the same centroids. With the approximate search the
    retried step searches exactly (its graph was built beside the lost slices); at
    k = 13 every centroid is a candidate, so that changes no label."""
    import ray

    from pseudolabel.pipelines.io.checkpoints import Checkpoints
    from pseudolabel.pipelines.io.storage import resolve

    root, x, _ = small_dataset
    plan, settings = plan_and_settings(root)
    params = KMeansParams(k=13, iterations=6, tol=0, seed=2, search=search)

    @ray.remote
    class Owner:  # owns what it puts: a ref to it is lost once the actor is gone
        def put(self, value):
            return [ray.put(value)]

    owner = Owner.remote()
    lost = [ray.get(owner.put.remote(np.zeros((5, 16), np.float32)))[0] for _ in range(3)]
    ray.kill(owner)  # its objects die with it: fetching raises OwnerDiedError
    results = []
    for lose in (False, True):
        ckpt = Checkpoints(resolve(str(tmp_path / f"ckpt-{lose}")), {"k": 13})
        data = ResidentShards.from_plan(plan, settings, SPEC, 3, reduce="scatter")

        def on_iteration(state, record, lose=lose, ckpt=ckpt):
            ckpt.save(state)
            if lose and record.iteration == 3:
                state.centroids.refs = lost

        try:
            results.append(fit(data, params, KMeansState(x[:13].copy()), on_iteration))
        finally:
            data.shutdown()
    undisturbed, disturbed = results
    assert "lost its slices" in caplog.text
    np.testing.assert_array_equal(disturbed.centroids, undisturbed.centroids)
    names = sorted(p.name for p in (tmp_path / "ckpt-True").iterdir())
    assert names == [f"ckpt-{i:06d}{s}" for i in (5, 6) for s in
                     ("-c00000.npy", "-c00001.npy", "-c00002.npy", ".npz")]  # fmt: skip
    resumed = Checkpoints(resolve(str(tmp_path / "ckpt-True")), {"k": 13}).latest()
    assert resumed.iteration == 6
    np.testing.assert_array_equal(resumed.centroids, undisturbed.centroids)


def test_sliced_centroids_fetch_any_range_empty_slices_included():
    """More workers than centroids leave empty slices: a reducer of one still gets its
    (0, d) rows; any range comes back whole, with the pending row-wise functions."""
    from pseudolabel.ops.arrays import normalize_rows
    from pseudolabel.ops.stats import slice_bounds
    from pseudolabel.pipelines.runtime import calls
    from pseudolabel.pipelines.runtime.held import SlicedCentroids

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with calls.in_process():
        bounds = slice_bounds(3, 5)
        c = SlicedCentroids([calls.put(x[lo:hi]) for lo, hi in bounds], bounds, [], 10)
        assert [hi - lo for lo, hi in bounds].count(0) == 2
        for lo, hi in [*bounds, (0, 3), (1, 3), (0, 2)]:
            np.testing.assert_array_equal(c.fetch_range(lo, hi), x[lo:hi])
        unit = c.map_rows(normalize_rows)
        np.testing.assert_array_equal(unit.fetch_range(1, 3), normalize_rows(x)[1:3])
        np.testing.assert_array_equal(unit.fetch(), normalize_rows(x))
