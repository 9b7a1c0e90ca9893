"""A Ray Data source over a read plan, so Ray Data reads through the one validated reader.

Blocks carry ``id``, ``embedding`` as Ray's tensor type (it reaches ``map_batches`` in
numpy format as an (n, d) array, unlike a fixed_size_list column, which arrives as an
object array), and any extra columns the run carries along (a truth column). Read
tasks report skipped rows to the run's ``SkipLedger`` when one is given.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.extensions import ArrowTensorArray

from pseudolabel.pipelines.io.plan import Plan, ReadSettings, Shard
from pseudolabel.pipelines.io.read import iter_batches
from pseudolabel.pipelines.io.skips import report_skips

# Rows per read task: small enough to spread over workers, large enough to amortise a task.
ROWS_PER_TASK = 262_144


class EmbeddingDatasource(Datasource):
    """One read task per unit of the plan, in file order, or in a seeded random order.

    Shuffling the tasks (not ``Dataset.randomize_block_order``, an all-to-all step that
    materialises every block before the first one is emitted) lets a stream start at
    once; ``iter_batches``' local shuffle buffer then mixes rows across blocks.
    """

    def __init__(
        self,
        plan: Plan,
        settings: ReadSettings,
        with_ids: bool = True,
        shuffle_seed: int | None = None,
        rows_per_task: int = ROWS_PER_TASK,
        ledger=None,
    ):
        self.plan, self.settings, self.with_ids = plan, settings, with_ids
        self.ledger = ledger
        self.units = plan.units(rows_per_task)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(self.units))
            self.units = [self.units[i] for i in order]

    def estimate_inmemory_data_size(self) -> int:
        return self.plan.total_rows * self.plan.dim * np.dtype(self.settings.dtype).itemsize

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [
            ReadTask(
                _reader(unit, self.settings, self.with_ids, self.ledger),
                BlockMetadata(
                    num_rows=unit.rows,
                    size_bytes=unit.rows * self.plan.dim * np.dtype(self.settings.dtype).itemsize,
                    exec_stats=None,
                    input_files=(unit.file.url,),
                ),
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self.units
        ]


def _reader(unit: Shard, settings: ReadSettings, with_ids: bool, ledger):
    def read() -> Iterator[pa.Table]:
        for batch in iter_batches(unit, settings, with_ids=with_ids):
            report_skips(ledger, batch)
            if not len(batch.x):  # all skipped: an empty table's id type could clash
                continue
            columns = {"embedding": ArrowTensorArray.from_numpy(batch.x)}
            if with_ids:
                columns = {"id": batch.ids, **columns, **batch.extra}
            yield pa.table(columns)

    return read


def embedding_dataset(
    plan: Plan, settings: ReadSettings, with_ids: bool = True, **source_options
) -> ray.data.Dataset:
    source = EmbeddingDatasource(plan, settings, with_ids, **source_options)
    return ray.data.read_datasource(source, override_num_blocks=len(source.units))
