"""The balance stage, between fit and label, over the ShardWorkers that hold the rows.

Sinkhorn-Knopp on a uniform sample of ``--balance-sample`` rows per cluster estimates the
k column potentials; passes over every row then correct them until the hard labels'
sizes meet their targets (``ops.hard_balance``). The driver holds k numbers; each step
sends them to the workers and gets k-vectors back. The result's log-duals go to
``duals.npy`` beside the centroids, and the label pass applies them row by row.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict

import numpy as np

from pseudolabel.ops.hard_balance import BalancedDuals, HardBalance, balanced_duals
from pseudolabel.ops.sinkhorn import SinkhornResult, proportions
from pseudolabel.pipelines import progress
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.layout import CENTROIDS, DUALS, MANIFEST, load_npy
from pseudolabel.pipelines.io.storage import Location, resolve
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.balance import BalanceShards
from pseudolabel.pipelines.runtime.shards import ResidentShards

log = logging.getLogger("pseudolabel")

BALANCE_STATE = "balance.json"
# Sinkhorn's sample (rows, scores and kernel, float32) solved on the driver at most this
# big: a constant, whatever the data's size, so the driver does not grow with the input.
DRIVER_SOLVE_BYTES = 256 * 2**20


def target_proportions(config: RunConfig) -> np.ndarray:
    """q (k,): uniform, or ``--cluster-proportions`` (.npy or a JSON list) normalised."""
    if not config.cluster_proportions:
        return proportions(config.k)
    loc = resolve(config.cluster_proportions, config.storage_options)
    try:
        raw = loc.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--cluster-proportions {loc.url} does not exist") from None
    try:
        if loc.url.endswith(".npy"):
            weights = np.load(io.BytesIO(raw), allow_pickle=False)
        else:
            weights = np.asarray(json.loads(raw), dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--cluster-proportions {loc.url}: not a list of numbers ({e})") from None
    weights = np.asarray(weights, np.float64).ravel()
    if len(weights) != config.k:
        raise ConfigError(
            f"--cluster-proportions {loc.url} has {len(weights)} weights; --k is {config.k}"
        )
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(
            f"--cluster-proportions {loc.url}: weights must be finite, >= 0, not all 0"
        )
    return proportions(config.k, weights)


def run_balance(
    config: RunConfig,
    data: ResidentShards,
    centroids: np.ndarray,
    q: np.ndarray,
    warm: np.ndarray | None = None,
) -> tuple[BalancedDuals, dict]:
    """Solve for the column potentials on the workers that hold the rows. Each worker
    caches scores up to --score-cache-gb; in this process the one worker caches that
    times its threads, for the Ray workers (one per CPU) it stands in for: else the
    Sinkhorn sample's scores would not fit and every step would score the sample again
    (SeLa's k = 3000 did, 2026-11-25)."""
    t0 = time.perf_counter()
    n = data.count()
    sample = config.balance_sample * config.k
    fraction = 1.0 if not sample or sample >= n else sample / n
    stand_in = 1 if calls.on_ray() else data.spec.threads or 1
    cache_bytes = config.score_cache_gb * 2**30 * stand_in
    shards = BalanceShards(data, centroids, cache_bytes, fraction, seed=config.seed)
    # A sample whose rows, scores and kernel fit DRIVER_SOLVE_BYTES (and the score cache
    # allowed) is solved on the driver: a step is then local arithmetic, not a round
    # trip to every worker (1-3 ms, which is most of a small solve's time).
    k, d = centroids.shape
    on_driver = shards.sample_rows * (2 * k + d) * 4 <= min(DRIVER_SOLVE_BYTES, cache_bytes)
    log.info(
        "balance: Sinkhorn on %s of %d rows (on the %s)%s, then size corrections on all rows",
        f"a sample of {shards.sample_rows}" if fraction < 1 else "all",
        n,
        "driver" if on_driver else "workers",
        ", warm-started from the previous run's duals" if warm is not None else "",
    )

    def on_stage(record: dict) -> None:
        bar.update(record["iterations"], eps=f"{record['epsilon']:.1e}")
        log.info(
            "balance: eps %.3e  %4d steps  cluster-size error %.2e",
            record["epsilon"],
            record["iterations"],
            record["marginal_error"],
        )

    def on_pass(record: dict) -> None:
        bar.update(1, off=record["l1_rows"])
        log.info(
            "balance: pass %2d  sizes off target by %d rows in all, %d at most%s",
            record["pass"],
            record["l1_rows"],
            record["max_rows"],
            "" if record["accepted"] else " (step not taken)",
        )

    def on_restart(sizes: HardBalance) -> None:
        log.info(
            "balance: the passes ended %d rows off from Sinkhorn's solution at the "
            "sample's tolerance; solving the sample again to --sinkhorn-tol %g",
            int(np.abs(sizes.counts - sizes.targets).max()),
            config.sinkhorn_tol,
        )

    try:
        with progress.bar(None, "balance", "step") as bar:
            result = balanced_duals(
                shards.sample_block(config.metric) if on_driver else shards,
                shards,
                q,
                n,
                epsilon=config.epsilon,
                sinkhorn_tol=config.sinkhorn_tol,
                sinkhorn_iterations=config.sinkhorn_iterations,
                tol=config.balance_tol,
                max_passes=config.balance_passes,
                warm=warm,
                on_stage=on_stage,
                on_pass=on_pass,
                sample_rows=shards.sample_rows,
                on_restart=on_restart,
            )
    finally:
        shards.release()
    if result.restarted:
        log.info(
            "balance: kept the %s solve's sizes",
            "second" if result.sinkhorn.tol == config.sinkhorn_tol else "first",
        )
    if not result.sinkhorn.converged:
        log.warning(
            "balance: Sinkhorn stopped after %d steps with cluster-size error %.2e above "
            "%g; the size corrections start from there",
            result.sinkhorn.iterations,
            result.sinkhorn.marginal_error,
            result.sinkhorn.tol,
        )
    sizes = result.sizes
    if not sizes.converged:
        log.warning(
            "balance: after %d passes a cluster is still %.1f%% off its target size "
            "(--balance-tol %g); raise --balance-passes, or check for duplicate rows",
            sizes.passes,
            100 * sizes.max_deviation,
            config.balance_tol,
        )
    info = {
        "sample_rows": shards.sample_rows,
        "sinkhorn_on": "driver" if on_driver else "workers",
        "score_cache": shards.cached,  # per worker, when solved on the workers
        "warm_start": warm is not None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "balance: %d Sinkhorn steps and %d passes in %.1f s; sizes within %.2f%% of target",
        result.sinkhorn.iterations,
        sizes.passes,
        info["seconds"],
        100 * sizes.max_deviation,
    )
    return result, info


def warm_duals(config: RunConfig, k: int) -> np.ndarray | None:
    """Last night's potentials (score units) when ``--init-centroids`` names a balanced
    run's centroids.npy, with its duals.npy and manifest beside it; else None."""
    url = config.init_centroids
    if not url or not url.rstrip("/").endswith(CENTROIDS):
        return None
    root = resolve(url.rstrip("/")[: -len(CENTROIDS)].rstrip("/"), config.storage_options)
    try:
        manifest = json.loads(root.join(MANIFEST).read_bytes())
        log_duals = load_npy(root.join(DUALS))
        epsilon = float(manifest["balance"]["epsilon"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
    if log_duals.shape != (k,) or not np.isfinite(log_duals).all():
        return None
    return log_duals.astype(np.float64) * epsilon


def save_balance(root: Location, checkpoints: Location, result: BalancedDuals, key: dict) -> None:
    """duals.npy beside the centroids, and the rest in _checkpoints/ for a rerun."""
    buf = io.BytesIO()
    np.save(buf, result.log_duals, allow_pickle=False)
    root.join(DUALS).write_bytes(buf.getvalue())
    doc = {
        "key": key,
        "beta": result.beta.tolist(),
        "epsilon": result.epsilon,
        "restarted": result.restarted,
        "sinkhorn": {**asdict(result.sinkhorn), "beta": result.sinkhorn.beta.tolist()},
        "sizes": {
            **asdict(result.sizes),
            **{f: getattr(result.sizes, f).tolist() for f in ("g", "counts", "targets")},
        },
    }
    checkpoints.join(BALANCE_STATE).write_bytes(json.dumps(doc).encode())


def load_balance(checkpoints: Location, key: dict) -> BalancedDuals | None:
    """The saved result of this very balance problem, or None."""
    loc = checkpoints.join(BALANCE_STATE)
    if not loc.exists():
        return None
    try:
        doc = json.loads(loc.read_bytes())
        if doc.get("key") != key:
            return None
        sink, sizes = doc["sinkhorn"], doc["sizes"]
        sink["beta"] = np.asarray(sink["beta"], np.float64)
        for f in ("g", "counts", "targets"):
            sizes[f] = np.asarray(sizes[f], np.float64 if f == "g" else np.int64)
        return BalancedDuals(
            np.asarray(doc["beta"], np.float64),
            float(doc["epsilon"]),
            SinkhornResult(**sink),
            HardBalance(**sizes),
            bool(doc["restarted"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def manifest_section(config: RunConfig, result: BalancedDuals, info: dict) -> dict:
    sink, sizes = result.sinkhorn, result.sizes
    return {
        "epsilon_relative": config.epsilon,
        "epsilon": result.epsilon,
        "target": config.cluster_proportions or "uniform",
        "converged": sizes.converged,
        # Sinkhorn solved again to --sinkhorn-tol: the passes could not correct the
        # sample's loose solution (``ops.hard_balance.balanced_duals``).
        "restarted": result.restarted,
        "sinkhorn": {
            "iterations": sink.iterations,
            "marginal_error": sink.marginal_error,
            "converged": sink.converged,
            "tol": config.sinkhorn_tol,
            "tol_used": sink.tol,  # larger on a sample with a larger error of its own
            "stages": sink.stages,
        },
        "sizes": {
            "passes": sizes.passes,
            "converged": sizes.converged,
            "max_deviation": sizes.max_deviation,
            "tol": config.balance_tol,
            "history": sizes.history,
        },
        **info,
    }
