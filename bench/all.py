"""Run every benchmark in turn, each in its own process (each starts its own Ray).

    python -m bench.all        (or: make bench)

Results land in bench/out/*.json; the README quotes them with the command that made them.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "bench.lloyd",
    "bench.lloyd_step",
    "bench.minibatch",
    "bench.label",
    "bench.job",
    "bench.job --data patches --k 256 --iterations 20",
    "bench.balanced",
    "bench.storage",
    "bench.row_groups",
    "bench.scaling",
    "bench.selftrain",
    "bench.curate",
    "bench.scale search",
    "bench.scale sample",
    "bench.scale driver",
    "bench.scale reduce",
    "bench.scale reduce --nodes 4",
]  # bench.gpu needs a CUDA device: run it by hand where there is one


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"== python -m {name}", flush=True)
        if subprocess.run([sys.executable, "-m", *name.split()]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
