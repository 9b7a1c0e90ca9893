"""Bad input: each case is an error naming the file and the row, or with --on-bad-rows
skip a counted skip in the manifest; nothing is lost silently.

The errors are checked where they are raised (planning, reading, publish) on an input
holding that one defect; one run with skip reads an input holding all of them at once."""

from __future__ import annotations

import shutil
from collections import Counter

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
VANISHING = 60  # rows of the file that is deleted between planning and reading


@pytest.fixture
def shards(tmp_path):
    x = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    paths = write_parquet_shards(tmp_path / "in", x, shards=3, row_group_rows=100)
    return tmp_path / "in", paths


def write(path, ids, x):
    """One parquet file: string ``ids`` (an Arrow array or a list), embeddings ``x``."""
    flat = pa.array(np.ascontiguousarray(x).ravel())
    ids = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    emb = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    pq.write_table(pa.table({"id": ids, "embedding": emb}), path)


@pytest.fixture
def defects(tmp_path):
    """One input: part-00000 (300 good rows, ids r0..r299) and a file per defect."""
    root = tmp_path / "in"
    x = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    ids = np.array([f"r{i}" for i in range(ROWS)], dtype=object)
    paths = write_parquet_shards(root, x, shards=3, ids=ids, row_group_rows=100)
    paths[1].write_bytes(paths[1].read_bytes()[:-300])  # the footer is gone
    data = bytearray(paths[2].read_bytes())  # pages corrupt, the footer valid
    data[200:1600] = np.random.default_rng(1).integers(0, 256, 1400, np.uint8).tobytes()
    paths[2].write_bytes(bytes(data))
    write(root / "dim8.parquet", [f"d{i}" for i in range(50)], np.ones((50, DIM + 2), np.float32))
    write(root / "int32.parquet", [f"i{i}" for i in range(5)], np.zeros((5, DIM), np.int32))
    write(root / "empty.parquet", [], np.ones((0, DIM), np.float32))
    write(root / "dup.parquet", [f"r{i}" for i in range(7)], np.ones((7, DIM), np.float32))
    raw = [b"a0", b"a1", b"\xff\xfe", b"a3"]  # row 2 is not UTF-8
    offsets = pa.array(np.cumsum([0] + [len(v) for v in raw]), pa.int32())
    bad = pa.StringArray.from_buffers(4, offsets.buffers()[1], pa.py_buffer(b"".join(raw)))
    write(root / "a.parquet", bad, np.ones((4, DIM), np.float32))
    write(root / "b.parquet", ["b0", None, "b2"], np.ones((3, DIM), np.float32))
    ids = [f"v{i}" for i in range(VANISHING)]
    write(root / "vanish.parquet", ids, np.ones((VANISHING, DIM), np.float32))
    return root


def alone(root, name, tmp_path):
    """The good part-00000 and the file ``name`` of ``root``, in a folder of their own."""
    folder = tmp_path / f"only-{name.split('.')[0]}"
    folder.mkdir()
    for n in ("part-00000.parquet", name):
        shutil.copy(root / n, folder / n)
    return folder


def read_all(root, on_bad_rows="error"):
    """Plan and read every row of ``root`` as a run's readers do: (plan, batches)."""
    plan = make_plan(str(root), ReadSettings(on_bad_rows=on_bad_rows))
    settings = ReadSettings(dim=plan.dim, on_bad_rows=on_bad_rows)
    return plan, [b for u in plan.split(1)[0] for b in iter_batches(u, settings)]


@pytest.mark.parametrize(
    "name, message",
    [
        ("part-00001.parquet", r"part-00001.parquet: not a readable parquet file"),
        (
            "part-00002.parquet",
            r"part-00002.parquet: corrupt or truncated file .*; use --on-bad-rows skip",
        ),
        ("dim8.parquet", r"mixed dimensions: .* has dim 6 but .*dim8.parquet has dim 8"),
        ("int32.parquet", r"int32.parquet: column 'embedding' holds int32 values"),
        ("a.parquet", r"a.parquet: row 2: id is not valid UTF-8 .*use --on-bad-rows skip"),
        ("b.parquet", r"b.parquet: row 1: null id .*use --on-bad-rows skip"),
    ],
    ids=["truncated", "corrupt-pages", "dimension", "int32", "non-utf8-id", "null-id"],
)
def test_each_defect_alone_is_an_error_naming_the_file(defects, tmp_path, name, message):
    """The InputError a run raises: planning or reading (no Ray) raises it."""
    with pytest.raises(InputError, match=message):
        read_all(alone(defects, name, tmp_path))


def test_empty_shard_is_listed_not_an_error(defects, tmp_path):
    plan, batches = read_all(alone(defects, "empty.parquet", tmp_path))
    assert [u.rsplit("/", 1)[1] for u in plan.empty_files] == ["empty.parquet"]
    assert plan.total_rows == sum(len(b.x) for b in batches) == 300


BACKENDS = pytest.mark.parametrize("backend", ["ray", "local"])  # --backend local: no Ray


@BACKENDS
def test_duplicate_ids_are_an_error_at_publish(ray_local, defects, tmp_path, backend):
    """The one defect only a whole run finds (in the label files, before publish)."""
    root = alone(defects, "dup.parquet", tmp_path)
    out = tmp_path / "e"
    with pytest.raises(InputError, match=r"duplicate ids: 7 rows repeat an id already seen"):
        run(fast_config(input=str(root), output=str(out), k=3, backend=backend))
    assert not (out / "_SUCCESS").exists()


@BACKENDS
def test_skip_counts_every_defect(ray_local, defects, tmp_path, monkeypatch, backend):
    """All defects in one input, one run with skip: each counted under its reason, each
    unusable file listed; output + skipped = input, and the labels' ids are unique."""

    def planner(url, settings):
        plan = make_plan(url, settings)
        (defects / "vanish.parquet").unlink(missing_ok=True)  # gone before any worker reads
        return plan

    # What survives the corrupt pages, read without Ray: the run must agree.
    _, batches = read_all(alone(defects, "part-00002.parquet", tmp_path), "skip")
    corrupt = sum(b.skipped["corrupt or truncated file"] for b in batches)
    assert 0 < corrupt < 300
    survivors = {i for b in batches for i in b.ids.to_pylist()}
    monkeypatch.setattr(run_module, "make_plan", planner)
    out = str(tmp_path / "s")
    m = run(fast_config(input=str(defects), output=out, k=3, on_bad_rows="skip", backend=backend))
    assert m["backend"]["name"] == backend
    rows = m["rows"]
    assert rows["skipped"]["by_reason"] == {
        "corrupt or truncated file": corrupt,
        "file disappeared after planning": VANISHING,
        "id is not valid UTF-8": 1,
        "null id": 1,
        "duplicate id": 7,
    }
    files = {f["url"].rsplit("/", 1)[1]: f for f in rows["skipped"]["files"]}
    assert sorted(files) == ["dim8.parquet", "int32.parquet", "part-00001.parquet"]
    assert "not a readable parquet file" in files["part-00001.parquet"]["reason"]
    assert (files["dim8.parquet"]["reason"], files["dim8.parquet"]["rows"]) == ("dim 8, not 6", 50)
    assert "column 'embedding' holds int32 values" in files["int32.parquet"]["reason"]
    assert [u.rsplit("/", 1)[1] for u in m["input"]["empty_files"]] == ["empty.parquet"]
    # Planned: part-00000, part-00002, vanish, a, b and dup; not the three files above.
    assert rows["input"] == 300 + 300 + VANISHING + 4 + 3 + 7
    # Nothing lost silently: every planned row is labelled or skipped for a reason.
    assert rows["output"] + sum(rows["skipped"]["by_reason"].values()) == rows["input"]
    labels = pq.read_table(tmp_path / "s" / "labels", columns=["id"]).column("id").to_pylist()
    assert len(labels) == rows["output"] == len(set(labels))
    assert set(labels) == survivors | {"a0", "a1", "a3", "b0", "b2"}


def test_reader_counts_a_vanished_file(shards):
    root, paths = shards
    plan = make_plan(str(root), ReadSettings())
    paths[0].unlink()
    settings = ReadSettings(dim=DIM, on_bad_rows="error")
    with pytest.raises(
        InputError,
        match=r"part-00000.parquet: file disappeared after planning; use --on-bad-rows skip",
    ):
        [b for u in plan.split(1)[0] for b in iter_batches(u, settings)]
    settings = ReadSettings(dim=DIM, on_bad_rows="skip")
    batches = [b for u in plan.split(1)[0] for b in iter_batches(u, settings)]
    assert sum(len(b.x) for b in batches) == 600
    assert sum(b.skipped["file disappeared after planning"] for b in batches) == 300


def nan_and_zero_rows(root):
    x = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    x[[5, 450]] = np.nan
    x[[7, 8, 800]] = 0.0
    write_parquet_shards(root, x, shards=3, row_group_rows=100)


@pytest.mark.parametrize("spherical", [False, True])
def test_zero_rows_are_bad_only_for_spherical(tmp_path, spherical):
    """The readers a run configures (no Ray): zero rows are kept unless --spherical."""
    nan_and_zero_rows(tmp_path / "in")
    config = fast_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "o"), k=3, on_bad_rows="skip",
        spherical=spherical,
    )  # fmt: skip
    plan = make_plan(config.input, config.read_settings())
    settings = config.read_settings(plan)
    batches = [b for u in plan.split(1)[0] for b in iter_batches(u, settings)]
    expected = {"NaN or inf in embedding": 2}
    if spherical:
        expected["all-zero embedding (spherical)"] = 3
    assert sum((b.skipped for b in batches), Counter()) == expected
    ids = {i for b in batches for i in b.ids.to_pylist()}
    assert len(ids) == ROWS - sum(expected.values())
    assert not {5, 450} & ids
    assert ({7, 8, 800} <= ids) != spherical


@pytest.mark.parametrize(
    "case",
    [
        dict(spherical=True),
        dict(spherical=True, algorithm="minibatch", batch_rows=100),
        dict(spherical=True, algorithm="minibatch", batch_rows=100, backend="local"),
    ],
    ids=["spherical", "spherical-minibatch", "spherical-minibatch-in-process"],
)
def test_skip_counts_have_one_owner(ray_local, tmp_path, case):
    """NaN rows and zero rows (spherical) are counted once, whichever passes read them
    (Lloyd or mini-batch), and the counts survive a rerun that resumes from a finished fit."""
    nan_and_zero_rows(tmp_path / "in")
    config = fast_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "o"), k=3, on_bad_rows="skip", **case
    )
    expected = {"NaN or inf in embedding": 2, "all-zero embedding (spherical)": 3}
    m = run(config)
    assert m["rows"]["skipped"]["by_reason"] == expected
    assert m["rows"]["output"] == ROWS - sum(expected.values())
    ids = pq.read_table(tmp_path / "o" / "labels", columns=["id"]).column("id").to_numpy()
    assert not {5, 450, 7, 8, 800} & set(ids.tolist())
    # A crash after the fit: the rerun finds the fit complete in its checkpoint and
    # labels again; the label pass alone reports the same counts.
    (tmp_path / "o" / "_SUCCESS").unlink()
    again = run(config)
    assert again["fit"]["init"] == "checkpoint"
    assert again["rows"]["skipped"]["by_reason"] == expected
    assert again["backend"]["name"] == m["backend"]["name"] == case.get("backend", "ray")


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
