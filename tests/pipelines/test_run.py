"""End to end on a local Ray: the output contract of DESIGN.md, and its refusals."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import ConfigError, InputError
from tests.data import mixture, write_parquet_shards
from tests.pipelines.conftest import cli, fast_config, nearest


def labels_table(out):
    return pq.read_table(out / "labels")


def test_contracted_output(ray_local, small_dataset, tmp_path):
    root, x, truth = small_dataset
    out = tmp_path / "run"
    manifest = run(fast_config(input=str(root), output=str(out), topk=3, truth_column="truth"))

    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "_SUCCESS", "_checkpoints", "centroids.npy", "labels", "manifest.json", "report.html",
    ]  # fmt: skip
    centroids = np.load(out / "centroids.npy", allow_pickle=False)
    assert centroids.shape == (12, 16) and centroids.dtype == np.float32

    table = labels_table(out)
    assert table.schema.field("label").type == pa.int32()
    assert table.schema.field("distance").type == pa.float32()
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("topk_labels").type == pa.list_(pa.int32(), 3)
    # Exactly one row per input id, ids preserved.
    ids = table.column("id").to_numpy()
    assert len(ids) == 6000 and np.array_equal(np.sort(ids), np.arange(6000))
    order = np.argsort(ids)
    labels = table.column("label").to_numpy()[order]
    np.testing.assert_array_equal(labels, nearest(x, centroids))
    dist = table.column("distance").to_numpy()[order]
    np.testing.assert_allclose(dist, ((x - centroids[labels]) ** 2).sum(1), rtol=1e-3, atol=1e-3)
    topk = np.stack(table.column("topk_labels").to_numpy(zero_copy_only=False))[order]
    np.testing.assert_array_equal(topk[:, 0], labels)
    np.testing.assert_array_equal(table.column("truth").to_numpy()[order], truth)

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["rows"] == {
        "input": 6000,
        "output": 6000,
        "skipped": {"total": 0, "by_reason": {}, "files": []},
    }
    assert sum(manifest["clusters"]["sizes"]) == 6000
    assert manifest["fit"]["history"][0]["iteration"] == 1
    assert manifest["metrics"]["truth"]["label"]["nmi"] > 0.9
    assert set(manifest["timings"]) >= {"plan", "fit", "label", "publish", "total"}
    assert {"ray", "faiss-cpu", "numpy", "pyarrow", "torch"} <= set(manifest["versions"])
    assert manifest["config"]["k"] == 12


def test_rerun_of_committed_output_is_not_recomputed(ray_local, small_dataset, tmp_path):
    root, _, _ = small_dataset
    config = fast_config(input=str(root), output=str(tmp_path / "run"), iterations=2)
    first = run(config)
    stamp = (tmp_path / "run" / "_SUCCESS").stat().st_mtime_ns
    assert run(config) == first
    assert (tmp_path / "run" / "_SUCCESS").stat().st_mtime_ns == stamp  # not rewritten
    # --overwrite: test_seed_overwrite_dtype_columns_and_skips_from_the_command_line


def test_string_ids_and_npy_input(ray_local, tmp_path):
    x = np.random.default_rng(0).standard_normal((900, 4)).astype(np.float32)
    ids = np.array([f"img-{i:04d}" for i in range(900)])
    write_parquet_shards(tmp_path / "p", x, 3, ids=ids)
    run(fast_config(input=str(tmp_path / "p"), output=str(tmp_path / "o1"), k=5))
    got = labels_table(tmp_path / "o1").column("id")
    assert got.type == pa.string() and sorted(got.to_pylist()) == sorted(ids.tolist())

    (tmp_path / "n").mkdir()
    np.save(tmp_path / "n" / "a.npy", x[:400])
    np.save(tmp_path / "n" / "b.npy", x[400:])
    run(fast_config(input=str(tmp_path / "n"), output=str(tmp_path / "o2"), k=5))
    got = labels_table(tmp_path / "o2").column("id").to_numpy()
    assert np.array_equal(np.sort(got), np.arange(900))


def test_minibatch_and_spherical_end_to_end(ray_local, small_dataset, tmp_path):
    root, x, truth = small_dataset
    # Through the command line: the flags' effects, not only the settings they fill.
    m = cli(
        "run", "--input", root, "--output", tmp_path / "mb", "--algorithm", "minibatch",
        "--iterations", "3", "--batch-rows", "500", "--workers", "1", "--truth-column", "truth",
    )  # fmt: skip
    assert m["fit"]["algorithm"] == "minibatch" and m["rows"]["output"] == 6000
    # --batch-rows 500: one worker streams its 6,000 rows in 12 steps an epoch.
    assert [r["steps"] for r in m["fit"]["history"]] == [12] * len(m["fit"]["history"])
    assert m["metrics"]["truth"]["label"]["nmi"] > 0.9
    s = cli("run", "--input", root, "--output", tmp_path / "sph", "--spherical",
            "--keep-columns", "truth")  # fmt: skip
    c = np.load(tmp_path / "sph" / "centroids.npy")
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    assert max(r["inertia"] for r in s["fit"]["history"]) <= 4 * 6000  # |x - c|^2 <= 4
    # Spherical labels carry the cosine to the label's centroid beside the distance, and
    # --keep-columns copies input columns through, row by row.
    t = labels_table(tmp_path / "sph").sort_by("id")
    ids, label = t.column("id").to_numpy(), t.column("label").to_numpy()
    unit = x[ids] / np.linalg.norm(x[ids], axis=1, keepdims=True)
    np.testing.assert_allclose(t.column("cosine").to_numpy(), (unit * c[label]).sum(1), atol=1e-5)
    np.testing.assert_array_equal(t.column("truth").to_numpy(), truth[ids])
    with pytest.raises(ConfigError, match=r"--keep-columns \['label'\]: the labels have"):
        fast_config(input=str(root), output=str(tmp_path / "x"), keep_columns="truth,label")
    with pytest.raises(InputError, match="missing column 'colour'"):
        run(fast_config(input=str(root), output=str(tmp_path / "x"), keep_columns="colour"))


def test_output_inside_input_is_refused(small_dataset):
    root, _, _ = small_dataset
    with pytest.raises(ConfigError, match="lies inside --input"):
        run(fast_config(input=str(root), output=str(root / "labels_here")))


def test_k_larger_than_rows(ray_local, tmp_path):
    write_parquet_shards(tmp_path / "in", np.ones((10, 3), np.float32), 1)
    with pytest.raises(InputError, match="--k 11 exceeds the 10 input rows"):
        run(fast_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=11))


def test_bad_row_error_names_file_and_row(ray_local, tmp_path):
    x = np.ones((50, 3), np.float32)
    x[7, 0] = np.nan
    write_parquet_shards(tmp_path / "in", x, 2)
    with pytest.raises(InputError, match=r"part-00000.parquet: row 7: NaN or inf"):
        run(fast_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=2))
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    m = run(
        fast_config(
            input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=2, on_bad_rows="skip"
        )
    )
    assert m["rows"]["skipped"] == {
        "total": 1, "by_reason": {"NaN or inf in embedding": 1}, "files": [],
    }  # fmt: skip
    assert m["rows"]["output"] == 49


def test_seed_overwrite_dtype_columns_and_skips_from_the_command_line(ray_local, tmp_path, capsys):
    """Columns named by --id-column/--embedding-column, a NaN row skipped and counted
    (--on-bad-rows skip), rows held as float16 (--dtype); the same --seed gives the same
    centroids, another seed others, which --overwrite puts in place of the old output."""
    x = np.random.default_rng(5).standard_normal((1500, 6)).astype(np.float32)
    x[7, 2] = np.nan
    keys = np.arange(1500, dtype=np.int64) * 3 + 1
    (tmp_path / "in").mkdir()
    for part in (0, 1):  # a file for each of the two workers
        rows = slice(750 * part, 750 * (part + 1))
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), 6)
        pq.write_table(
            pa.table({"key": keys[rows], "vec": vec}), tmp_path / "in" / f"{part}.parquet"
        )
    flags = ["--input", tmp_path / "in", "--k", "5", "--iterations", "2", "--init", "random",
             "--id-column", "key", "--embedding-column", "vec", "--on-bad-rows", "skip",
             "--dtype", "float16"]  # fmt: skip
    a = cli("run", *flags, "--seed", "1", "--output", tmp_path / "a")
    cli("run", *flags, "--seed", "1", "--output", tmp_path / "b")
    assert a["fit"]["rows_dtypes"] == ["float16", "float16"]
    assert (
        a["rows"]["skipped"]["by_reason"] == {"NaN or inf in embedding": 1}
        and a["rows"]["output"] == 1499
    )
    ids = labels_table(tmp_path / "a").column("id").to_numpy()
    assert np.array_equal(np.sort(ids), np.delete(keys, 7))  # the ids are the keys
    centroids = {name: np.load(tmp_path / name / "centroids.npy") for name in ("a", "b")}
    np.testing.assert_array_equal(centroids["a"], centroids["b"])

    stamp = (tmp_path / "a" / "_SUCCESS").stat().st_mtime_ns
    cli("run", *flags, "--seed", "2", "--output", tmp_path / "a", code=2)  # another run's
    error = capsys.readouterr().err
    assert "seed: 1 -> 2" in error and "--overwrite" in error
    cli("run", *flags, "--seed", "2", "--output", tmp_path / "a", "--overwrite")
    assert (tmp_path / "a" / "_SUCCESS").stat().st_mtime_ns > stamp
    assert not np.array_equal(np.load(tmp_path / "a" / "centroids.npy"), centroids["b"])


def test_resampling_flags_from_the_command_line(ray_local, small_dataset, tmp_path):
    """--resample-size 1 refits on one row per cluster: the centroids become input rows.
    --resample-strategy closest takes each cluster's row nearest its centre, random any
    of its rows: the closest rows label the data with a smaller mean distance."""
    root, x, _ = small_dataset
    mean_distance = {}
    for strategy in ("closest", "random"):
        out = tmp_path / strategy
        m = cli("run", "--input", root, "--output", out, "--resampling-steps", "1",
                "--resample-size", "1", "--resample-strategy", strategy)  # fmt: skip
        c = np.load(out / "centroids.npy")
        assert (((x[:, None, :] - c[None]) ** 2).sum(-1).min(0) == 0).all()  # each is a row
        mean_distance[strategy] = m["metrics"]["mean_distance"]
    assert mean_distance["closest"] < mean_distance["random"], mean_distance


def test_approx_search_from_the_command_line(ray_local, tmp_path, capsys):
    """--search approx on two workers: the first iteration exact, then each worker scores
    its rows near their last labels. Same objective as --search flat within 0.5%, the
    labels the nearest centroids of nearly every row, and the rows that changed label in
    the last iteration in the manifest. Mini-batch refuses it."""
    x, _ = mixture(12_000, 8, 96, seed=11, spread=0.3)
    write_parquet_shards(tmp_path / "in", x, shards=2)
    flags = ["--input", tmp_path / "in", "--k", "256", "--iterations", "6", "--tol", "0",
             "--init", "random", "--label-workers", "1"]  # fmt: skip
    approx = cli("run", *flags, "--search", "approx", "--output", tmp_path / "approx")
    assert approx["fit"]["search"] == "approx"
    changed = approx["fit"]["changed_last_iteration"]
    assert changed == approx["fit"]["history"][-1]["changed"] and 0 <= changed < 12_000
    assert approx["fit"]["history"][0]["changed"] is None
    # The same fit with the exact search, in this process (same seeding: the sample's
    # keys follow the global row numbers).
    params = KMeansParams(256, iterations=6, tol=0, init="random", search="flat")
    flat = fit(ArrayData(x), params, init_state(ArrayData(x), params)[0])
    assert approx["fit"]["history"][-1]["inertia"] <= flat.history[-1].inertia * 1.005
    table = labels_table(tmp_path / "approx").sort_by("id")
    c = np.load(tmp_path / "approx" / "centroids.npy")
    agree = table.column("label").to_numpy() == nearest(x, c)
    assert agree.mean() > 0.98  # the label pass searched near, too
    cli("run", *flags, "--search", "approx", "--algorithm", "minibatch",
        "--output", tmp_path / "mb", code=2)  # fmt: skip
    assert "--search approx needs --algorithm lloyd" in capsys.readouterr().err


def test_fit_sample_from_the_command_line(ray_local, small_dataset, tmp_path, capsys):
    """--fit-sample 1500 of 6,000 rows: the workers hold a uniform sample of about that
    many (the same rows for any split), the fit sees only them, the label pass labels
    every row, and from the same start (one row of each component) the objective over
    all rows stays near a full fit's (the same loop in this process)."""
    root, x, truth = small_dataset
    init = x[[np.flatnonzero(truth == j)[0] for j in range(12)]]
    np.save(tmp_path / "init.npy", init)
    flags = ["--input", root, "--iterations", "8", "--fit-sample", "1500",
             "--init-centroids", tmp_path / "init.npy"]  # fmt: skip
    sampled = cli("run", *flags, "--output", tmp_path / "s")
    rows = sampled["fit"]["sample_rows"]
    assert abs(rows - 1500) < 5 * np.sqrt(1500)
    assert {r["rows"] for r in sampled["fit"]["history"]} == {rows}
    assert sampled["rows"]["output"] == 6000
    params = KMeansParams(12, iterations=8)
    full = fit(ArrayData(x), params, init_state(ArrayData(x), params, init)[0]).centroids
    c_sampled = np.load(tmp_path / "s" / "centroids.npy")
    cost = [((x - c[nearest(x, c)]) ** 2).sum() for c in (full, c_sampled)]
    assert cost[1] <= cost[0] * 1.05
    one = cli("run", *flags, "--workers", "1", "--output", tmp_path / "one")
    assert one["fit"]["sample_rows"] == rows  # the sample does not depend on the split
    cli("run", *flags[:-4], "--fit-sample", "half", "--output", tmp_path / "bad", code=2)
    assert "--fit-sample must be a row count or auto" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ("--topk", "3", "--truth-column", "truth"),
        ("--spherical", "--balanced", "--topk", "2"),
    ],
    ids=["plain", "spherical-balanced"],
)
def test_labels_on_the_workers_are_the_streaming_pass_labels(
    ray_local, small_dataset, tmp_path, flags
):
    """--label-from workers (the default after a Lloyd fit: no second read) writes the
    rows, columns and labels of the streaming pass that reads the input again; the
    distances agree up to float rounding (BLAS blocks the batches differently)."""
    root, _, _ = small_dataset
    tables, manifests = {}, {}
    for source in ("workers", "stream"):
        out = tmp_path / source
        manifests[source] = cli("run", "--input", root, "--output", out, "--iterations", "4",
                                "--label-from", source, *flags)  # fmt: skip
        assert manifests[source]["label"]["source"] == source
        tables[source] = labels_table(out).sort_by("id")
    workers, stream = tables["workers"], tables["stream"]
    assert workers.schema == stream.schema and workers.num_rows == 6000
    for name in workers.column_names:
        if name in ("distance", "cosine", "topk_distances", "topk_probs"):
            got, want = (
                np.stack(t.column(name).to_numpy(zero_copy_only=False)) for t in tables.values()
            )
            # probabilities: exp(-d / eps) magnifies the distances' rounding by 1 / eps
            atol = 1e-3 if name == "topk_probs" else 1e-5
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)
        else:
            assert workers.column(name).equals(stream.column(name)), name
    got, want = (manifests[s]["clusters"] for s in ("workers", "stream"))
    assert got["sizes"] == want["sizes"] and got.get("nearest") == want.get("nearest")
    np.testing.assert_allclose(got["mean_distance"], want["mean_distance"], rtol=1e-5)
    assert manifests["workers"]["label"]["actors"] == manifests["workers"]["fit"]["workers"]
