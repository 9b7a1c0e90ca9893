"""Plan a read of sharded embeddings: parquet or .npy, from any fsspec location.

Planning reads only metadata (parquet footers, .npy headers) and splits the files over
the workers, balanced by rows; ``pipelines.io.read`` then reads and validates the rows.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.fingerprint import file_version
from pseudolabel.pipelines.io.storage import Location, resolve, storage_errors

SUFFIXES = {".parquet": "parquet", ".npy": "npy"}
NPY_BLOCK_ROWS = 65536  # .npy files are read (and split) in blocks of this many rows
BAD_ROW_POLICIES = ("error", "skip")
DIM_SAMPLE_ROWS = 4096  # list<float> files: the dim is the commonest length among these
# Bytes a parquet reader fetches at a time. pyarrow's defaults (pre_buffer, or no
# buffer) fetch a whole column chunk: for one huge row group, as much as the row group.
READ_BUFFER_BYTES = 8 << 20


@dataclass(frozen=True)
class ReadSettings:
    """What every reader needs; shipped to Ray workers, so it holds no open handles."""

    id_column: str | None = "id"  # None: ids are global row numbers (always, for .npy)
    embedding_column: str = "embedding"
    extra_columns: tuple[str, ...] = ()  # carried to the label pass (a truth column)
    dim: int = 0
    dtype: str = "float32"  # in-memory storage: float32 or float16
    on_bad_rows: str = "error"
    unit_norm: bool = False  # rows will be unit-normalised (--spherical): zero rows are bad
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class FileInfo:
    url: str
    fmt: str
    rows: int
    offset: int  # global row number of the first row (file order, then row)
    blocks: tuple[int, ...]  # rows per parquet row group, or per .npy block
    npy_header: int = 0  # .npy: byte offset of the first row
    npy_dtype: str = ""
    # What the listing said at planning; a reader that finds otherwise refuses the file
    # (it was rewritten, and ``blocks`` may no longer describe it). -1 / "": unknown.
    size: int = -1
    version: str = ""  # ETag, generation or mtime (pipelines.io.fingerprint.file_version)


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one file, on row-group (or .npy block) boundaries."""

    file: FileInfo
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def boundaries(self) -> list[int]:
        """Block edges strictly inside (start, stop): where this shard may be cut."""
        edges = np.cumsum((0, *self.file.blocks))
        return [int(e) for e in edges if self.start < e < self.stop]


@dataclass
class Plan:
    input_url: str
    fmt: str
    files: list[FileInfo]
    dim: int
    value_type: str  # float16 | float32 | float64, as stored
    id_type: str  # the ids' type as read: int64 (also row numbers), uint64 or string
    empty_files: list[str] = field(default_factory=list)
    skipped_files: list[dict] = field(default_factory=list)  # url, reason, rows (if known)
    ignored_files: list[str] = field(default_factory=list)  # left out by name: _x, .x

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def split(self, workers: int) -> list[list[Shard]]:
        """Shards for each worker, balanced by rows (largest first onto the lightest).

        Files are cut at row-group boundaries until there are enough pieces and none
        that could be cut holds more than 1/(4W) of the rows; greedy placement then
        stays within one piece of the mean. Deterministic for a plan and worker count.
        """
        limit = self.total_rows / (4 * workers)
        units = _cut(
            [Shard(f, 0, f.rows) for f in self.files],
            lambda us: len(us) < workers or any(u.rows > limit and u.boundaries() for u in us),
        )
        loads = [0] * workers
        assigned: list[list[Shard]] = [[] for _ in range(workers)]
        for u in sorted(units, key=lambda u: (-u.rows, u.file.offset, u.start)):
            w = loads.index(min(loads))
            assigned[w].append(u)
            loads[w] += u.rows
        return [sorted(a, key=lambda u: (u.file.offset, u.start)) for a in assigned if a]

    def units(self, max_rows: int) -> list[Shard]:
        """Shards of at most ``max_rows`` rows where block boundaries allow, in file order."""
        units = _cut(
            [Shard(f, 0, f.rows) for f in self.files],
            lambda u: any(s.rows > max_rows and s.boundaries() for s in u),
        )
        return sorted(units, key=lambda u: (u.file.offset, u.start))


def _cut(units: list[Shard], more: Any) -> list[Shard]:
    """Halve the largest cuttable shard at its middle block edge while ``more(units)``."""
    while more(units):
        cuttable = [u for u in units if u.boundaries()]
        if not cuttable:
            break
        u = max(cuttable, key=lambda u: (u.rows, -u.file.offset))
        mid = min(u.boundaries(), key=lambda e: abs(e - (u.start + u.stop) / 2))
        units.remove(u)
        units += [replace(u, stop=mid), replace(u, start=mid)]
    return units


# ---------------------------------------------------------------------------- planning


def make_plan(input_url: str, settings: ReadSettings) -> Plan:
    """List the input and read its metadata; no embedding is read for fixed-size types.

    A file that cannot be used (unreadable, wrong types, a dimension or id type that
    disagrees with the files holding most rows) is an error, or with
    ``on_bad_rows="skip"`` a skipped file recorded in ``Plan.skipped_files``.
    """
    root = resolve(input_url, settings.storage_options)
    root.check_readable()
    with storage_errors(root.url):
        listed, hidden = root.listing(SUFFIXES)
    ignored = [root.join(rel).url for rel in hidden]
    if not listed:
        also = f" ({len(ignored)} left out: names starting with _ or .)" if ignored else ""
        raise InputError(f"no .parquet or .npy files under {root.url}{also}")
    files = [(root.join(rel) if rel else root, info) for rel, info in listed]
    kinds = {SUFFIXES[_suffix(loc.url)] for loc, _ in files}
    if len(kinds) > 1:
        raise InputError(f"{root.url} mixes .parquet and .npy files; use one format")
    fmt = kinds.pop()
    probe = _probe_parquet if fmt == "parquet" else _probe_npy

    def probe_or_skip(file: tuple[Location, dict[str, Any]]) -> dict:
        loc, listed_info = file
        try:
            with storage_errors(loc.url):
                info = probe(loc, settings)
        except InputError as e:
            if settings.on_bad_rows != "skip":
                raise
            return {"url": loc.url, "skip": str(e), "rows": 0}
        size = listed_info.get("size")
        info["size"] = -1 if size is None else int(size)
        info["version"] = file_version(listed_info)
        return info

    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(probe_or_skip, files))
    skipped = [{"url": i["url"], "reason": i["skip"], "rows": None} for i in infos if "skip" in i]
    plan = _assemble(root.url, fmt, [i for i in infos if "skip" not in i], skipped, settings)
    plan.ignored_files = ignored
    return plan


def _suffix(url: str) -> str:
    return next(s for s in SUFFIXES if url.endswith(s))


def _majority(infos: list[dict], key: str, skipped: list[dict], settings: ReadSettings):
    """The value of ``key`` held by most rows; files that differ are an error, or skipped."""
    votes: Counter = Counter()
    for info in infos:
        if info[key] is not None:
            votes[info[key]] += info["rows"]
    if len(votes) <= 1:
        return infos
    winner = votes.most_common(1)[0][0]
    odd = [i for i in infos if i[key] is not None and i[key] != winner]
    if settings.on_bad_rows != "skip":
        first = next(i for i in infos if i[key] == winner)
        name = {"dim": "dimensions", "id_type": "id types"}[key]
        raise InputError(
            f"mixed {name}: {first['url']} has {key.replace('_', ' ')} {first[key]} "
            f"but {odd[0]['url']} has {key.replace('_', ' ')} {odd[0][key]}"
        )
    for i in odd:
        skipped.append(
            {
                "url": i["url"],
                "rows": i["rows"],
                "reason": f"{key.replace('_', ' ')} {i[key]}, not {winner}",
            }
        )
    return [i for i in infos if i not in odd]


def _assemble(
    input_url: str, fmt: str, infos: list[dict], skipped: list[dict], settings: ReadSettings
) -> Plan:
    nonempty = [i for i in infos if i["rows"] > 0]
    if not nonempty:
        raise InputError(
            f"{input_url}: no rows to read: "
            f"{len(infos)} files are empty and {len(skipped)} unusable"
            if skipped
            else f"{input_url}: all {len(infos)} files are empty (zero rows)"
        )
    nonempty = _majority(nonempty, "dim", skipped, settings)
    nonempty = _majority(nonempty, "id_type", skipped, settings)
    first = nonempty[0]
    dim = next((i["dim"] for i in nonempty if i["dim"] is not None), None)
    if dim is None:
        dim = first["common_len"]()
    files, offset = [], 0
    for info in nonempty:
        files.append(
            FileInfo(
                info["url"],
                fmt,
                info["rows"],
                offset,
                tuple(info["blocks"]),
                info.get("npy_header", 0),
                info.get("npy_dtype", ""),
                info["size"],
                info["version"],
            )
        )
        offset += info["rows"]
    widest = max((np.dtype(i["value_type"]) for i in nonempty), key=lambda t: t.itemsize)
    return Plan(
        input_url,
        fmt,
        files,
        int(dim),
        widest.name,
        first["id_type"],
        [i["url"] for i in infos if i["rows"] == 0],
        skipped,
    )


def _probe_parquet(loc: Location, settings: ReadSettings) -> dict:
    try:
        with loc.open() as f:
            pf = pq.ParquetFile(f)
            meta, schema = pf.metadata, pf.schema_arrow
    except FileNotFoundError:
        raise InputError(f"{loc.url}: file disappeared while planning") from None
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{loc.url}: not a readable parquet file ({e})") from None
    names = schema.names
    needed = [settings.embedding_column, *settings.extra_columns]
    if settings.id_column:
        needed.insert(0, settings.id_column)
    for column in needed:
        if column not in names:
            raise InputError(f"{loc.url}: missing column {column!r} (columns: {names})")
    dim, value_type = embedding_layout(
        schema.field(settings.embedding_column).type, loc.url, settings.embedding_column
    )
    id_type = "int64"
    if settings.id_column:
        t = schema.field(settings.id_column).type
        id_type = id_family(t)
        if id_type is None:
            raise InputError(
                f"{loc.url}: id column {settings.id_column!r} has type {t}; "
                "expected integers or UTF-8 strings"
            )
    blocks = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return {
        "url": loc.url,
        "rows": meta.num_rows,
        "blocks": blocks,
        "dim": dim,
        "value_type": value_type,
        "id_type": id_type,
        "common_len": lambda: _common_length(loc, settings.embedding_column),
    }


def id_family(t: pa.DataType) -> str | None:
    """The type ids of Arrow type ``t`` are read as (``read.table_to_batch`` casts them):
    any integer but uint64 as int64, any UTF-8 string (large or dictionary-encoded) as
    string; None for a type that cannot be an id. Files plan together by family."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "uint64" if pa.types.is_uint64(t) else "int64"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return None


def _common_length(loc: Location, column: str) -> int:
    """The dim of a list<float> column: the commonest length among the first
    DIM_SAMPLE_ROWS non-null rows (ties: the longest), so that one short or long row
    is a bad row of its own and not the measure of every other row."""
    lengths: Counter = Counter()
    with loc.open() as f:
        for batch in open_parquet(f).iter_batches(batch_size=1024, columns=[column]):
            found = pc.list_value_length(arrow_storage(batch.column(0))).drop_null()
            lengths.update(found.to_numpy().tolist())
            if lengths.total() >= DIM_SAMPLE_ROWS:
                break
    if not lengths:
        raise InputError(f"{loc.url}: column {column!r} has no values")
    return max(lengths, key=lambda n: (lengths[n], n))


def _probe_npy(loc: Location, settings: ReadSettings) -> dict:
    try:
        with loc.open() as f:
            shape, fortran, dtype, header = read_npy_header(f)
    except FileNotFoundError:
        raise InputError(f"{loc.url}: file disappeared while planning") from None
    except (ValueError, OSError, SyntaxError) as e:
        raise InputError(f"{loc.url}: not a readable .npy file ({e})") from None
    if len(shape) != 2:
        raise InputError(f"{loc.url}: .npy array has shape {shape}; expected (rows, dim)")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise InputError(f"{loc.url}: .npy dtype is {dtype}; expected float16/32/64 embeddings")
    if fortran:
        raise InputError(f"{loc.url}: .npy array is Fortran-ordered; save it C-ordered")
    rows = shape[0]
    blocks = [min(NPY_BLOCK_ROWS, rows - s) for s in range(0, rows, NPY_BLOCK_ROWS)]
    return {
        "url": loc.url,
        "rows": rows,
        "blocks": blocks,
        "dim": shape[1],
        "value_type": dtype.name,
        "id_type": "int64",
        "npy_header": header,
        "npy_dtype": dtype.str,
    }


def open_parquet(f: Any) -> pq.ParquetFile:
    """A parquet reader over the open file ``f`` whose reads are bounded in size."""
    return pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)


def read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, byte offset of the data) of the .npy file ``f``."""
    version = np.lib.format.read_magic(f)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(f)
    return shape, fortran, dtype, f.tell()


def embedding_layout(t: pa.DataType, url: str, column: str) -> tuple[int | None, str]:
    """(dim or None for variable lists, value type) of an embedding column's Arrow type."""
    dim = None
    if isinstance(t, pa.BaseExtensionType):
        shape = getattr(t, "shape", None)  # fixed_shape_tensor, Ray's tensor types
        if shape is not None and all(s is not None for s in shape):
            dim = math.prod(shape)
        t = t.storage_type
    if pa.types.is_fixed_size_list(t):
        dim = dim or t.list_size
    elif not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise InputError(
            f"{url}: column {column!r} has type {t}; expected a list of floats "
            "(fixed_size_list<float>, list<float> or fixed_shape_tensor)"
        )
    value = t.value_type
    if not pa.types.is_floating(value):
        raise InputError(
            f"{url}: column {column!r} holds {value} values; embeddings must be floats"
        )
    return dim, value.to_pandas_dtype().__name__


def arrow_storage(arr: pa.Array) -> pa.Array:
    """The plain Arrow storage of an extension array (a tensor column), else the array."""
    return arr.storage if isinstance(arr.type, pa.BaseExtensionType) else arr
