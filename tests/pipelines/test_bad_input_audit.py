"""Bad input found by the audit (issue 14): each case is a clear error naming the file
(and the row), or with --on-bad-rows skip a counted skip; none is read wrongly."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.read import SLICE_ROWS, iter_batches
from pseudolabel.pipelines.io.skips import SkipLedger
from tests.data import write_parquet_shards
from tests.pipelines.conftest import fast_config

DIM = 6


def write(path, columns, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def fsl(x):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def batches(plan, workers=1, with_ids=True, **kw):
    settings = ReadSettings(**{"dim": plan.dim, **kw})
    return [
        b
        for units in plan.split(workers)
        for u in units
        for b in iter_batches(u, settings, with_ids)
    ]


def skipped(bs) -> Counter:
    return sum((b.skipped for b in bs), start=Counter())


# ------------------------------------------------ 1: a short first row of list<float>


def test_short_first_row_does_not_set_the_dimension(tmp_path):
    rows = [[1.0] * 3] + [[float(i)] * DIM for i in range(1, 30)]
    write(tmp_path / "in" / "a.parquet", {"id": np.arange(30), "embedding": rows})
    plan = make_plan(str(tmp_path / "in"), ReadSettings())
    assert plan.dim == DIM
    with pytest.raises(InputError, match=r"a.parquet: row 0: embedding length differs from dim 6"):
        batches(plan)
    bs = batches(plan, on_bad_rows="skip")
    assert sum(len(b.x) for b in bs) == 29
    assert skipped(bs) == {"embedding length differs from dim 6": 1}


# ------------------------------------------------ 2: values beyond the storage dtype


def test_values_beyond_float16_are_bad_rows(tmp_path):
    x = np.ones((20, DIM), np.float32)
    x[4, 2] = 1e5
    x[7, 0] = -7e4
    x[9, 1] = 65519.0  # rounds to 65504, the largest float16: kept
    write(tmp_path / "in" / "a.parquet", {"id": np.arange(20), "embedding": fsl(x)})
    plan = make_plan(str(tmp_path / "in"), ReadSettings())
    with pytest.raises(InputError, match=r"a.parquet: row 4: embedding value exceeds float16"):
        batches(plan, dtype="float16")
    bs = batches(plan, dtype="float16", on_bad_rows="skip")
    got = np.concatenate([b.x for b in bs])
    assert got.dtype == np.float16 and np.isfinite(got).all() and len(got) == 18
    assert np.concatenate([b.rows for b in bs]).tolist() == sorted(set(range(20)) - {4, 7})
    assert skipped(bs) == {"embedding value exceeds float16 range": 2}
    assert len(np.concatenate([b.x for b in batches(plan)])) == 20  # float32 holds them


# ------------------------------------------------ 3: id types that are one family


def id_files(root, columns: dict[str, pa.Array]):
    """One file per entry, 5 rows each, ids as given."""
    for i, (name, ids) in enumerate(columns.items()):
        x = np.full((len(ids), DIM), i + 1, np.float32)
        write(root / f"{name}.parquet", {"id": ids, "embedding": fsl(x)})


def test_integer_id_types_plan_as_int64(tmp_path):
    id_files(
        tmp_path,
        {
            "a": pa.array(np.arange(5), pa.int32()),
            "b": pa.array(np.arange(5, 10), pa.int64()),
            "c": pa.array(np.arange(10, 15), pa.uint16()),
        },
    )
    plan = make_plan(str(tmp_path), ReadSettings())
    assert plan.id_type == "int64" and plan.total_rows == 15
    bs = batches(plan)
    assert {b.ids.type for b in bs} == {pa.int64()}
    assert pa.concat_arrays([b.ids for b in bs]).to_pylist() == list(range(15))


def test_string_and_dictionary_ids_plan_as_string(tmp_path):
    dictionary = pa.DictionaryArray.from_arrays(
        pa.array([0, 1, 0, 2, 1], pa.int32()), pa.array(["d0", "d1", "d2"])
    )
    id_files(
        tmp_path,
        {
            "a": pa.array([f"a{i}" for i in range(5)], pa.string()),
            "b": pa.array([f"b{i}" for i in range(5)], pa.large_string()),
            "c": dictionary,
        },
    )
    assert pq.ParquetFile(tmp_path / "c.parquet").schema_arrow.field("id").type == dictionary.type
    plan = make_plan(str(tmp_path), ReadSettings())
    assert plan.id_type == "string"
    bs = batches(plan)
    assert {b.ids.type for b in bs} == {pa.string()}
    got = pa.concat_arrays([b.ids for b in bs]).to_pylist()
    assert got[:10] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    assert got[10:] == ["d0", "d1", "d0", "d2", "d1"]


def test_integer_and_string_ids_stay_an_error(tmp_path):
    id_files(
        tmp_path,
        {
            "a": pa.array(np.arange(5), pa.int32()),
            "b": pa.array(np.arange(5, 10), pa.int64()),
            "c": pa.array([f"c{i}" for i in range(5)]),
        },
    )
    with pytest.raises(InputError, match=r"mixed id types: .*c.parquet has id type string"):
        make_plan(str(tmp_path), ReadSettings())
    plan = make_plan(str(tmp_path), ReadSettings(on_bad_rows="skip"))
    assert [f.url.rsplit("/", 1)[1] for f in plan.files] == ["a.parquet", "b.parquet"]
    assert plan.skipped_files[0]["reason"] == "id type string, not int64"


def test_run_writes_one_id_type(ray_local, tmp_path):
    id_files(
        tmp_path / "in",
        {
            "a": pa.array([f"a{i}" for i in range(5)], pa.string()),
            "b": pa.array([f"b{i}" for i in range(5)], pa.large_string()),
            "c": pa.array([f"c{i}" for i in range(5)]).dictionary_encode(),
        },
    )
    m = run(fast_config(input=str(tmp_path / "in"), output=str(tmp_path / "o"), k=3))
    assert m["input"]["id_type"] == "string" and m["rows"]["output"] == 15
    ids = pq.read_table(tmp_path / "o" / "labels").column("id")
    assert ids.type == pa.string()
    assert sorted(ids.to_pylist()) == sorted(f"{c}{i}" for c in "abc" for i in range(5))


# ------------------------------------------------ 4: a file rewritten after planning


@pytest.fixture
def shards(tmp_path):
    x = np.random.default_rng(0).standard_normal((900, DIM)).astype(np.float32)
    paths = write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=100)
    return tmp_path / "in", paths, x


def test_parquet_rewritten_after_planning(shards):
    root, paths, x = shards
    plan = make_plan(str(root), ReadSettings())
    # Same rows, other row groups: the planned row-group map no longer fits the file.
    write(paths[1], {"id": np.arange(300, 600), "embedding": fsl(x[300:600])}, 70)
    with pytest.raises(
        InputError, match=r"part-00001.parquet: file changed since planning \(.*\); rerun"
    ):
        batches(plan)
    bs = batches(plan, on_bad_rows="skip")
    assert sum(len(b.x) for b in bs) == 600
    assert skipped(bs) == {"file changed after planning": 300}


def test_npy_rewritten_after_planning(tmp_path):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "a.npy"
    np.save(path, np.ones((50, DIM), np.float32))
    plan = make_plan(str(tmp_path / "in"), ReadSettings())
    planned = os.stat(path).st_mtime_ns
    np.save(path, np.full((50, DIM), 2, np.float32))  # same shape and size, other values
    os.utime(path, ns=(planned + 10**9, planned + 10**9))  # a later write, as it would be
    with pytest.raises(InputError, match=r"a.npy: file changed since planning"):
        batches(plan)
    assert skipped(batches(plan, on_bad_rows="skip")) == {"file changed after planning": 50}


# ------------------------------------------------ 5: row groups larger than a read


def test_a_large_row_group_is_read_in_slices(tmp_path):
    n = 2 * SLICE_ROWS + 1000
    x = np.random.default_rng(2).standard_normal((n, 4)).astype(np.float32)
    nan_rows = [3, SLICE_ROWS + 7, 2 * SLICE_ROWS + 5]
    x[nan_rows] = np.nan
    write(tmp_path / "in" / "a.parquet", {"id": np.arange(n), "embedding": fsl(x)}, n)
    assert pq.ParquetFile(tmp_path / "in" / "a.parquet").metadata.num_row_groups == 1
    plan = make_plan(str(tmp_path / "in"), ReadSettings())
    with pytest.raises(InputError, match=r"a.parquet: row 3: NaN or inf"):
        batches(plan)
    ledger = SkipLedger()
    for with_ids in (False, True):  # two passes (fit, label) report the same blocks
        bs = batches(plan, with_ids=with_ids, on_bad_rows="skip")
        assert [len(b.x) + sum(b.skipped.values()) for b in bs] == [SLICE_ROWS] * 2 + [1000]
        rows = np.concatenate([b.rows for b in bs])
        assert rows.tolist() == sorted(set(range(n)) - set(nan_rows))
        np.testing.assert_array_equal(np.concatenate([b.x for b in bs]), x[rows])
        for b in bs:
            if b.skipped:
                ledger.record(b.block, dict(b.skipped))
    assert ledger.by_reason() == {"NaN or inf in embedding": 3}


# ------------------------------------------------ 6: files the name rule leaves out


def test_ignored_files_are_listed(shards, tmp_path):
    root, paths, _ = shards
    for name in ("_part.parquet", ".hidden.parquet", "_tmp/x.parquet", "_SUCCESS"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(paths[0].read_bytes())
    plan = make_plan(str(root), ReadSettings())
    assert plan.total_rows == 900
    names = [u.removeprefix(str(root) + "/") for u in plan.ignored_files]
    assert names == [".hidden.parquet", "_part.parquet", "_tmp/x.parquet"]


def test_manifest_lists_ignored_files(ray_local, shards, tmp_path):
    root, paths, _ = shards
    (root / "_part.parquet").write_bytes(paths[0].read_bytes())
    m = run(fast_config(input=str(root), output=str(tmp_path / "o"), k=3))
    assert m["input"]["ignored_files"] == [str(root / "_part.parquet")]
    assert m["rows"]["input"] == 900
