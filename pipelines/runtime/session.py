"""Joining or starting Ray, and sizing the actor pools from what the cluster offers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import ray

from pseudolabel.pipelines import progress
from pseudolabel.pipelines.config import RunConfig, TrainConfig
from pseudolabel.pipelines.io.plan import Plan
from pseudolabel.pipelines.runtime import calls

log = logging.getLogger("pseudolabel")

READ_CPUS = 1.0  # kept free for Ray Data's read tasks next to CPU actor pools


@contextmanager
def ray_session(config: RunConfig | TrainConfig) -> Iterator[dict[str, float]]:
    """Use the running Ray, else join ``--ray-address`` / RAY_ADDRESS (as under
    ``ray job submit``), else start an embedded local Ray for the length of the run."""
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    address = getattr(config, "ray_address", None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict = progress.ray_init_kwargs()
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=getattr(config, "ray_num_cpus", None), include_dashboard=False)
    ray.init(**kwargs)
    progress.quiet_ray()
    try:
        resources = ray.cluster_resources()
        log.info(
            "ray: %s, %g CPUs, %g GPUs",
            f"joined {address}" if address else "embedded local instance",
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
        yield resources
    finally:
        ray.shutdown()


# --backend auto runs in this process when the rows, as the workers hold them, take at
# most this share of the memory this process may use: the rest is for the label files
# being written, the report's sample and the fit's k x d arrays.
LOCAL_MEMORY_SHARE = 0.25
# ... and a balanced run whose Sinkhorn sample has fewer score cells (rows x k) than
# this. The balance's steps are numpy on each worker's rows: one worker in process runs
# them on one core, Ray's worker per CPU in parallel. Measured on 2 cores (2026-11-25):
# 191,715 x 3000 cells (SeLa's setting scaled) balanced in 298 s in process, 234 s on
# Ray; 64,218 x 1000 in 30-31 s in process (whole runs 50.5-54.1 s; 58.0 s on Ray the
# day before, balance 23.4 s).
LOCAL_BALANCE_CELLS = 2**28


def plan_backend(config: RunConfig, plan: Plan) -> tuple[str, str]:
    """``choose_backend`` for the rows of ``plan``, as the workers would hold them."""
    itemsize = np.dtype(config.held_dtype(plan.value_type)).itemsize
    return choose_backend(config, plan.total_rows, plan.dim, itemsize)


def choose_backend(config: RunConfig, rows: int, dim: int, itemsize: int) -> tuple[str, str]:
    """("ray" or "local", why) for a run over ``rows`` x ``dim`` rows held in
    ``itemsize`` bytes each (--backend; auto: ``local`` when nothing asks for Ray and
    the rows fit comfortably in memory)."""
    if config.backend != "auto":
        return config.backend, f"--backend {config.backend}"
    held, memory = rows * dim * itemsize, memory_limit()
    sample = min(rows, config.balance_sample * config.k) if config.balance_sample else rows
    cells = sample * config.k if config.balanced else 0
    reasons = [
        (ray.is_initialized(), "a Ray session is up in this process"),
        (bool(config.ray_address or os.environ.get("RAY_ADDRESS")), "a Ray cluster was given"),
        (config.gpus_per_worker > 0, "--gpus-per-worker places GPU actors"),
        (config.workers is not None, "--workers sizes a pool of Ray actors"),
        (config.ray_num_cpus is not None, "--ray-num-cpus sizes an embedded Ray"),
        (
            cells >= LOCAL_BALANCE_CELLS,
            f"the balance scores {cells:.3g} cells a step: Ray runs them on a worker per CPU",
        ),
        (
            held > LOCAL_MEMORY_SHARE * memory,
            f"the rows take {held / 2**30:.2f} GiB, over {LOCAL_MEMORY_SHARE:g} of the "
            f"{memory / 2**30:.1f} GiB of memory here",
        ),
    ]
    for applies, why in reasons:
        if applies:
            return "ray", why
    return "local", f"the rows take {held / 2**30:.2f} GiB and no cluster was given"


def memory_limit() -> int:
    """Bytes of memory this process may still use: the machine's available memory, or
    less under a cgroup (container) limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass  # not Linux: the free pages, an underestimate
    v1 = "/sys/fs/cgroup/memory/memory."
    for path, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (v1 + "limit_in_bytes", v1 + "usage_in_bytes"),
    ):
        try:
            with open(path) as f, open(used) as g:
                limit = f.read().strip()
                if limit != "max" and int(limit) < 1 << 60:  # cgroup v1 writes "no limit" so
                    available = min(available, int(limit) - int(g.read()))
        except (OSError, ValueError):
            continue
    return max(available, 0)


def local_cpus() -> int:
    """The CPUs this process may use: those it may run on, fewer under a cgroup's CPU
    quota (a container's CPU limit, whole CPUs, at least one: as Ray counts them)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),  # v2: "quota period", or "max period"
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields.append(f.read().strip())
            quota, period = fields[0], fields[1]
            if quota not in ("max", "-1"):
                cpus = min(cpus, max(1, int(quota) // int(period)))
            break
        except (OSError, ValueError, IndexError):
            continue
    return cpus


@contextmanager
def _thread_settings_kept() -> Iterator[None]:
    """Put back what an in-process worker's ``limit_threads`` sets: OMP_NUM_THREADS,
    faiss's threads, the BLAS and OpenMP pools (a notebook keeps its own)."""
    import faiss
    from threadpoolctl import threadpool_limits

    env, faiss_threads = os.environ.get("OMP_NUM_THREADS"), faiss.omp_get_max_threads()
    with threadpool_limits(limits=None):  # restores the pools' limits on exit
        try:
            yield
        finally:
            faiss.omp_set_num_threads(faiss_threads)
            if env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env


@contextmanager
def run_session(config: RunConfig, backend: str) -> Iterator[dict[str, float]]:
    """The run's resources: a Ray session's (``ray_session``), or this process's CPUs
    for the in-process backend, where no Ray starts (``runtime.calls``)."""
    if backend == "ray":
        with ray_session(config) as resources:
            yield resources
        return
    with calls.in_process(), _thread_settings_kept():
        yield {"CPU": float(local_cpus())}


@dataclass(frozen=True)
class Sizing:
    workers: int
    label_workers: int
    device: str
    worker_threads: int | None = None  # faiss threads per actor on CPUs (None: Ray's)
    label_threads: int | None = None


def size_pools(config: RunConfig, resources: dict[str, float], backend: str = "ray") -> Sizing:
    """Workers default to one per CPU (or GPU slot). Where Ray Data reads alongside the
    actors (the label pass, the mini-batch stream), one whole CPU stays free for its read
    tasks, which ask for one CPU each: actors holding the rest would starve them and the
    pass would never finish. A cluster that scales from zero shows no GPUs yet: pass
    --workers, which then sizes the GPU label pool too (the fit has brought those GPUs
    up by the time it starts). In this process (``backend`` "local") one worker holds
    the rows and computes with every core."""
    cpus = resources.get("CPU", 1)
    if backend == "local":
        threads = max(1, int(cpus))
        return Sizing(1, 1, "cpu", threads, threads)
    if config.gpus_per_worker > 0:
        slots = int(resources.get("GPU", 0) // config.gpus_per_worker)
        streamed = max(slots, config.workers or 0)
    else:
        slots = int(cpus // config.cpus_per_worker)
        streamed = int(max(cpus - READ_CPUS, 0) // config.cpus_per_worker)
    default_workers = streamed if config.algorithm == "minibatch" else slots
    workers = config.workers or max(1, default_workers)
    label_workers = config.label_workers or max(1, streamed)
    if config.gpus_per_worker > 0:
        return Sizing(workers, label_workers, "cuda")
    return Sizing(
        workers, label_workers, "cpu", _threads(cpus, workers), _threads(cpus, label_workers)
    )


def limit_threads(threads: int | None) -> None:
    """Inside an actor, before torch loads: give faiss's OpenMP pool, numpy's BLAS and
    torch ``threads`` threads (None keeps Ray's OMP_NUM_THREADS, the actor's CPUs).

    Set here rather than through a runtime_env's env_vars: an actor with a runtime_env
    cannot take one of Ray's prestarted workers (0.84-0.92 s to a ready actor against
    0.20-0.39 s without, measured on 2 cores)."""
    if not threads:
        return
    import faiss
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when it loads
    faiss.omp_set_num_threads(threads)
    threadpool_limits(threads)  # BLAS, and OpenMP runtimes already loaded


def _threads(cpus: float, actors: int) -> int:
    """faiss threads per CPU actor: the cores shared out, at least one.

    Ray caps OpenMP at an actor's logical CPUs; the CPU kept for reads is mostly idle
    while actors search (parquet of floats decodes at memory speed), so one labeler on
    2 cores searching with 2 threads labels 1M x 128 rows in 5.1 s instead of 6.5 s.
    """
    return max(1, round(cpus / actors))
