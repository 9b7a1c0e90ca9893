"""The fit stage: start the workers, seed, run ``ops.kmeans.fit``, checkpoint each step."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from pseudolabel.ops.hierarchical import resample_refine
from pseudolabel.ops.kmeans import KMeansParams, KMeansState, fit, init_state
from pseudolabel.pipelines import progress
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.checkpoints import Checkpoints
from pseudolabel.pipelines.io.plan import Plan, ReadSettings
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.roster import warn_fallback
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.runtime.streaming import StreamingShards
from pseudolabel.pipelines.stages.nightly import load_init_centroids

log = logging.getLogger("pseudolabel")


@dataclass
class FitResult:
    state: KMeansState
    init: str
    resumed_from: int | None
    workers: int
    nodes: int
    devices: list[str] = field(default_factory=list)  # each worker's, as it found it
    rows_dtypes: list[str] = field(default_factory=list)  # what each resident worker holds
    seconds: dict[str, float] = field(default_factory=dict)
    sample_rows: int | None = None  # rows the fit held, when --fit-sample sampled them
    reduce: str | None = None  # how Lloyd's statistics were summed: gather or scatter
    search: str | None = None  # the search the fit ran: flat or approx
    data: ResidentShards | None = None  # the workers, when kept for balance and labels


def fit_fingerprint(config: RunConfig, plan: Plan, run: dict, backend: str = "ray") -> dict:
    """What must match for a checkpoint to be resumed: the fit's settings, and the same
    input and warm-start files (``run``: the run's fingerprint, ``io.fingerprint``).
    The worker count need not match, nor settings that act after the fit. A mini-batch
    epoch's batches are cut by the rows' keys in this process and streamed on Ray: a
    fit continues only where its epochs are cut the same way (``backend``)."""
    minibatch = {"batches": "stream" if config.fit_streams(backend) else "keys",
                 "rows": config.batch_rows}  # fmt: skip
    return {
        "input": plan.input_url,
        "input_files": run["input_files"],
        "rows": plan.total_rows,
        "dim": plan.dim,
        "k": config.k,
        "algorithm": config.algorithm,
        "seed": config.seed,
        "spherical": config.spherical,
        "init": config.init,
        "init_centroids": config.init_centroids,
        "init_centroids_file": run.get("init_centroids_file"),
        "search": config.search,
        "fit_sample": config.fit_sample_rows(plan.total_rows),
        "minibatch": None if config.algorithm == "lloyd" else minibatch,
    }


def start_workers(
    config: RunConfig,
    plan: Plan,
    settings: ReadSettings,
    spec: WorkerSpec,
    workers: int,
    ledger=None,
) -> ResidentShards | StreamingShards:
    """Resident workers that load the planned files (Lloyd, and mini-batch in this
    process), or stream workers over a Ray Data read of them (mini-batch on Ray)."""
    if config.fit_streams("ray" if calls.on_ray() else "local"):
        from pseudolabel.pipelines.io.datasource import embedding_dataset  # loads Ray Data

        # Small read tasks in a seeded random order: batches mix many files early on. Ids
        # are read too, so the fit skips the rows (null or non-UTF-8 ids) the label skips.
        dataset = embedding_dataset(
            plan,
            settings,
            shuffle_seed=config.seed,
            rows_per_task=4 * spec.batch_rows,
            ledger=ledger,
        )
        return StreamingShards(dataset, "embedding", plan.dim, plan.total_rows, spec, workers)
    return ResidentShards.from_plan(plan, settings, spec, workers, ledger, config.reduce)


def fit_on_workers(
    config: RunConfig,
    data: ResidentShards | StreamingShards,
    params: KMeansParams,
    state: KMeansState | None,
    checkpoints: Checkpoints | None = None,
    warm: tuple | None = None,
    loop_done: bool = False,
) -> tuple[KMeansState, str, dict[str, float]]:
    """Seed (or resume ``state``), iterate, refine: (state, init, seconds)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if state is None:
        centroids, note = warm or (None, None)
        try:
            state, init = init_state(data, params, init_centroids=centroids)
        except ValueError as e:  # fewer valid rows than k: the input's fault, not a bug
            raise InputError(
                f"--k {config.k} exceeds the valid input rows ({e}); rows skipped by "
                "--on-bad-rows skip do not count"
            ) from None
        if note:
            init = f"{init} ({note})"
        log.info("fit: %s seeding of k=%d in %.1f s", init, config.k, time.perf_counter() - t0)
    else:
        init = "checkpoint"
        log.info("fit: resuming from iteration %d", state.iteration)
    seconds["init"] = time.perf_counter() - t0

    def on_iteration(s: KMeansState, record) -> None:
        # Checkpoint first: a progress line on screen means the iteration is durable.
        if checkpoints is not None:
            t = time.perf_counter()
            checkpoints.save(s)
            seconds["checkpoint"] = seconds.get("checkpoint", 0.0) + time.perf_counter() - t
        bar.set(s.iteration, inertia=f"{record.inertia:.4e}")
        log.info("fit: %s", record.line(params.iterations))

    t0 = time.perf_counter()
    if not loop_done:  # else only the resampling refinement is left to do
        with progress.bar(params.iterations, "fit", "iter") as bar:
            bar.set(state.iteration)
            fit(data, params, state, on_iteration)
    seconds["iterations"] = time.perf_counter() - t0
    if config.resampling_steps and config.algorithm == "lloyd":
        t0 = time.perf_counter()
        per_cluster = config.resample_size or max(1, data.count() // (2 * config.k))
        state.centroids = resample_refine(
            data,
            state.centroids,
            params,
            config.resampling_steps,
            per_cluster,
            config.resample_strategy,
        )
        seconds["resampling"] = time.perf_counter() - t0
        state.extra["resampled"] = config.resampling_steps
        if checkpoints is not None:
            checkpoints.save(state)  # a rerun finds the refined centroids
        log.info(
            "fit: %d resampling rounds of %d points per cluster in %.1f s",
            config.resampling_steps,
            per_cluster,
            seconds["resampling"],
        )
    if state.converged:
        log.info("fit: converged (inertia change below --tol %g)", config.tol)
    return state, init, seconds


def run_fit(
    config: RunConfig,
    plan: Plan,
    settings: ReadSettings,
    spec: WorkerSpec,
    workers: int,
    checkpoints: Checkpoints,
    keep_workers: bool = False,
    ledger=None,
) -> FitResult:
    """Fit from the last checkpoint. With ``keep_workers`` (and workers that hold the
    rows: not mini-batch streamed on Ray) the workers stay up for the balance stage and
    the labels; the caller shuts them down."""
    params = config.kmeans_params()
    state = checkpoints.latest()
    resumed_from = state.iteration if state else None
    loop_done = state is not None and (state.converged or state.iteration >= params.iterations)
    refined = not config.resampling_steps or (
        state is not None and state.extra.get("resampled") == config.resampling_steps
    )
    if loop_done and refined:
        log.info("fit: complete in checkpoint at iteration %d; not refitting", state.iteration)
        return FitResult(state, "checkpoint", resumed_from, 0, 0)

    warm = load_init_centroids(config, plan.dim) if state is None else None
    sample = config.fit_sample_rows(plan.total_rows)
    if sample:
        spec = dataclasses.replace(
            spec, sample_fraction=sample / plan.total_rows, sample_seed=config.seed
        )
        log.info(
            "fit: on a uniform sample of about %d of the %d rows (--fit-sample %s); "
            "the label pass labels every row",
            sample,
            plan.total_rows,
            config.fit_sample,
        )
    t0 = time.perf_counter()
    data = start_workers(config, plan, settings, spec, workers, ledger)
    load = time.perf_counter() - t0
    nodes = len({i["node"] for i in data.infos})
    warn_fallback("fit", spec.device, data.infos)
    devices = "/".join(sorted({i["device"] for i in data.infos}))  # as the workers found
    if params.resolved_search == "approx" and all(i["device"] == "cuda" for i in data.infos):
        # A GPU worker's search stays exact: no neighbour graph for the driver to build.
        log.info("fit: GPU workers search exactly (--search %s: flat)", config.search)
        params = dataclasses.replace(params, search="flat")
    reduce = None
    if isinstance(data, ResidentShards):
        where = f"{len(data.actors)} {devices} workers on {nodes} node(s)"
        if not calls.on_ray():
            where = "a worker in this process"
        log.info("fit: %s loaded %d rows in %.1f s", where, data.count(), load)
        reduce = data.reduce_mode(config.k)
        if reduce == "scatter":
            log.info(
                "fit: %.2f GiB of sums a step are reduce-scattered over the %d workers "
                "(--reduce %s); the centroids stay on them, the driver receives counts",
                len(data.actors) * config.k * plan.dim * 8 / 2**30,
                len(data.actors),
                config.reduce,
            )
    else:
        log.info("fit: %d %s workers streaming from Ray Data", len(data.actors), devices)
    kept = False
    try:
        state, init, seconds = fit_on_workers(
            config, data, params, state, checkpoints, warm, loop_done
        )
        kept = keep_workers and isinstance(data, ResidentShards)
        return FitResult(
            state,
            init,
            resumed_from,
            len(data.actors),
            nodes,
            [i["device"] for i in data.infos],
            [str(i["rows_dtype"]) for i in data.infos if "rows_dtype" in i],
            {"load": load, **seconds},
            data.count() if sample else None,
            reduce,
            params.resolved_search,
            data if kept else None,
        )
    finally:
        if not kept:  # also on any error: no actor outlives a failed fit
            data.shutdown()
