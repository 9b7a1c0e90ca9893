"""Memory of reading one huge parquet row group: the project's reader against a whole
``read_row_group``, each in a fresh process (peak RSS is per process).

    python -m bench.row_groups [--rows 1048576] [--dim 256]

pyarrow writes row groups of 1Mi rows by default; at d = 1024 float32 that is 4 GiB in
one group. The reader cuts groups into slices of ``SLICE_ROWS`` rows, so its peak stays
near one slice whatever the group size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import OUT, save, size_parser


def write(path, rows: int, dim: int) -> None:
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
    pq.write_table(pa.table({"id": np.arange(rows), "embedding": emb}), path, row_group_size=rows)


def peak_rss_mib() -> int:
    """This process's peak resident memory (VmHWM): unlike getrusage's maxrss, it does
    not carry over the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) >> 10
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(way: str, folder: str) -> dict:
    """Read every row of the folder's one file ``way`` (reader | whole); peak RSS."""
    from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
    from pseudolabel.pipelines.io.read import iter_batches

    plan = make_plan(folder, ReadSettings())
    before = peak_rss_mib()
    t0 = time.perf_counter()
    rows, biggest = 0, 0
    if way == "reader":
        settings = ReadSettings(dim=plan.dim)
        for shard in plan.split(1)[0]:
            for batch in iter_batches(shard, settings):
                rows += len(batch.x)
                biggest = max(biggest, len(batch.x))
    else:
        table = pq.ParquetFile(plan.files[0].url).read_row_group(0)
        rows = biggest = table.num_rows
    return {
        "rows": rows,
        "largest_batch": biggest,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": before,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    a = size_parser(rows=1 << 20, dim=256, k=None).parse_args()
    folder = OUT / f"one-group-{a.rows}x{a.dim}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "part-00000.parquet").exists():
        write(folder / "part-00000.parquet", a.rows, a.dim)
    r: dict = {"rows": a.rows, "dim": a.dim, "group_mib": a.rows * a.dim * 4 >> 20}
    for way in ("reader", "whole"):
        done = subprocess.run(
            [sys.executable, "-m", "bench.row_groups", "--measure", way, str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        r[way] = json.loads(done.stdout.strip().splitlines()[-1])
    r["peak_ratio_reader_over_whole"] = r["reader"]["peak_rss_mib"] / r["whole"]["peak_rss_mib"]
    print(json.dumps(r, indent=2))
    print(f"wrote {save('row_groups', r)}")


if __name__ == "__main__":
    main()
