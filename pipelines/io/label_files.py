"""Reading written label files back: a few small columns of one file.

The checks over every id (duplicates before publish, drift joins) read them in Ray
tasks partitioned by id (``runtime.label_partitions``); verification reads them per file.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.pipelines.io.storage import Location


def read_columns(loc: Location, columns: list[str]) -> pa.Table:
    """Some columns of one parquet file."""
    with loc.open() as f:
        return pq.read_table(f, columns=columns)
