"""``ops/`` stays pure and acyclic: numpy, scipy, faiss and torch only (no Ray, no
storage), and no module imports another that imports it back, even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

OPS = Path(__file__).parents[2] / "ops"
ALLOWED = {"numpy", "scipy", "faiss", "torch", "threadpoolctl", "__future__"}


def imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pseudolabel.ops":  # from pseudolabel.ops import gpu
                names |= {f"pseudolabel.ops.{a.name}" for a in node.names}
            else:
                names.add(node.module)
    return names


def graph() -> dict[str, set[str]]:
    return {
        p.stem: {n.rsplit(".", 1)[1] for n in imports(p) if n.startswith("pseudolabel.ops.")}
        for p in OPS.glob("*.py")
    }


def test_ops_imports_only_array_libraries():
    for path in OPS.glob("*.py"):
        stdlib_or_allowed = {
            n
            for n in imports(path)
            if n.split(".")[0] not in ALLOWED and not n.startswith("pseudolabel.ops")
        }
        foreign = {n for n in stdlib_or_allowed if n.split(".")[0] in {"ray", "fsspec", "s3fs",
                   "pyarrow", "pseudolabel"}}  # fmt: skip
        assert not foreign, f"{path.name} imports {foreign}"


def test_ops_has_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert "gpu" in edges["assign"]  # the lazy import is seen, so the check can fail


def test_gpu_kernels_need_torch_alone():
    """A GPU machine's bare image has torch and numpy but neither faiss nor Ray: the CUDA
    kernels (and bench.gpu) import and run there."""
    import subprocess
    import sys

    code = """
import sys
for blocked in ("faiss", "ray", "pyarrow", "fsspec"):
    sys.modules[blocked] = None  # any import of these now fails
import numpy as np
from pseudolabel.ops.gpu import DeviceRows, TorchSearch
x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
stats = DeviceRows(x, "cpu").partial_stats(x[:4], "l2")
D, I = TorchSearch(x[:4], "l2", "cpu").search(x, 2)
assert stats.n == 500 and I.shape == (500, 2)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
