"""Starting, waiting for and stopping a pool of worker actors: what every pool shares."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ResourceError
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
    startup_timeout: float = 600.0  # seconds to wait for resources and loading
    threads: int | None = None  # faiss threads; None: Ray's OMP_NUM_THREADS

    @classmethod
    def of(cls, config: RunConfig, sizing: Sizing) -> WorkerSpec:
        return cls(
            metric=config.metric,
            device=sizing.device,
            num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker,
            max_restarts=config.max_restarts,
            batch_rows=config.batch_rows,
            startup_timeout=config.startup_timeout,
            threads=sizing.worker_threads,
        )


def start_actor(actor_class: type, spec: WorkerSpec, *args: Any) -> Any:
    """One actor of ``actor_class``, spread over nodes, rebuilt by Ray when lost."""
    options = ray.remote(actor_class).options(
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        max_restarts=spec.max_restarts,
        max_task_retries=spec.max_restarts,
        scheduling_strategy="SPREAD",
    )
    return options.remote(*args)


def wait_ready(actors: list, spec: WorkerSpec) -> list[dict]:
    """The actors' ``info()``, or a clear error instead of waiting forever for resources
    (the actors are stopped then)."""
    refs = [a.info.remote() for a in actors]
    try:
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=spec.startup_timeout)
        if pending:
            have = ray.available_resources()
            raise ResourceError(
                f"{len(pending)} of {len(refs)} workers did not start within "
                f"{spec.startup_timeout:g} s; each needs {spec.num_cpus:g} CPU "
                f"and {spec.num_gpus:g} GPU, the cluster has "
                f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU free "
                "(lower --workers, or let the autoscaler add nodes)"
            )
        return ray.get(refs)
    except BaseException:
        stop_actors(actors, spec)
        raise


def stop_actors(actors: list, spec: WorkerSpec) -> None:
    """Kill the actors and wait (briefly) until Ray has their CPUs back, so the pass that
    follows does not start on a cluster that looks full."""
    if not actors:
        return
    freed = min(  # actors that never started hold nothing: cap at the cluster's CPUs
        ray.cluster_resources().get("CPU", 0),
        ray.available_resources().get("CPU", 0) + spec.num_cpus * len(actors),
    )
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < freed and time.monotonic() < deadline:
        time.sleep(0.05)
