"""Reading written label files back: a few small columns, in driver threads.

Starting Ray workers to read 4-byte columns costs more than reading them (5.7 s
against 0.02 s for 100k rows), so counts, duplicate checks and drift read them here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.pipelines.io.storage import Location


def read_columns(loc: Location, columns: list[str]) -> pa.Table:
    """Some columns of one parquet file."""
    with loc.open() as f:
        return pq.read_table(f, columns=columns)


def read_label_columns(files: list[Location], columns: list[str]) -> list[pa.Table]:
    """``columns`` of every label file, one table per file, in order."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda f: read_columns(f, columns), files))


def ids_and_labels(files: list[Location]) -> pa.Table:
    """(id, label) of every row in label files."""
    tables = read_label_columns(files, ["id", "label"])
    if not tables:
        return pa.table({"id": pa.array([], pa.int64()), "label": pa.array([], pa.int32())})
    return pa.concat_tables(tables)
