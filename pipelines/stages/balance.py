"""The balance stage: Sinkhorn-Knopp over the ShardWorkers, between fit and label.

The driver holds the k column potentials; each step sends them (as v) to the workers
and gets back k column sums per worker. The result's log-duals go to ``duals.npy``
beside the centroids, and the label pass applies them row by row.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict

import numpy as np

from pseudolabel.ops.sinkhorn import SinkhornResult, proportions, sinkhorn
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.layout import DUALS
from pseudolabel.pipelines.io.storage import Location, resolve
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.runtime.sinkhorn import SinkhornShards

log = logging.getLogger("pseudolabel")

BALANCE_STATE = "balance.json"


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
    config: RunConfig, data: ResidentShards, centroids: np.ndarray, q: np.ndarray
) -> tuple[SinkhornResult, dict]:
    """Solve for the column potentials on the workers that hold the rows."""
    t0 = time.perf_counter()
    rows = SinkhornShards(data, centroids, config.score_cache_gb * 2**30)

    def on_stage(record: dict) -> None:
        log.info(
            "balance: eps %.3e  %4d steps  cluster-size error %.2e",
            record["epsilon"],
            record["iterations"],
            record["marginal_error"],
        )

    try:
        result = sinkhorn(
            rows,
            q,
            epsilon=config.epsilon,
            tol=config.sinkhorn_tol,
            max_iterations=config.sinkhorn_iterations,
            on_stage=on_stage,
        )
    finally:
        rows.release()
    if not result.converged:
        log.warning(
            "balance: stopped after %d steps with cluster-size error %.2e above --sinkhorn-tol"
            " %g; raise --sinkhorn-iterations or --epsilon",
            result.iterations,
            result.marginal_error,
            config.sinkhorn_tol,
        )
    info = {
        "score_cache": rows.cached,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "balance: %d steps in %.1f s, cluster-size error %.2e (scores %s)",
        result.iterations,
        info["seconds"],
        result.marginal_error,
        "cached" if all(rows.cached) else "recomputed per step on some workers",
    )
    return result, info


def save_balance(root: Location, checkpoints: Location, result: SinkhornResult, key: dict) -> None:
    """duals.npy beside the centroids, and the rest in _checkpoints/ for a rerun."""
    buf = io.BytesIO()
    np.save(buf, result.log_duals, allow_pickle=False)
    root.join(DUALS).write_bytes(buf.getvalue())
    doc = {"key": key, **asdict(result), "beta": result.beta.tolist()}
    checkpoints.join(BALANCE_STATE).write_bytes(json.dumps(doc).encode())


def load_balance(checkpoints: Location, key: dict) -> SinkhornResult | None:
    """The saved result of this very balance problem, or None."""
    loc = checkpoints.join(BALANCE_STATE)
    if not loc.exists():
        return None
    try:
        doc = json.loads(loc.read_bytes())
    except ValueError:
        return None
    if doc.get("key") != key:
        return None
    doc.pop("key")
    doc["beta"] = np.asarray(doc["beta"], np.float64)
    return SinkhornResult(**doc)


def manifest_section(config: RunConfig, result: SinkhornResult, info: dict) -> dict:
    return {
        "epsilon_relative": config.epsilon,
        "epsilon": result.epsilon,
        "iterations": result.iterations,
        "marginal_error": result.marginal_error,
        "converged": result.converged,
        "tol": config.sinkhorn_tol,
        "target": config.cluster_proportions or "uniform",
        "stages": result.stages,
        **info,
    }
