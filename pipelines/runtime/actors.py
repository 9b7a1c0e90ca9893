"""Starting, waiting for and stopping a pool of worker actors: what every pool shares."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ResourceError
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.session import Sizing


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker actor is placed and what it computes with."""

    metric: str  # "l2", or "ip" for spherical k-means (rows unit-normalised at load)
    device: str = "cpu"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3
    batch_rows: int = 16384  # mini-batch rows per step
    seed: int = 0  # --seed: the order of a mini-batch epoch over resident rows
    startup_timeout: float = 600.0  # seconds to wait for resources and loading
    task_timeout: float = 0.0  # seconds for one step's answers; 0: from its size
    threads: int | None = None  # faiss threads; None: Ray's OMP_NUM_THREADS
    # --fit-sample: a resident worker keeps the rows whose sampling key
    # (ops.sampling.row_keys under sample_seed) is below this fraction: a uniform sample
    # that does not depend on the split. 1.0: every row.
    sample_fraction: float = 1.0
    sample_seed: int = 0
    # --label-from workers: a resident worker also holds each row's id and pass-through
    # columns, to write the rows' labels itself (``workers.labels``).
    label_columns: bool = False
    # False for a worker that only labels (a second read in process): it takes no k-means
    # step, so it never loads torch for the steps' sums (ops.stats).
    steps: bool = True

    @classmethod
    def of(cls, config: RunConfig, sizing: Sizing) -> WorkerSpec:
        return cls(
            metric=config.metric,
            device=sizing.device,
            num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker,
            max_restarts=config.max_restarts,
            batch_rows=config.batch_rows,
            seed=config.seed,
            startup_timeout=config.startup_timeout,
            task_timeout=config.task_timeout,
            threads=sizing.worker_threads,
        )


# A step's bound when none is set: a floor for scheduling and transfers, plus a rate
# far below any CPU's (a faiss search runs at ~1e10 row x centre x dim per second per
# core): a bound that a slow step never meets but a hung worker always does.
STEP_FLOOR_S = 300.0
STEP_RATE = 5e7  # row x centre x dim per second


def step_timeout(task_timeout: float, rows: int, k: int, dim: int) -> float:
    """Seconds to wait for one step over ``rows`` rows per worker against ``k``
    centres: ``task_timeout`` when set (--task-timeout), else from the step's size."""
    if task_timeout:
        return task_timeout
    return STEP_FLOOR_S + rows * k * dim / STEP_RATE


def gather(refs: list, timeout: float, what: str) -> list:
    """``ray.get(refs)``, or a ResourceError once ``timeout`` seconds pass with answers
    missing (``wait_all``)."""
    wait_all(refs, timeout, what)
    return calls.get(refs)


def wait_all(refs: list, timeout: float, what: str) -> None:
    """Return once every ref is ready (done or failed), or raise a ResourceError after
    ``timeout`` seconds: a worker on a node that stopped answering (a hung host, a
    network partition Ray has not noticed) ends the run instead of stalling it forever.
    The fit's checkpoints stay; a rerun resumes from the last finished iteration."""
    _, pending = calls.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)
    if pending:
        raise unanswered(len(pending), len(refs), what, timeout)


def unanswered(late: int, workers: int, what: str, timeout: float) -> ResourceError:
    """The error for ``late`` of ``workers`` workers that did not answer ``what`` in time."""
    return ResourceError(
        f"{late} of {workers} workers did not answer {what} within {timeout:g} s "
        "(--task-timeout): a node may have stopped responding; the checkpoint of the last "
        "finished iteration is kept, rerun to resume"
    )


def start_actor(actor_class: type, spec: WorkerSpec, *args: Any) -> Any:
    """One actor of ``actor_class``, spread over nodes, rebuilt by Ray when lost (or in
    this process, outside Ray: ``calls.start``)."""
    options = {
        "num_cpus": spec.num_cpus,
        "num_gpus": spec.num_gpus,
        "max_restarts": spec.max_restarts,
        "max_task_retries": spec.max_restarts,
        "scheduling_strategy": "SPREAD",
    }
    return calls.start(actor_class, options, *args)


def not_started(who: str, timeout: float, cpus: float, gpus: float, flag: str) -> ResourceError:
    """The error for actors (``who``) that did not start within ``timeout`` seconds: what
    each asked for, what the cluster has free, and the flags that help: fewer actors
    when resources are short, a longer wait when processes start slowly (a busy host, a
    large image). Free resources exclude those already held by the actors waited for."""
    have = ray.available_resources()
    return ResourceError(
        f"{who} did not start within {timeout:g} s; each needs {cpus:g} CPU and {gpus:g} "
        f"GPU, the cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU "
        f"free (lower {flag} or let the autoscaler add nodes; raise --startup-timeout if "
        "their processes start slowly)"
    )


def wait_ready(
    actors: list,
    spec: WorkerSpec,
    on_ready: Callable[[int], None] | None = None,
    method: str = "info",
) -> list:
    """The actors' ``info()`` (or ``method()``), or a clear error instead of waiting
    forever for resources (the actors are stopped then). ``on_ready(i)`` as actor i
    becomes ready."""
    refs = [getattr(a, method).remote() for a in actors]
    index = {ref: i for i, ref in enumerate(refs)}
    deadline = time.monotonic() + spec.startup_timeout
    try:
        pending = list(refs)
        while pending:
            left = max(deadline - time.monotonic(), 0.0)
            ready, pending = calls.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break
            if on_ready is not None:
                on_ready(index[ready[0]])
        if pending:
            raise not_started(
                f"{len(pending)} of {len(refs)} workers",
                spec.startup_timeout,
                spec.num_cpus,
                spec.num_gpus,
                "--workers",
            )
        return calls.get(refs)
    except BaseException:
        stop_actors(actors, spec)
        raise


def stop_actors(actors: list, spec: WorkerSpec) -> None:
    """Kill the actors and wait (briefly) until Ray has their CPUs back, so the pass that
    follows does not start on a cluster that looks full."""
    if not actors or not calls.on_ray():
        return  # in-process actors are dropped with the caller's references
    freed = min(  # actors that never started hold nothing: cap at the cluster's CPUs
        ray.cluster_resources().get("CPU", 0),
        ray.available_resources().get("CPU", 0) + spec.num_cpus * len(actors),
    )
    for actor in actors:
        calls.kill(actor)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < freed and time.monotonic() < deadline:
        time.sleep(0.05)
