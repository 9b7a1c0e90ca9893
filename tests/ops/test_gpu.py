"""The GPU kernels. Their math runs here on a CPU torch device against the CPU faiss
path; the CUDA placement itself needs a GPU and is skipped, with the reason, without one."""

import numpy as np
import pytest

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.gpu import (
    DeviceRows,
    TorchSearch,
    backend,
    torch_cuda_ready,
    usable_device,
)
from pseudolabel.ops.stats import partial_stats

needs_cuda = pytest.mark.skipif(not torch_cuda_ready(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_search_matches_faiss(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    c = rng.standard_normal((40, 16)).astype(np.float32)
    if metric == "ip":
        x, c = normalize_rows(x), normalize_rows(c)
    dist, idx = TorchSearch(c, metric, "cpu").search(x, 3)
    ref_dist, ref_idx = CentroidIndex(c, metric).search(x, 3)
    assert (idx == ref_idx).mean() > 0.999
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_device_rows_stats_match_cpu_stats(metric):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((20_000, 8)) + 3).astype(np.float32)
    c = x[:12].copy()
    if metric == "ip":
        x, c = normalize_rows(x), normalize_rows(c)
    ours = DeviceRows(x, "cpu").partial_stats(c, metric)
    ref = partial_stats(x, CentroidIndex(c, metric))
    np.testing.assert_array_equal(ours.counts, ref.counts)
    np.testing.assert_allclose(ours.sums, ref.sums, rtol=1e-9)
    assert ours.inertia == pytest.approx(ref.inertia, rel=1e-5)


def test_no_gpu_is_a_clear_error():
    if torch_cuda_ready():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="a GPU was requested"):
        backend()


def test_a_worker_without_a_gpu_falls_back_to_the_cpu_and_says_so(caplog):
    """A worker placed for a GPU that its process cannot see computes on the CPU (the
    autoscaler test runs this on fake GPU nodes); one asked for the CPU stays there."""
    assert usable_device("cpu") == "cpu"
    if torch_cuda_ready():
        assert usable_device("cuda") == "cuda"
        return
    with caplog.at_level("WARNING", logger="pseudolabel"):
        assert usable_device("cuda") == "cpu"
    assert "sees no CUDA device" in caplog.text and "computing on the CPU" in caplog.text


@needs_cuda
def test_cuda_search_and_stats():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50_000, 32)).astype(np.float32)
    c = x[:64].copy()
    _, idx = CentroidIndex(c, "l2", "cuda").search(x)
    _, ref_idx = CentroidIndex(c, "l2").search(x)
    assert (idx == ref_idx).mean() > 0.999
    ours = DeviceRows(x, "cuda").partial_stats(c, "l2")
    ref = partial_stats(x, CentroidIndex(c, "l2"))
    np.testing.assert_allclose(ours.sums, ref.sums, rtol=1e-5)
