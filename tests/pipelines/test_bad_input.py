"""Bad input end to end: each case is an error naming the file and the row, or with
--on-bad-rows skip a counted skip in the manifest; nothing is lost silently."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pseudolabel.pipelines.commands.run as run_module
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.read import iter_batches
from tests.data import write_parquet_shards
from tests.pipelines.conftest import fast_config

ROWS, DIM = 900, 6


@pytest.fixture
def shards(tmp_path):
    x = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    paths = write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=100)
    return tmp_path / "in", paths


def both_policies(root, out, **kw):
    """Run with the default policy (expecting an InputError), then with skip."""
    with pytest.raises(InputError) as err:
        run(fast_config(input=str(root), output=str(out / "e"), k=3, **kw))
    manifest = run(
        fast_config(input=str(root), output=str(out / "s"), k=3, on_bad_rows="skip", **kw)
    )
    labels = pq.read_table(out / "s" / "labels", columns=["id"]).column("id").to_numpy()
    assert len(labels) == manifest["rows"]["output"] == len(np.unique(labels))
    rows = manifest["rows"]
    # Nothing lost silently: every planned row is labelled or skipped for a reason.
    assert rows["output"] + sum(rows["skipped"]["by_reason"].values()) == rows["input"]
    return str(err.value), manifest


def test_truncated_parquet(ray_local, shards, tmp_path):
    root, paths = shards
    paths[1].write_bytes(paths[1].read_bytes()[:-300])  # the footer is gone
    message, manifest = both_policies(root, tmp_path)
    assert "part-00001.parquet: not a readable parquet file" in message
    skipped = manifest["rows"]["skipped"]["files"]
    assert [f["url"].rsplit("/", 1)[1] for f in skipped] == ["part-00001.parquet"]
    assert manifest["rows"]["output"] == 600


def test_corrupt_pages_with_a_valid_footer(ray_local, shards, tmp_path):
    root, paths = shards
    data = bytearray(paths[2].read_bytes())
    data[200:1600] = np.random.default_rng(1).integers(0, 256, 1400, np.uint8).tobytes()
    paths[2].write_bytes(bytes(data))
    message, manifest = both_policies(root, tmp_path)
    assert "part-00002.parquet: corrupt or truncated file" in message
    assert manifest["rows"]["skipped"]["by_reason"]["corrupt or truncated file"] > 0


def test_dimension_mismatch_in_one_shard(ray_local, shards, tmp_path):
    root, _ = shards
    odd = np.ones((50, DIM + 2), np.float32)
    write_parquet_shards(tmp_path / "odd", odd, 1, ids=np.arange(10_000, 10_050))
    (tmp_path / "odd" / "part-00000.parquet").rename(root / "part-00009.parquet")
    message, manifest = both_policies(root, tmp_path)
    assert "mixed dimensions" in message and "part-00009.parquet has dim 8" in message
    assert manifest["rows"]["skipped"]["files"][0]["reason"] == "dim 8, not 6"
    assert manifest["rows"]["output"] == ROWS


def test_wrong_dtype_in_one_shard(ray_local, shards, tmp_path):
    root, _ = shards
    bad = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(5 * DIM, np.int32)), DIM)
    pq.write_table(
        pa.table({"id": np.arange(5000, 5005), "embedding": bad}), root / "part-00009.parquet"
    )
    message, manifest = both_policies(root, tmp_path)
    assert "part-00009.parquet: column 'embedding' holds int32 values" in message
    assert manifest["rows"]["output"] == ROWS


def test_duplicate_ids(ray_local, shards, tmp_path):
    root, _ = shards
    x = np.ones((7, DIM), np.float32)
    write_parquet_shards(tmp_path / "dup", x, 1, ids=np.array([0, 1, 2, 3, 4, 5, 6]))
    (tmp_path / "dup" / "part-00000.parquet").rename(root / "part-00009.parquet")
    message, manifest = both_policies(root, tmp_path)
    assert "duplicate ids: 7 rows repeat an id already seen" in message
    assert manifest["rows"]["skipped"]["by_reason"] == {"duplicate id": 7}
    assert manifest["rows"]["output"] == ROWS


def test_null_and_non_utf8_ids(ray_local, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    raw = [b"a0", b"a1", b"\xff\xfe", b"a3"]
    offsets = pa.array(np.cumsum([0] + [len(v) for v in raw]), pa.int32())
    ids = pa.StringArray.from_buffers(4, offsets.buffers()[1], pa.py_buffer(b"".join(raw)))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4 * DIM, np.float32)), DIM)
    pq.write_table(pa.table({"id": ids, "embedding": emb}), root / "a.parquet")
    pq.write_table(
        pa.table({"id": pa.array(["b0", None, "b2"]), "embedding": emb[:3]}), root / "b.parquet"
    )
    with pytest.raises(InputError, match=r"a.parquet: row 2: id is not valid UTF-8"):
        run(fast_config(input=str(root), output=str(tmp_path / "e"), k=2))
    m = run(fast_config(input=str(root), output=str(tmp_path / "s"), k=2, on_bad_rows="skip"))
    assert m["rows"]["skipped"]["by_reason"] == {"id is not valid UTF-8": 1, "null id": 1}
    got = pq.read_table(tmp_path / "s" / "labels").column("id").to_pylist()
    assert sorted(got) == ["a0", "a1", "a3", "b0", "b2"]


def test_empty_shard_is_listed(ray_local, shards, tmp_path):
    root, _ = shards
    write_parquet_shards(tmp_path / "empty", np.ones((0, DIM), np.float32), 1)
    (tmp_path / "empty" / "part-00000.parquet").rename(root / "part-00009.parquet")
    m = run(fast_config(input=str(root), output=str(tmp_path / "o"), k=3))
    assert [u.rsplit("/", 1)[1] for u in m["input"]["empty_files"]] == ["part-00009.parquet"]
    assert m["rows"]["output"] == ROWS


def test_file_disappears_after_planning(ray_local, shards, tmp_path, monkeypatch):
    root, paths = shards
    plan_then_delete = make_plan

    def planner(url, settings):
        plan = plan_then_delete(url, settings)
        paths[0].unlink(missing_ok=True)  # gone before any worker reads it
        return plan

    monkeypatch.setattr(run_module, "make_plan", planner)
    with pytest.raises(InputError, match=r"part-00000.parquet: file disappeared after planning"):
        run(fast_config(input=str(root), output=str(tmp_path / "e"), k=3))
    write_parquet_shards(tmp_path / "again", np.ones((300, DIM), np.float32), 1)
    (tmp_path / "again" / "part-00000.parquet").rename(paths[0])
    m = run(fast_config(input=str(root), output=str(tmp_path / "s"), k=3, on_bad_rows="skip"))
    assert m["rows"]["skipped"]["by_reason"] == {"file disappeared after planning": 300}
    assert m["rows"]["output"] == 600


def test_reader_counts_a_vanished_file(shards):
    root, paths = shards
    plan = make_plan(str(root), ReadSettings())
    paths[0].unlink()
    settings = ReadSettings(dim=DIM, on_bad_rows="skip")
    batches = [b for u in plan.split(1)[0] for b in iter_batches(u, settings)]
    assert sum(len(b.x) for b in batches) == 600
    assert sum(b.skipped["file disappeared after planning"] for b in batches) == 300


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(algorithm="minibatch", batch_rows=100),
        dict(spherical=True),
        dict(spherical=True, algorithm="minibatch", batch_rows=100),
    ],
    ids=["lloyd", "minibatch", "spherical", "spherical-minibatch"],
)
def test_skip_counts_have_one_owner(ray_local, tmp_path, case):
    """NaN rows and (spherical) zero rows are counted once, whichever passes read them,
    and the counts survive a rerun that resumes from a finished fit."""
    x = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    x[[5, 450]] = np.nan
    x[[7, 8, 800]] = 0.0
    write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=100)
    config = fast_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "o"), k=3, on_bad_rows="skip", **case
    )
    expected = {"NaN or inf in embedding": 2}
    if case.get("spherical"):
        expected["all-zero embedding (spherical)"] = 3
    m = run(config)
    assert m["rows"]["skipped"]["by_reason"] == expected
    assert m["rows"]["output"] == ROWS - sum(expected.values())
    ids = pq.read_table(tmp_path / "o" / "labels", columns=["id"]).column("id").to_numpy()
    assert not {5, 450} & set(ids.tolist())
    assert ({7, 8, 800} <= set(ids.tolist())) != bool(case.get("spherical"))
    # A crash after the fit: the rerun finds the fit complete in its checkpoint and
    # labels again; the label pass alone reports the same counts.
    (tmp_path / "o" / "_SUCCESS").unlink()
    again = run(config)
    assert again["fit"]["init"] == "checkpoint"
    assert again["rows"]["skipped"]["by_reason"] == expected


def test_zero_row_with_spherical_is_an_error_naming_the_row(ray_local, tmp_path):
    x = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    x[450] = 0.0
    write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=100)
    with pytest.raises(InputError, match=r"part-00001.parquet: row 150: all-zero embedding"):
        run(
            fast_config(input=str(tmp_path / "in"), output=str(tmp_path / "o"), k=3, spherical=True)
        )


@pytest.mark.parametrize("algorithm", ["lloyd", "minibatch"])
def test_k_is_checked_against_the_valid_rows(ray_local, tmp_path, algorithm):
    """300 rows of which 5 are valid: k = 8 is one clear error, not a seeding traceback."""
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    x[5:] = np.nan
    write_parquet_shards(tmp_path / "in", x, 2)
    config = fast_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=8, on_bad_rows="skip",
        algorithm=algorithm, iterations=2,
    )  # fmt: skip
    # Mini-batch seeds from the stream's first batches, which may hold 4 of the 5 rows.
    with pytest.raises(InputError, match=r"--k 8 exceeds the valid input rows .* [45] rows"):
        run(config)
