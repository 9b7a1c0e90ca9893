"""Duplicate ids and the drift join, answered by Ray tasks partitioned by id hash: the
same answers as a join in one process, for any number of partitions."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.runtime import id_partitions


def write_files(root, ids, labels, sizes):
    root.mkdir()
    files, start = [], 0
    for i, size in enumerate(sizes):  # an empty file among them
        table = pa.table({"id": ids[start : start + size], "label": labels[start : start + size]})
        pq.write_table(table, root / f"{i}.parquet")
        files.append(resolve(str(root / f"{i}.parquet"), {}))
        start += size
    return files


@pytest.mark.parametrize("kind", ["int", "str"])
@pytest.mark.parametrize("partitions", [1, 3])
def test_duplicates_and_contingency(ray_local, tmp_path, monkeypatch, kind, partitions):
    monkeypatch.setattr(id_partitions, "ROWS_PER_PARTITION", -(-2000 // partitions))
    rng = np.random.default_rng(partitions)
    numbers = rng.permutation(5000)[:2000]
    numbers[[10, 900, 1999]] = numbers[[5, 5, 1500]]  # three later occurrences
    ids = numbers.astype(str).astype(object) if kind == "str" else numbers
    labels = rng.integers(0, 7, 2000).astype(np.int32)
    files = write_files(tmp_path / "a", ids, labels, [700, 0, 800, 500])

    drop, examples = id_partitions.duplicate_positions(files, 2000)
    assert {f: r.tolist() for f, r in drop.items()} == {0: [10], 2: [200], 3: [499]}
    assert examples == sorted({str(numbers[5]), str(numbers[1500])})

    # A later run labels 1,500 of the ids (and 300 new ones) with other labels.
    later_numbers = np.concatenate([numbers[:1500], np.arange(10_000, 10_300)])
    later_ids = later_numbers.astype(str).astype(object) if kind == "str" else later_numbers
    later_labels = rng.integers(0, 5, 1800).astype(np.int32)
    later = write_files(tmp_path / "b", later_ids, later_labels, [900, 900])
    prev, cur, counts = id_partitions.label_contingency(files, later, 1800)

    before = pa.table({"id": ids, "label_prev": labels})
    after = pa.table({"id": later_ids, "label": later_labels})
    joined = after.join(before, "id", join_type="inner")
    expected = np.zeros((7, 5), np.int64)
    np.add.at(expected, (joined["label_prev"].to_numpy(), joined["label"].to_numpy()), 1)
    got = np.zeros((7, 5), np.int64)
    np.add.at(got, (prev, cur), counts)
    assert np.array_equal(got, expected) and counts.sum() == joined.num_rows
