"""CUDA backends: nearest-centroid search and shard statistics on a GPU.

Chosen per process: the faiss GPU build when it is installed and sees a device, else
torch on CUDA (a GEMM and a top-k, exact), else an error that says what is missing.
The torch kernels take any device, so their math is tested on CPU where no GPU is.
Rows live on the device in float32, or in float16 when float32 would not fit in
``memory_fraction`` of its free memory; scores and sums are float32 and float64.
"""

from __future__ import annotations

import logging

import numpy as np

from pseudolabel.ops.arrays import as_float32, iter_chunks
from pseudolabel.ops.scores import scores_from_dots, sq_distances_from_scores
from pseudolabel.ops.stats import PartialStats

log = logging.getLogger("pseudolabel")

GPU_CHUNK_ROWS = 1 << 16


def faiss_gpu_ready() -> bool:
    """The faiss GPU build is installed and sees a device. faiss is imported here, not at
    the top: the torch kernels run where faiss is not installed at all."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def torch_cuda_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def backend() -> str:
    """ "faiss-gpu" or "torch-cuda"; raises when --gpus-per-worker asks for a GPU that
    this process cannot use."""
    if faiss_gpu_ready():
        return "faiss-gpu"
    if torch_cuda_ready():
        return "torch-cuda"
    raise RuntimeError(
        "a GPU was requested (--gpus-per-worker > 0) but this process sees no CUDA device "
        "(neither the faiss GPU build nor torch.cuda): check the node's drivers and image"
    )


def usable_device(requested: str) -> str:
    """The device this process computes on: ``requested`` when it can, else "cpu".

    Decided inside each worker, not on the driver: the driver's machine may have no GPU
    while the workers' do, and a node can advertise a GPU its process cannot use (a
    fake autoscaler GPU, a driver missing from the image). Such a worker computes on its
    CPU, warns, and reports "cpu" in its info, which the manifest records per worker.
    torch on CUDA is required (resident rows live in torch tensors); the faiss GPU build
    only speeds up the search on top of it."""
    if requested == "cpu" or torch_cuda_ready():
        return requested
    log.warning(
        "worker: a GPU was requested (--gpus-per-worker > 0) but torch in this process "
        "sees no CUDA device; computing on the CPU"
    )
    return "cpu"


def make_search(centroids: np.ndarray, metric: str, device: str):
    """search(x (n, d) float32, m) -> D, I on the GPU, as faiss's CPU search returns."""
    name = backend()
    log.info("gpu: nearest-centroid search with %s", name)
    if name == "faiss-gpu":
        import faiss

        res = faiss.StandardGpuResources()
        index = (
            faiss.GpuIndexFlatL2(res, centroids.shape[1])
            if metric == "l2"
            else (faiss.GpuIndexFlatIP(res, centroids.shape[1]))
        )
        index.add(as_float32(centroids))
        return index.search
    return TorchSearch(centroids, metric, "cuda").search


class TorchSearch:
    """Exact top-m by one GEMM per chunk: D as faiss reports it (squared L2, or x.c)."""

    def __init__(self, centroids: np.ndarray, metric: str, device: str):
        import torch

        self.torch, self.metric = torch, metric
        self.c = torch.from_numpy(as_float32(centroids)).to(device)
        self.c_sq = (self.c * self.c).sum(1)

    def search(self, x: np.ndarray, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        xt = torch.from_numpy(as_float32(x)).to(self.c.device)
        S, I = torch.topk(scores_from_dots(xt @ self.c.T, self.c_sq, self.metric), m, dim=1)
        if self.metric == "l2":  # faiss reports squared L2 for l2, the dot product for ip
            S = sq_distances_from_scores(S, (xt * xt).sum(1, keepdim=True))
        return S.cpu().numpy(), I.cpu().numpy()


class DeviceRows:
    """A shard's rows resident on a device; ``partial_stats`` without leaving it."""

    def __init__(self, x: np.ndarray, device: str, memory_fraction: float = 0.6):
        import torch

        self.torch, self.device = torch, torch.device(device)
        dtype = torch.float32
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if x.shape[0] * x.shape[1] * 4 > memory_fraction * free:
                dtype = torch.float16  # half the bytes; scores are computed in float32
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, dtype)
        self.dtype = str(dtype).replace("torch.", "")

    def partial_stats(self, centroids: np.ndarray, metric: str) -> PartialStats:
        torch = self.torch
        c = torch.from_numpy(as_float32(centroids)).to(self.device)
        k, d = c.shape
        c_sq = (c * c).sum(1)
        sums = torch.zeros((k, d), dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        inertia = torch.zeros((), dtype=torch.float64, device=self.device)
        for sl in iter_chunks(len(self.x), GPU_CHUNK_ROWS):
            xb = self.x[sl].float()
            best, labels = scores_from_dots(xb @ c.T, c_sq, metric).max(dim=1)
            x_sq = (xb * xb).sum(1) if metric == "l2" else None
            d2 = sq_distances_from_scores(best, x_sq)
            counts += torch.bincount(labels, minlength=k)
            sums.index_add_(0, labels, xb.double())
            inertia += d2.double().sum()
        return PartialStats(sums.cpu().numpy(), counts.cpu().numpy(), float(inertia.item()))
