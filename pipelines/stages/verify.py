"""Verification before publish: counts per label from the staged files, duplicate ids
(skipped where ids are row numbers, unique by construction), and the row check
(written + skipped = input) that gates the commit."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.label_files import read_columns
from pseudolabel.pipelines.io.storage import Location
from pseudolabel.pipelines.runtime.label_partitions import duplicate_positions


@dataclass
class LabelCounts:
    rows: int
    sizes: np.ndarray  # (k,) rows per label
    contingency: dict[tuple[int, object], int]  # (label, truth) -> rows, with a truth column
    distance_sum: float = 0.0  # the objective of the final centroids over the labelled rows
    # (k,) the distance column summed per label; for "label" only, whose centroid the
    # distance is measured to
    distance_sums: np.ndarray | None = None

    def mean_distances(self) -> np.ndarray | None:
        """(k,) mean distance of each cluster's rows to its centroid; NaN when empty."""
        if self.distance_sums is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.distance_sums / self.sizes

    def truth_table(self) -> np.ndarray:
        """(k, C) counts of rows per (label, truth class), classes in sorted order."""
        classes = sorted({t for _, t in self.contingency}, key=str)
        column = {t: j for j, t in enumerate(classes)}
        table = np.zeros((len(self.sizes), len(classes)), np.int64)
        for (label, truth), count in self.contingency.items():
            table[label, column[truth]] += count
        return table


def count_labels(
    files: list[Location],
    k: int,
    columns: tuple[str, ...] = ("label",),
    truth_column: str | None = None,
) -> dict[str, LabelCounts]:
    """Counts per label (and per label x truth pair) of each label column, over the
    written label files.

    Reads only the small columns (4 bytes per row each), in driver threads: starting Ray
    workers for this cost more than the reading (5.7 s against 0.02 s, 100k rows).
    """
    totals = {c: LabelCounts(0, np.zeros(k, np.int64), Counter()) for c in columns}
    totals["label"].distance_sums = np.zeros(k, np.float64)
    with ThreadPoolExecutor(max_workers=16) as pool:
        parts = pool.map(lambda f: _count_file(f, k, columns, truth_column), files)
    for part in parts:
        for column, (rows, sizes, pairs, distance, sums) in part.items():
            total = totals[column]
            total.rows += rows
            total.sizes += sizes
            total.contingency.update(pairs)
            total.distance_sum += distance
            if column == "label":
                total.distance_sums += sums
    for total in totals.values():
        total.contingency = dict(total.contingency)
    return totals


def _count_file(loc: Location, k: int, columns: tuple[str, ...], truth_column: str | None):
    wanted = [*columns, "distance"] + ([truth_column] if truth_column else [])
    table = read_columns(loc, wanted)
    truths = table.column(truth_column).to_pylist() if truth_column else None
    distances = table.column("distance").to_numpy().astype(np.float64)
    distance = float(distances.sum())
    out = {}
    for column in columns:
        labels = table.column(column).to_numpy()
        pairs: Counter = Counter()
        if truths is not None:
            pairs.update(zip(labels.tolist(), truths, strict=True))
        sums = np.bincount(labels, weights=distances, minlength=k) if column == "label" else None
        out[column] = (len(labels), np.bincount(labels, minlength=k), pairs, distance, sums)
    return out


def drop_duplicate_ids(files: list[Location], on_bad_rows: str, rows: int) -> int:
    """Find ids that occur more than once in the staged label files (before publish), in
    Ray tasks partitioned by id (``runtime.label_partitions``): the driver sees only the
    duplicates. ``rows``: the files' total, to size the partitions.

    ``error``: an InputError with examples. ``skip``: the later occurrences (in file,
    then row order) are dropped by rewriting the affected files; returns their count.
    """
    drop, examples = duplicate_positions(files, rows)
    dropped = sum(len(r) for r in drop.values())
    if not dropped:
        return 0
    if on_bad_rows != "skip":
        raise InputError(
            f"duplicate ids: {dropped} rows repeat an id already seen (e.g. {examples}); "
            "use --on-bad-rows skip to keep the first occurrence of each"
        )
    for index, later in drop.items():
        f = files[index]
        with f.open() as fh:
            table = pq.read_table(fh)
        keep = np.ones(len(table), bool)
        keep[later] = False
        with f.open("wb") as fh:
            pq.write_table(table.filter(pa.array(keep)), fh)
    return dropped


def check_rows(written: int, input_rows: int, skipped: dict[str, int]) -> None:
    """Every input row is either written or skipped for a counted reason: else no commit."""
    expected = input_rows - sum(skipped.values())
    if written != expected:
        raise RuntimeError(
            f"the label pass wrote {written} rows, expected {expected} "
            f"({input_rows} input rows, {sum(skipped.values())} skipped): not committing"
        )
