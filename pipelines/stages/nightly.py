"""What a nightly run adds: a warm start from last night's centroids, and label drift
against last night's run, both read from storage by URL."""

from __future__ import annotations

import logging
import posixpath

import numpy as np

from pseudolabel.ops.drift import centroid_shift, changed_fraction, match_centroids
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.layout import CENTROIDS, LABELS, RunOutput, load_npy
from pseudolabel.pipelines.io.storage import Location, resolve
from pseudolabel.pipelines.runtime.label_partitions import label_contingency

log = logging.getLogger("pseudolabel")


def check_previous_runs(config: RunConfig) -> None:
    """Refuse a ``--init-centroids`` or ``--previous-run`` that belongs to a run without
    ``_SUCCESS`` (its centroids may come from an unfinished fit, its labels be half
    written), or with ``--allow-incomplete-previous`` warn and go on. A run that has not
    started at all (the first night) is left to the stages: they seed from the data and
    report no drift. Called before Ray starts."""
    folders = []
    if config.init_centroids:
        folders.append(("--init-centroids", posixpath.dirname(config.init_centroids)))
    if config.previous_run:
        folders.append(("--previous-run", config.previous_run))
    for flag, url in folders:
        previous = RunOutput(resolve(url, config.storage_options))
        if previous.committed() or not previous.started():
            continue
        problem = f"{flag}: the run at {previous.root.url} has no _SUCCESS (unfinished or failed)"
        if not config.allow_incomplete_previous:
            raise ConfigError(
                f"{problem}; finish it, point to a finished run, or pass "
                "--allow-incomplete-previous to use it anyway"
            )
        log.warning("%s; used anyway (--allow-incomplete-previous)", problem)


def load_init_centroids(config: RunConfig, dim: int) -> tuple[np.ndarray | None, str | None]:
    """(centroids, note). A missing file, as on the first night, means seeding from the
    data, with a warning and a note for the manifest; a wrong shape is an error."""
    if not config.init_centroids:
        return None, None
    loc = resolve(config.init_centroids, config.storage_options)
    if not loc.exists():
        log.warning("--init-centroids %s does not exist: seeding from the data", loc.url)
        return None, f"{loc.url} not found: seeded from the data"
    centroids = load_npy(loc)
    if centroids.shape != (config.k, dim):
        raise ConfigError(
            f"--init-centroids {loc.url} has shape {centroids.shape}; this run needs "
            f"({config.k}, {dim}) for --k {config.k} and the input's dim"
        )
    if not np.isfinite(centroids).all():
        raise ConfigError(f"--init-centroids {loc.url} holds NaN or inf values")
    log.info("fit: warm start from %s", loc.url)
    return centroids.astype(np.float32), None


def label_drift(
    config: RunConfig, centroids: np.ndarray, labels: list[Location], rows: int
) -> dict | None:
    """Drift against ``--previous-run``: matched centroid shift, and the share of ids in
    both runs whose label changed once previous labels are carried through the match.
    ``rows``: this run's, to size the join's partitions."""
    if not config.previous_run:
        return None
    root = resolve(config.previous_run, config.storage_options)
    if not root.join(CENTROIDS).exists():
        log.warning("--previous-run %s has no %s: no drift reported", root.url, CENTROIDS)
        return {"previous_run": root.url, "missing": True}
    previous = load_npy(root.join(CENTROIDS))
    if previous.shape[1] != centroids.shape[1]:
        raise ConfigError(
            f"--previous-run {root.url}: centroids of dim {previous.shape[1]}, this run has "
            f"{centroids.shape[1]}"
        )
    mapping, method = match_centroids(previous, centroids)
    # The join runs in Ray tasks partitioned by id; the driver gets k x k counts at most.
    prev_labels, cur_labels, counts = label_contingency(
        root.join(LABELS).files([".parquet"]), labels, rows
    )
    changed = changed_fraction(prev_labels, cur_labels, mapping, counts)
    shared = int(counts.sum())
    drift = {
        "previous_run": root.url,
        "matching": method,
        "shared_ids": shared,
        "label_changed_fraction": changed,
        "centroid_shift": centroid_shift(previous, centroids, mapping),
    }
    log.info(
        "drift: %.2f%% of %d shared ids changed label; matched centroids moved %.4g on average",
        100 * changed,
        shared,
        drift["centroid_shift"]["mean"],
    )
    return drift
