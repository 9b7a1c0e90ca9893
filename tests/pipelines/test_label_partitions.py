"""Duplicate ids and the drift join, answered by Ray tasks partitioned by id hash: the
same answers as a join in one process, for any number of partitions."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.runtime import label_partitions


def write_files(root, ids, labels, sizes, distances=None):
    root.mkdir()
    files, start = [], 0
    for i, size in enumerate(sizes):  # an empty file among them
        rows = slice(start, start + size)
        table = pa.table({"id": ids[rows], "label": labels[rows]})
        if distances is not None:
            table = table.append_column("distance", pa.array(distances[rows]))
        pq.write_table(table, root / f"{i}.parquet")
        files.append(resolve(str(root / f"{i}.parquet"), {}))
        start += size
    return files


@pytest.mark.parametrize("kind, partitions", [("int", 1), ("str", 3)])
def test_duplicates_and_contingency(ray_local, tmp_path, monkeypatch, kind, partitions):
    monkeypatch.setattr(label_partitions, "ROWS_PER_PARTITION", -(-2000 // partitions))
    rng = np.random.default_rng(partitions)
    numbers = rng.permutation(5000)[:2000]
    numbers[[10, 900, 1999]] = numbers[[5, 5, 1500]]  # three later occurrences
    ids = numbers.astype(str).astype(object) if kind == "str" else numbers
    labels = rng.integers(0, 7, 2000).astype(np.int32)
    files = write_files(tmp_path / "a", ids, labels, [700, 0, 800, 500])

    drop, examples = label_partitions.duplicate_positions(files, 2000)
    assert {f: r.tolist() for f, r in drop.items()} == {0: [10], 2: [200], 3: [499]}
    assert examples == sorted({str(numbers[5]), str(numbers[1500])})

    # A later run labels 1,500 of the ids (and 300 new ones) with other labels.
    later_numbers = np.concatenate([numbers[:1500], np.arange(10_000, 10_300)])
    later_ids = later_numbers.astype(str).astype(object) if kind == "str" else later_numbers
    later_labels = rng.integers(0, 5, 1800).astype(np.int32)
    later = write_files(tmp_path / "b", later_ids, later_labels, [900, 900])
    prev, cur, counts = label_partitions.label_contingency(files, later, 1800)

    before = pa.table({"id": ids, "label_prev": labels})
    after = pa.table({"id": later_ids, "label": later_labels})
    joined = after.join(before, "id", join_type="inner")
    expected = np.zeros((7, 5), np.int64)
    np.add.at(expected, (joined["label_prev"].to_numpy(), joined["label"].to_numpy()), 1)
    got = np.zeros((7, 5), np.int64)
    np.add.at(got, (prev, cur), counts)
    assert np.array_equal(got, expected) and counts.sum() == joined.num_rows


@pytest.mark.parametrize("partitions", [3])
def test_cluster_selection_takes_each_clusters_quota(ray_local, tmp_path, monkeypatch, partitions):
    """closest: per cluster its quota of rows nearest the centroid, as one process picks
    them; random: the quota's counts, a draw that follows the seed, not the partitions."""
    monkeypatch.setattr(label_partitions, "ROWS_PER_PARTITION", -(-3000 // partitions))
    rng = np.random.default_rng(0)
    ids = np.arange(3000) * 7
    labels = rng.integers(0, 6, 3000).astype(np.int32)
    distances = rng.random(3000).astype(np.float32)
    files = write_files(tmp_path / "a", ids, labels, [1000, 0, 2000], distances)
    quota = np.array([0, 10, 50, 1000, 3, 7])  # cluster 3 has fewer rows than its quota

    table = label_partitions.cluster_selection(files, quota, "closest", 0, 3000)
    expected = []
    for c in range(6):
        mine = np.flatnonzero(labels == c)
        expected += mine[np.argsort(distances[mine], kind="stable")[: quota[c]]].tolist()
    assert table.column("id").to_pylist() == (ids[np.sort(expected)]).tolist()

    a, b = (label_partitions.cluster_selection(files, quota, "random", s, 3000) for s in (1, 2))
    counts = np.bincount(a.column("label").to_numpy(), minlength=6)
    assert counts.tolist() == np.minimum(quota, np.bincount(labels, minlength=6)).tolist()
    assert a.column("id").to_pylist() != b.column("id").to_pylist()  # another seed


def test_no_label_files_no_questions(ray_local):
    """Every row skipped leaves no label files: nothing is duplicated, shared or picked."""
    assert label_partitions.duplicate_positions([], 0) == ({}, [])
    assert label_partitions.label_contingency([], [], 0)[2].sum() == 0
    assert label_partitions.cluster_selection([], np.array([3]), "closest", 0, 0).num_rows == 0
