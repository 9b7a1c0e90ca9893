"""The Python API, re-exported by ``pseudolabel``: fit/predict as in scikit-learn, cuML
and Spark ML, a lazy labelling of any Ray Dataset, and the command line's job.

Every path runs the code the command line runs: a numpy array goes through the
``ops`` loop in this process (no Ray), a Ray Dataset or a URL through the worker actors
of ``pipelines.runtime`` and the stages of ``pipelines.stages``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.balanced import BalancedAssigner
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.hard_balance import BoundaryBlock, balanced_duals
from pseudolabel.ops.kmeans import (
    IterationRecord,
    KMeansState,
    fit,
    init_state,
    neighbour_graph,
    resolve_search,
)
from pseudolabel.ops.sampling import row_keys
from pseudolabel.ops.sinkhorn import DEFAULT_EPSILON, RowBlock, proportions
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ConfigError, InputError

log = logging.getLogger("pseudolabel")


@dataclass
class RunResult:
    """What ``run`` wrote, read back from its output: the manifest, the centroids and the
    cluster sizes, and where each part lies."""

    output: str
    manifest: dict[str, Any]
    centroids: np.ndarray  # (k, d) float32
    sizes: np.ndarray  # (k,) rows per label
    paths: dict[str, str]  # labels, centroids, manifest, report (, duals) -> URL

    @property
    def metrics(self) -> dict[str, Any]:
        """Mean distance, and scores against the truth column when one was given."""
        return self.manifest["metrics"]


def run(input: str, output: str, k: int, **options: Any) -> RunResult:
    """Run the whole job, as ``pseudolabel run`` does: fit on the input's rows, label
    every row into ``output`` and commit it.

    ``options`` are the command's flags with underscores (``balanced=True``,
    ``topk=5``, ``workers=4``, ``storage_options={...}``, ...). A committed output is
    returned as it is unless ``overwrite=True``.
    """
    try:
        config = RunConfig(input=input, output=output, k=k, **options)
    except TypeError as e:  # an option that is no flag of `pseudolabel run`
        raise ConfigError(str(e)) from None
    return run_config(config.validate())


def run_config(config: RunConfig) -> RunResult:
    """``run`` for a validated RunConfig (the command line's path)."""
    from pseudolabel.pipelines.commands.run import run as run_job
    from pseudolabel.pipelines.io.layout import (
        CENTROIDS,
        DUALS,
        LABELS,
        MANIFEST,
        REPORT,
        RunOutput,
        load_npy,
    )
    from pseudolabel.pipelines.io.storage import resolve

    manifest = run_job(config)
    root = RunOutput(resolve(config.output, config.storage_options)).root
    names = {"labels": LABELS, "centroids": CENTROIDS, "manifest": MANIFEST, "report": REPORT}
    if "balance" in manifest:
        names["duals"] = DUALS
    return RunResult(
        output=root.url,
        manifest=manifest,
        centroids=load_npy(root.join(CENTROIDS)),
        sizes=np.asarray(manifest["clusters"]["sizes"], np.int64),
        paths={name: root.join(part).url for name, part in names.items()},
    )


def label(
    dataset: Any,
    centroids: np.ndarray | str,
    *,
    topk: int = 1,
    duals: np.ndarray | str | None = None,
    epsilon: float | None = None,
    spherical: bool = False,
    embedding_column: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_rows: int = 65536,
    storage_options: dict | None = None,
) -> Any:
    """A lazy ``ray.data.Dataset``: ``dataset``'s rows with ``label`` (int32) and
    ``distance`` (float32, squared L2 to the label's centroid) added, every other
    column passed through and the embedding column dropped.

    ``centroids`` (k, d), or the URL of a ``centroids.npy``. ``topk`` > 1 adds
    ``topk_labels`` and ``topk_distances`` (the M nearest, best first). With ``duals``
    (a run's ``duals.npy``: log v) and that run's ``epsilon``, ``label`` is the balanced
    label argmax_j S_ij / eps + log v_j and ``nearest_label`` the nearest centroid;
    ``epsilon`` is the plan's absolute eps (``KMeans.epsilon_``, or a run's
    ``manifest["balance"]["epsilon"]``), not the relative ``--epsilon`` of the run.
    ``spherical``: rows are unit-normalised and distances are between unit vectors.
    ``workers`` labeler actors (default: one per CPU less one for reads, or one per
    ``gpus_per_worker`` GPUs); ``storage_options`` reach fsspec for URLs.
    """
    import ray

    from pseudolabel.pipelines.runtime.sources import dataset_layout
    from pseudolabel.pipelines.stages.label import LabelPool, LabelSpec, label_dataset

    if topk < 1:
        raise ConfigError(f"topk must be at least 1, got {topk}")
    if duals is not None and not epsilon:
        raise ConfigError("duals need the epsilon of the plan they came from (epsilon=...)")
    column, _, _ = dataset_layout(dataset, embedding_column)
    source = _centroid_source(centroids)
    if not isinstance(source, str) and topk > len(source):
        raise ConfigError(f"topk {topk} exceeds the {len(source)} centroids")
    spec = LabelSpec(
        metric="ip" if spherical else "l2",
        topk=topk if topk > 1 else 0,
        embedding_column=column,
        device="cuda" if gpus_per_worker > 0 else "cpu",
        duals=duals,
        epsilon=epsilon if duals is not None else None,
    )
    size = workers or label_pool_size(ray.cluster_resources(), cpus_per_worker, gpus_per_worker)
    pool = LabelPool(size, cpus_per_worker, gpus_per_worker, batch_rows)
    return label_dataset(dataset, source, spec, pool, storage_options)


def label_pool_size(resources: dict, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Labelers the cluster can hold: one per GPU slot when GPUs are asked for (a CPU
    count would ask for actors that never start), else one per CPU slot with one CPU
    left for Ray Data's read tasks."""
    if gpus_per_worker > 0:
        slots = resources.get("GPU", 0) // gpus_per_worker
    else:
        slots = max(resources.get("CPU", 1) - 1, 1) // cpus_per_worker
    return max(1, int(slots))


def _centroid_source(centroids: np.ndarray | str) -> np.ndarray | str:
    if isinstance(centroids, str):
        return centroids
    c = np.asarray(centroids, np.float32)
    if c.ndim != 2 or not np.isfinite(c).all():
        raise InputError(f"centroids must be a finite (k, d) array, got shape {c.shape}")
    return c


class KMeans:
    """k-means (Lloyd or mini-batch), optionally spherical and with balanced labels.

    ``fit(X)`` takes a numpy array (fitted in this process: no Ray), a
    ``ray.data.Dataset`` with an embedding column, or a URL of parquet or .npy shards (as
    ``pseudolabel run`` reads them). On a Dataset or a URL the rows are fitted on worker
    actors (ShardWorkers that hold them, or StreamWorkers for mini-batch on Ray), as
    ``pseudolabel run`` fits them. For a URL ``backend`` ("auto", "local" or "ray", as
    --backend) says where: "auto" fits a URL whose rows fit comfortably in memory in
    this process, with no Ray, as ``pseudolabel run`` would; otherwise it uses the
    running Ray, or starts an embedded one.

    Parameters mirror the command line: ``n_clusters`` (--k), ``algorithm``,
    ``max_iter`` (--iterations), ``tol``, ``spherical``, ``init`` ("auto", "kmeans++",
    "random"), ``seed``, ``workers``, ``search`` ("flat", "approx" or "auto": see
    ``ops.neighbours``); ``balanced`` also solves for duals after the fit
    (Sinkhorn-Knopp on a sample, then size corrections on every row), so ``predict``
    gives labels of equal cluster sizes on the fitted rows (within 1% when the
    corrections converge; the run's log says when they do not). ``init`` may also be
    a (k, d) array of initial centroids, as in scikit-learn.

    Fitted attributes: ``cluster_centers_`` (k, d) float32, ``inertia_`` (sum of squared
    distances of the rows to their nearest fitted centre; for mini-batch streamed on Ray
    (a Dataset, or a URL fitted on Ray), of the last epoch's batches before each update),
    ``n_iter_``, ``history_`` (one record per iteration) and, when balanced, ``duals_``
    (log v, (k,)) and ``epsilon_`` (the plan's absolute eps). ``storage_options`` reach
    fsspec when X is a URL.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        algorithm: str = "lloyd",
        max_iter: int = 20,
        tol: float = 1e-4,
        spherical: bool = False,
        init: str | np.ndarray = "auto",
        seed: int = 0,
        workers: int | None = None,
        search: str = "auto",
        balanced: bool = False,
        epsilon: float = DEFAULT_EPSILON,
        embedding_column: str | None = None,
        batch_rows: int = 16384,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        storage_options: dict | None = None,
        backend: str = "auto",
    ):
        self.n_clusters = n_clusters
        self.algorithm = algorithm
        self.max_iter = max_iter
        self.tol = tol
        self.spherical = spherical
        self.init = init
        self.seed = seed
        self.workers = workers
        self.search = search
        self.balanced = balanced
        self.epsilon = epsilon
        self.embedding_column = embedding_column
        self.batch_rows = batch_rows
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.storage_options = storage_options
        self.backend = backend

    def _config(self, input: str = "") -> RunConfig:
        """These parameters as run settings (the one config source)."""
        config = RunConfig(
            input=input,
            k=self.n_clusters,
            algorithm=self.algorithm,
            iterations=self.max_iter,
            tol=self.tol,
            spherical=self.spherical,
            init=self.init if isinstance(self.init, str) else "auto",
            seed=self.seed,
            workers=self.workers,
            search=self.search,
            balanced=self.balanced,
            epsilon=self.epsilon,
            embedding_column=self.embedding_column or "embedding",
            id_column=None,
            batch_rows=self.batch_rows,
            cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker,
            storage_options=dict(self.storage_options or {}),
            backend=self.backend,
        )
        return config.validate(paths=False)

    def fit(self, X: Any, y: None = None) -> KMeans:
        """Fit on X: a numpy array (n, d), a ``ray.data.Dataset`` or a URL. Returns self."""
        config = self._config(X if isinstance(X, str) else "")
        if isinstance(X, np.ndarray):
            self._fit_array(X, config)
        elif isinstance(X, str):
            self._fit_url(X, config)
        elif _is_dataset(X):
            self._fit_dataset(X, config)
        else:
            raise TypeError(
                f"X must be a numpy array, a ray.data.Dataset or a URL, got {type(X).__name__}"
            )
        return self

    def predict(self, X: Any) -> Any:
        """Labels: (n,) int64 for a numpy array; for a Dataset, ``label(X, ...)``, a lazy
        Dataset with ``label`` and ``distance`` columns. Balanced when fitted so."""
        self._check_fitted()
        if isinstance(X, np.ndarray):
            x = _as_rows(X, self.cluster_centers_.shape[1], self.spherical)
            if self.spherical:
                x = normalize_rows(x)
            beta = self.duals_ * self.epsilon_ if self.duals_ is not None else None
            search = resolve_search(self.search, self.n_clusters)
            assigner = BalancedAssigner(
                self.cluster_centers_, self._metric, beta, self.epsilon_, search=search,
                seed=self.seed,
            )  # fmt: skip
            return assigner.assign(x).label
        if _is_dataset(X):
            return label(
                X,
                self.cluster_centers_,
                duals=self.duals_,
                epsilon=self.epsilon_,
                spherical=self.spherical,
                embedding_column=self.embedding_column,
                workers=self.workers,
                cpus_per_worker=self.cpus_per_worker,
                gpus_per_worker=self.gpus_per_worker,
            )
        raise TypeError(f"predict takes a numpy array or a ray.data.Dataset, got {type(X)}")

    def fit_predict(self, X: Any, y: None = None) -> Any:
        """``fit(X).predict(X)``."""
        return self.fit(X).predict(X)

    # -- fitting backends: one loop (ops.kmeans.fit), three sources of rows --

    @property
    def _metric(self) -> str:
        return "ip" if self.spherical else "l2"

    def _fit_array(self, X: np.ndarray, config: RunConfig) -> None:
        x = _as_rows(X, None, self.spherical)
        if len(x) < self.n_clusters:
            raise InputError(f"n_clusters {self.n_clusters} exceeds the {len(x)} rows of X")
        params = config.kmeans_params()
        data = ArrayData(x, self._metric, config.batch_rows, config.seed)
        state, _ = init_state(data, params, init_centroids=self._given_init(x.shape[1]))
        self._set_fitted(fit(data, params, state), data)
        self.duals_ = self.epsilon_ = None
        if self.balanced:
            c, n = self.cluster_centers_, len(x)
            sample = data.x
            if config.balance_sample and config.balance_sample * self.n_clusters < n:
                fraction = config.balance_sample * self.n_clusters / n
                sample = data.x[row_keys(np.arange(n), config.seed) < fraction]
            result = balanced_duals(
                RowBlock(sample, c, self._metric, len(sample)),
                BoundaryBlock(data.x, c, self._metric),
                proportions(self.n_clusters),
                n,
                epsilon=config.epsilon,
                sinkhorn_tol=config.sinkhorn_tol,
                sinkhorn_iterations=config.sinkhorn_iterations,
                tol=config.balance_tol,
                max_passes=config.balance_passes,
                sample_rows=len(sample),
            )
            self.duals_, self.epsilon_ = result.log_duals, result.epsilon

    def _fit_url(self, url: str, config: RunConfig) -> None:
        from pseudolabel.pipelines.io.plan import make_plan
        from pseudolabel.pipelines.runtime.session import plan_backend, run_session

        plan = make_plan(config.input, config.read_settings())  # {date} filled in
        if self.n_clusters > plan.total_rows:
            raise InputError(f"n_clusters {self.n_clusters} exceeds the {plan.total_rows} rows")
        backend, _ = plan_backend(config, plan)
        with run_session(config, backend) as resources:
            self._fit_on_workers(config, resources, plan=plan, backend=backend)

    def _fit_dataset(self, dataset: Any, config: RunConfig) -> None:
        import ray

        from pseudolabel.pipelines.runtime.sources import dataset_layout

        column, dim, value_type = dataset_layout(dataset, self.embedding_column)
        config = dataclasses.replace(config, embedding_column=column)
        self._fit_on_workers(config, ray.cluster_resources(), dataset=(dataset, dim, value_type))

    def _fit_on_workers(
        self, config: RunConfig, resources: dict, plan=None, dataset=None, backend: str = "ray"
    ):
        if self.balanced and config.algorithm != "lloyd":
            raise ConfigError("balanced=True on a Dataset or URL needs algorithm='lloyd'")
        from pseudolabel.pipelines.runtime.actors import WorkerSpec
        from pseudolabel.pipelines.runtime.session import size_pools
        from pseudolabel.pipelines.runtime.shards import ResidentShards
        from pseudolabel.pipelines.runtime.sources import dataset_sources
        from pseudolabel.pipelines.runtime.streaming import StreamingShards
        from pseudolabel.pipelines.stages.balance import run_balance
        from pseudolabel.pipelines.stages.fit import fit_on_workers, start_workers

        sizing = size_pools(config, resources, backend)
        spec = WorkerSpec.of(config, sizing)
        if plan is not None:
            data = start_workers(config, plan, config.read_settings(plan), spec, sizing.workers)
        else:
            ds, dim, value_type = dataset
            settings = config.read_settings(dim=dim, value_type=value_type)
            if config.algorithm == "minibatch":
                data = StreamingShards(
                    ds, config.embedding_column, dim, ds.count(), spec, sizing.workers
                )
            else:
                data = ResidentShards(dataset_sources(ds, sizing.workers), settings, spec)
        try:
            if data.count() < self.n_clusters:
                raise InputError(f"n_clusters {self.n_clusters} exceeds the {data.count()} rows")
            given = self._given_init(data.dim())
            warm = (given, None) if given is not None else None
            state, _, _ = fit_on_workers(config, data, config.kmeans_params(), None, warm=warm)
            self._set_fitted(state, data)
            self.duals_ = self.epsilon_ = None
            if self.balanced:
                q = proportions(self.n_clusters)
                result, _ = run_balance(config, data, self.cluster_centers_, q)
                self.duals_, self.epsilon_ = result.log_duals, result.epsilon
        finally:
            data.shutdown()

    def _given_init(self, dim: int) -> np.ndarray | None:
        """``init`` when it is an array of centroids, checked; else None (seed from data)."""
        if isinstance(self.init, str):
            return None
        c = np.asarray(self.init, np.float32)
        if c.shape != (self.n_clusters, dim) or not np.isfinite(c).all():
            raise ConfigError(
                f"init must be a finite ({self.n_clusters}, {dim}) array, got shape {c.shape}"
            )
        return c

    def _set_fitted(self, state: KMeansState, data: Any) -> None:
        self.cluster_centers_ = state.centroids
        self.n_iter_ = state.iteration
        self.history_: list[IterationRecord] = state.history
        # The objective of the final centres: one more pass over the rows, near each
        # row's last label when the fit searched so (an exact pass costs a flat iteration).
        near = None
        if resolve_search(self.search, self.n_clusters, self.algorithm) == "approx":
            near = neighbour_graph(state.centroids, self._metric, self.seed)
        try:
            self.inertia_ = float(data.partial_stats(state.centroids, near).inertia)
        except TypeError:  # a stream has no full pass: the last epoch's batches
            self.inertia_ = float(state.history[-1].inertia)

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this KMeans is not fitted yet: call fit(X) first")


def _is_dataset(X: Any) -> bool:
    try:
        import ray.data
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(X, ray.data.Dataset)


def _as_rows(X: np.ndarray, dim: int | None, spherical: bool) -> np.ndarray:
    """X as float32 (or float16) rows, validated at the edge: 2-D, the right width,
    finite, and (spherical) no zero rows."""
    if X.ndim != 2:
        raise InputError(f"X must be 2-D (n, d), got shape {X.shape}")
    if dim is not None and X.shape[1] != dim:
        raise InputError(f"X has {X.shape[1]} columns; the model was fitted on {dim}")
    if X.dtype.kind != "f":
        raise InputError(f"X must hold floats, got {X.dtype}")
    x = X if X.dtype in (np.float16, np.float32) else X.astype(np.float32)
    finite = np.isfinite(x.sum(axis=1, dtype=np.float64))
    if not finite.all():
        raise InputError(f"X row {int(np.flatnonzero(~finite)[0])}: NaN or inf")
    if spherical:
        zero = ~np.any(x != 0, axis=1)
        if zero.any():
            raise InputError(
                f"X row {int(np.flatnonzero(zero)[0])}: all-zero row cannot be "
                "unit-normalised for spherical k-means"
            )
    return x
