"""Read the rows of a plan, validated at the edge (DESIGN invariant 6).

Every bad value is an error naming the file, the row and the column, or, with
``on_bad_rows="skip"``, a dropped row counted by reason. Files are read in pieces: a
parquet row group, or a .npy block, cut into slices of at most SLICE_ROWS rows so that
one read holds a bounded number of rows. ``_pieces`` alone decides the cut, from the
plan's block map, so every pass that reads a piece (fit, label) counts its skipped rows
under the same key, whichever columns it reads and however the files were sharded.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from queue import Full, Queue
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.fingerprint import file_version
from pseudolabel.pipelines.io.plan import (
    NPY_BLOCK_ROWS,
    FileInfo,
    ReadSettings,
    Shard,
    arrow_storage,
    open_parquet,
    read_npy_header,
)
from pseudolabel.pipelines.io.storage import (
    Location,
    first_line,
    is_transport_error,
    resolve,
    storage_errors,
)

BlockKey = tuple[str, int]  # (file url, first row of the piece in its file)
ZERO_ROW = "all-zero embedding (spherical)"
# Rows per piece at most: a row group of 1Mi rows x 1024 floats (4 GiB) is read 64Ki
# rows (256 MiB) at a time. Equal to NPY_BLOCK_ROWS, so a .npy block is one piece.
SLICE_ROWS = NPY_BLOCK_ROWS
# pyarrow decodes a list column with ~5x a batch in buffers: it decodes quarter slices,
# joined into a slice. On a 1Mi x 256 float32 row group (1 GiB), peak RSS 3.5 GiB
# read whole, 0.56 GiB in slices (python -m bench.row_groups).
READ_BATCH_ROWS = SLICE_ROWS // 4
CHANGED = "file changed after planning"


def _overflow(dtype: np.dtype) -> str:
    """The skip reason of a row with a value beyond the storage dtype's range."""
    return f"embedding value exceeds {dtype.name} range"


# Said after a refused row's reason.
HINTS = {
    ZERO_ROW: "cannot be unit-normalised for --spherical",
    _overflow(np.dtype(np.float16)): "(largest 65504; --dtype float32 keeps such rows)",
}


class FileChanged(Exception):
    """The file is not what planning saw (size, version or layout); the message says how.
    Not an OSError or ValueError: it must not pass for corrupt data."""


@dataclass
class Batch:
    """Validated rows of one piece. ``rows`` are global row numbers; ``block`` is the
    piece's key in the skip ledger."""

    x: np.ndarray  # (n, d)
    rows: np.ndarray  # (n,) int64
    ids: pa.Array | None
    extra: dict[str, pa.Array]
    skipped: Counter
    block: BlockKey = ("", 0)


def iter_batches(shard: Shard, settings: ReadSettings, with_ids: bool = True) -> Iterator[Batch]:
    """Validated batches of a shard, one per piece (see ``_pieces``).

    A piece that cannot be read (corrupt or truncated data), or a file that vanished or
    changed since planning, is an error naming the file; with ``on_bad_rows="skip"`` its
    rows are counted instead, piece by piece, so every pass over the same files skips
    the same rows under the same keys however the files were cut into shards.
    """
    loc = resolve(shard.file.url, settings.storage_options)
    pieces = _npy_pieces if shard.file.fmt == "npy" else _parquet_pieces
    done = shard.start  # rows of the file accounted for so far
    try:
        for start, rows, read in pieces(loc, shard, settings, with_ids):
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
    except FileChanged as e:
        if settings.on_bad_rows != "skip":
            raise InputError(
                f"{shard.file.url}: file changed since planning ({e}); rerun to plan it again"
            ) from None
        yield from _unreadable_rest(shard, settings, done, CHANGED)
    except (pa.ArrowException, OSError, ValueError) as e:  # the file itself: footer, header
        yield from _unreadable_rest(shard, settings, done, _problem(shard, e))


# Batches queued ahead of the one being used (``prefetched``), and its thread's name.
PREFETCH_BATCHES = 1
READER_NAME = "pseudolabel-read-ahead"


def prefetched(batches: Iterator[Batch], depth: int = PREFETCH_BATCHES) -> Iterator[Batch]:
    """``batches``, read by a thread ahead of the caller: pyarrow's decode of the next
    batch (single-threaded within a row group, the GIL released) runs while the caller
    copies and checks this one. Same batches, same order, same errors (raised where they
    were met). At most depth + 2 batches are alive: ``depth`` queued, one the thread
    offers, one the caller holds. The thread runs in the caller's context (its context
    variables) and stops when the caller does, once its read under way returns: an
    error in the caller's loop surfaces after that read."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")  # 0 would not bound it
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
            offer(done)
        except BaseException as e:  # handed over: raised in the caller's thread
            offer(e)

    context = contextvars.copy_context()
    reader = threading.Thread(target=context.run, args=(produce,), name=READER_NAME, daemon=True)
    reader.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


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
    """``_unreadable`` for every piece of the shard from file row ``done`` on."""
    for start, rows in _pieces(shard.file, done, shard.stop):
        yield _unreadable(shard.file, settings, start, rows, problem)


def _pieces(file: FileInfo, start: int, stop: int) -> list[tuple[int, int]]:
    """(first row, rows) of the pieces of ``file`` that begin in rows [start, stop): each
    planned block cut into SLICE_ROWS-row slices from its first row. The one definition
    of the skip ledger's keys: every read and every count goes through it."""
    edges = np.cumsum((0, *file.blocks))
    return [
        (int(s), int(min(SLICE_ROWS, hi - s)))
        for lo, hi in itertools.pairwise(edges)
        for s in range(lo, hi, SLICE_ROWS)
        if start <= s < stop
    ]


def _unchanged(f: Any, loc: Location, file: FileInfo) -> None:
    """Raise FileChanged unless the open file ``f`` has the size and version (ETag,
    mtime) that the listing gave at planning; what was not recorded is not compared."""
    info = getattr(f, "details", None) or loc.fs.info(loc.path)  # fsspec's, or a stat
    size, version = info.get("size"), file_version(info)
    if file.size >= 0 and size is not None and int(size) != file.size:
        raise FileChanged(f"{file.size} bytes when planned, {size} now")
    if file.version and version and version != file.version:
        raise FileChanged(f"version {file.version} when planned, {version} now")


def _parquet_pieces(loc: Location, shard: Shard, settings: ReadSettings, with_ids: bool):
    """(start, rows, read) per piece of the shard; opening the file may raise."""
    columns = [settings.embedding_column, *settings.extra_columns]
    if with_ids and settings.id_column:
        columns.insert(0, settings.id_column)
    with loc.open() as f:
        _unchanged(f, loc, shard.file)
        pf = open_parquet(f)
        meta = pf.metadata
        found = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        if found != shard.file.blocks:
            raise FileChanged(
                f"{shard.file.rows} rows in {len(shard.file.blocks)} row groups when planned, "
                f"{meta.num_rows} in {len(found)} now"
            )
        edges = np.cumsum((0, *shard.file.blocks))
        for g, (lo, hi) in enumerate(itertools.pairwise(edges)):
            if not shard.start <= lo < shard.stop:
                continue
            group = _RowGroupSlices(pf, g, columns)
            for start, rows in _pieces(shard.file, int(lo), int(hi)):

                def read(start=start, rows=rows, group=group) -> Batch:
                    table = group.next(rows)
                    return table_to_batch(table, shard.file, start, settings, with_ids)

                yield start, rows, read


class _RowGroupSlices:
    """The pieces of one row group, read in order, each as it is asked for. A read that
    fails fails every later piece of the group too: its rows are counted, not lost."""

    def __init__(self, pf: pq.ParquetFile, group: int, columns: list[str]) -> None:
        batches = pf.iter_batches(READ_BATCH_ROWS, row_groups=[group], columns=columns)
        self._tables = _slices(batches)
        self._failure: BaseException | None = None

    def next(self, rows: int) -> pa.Table:
        if self._failure is not None:
            raise self._failure
        try:
            table = next(self._tables, None)
            if table is None or table.num_rows != rows:
                got = 0 if table is None else table.num_rows
                raise EOFError(f"row group ended early: {got} rows where {rows} were due")
        except Exception as e:
            self._failure = e
            raise
        return table


def _slices(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.Table]:
    """Tables of exactly SLICE_ROWS rows (the last: what is left) from record batches of
    any size, so that piece edges never depend on how pyarrow cuts its batches."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        while count >= SLICE_ROWS:
            table = pa.Table.from_batches(held)
            yield table.slice(0, SLICE_ROWS)
            rest = table.slice(SLICE_ROWS)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


def _npy_pieces(loc: Location, shard: Shard, settings: ReadSettings, with_ids: bool):
    """(start, rows, read) per piece (= .npy block) of the shard; opening may raise."""
    dtype = np.dtype(shard.file.npy_dtype)
    row_bytes = dtype.itemsize * settings.dim
    with loc.open() as f:
        _unchanged(f, loc, shard.file)
        shape, _, found, header = read_npy_header(f)
        planned = ((shard.file.rows, settings.dim), dtype, shard.file.npy_header)
        if (shape, found, header) != planned:
            raise FileChanged(
                f"shape ({shard.file.rows}, {settings.dim}) of {dtype} when planned, "
                f"{shape} of {found} now"
            )
        for start, n in _pieces(shard.file, shard.start, shard.stop):

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
        ids = _decoded(table.column(settings.id_column))
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
    if ids is not None:
        ids = _as_planned(ids)  # after the filter: only valid UTF-8 is left
    values = arr.flatten().to_numpy(zero_copy_only=False)
    x = values.reshape(-1, settings.dim)
    extra = {c: table.column(c).combine_chunks() for c in settings.extra_columns}
    batch = _validated(x, ids, extra, file, row0, settings, kept=np.flatnonzero(~broken))
    batch.skipped.update({k: int(v.sum()) for k, v in bad.items() if v.any()})
    return batch


def _decoded(ids: pa.ChunkedArray) -> pa.Array:
    """The ids of a piece as one array, dictionary encoding undone."""
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    return ids.combine_chunks()


def _as_planned(ids: pa.Array) -> pa.Array:
    """Ids as the one type of their family (``plan.id_family``), whatever each file
    stores: int64 for integers (uint64 stays), string for large strings."""
    if pa.types.is_large_string(ids.type):
        return ids.cast(pa.string())
    if pa.types.is_integer(ids.type) and ids.type not in (pa.int64(), pa.uint64()):
        return ids.cast(pa.int64())
    return ids


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
    """Cast to the storage dtype, and drop (or refuse) the rows that are non-finite,
    that the cast made non-finite (beyond the dtype's range), or (unit_norm) zero."""
    rows = (np.arange(len(x)) if kept is None else kept) + row0 + file.offset
    # A row sum is non-finite iff the row holds a NaN or an inf (float64: no overflow).
    finite = np.isfinite(x.sum(axis=1, dtype=np.float64))
    bad = {"NaN or inf in embedding": ~finite}
    with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes inf
        stored = np.ascontiguousarray(x, dtype=settings.dtype)
    if stored.dtype.itemsize < x.dtype.itemsize:  # narrowed: finite rows may not be now
        bad[_overflow(stored.dtype)] = finite & ~np.isfinite(stored.sum(1, dtype=np.float64))
    if settings.unit_norm:  # a zero row (as stored) has no direction to normalise to
        bad[ZERO_ROW] = ~np.any(stored != 0, axis=1)
    broken = np.logical_or.reduce(list(bad.values()))
    skipped: Counter = Counter()
    if broken.any():
        _raise_or_count(bad, file, 0, settings, rows=rows - file.offset)
        skipped.update({k: int(v.sum()) for k, v in bad.items() if v.any()})
        fine = ~broken
        stored, rows = stored[fine], rows[fine]
        keep = pa.array(fine)
        ids = ids.filter(keep) if ids is not None else None
        extra = {c: a.filter(keep) for c, a in extra.items()}
    if (ids is None and settings.id_column is None) or file.fmt == "npy":
        ids = pa.array(rows, pa.int64())
    return Batch(stored, rows.astype(np.int64), ids, extra, skipped)


def _raise_or_count(bad: dict[str, np.ndarray], file: FileInfo, row0: int, settings, rows=None):
    if settings.on_bad_rows == "skip":
        return
    for reason, mask in bad.items():
        if mask.any():
            first = int(np.flatnonzero(mask)[0])
            row = int(rows[first]) if rows is not None else row0 + first
            what = HINTS.get(reason, "")
            raise InputError(
                f"{file.url}: row {row}: {reason}{' ' + what if what else ''} (column "
                f"{settings.embedding_column!r}"
                f"{', id column ' + repr(settings.id_column) if 'id' in reason else ''}); "
                "use --on-bad-rows skip to drop such rows"
            )
