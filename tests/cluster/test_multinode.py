import json
import sys
from pathlib import Path

from tests.data import mixture, write_parquet_shards
from tests.processes import run_in_session


def test_workers_spread_over_nodes_and_agree_with_one_node(tmp_path):
    """Eight workers on four nodes, statistics reduce-scattered among them through small
    object stores (multinode.py), against the same loop in one process."""
    x, _ = mixture(6000, 8, 8, seed=2)
    write_parquet_shards(tmp_path / "in", x, shards=8, row_group_rows=375)
    script = Path(__file__).with_name("multinode.py")
    done = run_in_session(
        [sys.executable, str(script), str(tmp_path / "in")],
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["nodes"]) == 8 and len(set(result["nodes"])) == 4  # SPREAD
    # The centroids of the same loop on one machine: with the exact search, and with the
    # approximate one (each row's candidates follow from its own last label and the
    # driver's graph, so the split over nodes changes nothing but the sums' order).
    assert result["max_diff"]["flat"] < 1e-4 and result["max_diff"]["approx"] < 1e-4
    changed = result["approx_changed"]
    assert changed[0] is None and all(c is not None and c >= 0 for c in changed[1:])
    assert result["approx_over_flat"] < 1.01  # the approximate search's objective
