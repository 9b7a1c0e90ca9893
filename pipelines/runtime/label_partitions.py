"""Questions about all rows of label files, answered by Ray tasks partitioned by key.

The driver never holds the rows (a billion would not fit): each file's rows go to P
partitions by a hash of the id, or by label (``_partition``); partition p receives its
slice of every file and answers for those rows alone; the driver receives the answers,
whose size does not grow with the rows:

* ``duplicate_positions``: (file, row) of each later occurrence of an id (in file, then
  row order), to drop or report; as many as there are duplicates.
* ``label_contingency``: the rows shared by two runs, as counts per (previous label,
  label) pair: at most k x k numbers.
* ``cluster_selection``: the rows a per-cluster quota picks (curation's balanced
  sample), partitioned by label: as many as the sample.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from pseudolabel.ops.sampling import cluster_samples, row_keys
from pseudolabel.pipelines.io.label_files import read_columns
from pseudolabel.pipelines.io.storage import Location
from pseudolabel.pipelines.runtime import calls

# Rows per partition the driver aims for; at least one partition, at most MAX_PARTITIONS.
ROWS_PER_PARTITION = 4_000_000
MAX_PARTITIONS = 256


def partition_count(rows: int) -> int:
    return int(np.clip(-(-rows // ROWS_PER_PARTITION), 1, MAX_PARTITIONS))


def _id_hash(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hashes of integer or string ids (pandas' vectorised hash)."""
    values = ids.to_numpy() if isinstance(ids, pa.ChunkedArray) else ids.to_numpy(False)
    import pandas as pd  # 0.16 s to import: only where ids are hashed

    return pd.util.hash_array(values)


@ray.remote
def _partition(loc: Location, columns: list[str], parts: int, file_index: int, by: str):
    """File ``loc``'s ``columns`` (``id`` first), with a file and row number each, split
    into ``parts`` tables by id hash (``by="id"``) or label (num_returns = parts)."""
    table = read_columns(loc, columns)
    table = table.append_column("file", pa.array(np.full(len(table), file_index, np.int32)))
    table = table.append_column("row", pa.array(np.arange(len(table), dtype=np.int64)))
    if by == "id":
        which = _id_hash(table.column("id")) % np.uint64(parts)
    else:
        which = table.column("label").to_numpy() % parts
    out = [table.filter(pa.array(which == p)) for p in range(parts)]
    return out if parts > 1 else out[0]


def _spread(files: list[Location], columns: list[str], parts: int, by: str = "id") -> list:
    """refs[p] = partition p's table refs, one per file."""
    refs = [
        calls.task(_partition).options(num_returns=parts).remote(f, columns, parts, i, by)
        for i, f in enumerate(files)
    ]
    if parts == 1:
        return [refs]
    return [[r[p] for r in refs] for p in range(parts)]


@ray.remote
def _later_occurrences(*tables: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(files, rows) of every occurrence of an id after its first, and a few of the ids."""
    table = pa.concat_tables(tables, promote_options="default").sort_by(
        [("file", "ascending"), ("row", "ascending")]
    )
    ids = table.column("id").to_numpy()
    _, first = np.unique(ids, return_index=True)
    later = np.ones(len(ids), bool)
    later[first] = False
    examples = sorted({str(v) for v in ids[later][:5]})
    return table.column("file").to_numpy()[later], table.column("row").to_numpy()[later], examples


def duplicate_positions(files: list[Location], rows: int) -> tuple[dict[int, np.ndarray], list]:
    """{file index: sorted row numbers to drop}, and up to 5 example ids per partition."""
    if not files:  # every row skipped: nothing was written
        return {}, []
    parts = partition_count(rows)
    later = calls.task(_later_occurrences)
    answers = calls.get([later.remote(*p) for p in _spread(files, ["id"], parts)])
    drop: dict[int, list[np.ndarray]] = {}
    examples: list[str] = []
    for file_numbers, row_numbers, some in answers:
        examples += some
        for f in np.unique(file_numbers):
            drop.setdefault(int(f), []).append(row_numbers[file_numbers == f])
    return {f: np.sort(np.concatenate(r)) for f, r in drop.items()}, sorted(examples)[:5]


@ray.remote
def _joined_pairs(n_before: int, *tables: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Counts of (previous label, label) over the ids in both runs' tables: the first
    ``n_before`` tables are the previous run's."""
    if n_before == 0 or n_before == len(tables):  # a run with no label files
        return np.empty(0, np.int64), np.empty(0, np.int64)
    before = pa.concat_tables(tables[:n_before], promote_options="default").select(["id", "label"])
    after = pa.concat_tables(tables[n_before:], promote_options="default").select(["id", "label"])
    before = before.rename_columns(["id", "label_prev"])
    shared = after.join(before, "id", join_type="inner")
    codes = shared.column("label_prev").to_numpy().astype(np.int64) << 32
    codes |= shared.column("label").to_numpy().astype(np.int64)
    return np.unique(codes, return_counts=True)


def label_contingency(
    previous: list[Location], current: list[Location], rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(previous labels, labels, counts) over the ids that both runs labelled."""
    parts = partition_count(rows)
    before = _spread(previous, ["id", "label"], parts) if previous else [[]] * parts
    after = _spread(current, ["id", "label"], parts) if current else [[]] * parts
    joined = calls.task(_joined_pairs)
    answers = calls.get([joined.remote(len(b), *b, *a) for b, a in zip(before, after, strict=True)])
    codes = np.concatenate([a[0] for a in answers]) if answers else np.empty(0, np.int64)
    counts = np.concatenate([a[1] for a in answers]) if answers else np.empty(0, np.int64)
    codes, where = np.unique(codes, return_inverse=True)
    counts = np.bincount(where, weights=counts, minlength=len(codes)).astype(np.int64)
    return codes >> 32, codes & 0xFFFFFFFF, counts


@ray.remote
def _pick(quota: np.ndarray, strategy: str, seed: int, *tables: pa.Table) -> pa.Table:
    """The rows of these clusters that ``quota`` picks: per cluster its ``quota`` rows of
    smallest key (the distance for "closest", a hash of id and seed for "random"), ties
    by file and row."""
    table = pa.concat_tables(tables, promote_options="default")
    labels = table.column("label").to_numpy().astype(np.int64)
    if strategy == "random":
        keys = row_keys(_id_hash(table.column("id")), seed)  # uniform, one draw per seed
    else:
        keys = table.column("distance").to_numpy().astype(np.float64)
    order = table.column("file").to_numpy().astype(np.int64) << 40
    order |= table.column("row").to_numpy()
    picked = cluster_samples(labels, keys, order, len(quota), quota)
    return table.take(pa.array(picked)).select(["id", "label", "file", "row"])


def cluster_selection(
    files: list[Location], quota: np.ndarray, strategy: str, seed: int, rows: int
) -> pa.Table:
    """(id, label) of the rows that ``quota`` (k,) picks per label, in file, row order."""
    if not files:
        return pa.table({"id": pa.array([], pa.int64()), "label": pa.array([], pa.int32())})
    parts = partition_count(rows)
    spread = _spread(files, ["id", "label", "distance"], parts, by="label")
    quota_ref = calls.put(np.asarray(quota, np.int64))
    picked = calls.get([calls.task(_pick).remote(quota_ref, strategy, seed, *p) for p in spread])
    table = pa.concat_tables(picked, promote_options="default")
    return table.sort_by([("file", "ascending"), ("row", "ascending")]).select(["id", "label"])
