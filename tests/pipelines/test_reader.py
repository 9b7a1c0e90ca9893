"""Planning and reading: every accepted layout, and a clear error for each bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.read import iter_batches
from tests.data import write_parquet_shards

SETTINGS = ReadSettings()


def read_all(plan, settings=SETTINGS, with_ids=True):
    settings = ReadSettings(**{**settings.__dict__, "dim": plan.dim})
    batches = [
        b for units in plan.split(1) for u in units for b in iter_batches(u, settings, with_ids)
    ]
    ids = pa.concat_arrays([b.ids for b in batches]) if with_ids else None
    return (
        np.concatenate([b.x for b in batches]),
        ids,
        sum((b.skipped for b in batches), start=type(batches[0].skipped)()),
    )


def write(path, columns, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def fsl(x):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


@pytest.fixture
def shards(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=100)
    return tmp_path / "in", x


def test_plan_from_metadata(shards):
    root, x = shards
    plan = make_plan(str(root), SETTINGS)
    assert plan.total_rows == 1000 and plan.dim == 8 and plan.fmt == "parquet"
    assert [f.offset for f in plan.files] == [0, 334, 667]
    assert plan.id_type == "int64" and plan.value_type == "float32"
    got, ids, _ = read_all(plan)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(ids.to_numpy(), np.arange(1000))


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
def test_split_is_balanced_and_complete(shards, workers):
    plan = make_plan(str(shards[0]), SETTINGS)
    split = plan.split(workers)
    assert len(split) == workers  # files are cut at row groups when too few
    loads = [sum(u.rows for u in w) for w in split]
    assert sum(loads) == 1000
    assert max(loads) - min(loads) <= 2 * 100  # within two row groups
    covered = sorted((u.file.offset + u.start, u.file.offset + u.stop) for w in split for u in w)
    assert covered[0][0] == 0 and covered[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert plan.split(workers) == split  # deterministic


def test_units_respect_max_rows(shards):
    plan = make_plan(str(shards[0]), SETTINGS)
    units = plan.units(250)
    assert all(u.rows <= 250 for u in units) and sum(u.rows for u in units) == 1000


@pytest.mark.parametrize("layout", ["fixed_size_list", "list", "large_list", "fixed_shape_tensor"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_embedding_layouts(tmp_path, layout, dtype):
    x = np.random.default_rng(1).standard_normal((50, 6)).astype(dtype)
    flat = pa.array(x.ravel())
    if layout == "fixed_size_list":
        emb = pa.FixedSizeListArray.from_arrays(flat, 6)
    elif layout == "fixed_shape_tensor":
        emb = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    else:
        offsets = pa.array(
            np.arange(0, 51 * 6, 6, dtype=np.int32 if layout == "list" else np.int64)
        )
        cls = pa.ListArray if layout == "list" else pa.LargeListArray
        emb = cls.from_arrays(offsets, flat)
    write(tmp_path / "a.parquet", {"id": pa.array([f"r{i}" for i in range(50)]), "embedding": emb})
    plan = make_plan(str(tmp_path), SETTINGS)
    assert plan.dim == 6 and plan.id_type == "string"
    assert plan.value_type == np.dtype(dtype).name
    got, ids, _ = read_all(plan, ReadSettings(dtype=np.dtype(dtype).name))
    np.testing.assert_array_equal(got, x)
    assert ids.to_pylist()[:2] == ["r0", "r1"]


def test_npy_shards_use_global_row_numbers(tmp_path):
    rng = np.random.default_rng(2)
    parts = [rng.standard_normal((n, 5)).astype(np.float32) for n in (30, 0, 45)]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"s{i}.npy", p)
    plan = make_plan(str(tmp_path), SETTINGS)
    assert plan.fmt == "npy" and plan.total_rows == 75 and len(plan.empty_files) == 1
    got, ids, _ = read_all(plan)
    np.testing.assert_array_equal(got, np.concatenate(parts))
    np.testing.assert_array_equal(ids.to_numpy(), np.arange(75))


def test_hidden_and_underscore_files_are_ignored(shards):
    root, _ = shards
    (root / "_SUCCESS").write_text("")
    (root / "_checkpoints").mkdir()
    np.save(root / "_checkpoints" / "c.npy", np.zeros((3, 8)))
    (root / ".part.parquet.crc").write_text("x")
    assert len(make_plan(str(root), SETTINGS).files) == 3


def test_partition_folders_are_read(tmp_path):
    x = np.ones((10, 4), np.float32)
    write_parquet_shards(tmp_path / "date=2026-11-20", x, 1)
    write_parquet_shards(tmp_path / "date=2026-11-21", x, 1)
    assert make_plan(str(tmp_path), SETTINGS).total_rows == 20
    assert make_plan(str(tmp_path / "date=2026-11-21"), SETTINGS).total_rows == 10


# -------------------------------------------------------------------------- bad input


def test_no_files(tmp_path):
    with pytest.raises(InputError, match=r"no \.parquet or \.npy files under"):
        make_plan(str(tmp_path), SETTINGS)


def test_missing_column(shards):
    with pytest.raises(InputError, match=r"part-00000.parquet: missing column 'vec'"):
        make_plan(str(shards[0]), ReadSettings(embedding_column="vec"))


@pytest.mark.parametrize("values", [pa.array(np.arange(12, dtype=np.int32)), pa.array(["a"] * 12)])
def test_non_float_embeddings(tmp_path, values):
    write(
        tmp_path / "a.parquet",
        {"id": [1, 2, 3], "embedding": pa.FixedSizeListArray.from_arrays(values, 4)},
    )
    with pytest.raises(
        InputError, match=r"a.parquet: column 'embedding' holds .* embeddings must be floats"
    ):
        make_plan(str(tmp_path), SETTINGS)


def test_scalar_embedding_column(tmp_path):
    write(tmp_path / "a.parquet", {"id": [1, 2], "embedding": [0.5, 0.25]})
    with pytest.raises(InputError, match="expected a list of floats"):
        make_plan(str(tmp_path), SETTINGS)


def test_mixed_dimensions(tmp_path):
    write_parquet_shards(tmp_path / "a", np.ones((5, 4), np.float32), 1)
    write(tmp_path / "b" / "z.parquet", {"id": [9], "embedding": fsl(np.ones((1, 3), np.float32))})
    with pytest.raises(
        InputError,
        match=r"mixed dimensions: .*part-00000.parquet has dim 4 but .*z.parquet has dim 3",
    ):
        make_plan(str(tmp_path), SETTINGS)


def test_mixed_dimensions_in_variable_lists_name_the_row(tmp_path):
    emb = pa.array([[1.0, 2.0], [1.0, 2.0], [1.0]], pa.list_(pa.float32()))
    write(tmp_path / "a.parquet", {"id": [1, 2, 3], "embedding": emb})
    plan = make_plan(str(tmp_path), SETTINGS)
    with pytest.raises(InputError, match=r"a.parquet: row 2: embedding length differs from dim 2"):
        read_all(plan)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rows(tmp_path, bad):
    x = np.ones((20, 3), np.float32)
    x[13, 1] = bad
    write_parquet_shards(tmp_path, x, 1)
    plan = make_plan(str(tmp_path), SETTINGS)
    with pytest.raises(InputError, match=r"part-00000.parquet: row 13: NaN or inf in embedding"):
        read_all(plan)
    got, ids, skipped = read_all(plan, ReadSettings(on_bad_rows="skip"))
    assert len(got) == 19 and 13 not in ids.to_pylist()
    assert skipped == {"NaN or inf in embedding": 1}


def test_null_embedding_and_null_id(tmp_path):
    emb = pa.array([[1.0, 2.0], None, [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32(), 2))
    write(tmp_path / "a.parquet", {"id": pa.array([1, 2, None, 4]), "embedding": emb})
    plan = make_plan(str(tmp_path), SETTINGS)
    with pytest.raises(InputError, match=r"row 1: null embedding"):
        read_all(plan)
    got, ids, skipped = read_all(plan, ReadSettings(on_bad_rows="skip"))
    assert ids.to_pylist() == [1, 4] and skipped == {"null embedding": 1, "null id": 1}
    np.testing.assert_array_equal(got, [[1, 2], [5, 6]])


def test_npy_bad_inputs(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3, 2), np.float32))
    with pytest.raises(InputError, match=r"a.npy: .npy array has shape \(4, 3, 2\)"):
        make_plan(str(tmp_path), SETTINGS)
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.int64))
    with pytest.raises(InputError, match=r"a.npy: .npy dtype is int64"):
        make_plan(str(tmp_path), SETTINGS)
    (tmp_path / "a.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(InputError, match=r"a.npy: not a readable .npy file"):
        make_plan(str(tmp_path), SETTINGS)


def test_mixed_formats(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    write_parquet_shards(tmp_path, np.ones((4, 3), np.float32), 1)
    with pytest.raises(InputError, match=r"mixes \.parquet and \.npy"):
        make_plan(str(tmp_path), SETTINGS)


def test_corrupt_parquet_footer(shards):
    root, _ = shards
    path = root / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match=r"part-00001.parquet: not a readable parquet file"):
        make_plan(str(root), SETTINGS)


def test_all_empty_is_an_error(tmp_path):
    write_parquet_shards(tmp_path, np.ones((0, 4), np.float32), 2)
    with pytest.raises(InputError, match="all 2 files are empty"):
        make_plan(str(tmp_path), SETTINGS)


def test_prefetched_batches_keep_order_errors_context_and_stop_with_the_caller():
    """The reader thread yields the same items in order, raises a reader's error where
    it was met (after the items before it), sees the caller's context variables, and
    ends when the caller stops early."""
    import contextvars
    import threading

    from pseudolabel.pipelines.io.read import READER_NAME, prefetched

    var = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    seen, produced = [], []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise OSError(f"unreadable at {i}")
            seen.append(var.get())
            produced.append(i)
            yield i

    assert list(prefetched(items(10))) == list(range(10))
    assert set(seen) == {"caller's"}
    got = []
    with pytest.raises(OSError, match="unreadable at 4"):
        for i in prefetched(items(10, fail_at=4)):
            got.append(i)
    assert got == [0, 1, 2, 3]
    produced.clear()
    stream = prefetched(items(1000), depth=1)
    assert next(stream) == 0
    stream.close()  # the caller stops: the reader stops too, a few items ahead at most
    assert READER_NAME not in [t.name for t in threading.enumerate()]
    assert len(produced) <= 4
