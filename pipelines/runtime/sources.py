"""Where a worker's rows come from: shards of planned files, or a part of a Ray Dataset.

A source is a plain description (file pieces, or a Dataset part and its row range), so a
worker that Ray restarts rebuilds its rows from its constructor arguments alone (DESIGN
invariant 8). Both yield validated ``pipelines.io.read.Batch``es numbered by global row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.plan import FileInfo, ReadSettings, Shard, embedding_layout
from pseudolabel.pipelines.io.read import Batch, iter_batches, table_to_batch

DATASET_BATCH_ROWS = 65536


@dataclass(frozen=True)
class FileRows:
    """Some shards of a plan's files."""

    shards: tuple[Shard, ...]

    def size(self) -> int:
        return sum(s.rows for s in self.shards)

    def batches(self, settings: ReadSettings) -> Iterator[Batch]:
        for shard in self.shards:
            # The same columns as the label pass reads (ids too, though unused here), so
            # both passes meet the same bad rows and skip the same ones.
            yield from iter_batches(shard, settings)


@dataclass(frozen=True)
class DatasetRows:
    """Rows [offset, offset + rows) of a Ray Dataset: one part of ``split_at_indices``."""

    part: Any  # ray.data.MaterializedDataset
    offset: int
    rows: int
    name: str = "ray dataset"

    def size(self) -> int:
        return self.rows

    def batches(self, settings: ReadSettings) -> Iterator[Batch]:
        # The part as a pseudo-file: errors name "ray dataset: row N" with the global row.
        file = FileInfo(self.name, "dataset", self.rows, self.offset, (self.rows,))
        start = 0
        for table in self.part.iter_batches(batch_size=DATASET_BATCH_ROWS, batch_format="pyarrow"):
            yield table_to_batch(table, file, start, settings, with_ids=False)
            start += table.num_rows


def dataset_layout(dataset: Any, column: str | None) -> tuple[str, int, str]:
    """(embedding column, dim, value type) of a Ray Dataset, from its schema.

    ``column`` None: "embedding" if the Dataset has it, else its only column (as
    ``ray.data.from_numpy`` makes: "data").
    """
    schema = dataset.schema()
    names = list(schema.names)
    if column is None:
        if "embedding" in names:
            column = "embedding"
        elif len(names) == 1:
            column = names[0]
        else:
            raise InputError(
                f"the Dataset has columns {names}: name the embedding column (embedding_column=...)"
            )
    if column not in names:
        raise InputError(f"the Dataset has no column {column!r} (columns: {names})")
    arrow = schema.base_schema
    dim, value_type = embedding_layout(arrow.field(column).type, "ray dataset", column)
    if dim is None:
        raise InputError(
            f"ray dataset: column {column!r} holds variable-length lists; "
            "write fixed-size embeddings (a tensor column or fixed_size_list)"
        )
    return column, int(dim), value_type


def dataset_sources(dataset: Any, workers: int) -> list[DatasetRows]:
    """The Dataset cut into at most ``workers`` contiguous parts, in row order: global
    row numbers are the Dataset's order, as for a numpy array or the files of a plan."""
    materialized = dataset.materialize()
    n = materialized.count()
    if n == 0:
        raise InputError("the Dataset has no rows")
    edges = np.linspace(0, n, min(workers, n) + 1).round().astype(int)
    parts = materialized.split_at_indices([int(e) for e in edges[1:-1]])
    return [
        DatasetRows(part, int(lo), int(hi - lo))
        for part, lo, hi in zip(parts, edges[:-1], edges[1:], strict=True)
    ]
