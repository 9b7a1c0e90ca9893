"""``pseudolabel label``: label rows with centroids fitted before (faiss ``search``, Spark's
``transform``, cuML's ``predict``), with a run's output contract: parquet labels, the
manifest, ``report.html`` and ``_SUCCESS``.

``--centroids`` is a finished run's output, or a ``centroids.npy`` (k, d). A balanced
run's output brings its duals and eps: ``label`` is then that run's balanced rule,
argmax_j S_ij / eps + log v_j, and ``nearest_label`` the nearest centroid. A ``.npy``
takes ``--duals`` (log v, a run's ``duals.npy``) with ``--epsilon`` (eps in score
units, the run's ``manifest["balance"]["epsilon"]``). Nothing is fitted: the run flow
(``commands.run``) labels with the given model in place of the fit and balance stages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from pseudolabel.ops.kmeans import KMeansState
from pseudolabel.pipelines.config import LabelConfig, RunConfig, run_settings
from pseudolabel.pipelines.errors import ConfigError, InputError
from pseudolabel.pipelines.io.layout import CENTROIDS, DUALS, RunOutput, load_npy, npy_bytes
from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.stages.fit import FitResult


@dataclass(frozen=True)
class GivenModel:
    """Centroids (and balanced duals) to label with, and where they came from."""

    source: str
    centroids: np.ndarray  # (k, d) float32
    spherical: bool
    log_duals: np.ndarray | None = None  # (k,): balanced labels
    epsilon: float | None = None  # the duals' eps, score units

    def fitted(self) -> FitResult:
        state = KMeansState(self.centroids, converged=True)
        return FitResult(state, f"given ({self.source})", None, 0, 0)

    def fingerprint(self) -> dict[str, Any]:
        """What the labels depend on besides the input and the settings: the arrays."""
        out = {"centroids_sha256": hashlib.sha256(npy_bytes(self.centroids)).hexdigest()}
        if self.log_duals is not None:
            out["duals_sha256"] = hashlib.sha256(npy_bytes(self.log_duals)).hexdigest()
            out["epsilon"] = self.epsilon
        return out

    def describe(self) -> str:
        k, d = self.centroids.shape
        rule = "balanced (given duals)" if self.log_duals is not None else "nearest centroid"
        spherical = ", spherical" if self.spherical else ""
        return f"{k} centroids of dim {d} from {self.source}, {rule}{spherical}"

    def balance_section(self) -> dict[str, Any]:
        return {"given": self.source, "epsilon": self.epsilon}


def load_model(cfg: LabelConfig) -> GivenModel:
    """The centroids (and duals) ``cfg`` names, checked: finite, of one shape."""
    options = cfg.storage_options
    loc = resolve(cfg.centroids, options)
    run = RunOutput(loc)
    spherical = cfg.spherical
    log_duals = epsilon = None
    if loc.url.endswith(".npy"):
        centroids = load_npy(loc)
        if cfg.duals:
            log_duals, epsilon = load_npy(resolve(cfg.duals, options)), cfg.epsilon
    elif run.committed():
        manifest = run.manifest()
        centroids = load_npy(run.root.join(CENTROIDS))
        if spherical is None:
            spherical = bool(manifest.get("config", {}).get("spherical"))
        if cfg.duals:
            log_duals, epsilon = load_npy(resolve(cfg.duals, options)), cfg.epsilon
        elif "balance" in manifest and run.root.join(DUALS).exists():
            log_duals = load_npy(run.root.join(DUALS))
            epsilon = cfg.epsilon or float(manifest["balance"]["epsilon"])
    else:
        raise InputError(
            f"--centroids {loc.url}: neither a .npy file nor a finished run's output "
            "(no _SUCCESS there)"
        )
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or len(centroids) == 0 or not np.isfinite(centroids).all():
        raise InputError(
            f"--centroids {loc.url}: need a finite (k, d) array, got shape {centroids.shape}"
        )
    if log_duals is not None:
        log_duals = np.asarray(log_duals, np.float64)
        if log_duals.shape != (len(centroids),) or not np.isfinite(log_duals).all():
            raise InputError(
                f"duals: need {len(centroids)} finite values (one per centroid), got "
                f"shape {log_duals.shape}"
            )
        if not epsilon or epsilon <= 0:
            raise ConfigError("--duals need --epsilon: the eps of the plan they came from")
    return GivenModel(loc.url, centroids.astype(np.float32), bool(spherical), log_duals, epsilon)


def run_config(cfg: LabelConfig, model: GivenModel) -> RunConfig:
    """The run settings of a label-only run: the label pass's, and the model's shape."""
    values = run_settings(vars(cfg))
    values.update(
        k=len(model.centroids),
        spherical=model.spherical,
        balanced=model.log_duals is not None,
        epsilon=RunConfig.epsilon,  # the relative eps of a fit; the absolute one is given
    )
    if cfg.topk > len(model.centroids):
        raise ConfigError(f"--topk {cfg.topk} exceeds the {len(model.centroids)} centroids")
    return RunConfig(**values).validate()


def label(cfg: LabelConfig) -> dict[str, Any]:
    """Label ``cfg.input`` with the given model into ``cfg.output``; the manifest."""
    from pseudolabel.pipelines.commands.run import run

    cfg.validate()
    model = load_model(cfg)
    manifest = run(run_config(cfg, model), model=model)
    return manifest
