"""``pseudolabel run``: plan -> fit -> [balance] -> label -> verify -> commit, as DESIGN.md's
flow. ``pseudolabel.run`` and the command line both call ``run`` here."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import numpy as np

from pseudolabel.ops.kmeans import resolve_search
from pseudolabel.ops.metrics import scores, size_stats
from pseudolabel.pipelines.commands.label import GivenModel
from pseudolabel.pipelines.commands.report import write_report
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ConfigError, InputError, ResourceError
from pseudolabel.pipelines.io.checkpoints import Checkpoints
from pseudolabel.pipelines.io.fingerprint import refuse_stale, run_fingerprint
from pseudolabel.pipelines.io.layout import CENTROIDS, CHECKPOINTS, DUALS, RunOutput
from pseudolabel.pipelines.io.lease import Lease
from pseudolabel.pipelines.io.plan import SUFFIXES, Plan, make_plan
from pseudolabel.pipelines.io.skips import start_ledger
from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.roster import describe, start_roster, warn_fallback
from pseudolabel.pipelines.runtime.session import plan_backend, run_session, size_pools
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.stages.balance import (
    load_balance,
    manifest_section,
    run_balance,
    save_balance,
    target_proportions,
    warm_duals,
)
from pseudolabel.pipelines.stages.fit import FitResult, fit_fingerprint, run_fit
from pseudolabel.pipelines.stages.label import LabelPool, LabelSpec, label_pass
from pseudolabel.pipelines.stages.nightly import check_previous_runs, label_drift
from pseudolabel.pipelines.stages.verify import (
    LabelCounts,
    check_rows,
    count_labels,
    drop_duplicate_ids,
)

log = logging.getLogger("pseudolabel")


@contextmanager
def _timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)


def run(config: RunConfig, model: GivenModel | None = None) -> dict[str, Any]:
    """Run the whole job and return its manifest. A committed output is returned as is.

    With ``model`` (``pseudolabel label``), its centroids and duals take the place of the
    fit and balance stages: the rows are only labelled."""
    t_start = time.perf_counter()
    source = resolve(config.input, config.storage_options)
    output = RunOutput(resolve(config.output, config.storage_options))
    if source.contains(output.root):
        raise ConfigError(
            f"--output {output.root.url} lies inside --input {source.url}: the next run "
            "would read the labels as embeddings; choose an output outside the input"
        )
    output.root.check_writable()  # credentials, bucket, endpoint: fail in seconds
    # One listing of the input, before any file is opened or Ray starts: a finished
    # output is reused only by a run of the same settings and input files.
    fingerprint = run_fingerprint(config, tuple(SUFFIXES))
    if model is not None:
        fingerprint["model"] = model.fingerprint()
    if output.committed() and not config.overwrite:
        previous = output.manifest()
        old = previous.get("fingerprint")
        refuse_stale(output.root.url, "a finished run", old, fingerprint)
        log.info("%s is complete (_SUCCESS); --overwrite recomputes it", output.root.url)
        return previous
    check_previous_runs(config)
    # One writer per output, from here to the commit (a resubmitted job fails here).
    with Lease(output.root) as lease:
        if output.committed():
            log.info("--overwrite: removing the previous run at %s", output.root.url)
            output.clear()
        return _run(config, output, fingerprint, lease, t_start, model)


def _run(
    config: RunConfig,
    output: RunOutput,
    fingerprint: dict,
    lease: Lease,
    t_start: float,
    model: GivenModel | None,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    with _timed("plan", timings):
        plan = make_plan(config.input, config.read_settings(label_pass=True))
    if plan.fmt != "parquet" and config.kept_columns():
        raise ConfigError("--keep-columns: .npy input holds no columns but the embedding")
    # Where the rows are labelled: on the fit's workers, which then read the label pass's
    # columns too, or in a pass that reads the input again.
    backend, why = plan_backend(config, plan)
    source = "stream" if model else config.label_source(plan.total_rows, plan.value_type, backend)
    settings = config.read_settings(plan, label_pass=source == "workers")
    log.info(
        "plan: %d %s files, %d rows, dim %d, %s%s",
        len(plan.files),
        plan.fmt,
        plan.total_rows,
        plan.dim,
        plan.value_type,
        f" ({len(plan.empty_files)} empty files skipped)" if plan.empty_files else "",
    )
    if model is not None:
        _check_dim(model, plan.dim)
        log.info("label: %s", model.describe())
    elif config.k > plan.total_rows:
        raise InputError(f"--k {config.k} exceeds the {plan.total_rows} input rows")

    log.info(
        "backend: %s (%s; --backend chooses)",
        "in this process, no Ray" if backend == "local" else "Ray",
        why,
    )
    t_ray = time.perf_counter()
    with run_session(config, backend) as resources:
        if backend == "ray":
            timings["ray_start"] = round(time.perf_counter() - t_ray, 3)
        sizing = size_pools(config, resources, backend)
        spec = dataclasses.replace(WorkerSpec.of(config, sizing), label_columns=source == "workers")
        ledger = start_ledger()  # every reader reports its skipped rows here
        checkpoints = Checkpoints(
            output.root.join(CHECKPOINTS), fit_fingerprint(config, plan, fingerprint, backend)
        )
        if model is not None:
            fitted = model.fitted()
        else:
            with _timed("fit", timings):
                fitted = run_fit(
                    config,
                    plan,
                    settings,
                    spec,
                    sizing.workers,
                    checkpoints,
                    keep_workers=config.balanced or source == "workers",
                    ledger=ledger,
                )
        workers = fitted.data  # kept up for the balance stage and the labels
        try:
            # Labelers load it, and check it is still this file.
            centroids_sha256 = output.write_array(CENTROIDS, fitted.state.centroids)
            balance = None
            if model is not None and model.log_duals is not None:
                output.write_array(DUALS, model.log_duals)  # labelers read it from the output
                balance = (model, model.balance_section())
            elif config.balanced:
                with _timed("balance", timings):
                    balance, workers = _balance(
                        config, plan, settings, spec, sizing, fitted, output, ledger, workers
                    )
            if source != "workers" and workers is not None:
                workers.shutdown()  # the labelers need their CPUs
                workers = None
            staging = output.new_staging()
            roster = start_roster()  # each labeler reports its node and device here
            with _timed("label", timings):
                reread = backend == "local" and workers is None
                if reread:  # no Ray Data here: a worker reads the rows again and labels them
                    workers = _reread(config, plan, spec, ledger)
                labelled_on, asked = _label(
                    config, plan, config.read_settings(plan, label_pass=True), sizing, output,
                    staging, balance, ledger, roster, centroids_sha256, workers, reread,
                )  # fmt: skip
        finally:
            if workers is not None:
                workers.shutdown()
        labelers = _ask(roster.members.remote(), "roster")
        warn_fallback("label", sizing.device, labelers)
        with _timed("publish", timings):
            staged = staging.files([".parquet"])
            skipped = dict(_ask(ledger.by_reason.remote(), "skip ledger"))
            # Ids that are global row numbers (.npy, or no id column) cannot repeat.
            row_numbers = plan.fmt == "npy" or config.id_column is None
            duplicates = 0 if row_numbers else drop_duplicate_ids(
                staged, config.on_bad_rows, plan.total_rows
            )  # fmt: skip
            if duplicates:
                skipped["duplicate id"] = duplicates
            columns = ("label", "nearest_label") if balance else ("label",)
            counts = count_labels(staged, config.k, columns, config.truth_column)
            written = counts["label"].rows
            check_rows(written, plan.total_rows, skipped)  # before anything is published
            lease.check()  # still the only writer
            output.publish(staged)
        manifest = _manifest(config, plan, fitted, counts, skipped, timings, sizing, balance)
        if model is not None:
            manifest["fit"]["algorithm"] = "given"
        manifest["label"] = {
            # where the rows were labelled: the fit's workers, or a streaming pass
            "source": labelled_on,
            "device": sizing.device,
            "asked": asked,
            **describe(labelers),
            "centroids_sha256": centroids_sha256,  # what every labeler checked it loaded
        }
        manifest["fingerprint"] = fingerprint
        manifest["backend"] = {"name": backend, "why": why}
        if backend == "ray":
            manifest["ray"] = {"cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}
        else:
            manifest["backend"]["cpus"] = resources["CPU"]
        drift = label_drift(
            config, fitted.state.centroids, output.labels.files([".parquet"]), plan.total_rows
        )
        if drift is not None:
            manifest["drift"] = drift
        manifest["timings"]["total"] = round(time.perf_counter() - t_start, 3)
        write_report(output, manifest, config.storage_options)  # before _SUCCESS, last
        lease.check()
        output.commit(manifest)
    log.info("done: %d rows labelled into %s", written, output.labels.url)
    return manifest


# The run's bookkeeping actors (skip ledger, roster) live on the driver's node and do
# O(blocks) work: a minute without an answer means they are gone or their node hangs.
BOOKKEEPING_S = 60.0


def _ask(ref: Any, actor: str) -> Any:
    import ray

    try:
        return calls.get(ref, timeout=BOOKKEEPING_S)
    except ray.exceptions.GetTimeoutError:
        raise ResourceError(
            f"the run's {actor} did not answer within {BOOKKEEPING_S:g} s: the driver's "
            "node may have stopped responding; rerun to resume"
        ) from None


def _check_dim(model: GivenModel, dim: int) -> None:
    if model.centroids.shape[1] != dim:
        raise InputError(
            f"--centroids {model.source} has dimension {model.centroids.shape[1]}; the input "
            f"rows have {dim}"
        )


def _balance(
    config, plan, settings, spec, sizing, fitted: FitResult, output: RunOutput, ledger, workers
):
    """Balanced duals from workers that hold the rows (the fit's, or freshly loaded
    ones), or the checkpointed solution of the same problem. Returns ((result, info),
    the workers), which stay up for the labels: the caller shuts them down."""
    centroids = fitted.state.centroids
    q = target_proportions(config)
    warm = warm_duals(config, config.k)
    key = {
        "centroids": hashlib.sha256(centroids.tobytes()).hexdigest(),
        "proportions": hashlib.sha256(q.tobytes()).hexdigest(),
        "warm": None if warm is None else hashlib.sha256(warm.tobytes()).hexdigest(),
        "epsilon": config.epsilon,
        "tol": config.sinkhorn_tol,
        "iterations": config.sinkhorn_iterations,
        "sample": config.balance_sample,
        "seed": config.seed,
        "size_tol": config.balance_tol,
        "passes": config.balance_passes,
    }
    ckpt = output.root.join(CHECKPOINTS)
    saved = load_balance(ckpt, key)
    if saved is not None:
        log.info("balance: solution of this run found in %s; not solving again", ckpt.url)
        save_balance(output.root, ckpt, saved, key)
        return (saved, {"resumed": True}), workers
    if workers is None:
        workers = ResidentShards.from_plan(plan, settings, spec, sizing.workers, ledger)
    try:
        result, info = run_balance(config, workers, centroids, q, warm)
        save_balance(output.root, ckpt, result, key)
    except BaseException:
        workers.shutdown()
        raise
    return (result, info), workers


def _reread(config: RunConfig, plan: Plan, spec: WorkerSpec, ledger) -> ResidentShards:
    """An in-process worker holding every row with the label pass's columns, for a run
    in this process whose fit's workers did not (or are gone). Spherical rows are held
    in float32, as a streaming Labeler normalises them (``RunConfig.label_source``)."""
    settings = config.read_settings(plan, label_pass=True)
    if config.spherical:
        settings = dataclasses.replace(settings, dtype="float32")
    spec = dataclasses.replace(spec, label_columns=True, steps=False)
    return ResidentShards.from_plan(plan, settings, spec, 1, ledger)


def _label(
    config,
    plan,
    settings,
    sizing,
    output: RunOutput,
    staging,
    balance,
    ledger,
    roster,
    centroids_sha256: str,
    workers: ResidentShards | None = None,
    reread: bool = False,
) -> tuple[str, int]:
    """Label every row into ``staging``: on ``workers`` when given (they hold every row
    and its columns; ``reread``: loaded for this, not the fit's), else in a streaming
    pass (``settings``: the label pass's, with --keep-columns). Returns where
    ("workers", "reread" or "stream") and how many actors."""
    spec = LabelSpec.of(
        config,
        sizing,
        duals_url=output.root.join(DUALS).url if balance else None,
        epsilon=balance[0].epsilon if balance else None,
        centroids_sha256=centroids_sha256,
    )
    centroids = output.root.join(CENTROIDS)
    if workers is not None:
        if reread:
            log.info("label: in this process, on a second read of the input")
        else:
            who = f"{len(workers.actors)} workers, which hold"
            if not calls.on_ray():
                who = "worker in this process, which holds"
            log.info(
                "label: on the fit's %s every row (no second read of the input; "
                "--label-from stream reads it again)",
                who,
            )
        batch_rows = config.label_batch_rows
        workers.write_labels(centroids.url, config.k, spec, staging, batch_rows, roster)
        return "reread" if reread else "workers", len(workers.actors)
    pool = LabelPool.of(config, sizing)
    log.info("label: %d labeler actors, batches of %d rows", pool.size, pool.batch_rows)
    label_pass(plan, settings, centroids, spec, pool, staging, ledger, roster)
    return "stream", pool.size


def _cluster_section(counts: LabelCounts) -> dict[str, Any]:
    section = {"sizes": counts.sizes.tolist(), "balance": size_stats(counts.sizes)}
    means = counts.mean_distances()
    if means is not None:  # 6 significant digits: k numbers for the report, not the math
        section["mean_distance"] = [None if np.isnan(m) else float(f"{m:.6g}") for m in means]
    return section


def _manifest(
    config: RunConfig,
    plan: Plan,
    fitted: FitResult,
    counts: dict[str, LabelCounts],
    skipped: dict[str, int],
    timings,
    sizing,
    balance,
) -> dict[str, Any]:
    label = counts["label"]
    metrics: dict[str, Any] = {
        "label_distance_sum": label.distance_sum,
        "mean_distance": label.distance_sum / max(label.rows, 1),
    }
    if config.truth_column:
        metrics["truth"] = {c: scores(n.truth_table()) for c, n in counts.items()}
    skipped_section = {
        "total": sum(skipped.values()),  # = input - output: check_rows held before publish
        "by_reason": skipped,
        "files": plan.skipped_files,  # whole files left out at planning (rows: if known)
    }
    clusters = {"k": config.k, **_cluster_section(label)}
    if "nearest_label" in counts:
        clusters["nearest"] = _cluster_section(counts["nearest_label"])
    manifest = {
        "format": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "input": {
            "url": plan.input_url,
            "format": plan.fmt,
            "files": len(plan.files),
            "empty_files": plan.empty_files,
            "ignored_files": plan.ignored_files,  # not read: names starting with _ or .
            "rows": plan.total_rows,
            "dim": plan.dim,
            "value_type": plan.value_type,
            "id_type": plan.id_type,
        },
        "fit": {
            "algorithm": config.algorithm,
            # the search the fit ran (GPU workers search exactly)
            "search": fitted.search or resolve_search(config.search, config.k, config.algorithm),
            # --fit-sample: the rows the workers held and fitted on (null: all rows)
            "sample_rows": fitted.sample_rows,
            # how the workers' statistics were summed (--reduce): gather or scatter
            "reduce": fitted.reduce,
            # rows whose label changed in the last iteration (null: not known, e.g. the
            # only iteration, or a worker was rebuilt in it)
            "changed_last_iteration": (
                fitted.state.history[-1].changed if fitted.state.history else None
            ),
            "init": fitted.init,
            "iterations_run": fitted.state.iteration,
            "converged": fitted.state.converged,
            "resumed_from_iteration": fitted.resumed_from,
            "workers": fitted.workers,
            "nodes": fitted.nodes,
            "device": sizing.device,  # asked for; "devices": what each worker found
            "devices": fitted.devices,
            "rows_dtypes": fitted.rows_dtypes,  # --dtype, as the workers hold the rows
            "history": fitted.state.history_dicts(),
            "seconds": {k: round(v, 3) for k, v in fitted.seconds.items()},
        },
        "clusters": clusters,
        "rows": {"input": plan.total_rows, "output": label.rows, "skipped": skipped_section},
        "metrics": metrics,
        "timings": dict(timings),
        "versions": versions(),
    }
    if balance is not None and isinstance(balance[0], GivenModel):
        manifest["balance"] = balance[1]  # pseudolabel label: the given duals, not solved
    elif balance is not None:
        manifest["balance"] = manifest_section(config, *balance)
    return manifest


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in (
        "pseudolabel",
        "ray",
        "faiss-cpu",
        "faiss-gpu-cu12",
        "numpy",
        "pyarrow",
        "torch",
        "fsspec",
        "s3fs",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
