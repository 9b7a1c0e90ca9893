"""The Python API: fit/predict on numpy (no Ray), a Ray Dataset and a URL, ``label`` on
any Dataset, and ``run`` returning what the output holds."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

import pseudolabel
from pseudolabel.ops.assign import CentroidIndex
from tests.data import mixture, write_parquet_shards
from tests.pipelines.conftest import nearest


def objective(x: np.ndarray, c: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid, computed by faiss."""
    D, _ = CentroidIndex(c).search(x)
    return float(D[:, 0].sum(dtype=np.float64))


def test_numpy_fit_matches_faiss_from_the_same_init():
    x, _ = mixture(20_000, 16, 40, seed=2)
    c0 = x[np.random.default_rng(0).choice(len(x), 32, replace=False)].copy()
    ours = pseudolabel.KMeans(32, init=c0, max_iter=15, tol=0).fit(x)
    # faiss subsamples above 256 points per centroid unless told otherwise.
    ref = faiss.Kmeans(16, 32, niter=15, max_points_per_centroid=10**6, seed=1)
    ref.train(x, init_centroids=c0)
    ours_obj, ref_obj = objective(x, ours.cluster_centers_), objective(x, ref.centroids)
    # The same Lloyd iterations from the same start: equal up to float rounding.
    assert abs(ours_obj - ref_obj) <= 1e-4 * ref_obj
    assert ours.inertia_ == pytest.approx(ours_obj, rel=1e-5)
    assert ours.n_iter_ == 15 and len(ours.history_) == 15
    assert ours.cluster_centers_.dtype == np.float32 and ours.cluster_centers_.shape == (32, 16)
    np.testing.assert_array_equal(ours.predict(x), nearest(x, ours.cluster_centers_))


def test_numpy_fit_starts_no_ray():
    import ray

    was_running = ray.is_initialized()
    x, _ = mixture(2000, 8, 5, seed=1)
    labels = pseudolabel.KMeans(5).fit_predict(x)
    assert labels.shape == (2000,)
    assert ray.is_initialized() == was_running


def test_bad_arrays_get_clear_errors():
    x, _ = mixture(500, 8, 5, seed=1)
    with pytest.raises(pseudolabel.InputError, match="exceeds the 500 rows"):
        pseudolabel.KMeans(600).fit(x)
    bad = x.copy()
    bad[17, 3] = np.nan
    with pytest.raises(pseudolabel.InputError, match="row 17: NaN or inf"):
        pseudolabel.KMeans(5).fit(bad)
    zero = x.copy()
    zero[4] = 0
    with pytest.raises(pseudolabel.InputError, match="row 4: all-zero"):
        pseudolabel.KMeans(5, spherical=True).fit(zero)
    km = pseudolabel.KMeans(5).fit(x)
    with pytest.raises(pseudolabel.InputError, match="has 9 columns"):
        km.predict(np.ones((3, 9), np.float32))
    with pytest.raises(RuntimeError, match="not fitted"):
        pseudolabel.KMeans(5).predict(x)
    with pytest.raises(pseudolabel.ConfigError, match="init must be"):
        pseudolabel.KMeans(5, init=np.ones((4, 8))).fit(x)


def test_balanced_numpy_fit_predicts_equal_sizes():
    x, _ = mixture(4000, 8, 20, seed=4, weights=np.r_[[0.5], np.full(19, 0.5 / 19)])
    km = pseudolabel.KMeans(20, balanced=True, seed=0).fit(x)
    sizes = np.bincount(km.predict(x), minlength=20)
    nearest_sizes = np.bincount(nearest(x, km.cluster_centers_), minlength=20)
    assert km.duals_.shape == (20,) and km.epsilon_ > 0
    assert sizes.max() / sizes.min() < nearest_sizes.max() / nearest_sizes.min()
    assert sizes.max() / sizes.min() < 1.5


def test_numpy_dataset_and_url_give_the_same_centroids(ray_local, tmp_path):
    import ray.data

    x, _ = mixture(6000, 16, 12, seed=3)
    write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=500)
    kwargs = dict(seed=7, max_iter=8, tol=0, workers=2, cpus_per_worker=0.5)
    from_numpy = pseudolabel.KMeans(12, **kwargs).fit(x)
    from_dataset = pseudolabel.KMeans(12, **kwargs).fit(ray.data.from_numpy(x))
    from_url = pseudolabel.KMeans(12, **kwargs).fit(str(tmp_path / "in"))
    for other in (from_dataset, from_url):
        np.testing.assert_allclose(other.cluster_centers_, from_numpy.cluster_centers_, atol=1e-4)
        assert other.n_iter_ == from_numpy.n_iter_
        assert other.inertia_ == pytest.approx(from_numpy.inertia_, rel=1e-5)
    # predict on a Dataset is a Dataset with the labels of the numpy predict.
    labelled = from_dataset.predict(ray.data.from_numpy(x)).to_pandas()
    np.testing.assert_array_equal(
        labelled["label"].to_numpy(), from_numpy.predict(x).astype(np.int32)
    )


def test_dataset_with_a_nan_row_is_refused(ray_local):
    import ray.data

    x, _ = mixture(1000, 8, 4, seed=3)
    x[321, 0] = np.inf
    with pytest.raises(pseudolabel.InputError, match="ray dataset: row 321: NaN or inf"):
        pseudolabel.KMeans(4, workers=2, cpus_per_worker=0.5).fit(ray.data.from_numpy(x))


def test_minibatch_on_a_dataset(ray_local):
    """Streamed from the Dataset: every row once per epoch, and an objective near Lloyd's.
    (k above the component count: with k equal to it, a seeding that puts two centres on
    one component is a local minimum that 12 steps do not leave, whichever backend.)"""
    import ray.data

    x, _ = mixture(8000, 16, 10, seed=5)
    km = pseudolabel.KMeans(
        20, algorithm="minibatch", max_iter=3, batch_rows=1000, workers=2, cpus_per_worker=0.5
    ).fit(ray.data.from_numpy(x))
    assert [(h.rows, h.steps) for h in km.history_] == [(8000, 4)] * 3
    best = pseudolabel.KMeans(20, max_iter=30).fit(x)
    # Measured 1.002-1.004 over three seeds.
    assert objective(x, km.cluster_centers_) <= 1.02 * objective(x, best.cluster_centers_)


def test_label_passes_other_columns_through(ray_local):
    import ray
    import ray.data

    x, _ = mixture(3000, 8, 6, seed=6)
    c = pseudolabel.KMeans(6).fit(x).cluster_centers_
    table = pa.table(
        {
            "doc": pa.array([f"doc-{i}" for i in range(3000)]),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
            "score": pa.array(np.arange(3000, dtype=np.float64)),
        }
    )
    ds = pseudolabel.label(ray.data.from_arrow(table), c, topk=3, embedding_column="vec", workers=1)
    out = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert set(out.column_names) == {
        "doc", "score", "label", "distance", "topk_labels", "topk_distances",
    }  # fmt: skip
    order = np.argsort(out.column("score").to_numpy())
    docs = np.array(out.column("doc").to_pylist())[order]
    assert docs.tolist() == [f"doc-{i}" for i in range(3000)]
    labels = out.column("label").to_numpy()[order]
    np.testing.assert_array_equal(labels, nearest(x, c))
    dist = out.column("distance").to_numpy()[order]
    np.testing.assert_allclose(dist, ((x - c[labels]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    topk = np.stack(out.column("topk_labels").to_numpy(zero_copy_only=False))[order]
    np.testing.assert_array_equal(topk[:, 0], labels)


def test_run_returns_what_the_output_holds(ray_local, small_dataset, tmp_path):
    root, _, _ = small_dataset
    result = pseudolabel.run(
        str(root),
        str(tmp_path / "out"),
        k=12,
        workers=2,
        cpus_per_worker=0.5,
        label_workers=1,
        balanced=True,
    )
    on_disk = np.load(tmp_path / "out" / "centroids.npy", allow_pickle=False)
    np.testing.assert_array_equal(result.centroids, on_disk)
    assert result.sizes.sum() == 6000 and len(result.sizes) == 12
    assert result.manifest["rows"]["output"] == 6000
    assert result.metrics["mean_distance"] > 0
    assert set(result.paths) == {"labels", "centroids", "manifest", "report", "duals"}
    assert result.paths["labels"] == str(tmp_path / "out" / "labels")
    with pytest.raises(pseudolabel.ConfigError, match="--k must be at least 1"):
        pseudolabel.run(str(root), str(tmp_path / "o2"), k=0)


def test_label_pool_follows_gpus_when_asked_for():
    from pseudolabel.pipelines.api import label_pool_size

    assert label_pool_size({"CPU": 16, "GPU": 1}, 1.0, 1.0) == 1
    assert label_pool_size({"CPU": 16, "GPU": 4}, 1.0, 0.5) == 8
    assert label_pool_size({"CPU": 16}, 1.0, 0.0) == 15  # one CPU left for reads
    assert label_pool_size({"CPU": 2}, 0.5, 0.0) == 2


def test_streamed_dataset_with_a_nan_row_is_refused(ray_local):
    import ray.data

    x, _ = mixture(2000, 8, 4, seed=3)
    x[1500, 2] = np.nan
    km = pseudolabel.KMeans(
        4, algorithm="minibatch", batch_rows=500, workers=2, cpus_per_worker=0.5
    )
    with pytest.raises(pseudolabel.InputError, match="ray dataset: NaN or inf in column 'data'"):
        km.fit(ray.data.from_numpy(x))


def test_numpy_fit_with_approx_search():
    """search="approx" on numpy: the fit, its inertia_ pass and predict search near the
    previous centroid; inertia_ is the approx labels' objective, at most 0.5% above the
    exact nearest centres' (never below it), and predict agrees with exact labels."""
    x, _ = mixture(12_000, 8, 96, seed=4)
    km = pseudolabel.KMeans(256, search="approx", max_iter=5, tol=0).fit(x)
    exact = objective(x, km.cluster_centers_)
    assert exact * (1 - 1e-5) <= km.inertia_ <= exact * 1.005
    assert km.history_[-1].changed is not None
    agree = km.predict(x) == CentroidIndex(km.cluster_centers_).search(x)[1][:, 0]
    assert agree.mean() > 0.98
