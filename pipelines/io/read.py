"""Read the rows of a plan, validated at the edge (DESIGN invariant 6).

Every bad value is an error naming the file, the row and the column, or, with
``on_bad_rows="skip"``, a dropped row counted by reason. Counts are kept per block (a
parquet row group, or a .npy block), the unit every pass cuts files at, so the passes
that read a block (fit, label) count its skipped rows under the same key.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.plan import (
    NPY_BLOCK_ROWS,
    FileInfo,
    ReadSettings,
    Shard,
    arrow_storage,
)
from pseudolabel.pipelines.io.storage import (
    Location,
    first_line,
    is_transport_error,
    resolve,
    storage_errors,
)

BlockKey = tuple[str, int]  # (file url, first row of the block in its file)
ZERO_ROW = "all-zero embedding (spherical)"


@dataclass
class Batch:
    """Validated rows of one block. ``rows`` are global row numbers; ``block`` is the
    block's key in the skip ledger."""

    x: np.ndarray  # (n, d)
    rows: np.ndarray  # (n,) int64
    ids: pa.Array | None
    extra: dict[str, pa.Array]
    skipped: Counter
    block: BlockKey = ("", 0)


def iter_batches(shard: Shard, settings: ReadSettings, with_ids: bool = True) -> Iterator[Batch]:
    """Validated batches of a shard, one per row group (or .npy block).

    A block that cannot be read (corrupt or truncated data), or a file that vanished
    since planning, is an error naming the file; with ``on_bad_rows="skip"`` its rows
    are counted instead, block by block, so every pass over the same files skips the
    same rows under the same keys however the files were cut into shards.
    """
    loc = resolve(shard.file.url, settings.storage_options)
    blocks = _npy_blocks if shard.file.fmt == "npy" else _parquet_blocks
    done = shard.start  # rows of the file accounted for so far
    try:
        for start, rows, read in blocks(loc, shard, settings, with_ids):
            try:
                batch = read()
            except (pa.ArrowException, OSError, ValueError, EOFError) as e:
                if isinstance(e, FileNotFoundError):
                    raise
                batch = _unreadable(shard.file, settings, start, rows, _problem(shard, e))
            batch.block = (shard.file.url, start)
            done = start + rows
            yield batch
    except FileNotFoundError:
        problem = "file disappeared after planning"
        yield from _unreadable_rest(shard, settings, done, problem)
    except (pa.ArrowException, OSError, ValueError) as e:  # the file itself: footer, header
        yield from _unreadable_rest(shard, settings, done, _problem(shard, e))


def _problem(shard: Shard, e: BaseException) -> str:
    if is_transport_error(e):
        with storage_errors(shard.file.url):
            raise e
    return f"corrupt or truncated file ({first_line(e)})"


def _unreadable(file: FileInfo, settings: ReadSettings, start: int, rows: int, problem: str):
    """An error naming the file, or (skip) an empty batch that counts ``rows``."""
    if settings.on_bad_rows != "skip":
        raise InputError(f"{file.url}: {problem}; use --on-bad-rows skip to skip its rows")
    return Batch(
        np.empty((0, settings.dim), settings.dtype),
        np.empty(0, np.int64),
        pa.array([], pa.int64()),
        {},
        Counter({problem.split(" (")[0]: rows}),
        (file.url, start),
    )


def _unreadable_rest(shard: Shard, settings: ReadSettings, done: int, problem: str):
    """``_unreadable`` for every block of the shard from file row ``done`` on."""
    edges = np.cumsum((0, *shard.file.blocks))
    for start, stop in itertools.pairwise(edges):
        if done <= start < shard.stop:
            yield _unreadable(shard.file, settings, int(start), int(stop - start), problem)


def _parquet_blocks(loc: Location, shard: Shard, settings: ReadSettings, with_ids: bool):
    """(start, rows, read) per row group in the shard; opening the file may raise."""
    columns = [settings.embedding_column, *settings.extra_columns]
    if with_ids and settings.id_column:
        columns.insert(0, settings.id_column)
    edges = np.cumsum((0, *shard.file.blocks))
    with loc.open() as f:
        pf = pq.ParquetFile(f)
        for g in range(len(shard.file.blocks)):
            if shard.start <= edges[g] < shard.stop:

                def read(g=g) -> Batch:
                    table = pf.read_row_group(g, columns=columns)
                    return table_to_batch(table, shard.file, int(edges[g]), settings, with_ids)

                yield int(edges[g]), int(shard.file.blocks[g]), read


def _npy_blocks(loc: Location, shard: Shard, settings: ReadSettings, with_ids: bool):
    dtype = np.dtype(shard.file.npy_dtype)
    row_bytes = dtype.itemsize * settings.dim
    with loc.open() as f:
        for start in range(shard.start, shard.stop, NPY_BLOCK_ROWS):
            n = min(NPY_BLOCK_ROWS, shard.stop - start)

            def read(start=start, n=n) -> Batch:
                f.seek(shard.file.npy_header + start * row_bytes)
                buf = f.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise EOFError(f"truncated .npy: rows from {start} are missing")
                x = np.frombuffer(buf, dtype=dtype).reshape(n, settings.dim)
                return _validated(x, None, {}, shard.file, start, settings)

            yield start, n, read


def table_to_batch(
    table: pa.Table, file: FileInfo, row0: int, settings: ReadSettings, with_ids: bool = True
) -> Batch:
    """Validate one block read from ``file`` whose first row is ``row0`` in that file."""
    column = settings.embedding_column
    arr = arrow_storage(table.column(column).combine_chunks())
    bad: dict[str, np.ndarray] = {"null embedding": arr.is_null().to_numpy(zero_copy_only=False)}
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).fill_null(settings.dim).to_numpy()
        bad[f"embedding length differs from dim {settings.dim}"] = lengths != settings.dim
    ids = None
    if with_ids and settings.id_column:
        ids = table.column(settings.id_column).combine_chunks()
        bad["null id"] = ids.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
            bad["id is not valid UTF-8"] = _invalid_utf8(ids)
    broken = np.logical_or.reduce(list(bad.values()))
    if broken.any():
        _raise_or_count(bad, file, row0, settings)
        keep = pa.array(~broken)
        arr = arr.filter(keep)
        ids = ids.filter(keep) if ids is not None else None
        table = table.filter(keep)
    if ids is not None and pa.types.is_large_string(ids.type):
        ids = ids.cast(pa.string())  # after the filter: only valid UTF-8 is left
    values = arr.flatten().to_numpy(zero_copy_only=False)
    x = values.reshape(-1, settings.dim)
    extra = {c: table.column(c).combine_chunks() for c in settings.extra_columns}
    batch = _validated(x, ids, extra, file, row0, settings, kept=np.flatnonzero(~broken))
    batch.skipped.update({k: int(v.sum()) for k, v in bad.items() if v.any()})
    return batch


def _invalid_utf8(ids: pa.Array) -> np.ndarray:
    """Rows whose string id is not valid UTF-8 (parquet does not enforce it)."""
    try:
        ids.validate(full=True)
        return np.zeros(len(ids), bool)
    except pa.ArrowInvalid:
        raw = ids.cast(pa.binary()).to_pylist()
        return np.array([v is not None and not _utf8(v) for v in raw])


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _validated(
    x: np.ndarray, ids, extra, file: FileInfo, row0: int, settings: ReadSettings, kept=None
) -> Batch:
    """Drop (or refuse) non-finite rows and cast to the storage dtype."""
    rows = (np.arange(len(x)) if kept is None else kept) + row0 + file.offset
    # A row sum is non-finite iff the row holds a NaN or an inf (float64: no overflow).
    bad = {"NaN or inf in embedding": ~np.isfinite(x.sum(axis=1, dtype=np.float64))}
    if settings.unit_norm:  # a zero row has no direction to normalise to
        bad[ZERO_ROW] = ~np.any(x != 0, axis=1)
    broken = np.logical_or.reduce(list(bad.values()))
    skipped: Counter = Counter()
    if broken.any():
        _raise_or_count(bad, file, 0, settings, rows=rows - file.offset)
        skipped.update({k: int(v.sum()) for k, v in bad.items() if v.any()})
        fine = ~broken
        x, rows = x[fine], rows[fine]
        keep = pa.array(fine)
        ids = ids.filter(keep) if ids is not None else None
        extra = {c: a.filter(keep) for c, a in extra.items()}
    x = np.ascontiguousarray(x, dtype=settings.dtype)
    if (ids is None and settings.id_column is None) or file.fmt == "npy":
        ids = pa.array(rows, pa.int64())
    return Batch(x, rows.astype(np.int64), ids, extra, skipped)


def _raise_or_count(bad: dict[str, np.ndarray], file: FileInfo, row0: int, settings, rows=None):
    if settings.on_bad_rows == "skip":
        return
    for reason, mask in bad.items():
        if mask.any():
            first = int(np.flatnonzero(mask)[0])
            row = int(rows[first]) if rows is not None else row0 + first
            what = "cannot be unit-normalised for --spherical" if reason == ZERO_ROW else ""
            raise InputError(
                f"{file.url}: row {row}: {reason}{' ' + what if what else ''} (column "
                f"{settings.embedding_column!r}"
                f"{', id column ' + repr(settings.id_column) if 'id' in reason else ''}); "
                "use --on-bad-rows skip to drop such rows"
            )
