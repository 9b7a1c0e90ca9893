"""Skipped-row accounting with one owner: a ledger keyed by block.

Every pass that reads a block (a parquet row group or a .npy block) meets the same bad
rows in it. Each reader reports a block's skip counts under the block's key, and a
report replaces the last one for that key, so a block read by the fit workers, by the
label pass, by several mini-batch epochs or by a retried task counts once. The ledger
holds O(blocks with a skip) entries, never rows. ``SkipLedger`` runs as a Ray actor for
a run on Ray and as a plain object in one process.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pseudolabel.pipelines.io.read import Batch, BlockKey


class SkipLedger:
    def __init__(self) -> None:
        self._blocks: dict[BlockKey, dict[str, int]] = {}

    def record(self, block: BlockKey, counts: dict[str, int]) -> None:
        self._blocks[tuple(block)] = dict(counts)

    def by_reason(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self._blocks.values():
            total.update(counts)
        return dict(sorted(total.items()))


def start_ledger() -> Any:
    """A ``SkipLedger`` actor (``runtime.bookkeeping``): on the driver's node, which lives
    as long as the run; not restarted (a lost ledger fails the run's row check rather
    than undercounting)."""
    from pseudolabel.pipelines.runtime.bookkeeping import start_bookkeeper

    return start_bookkeeper(SkipLedger, "skip-ledger")


def report_skips(ledger: Any, batch: Batch) -> None:
    """Send a batch's skip counts to ``ledger`` (an actor handle or name, a SkipLedger or
    None), waiting for the answer: a reader's counts are recorded before its rows are
    used."""
    if ledger is None or not batch.skipped:
        return
    if isinstance(ledger, SkipLedger):
        ledger.record(batch.block, dict(batch.skipped))
        return
    from pseudolabel.pipelines.runtime import calls
    from pseudolabel.pipelines.runtime.bookkeeping import resolve

    calls.get(resolve(ledger).record.remote(batch.block, dict(batch.skipped)))
