"""The README's Python API example runs as it stands, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.processes import run_in_session

README = Path(__file__).parents[1] / "README.md"


def python_api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


@pytest.mark.slow
def test_python_api_example_runs(tmp_path):
    (tmp_path / "example.py").write_text(python_api_example())
    env = {**os.environ, "RAY_ACCEPT_CLUSTER_RESOURCE_WARNINGS": "1"}
    env.pop("RAY_ADDRESS", None)  # its own embedded Ray, as on a laptop
    out = run_in_session([sys.executable, "example.py"], timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same centroids: True" in out.stdout
    assert "'label'" in out.stdout and "'topk_labels'" in out.stdout
    sizes = out.stdout.strip().splitlines()[-1].split()
    assert int(sizes[1]) - int(sizes[0]) <= 0.05 * 20_000 / 64  # balanced within 5%
    assert sizes[2].endswith("run_output/labels")
    assert (tmp_path / "run_output" / "_SUCCESS").exists()
