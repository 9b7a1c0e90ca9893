"""Settings: one dataclass per command, filled from defaults, then a YAML file, then flags.

Each field is a YAML key and a flag (``cpus_per_worker`` <-> ``--cpus-per-worker``) with
the help text in its metadata, so ``--help``, ``cluster_configs/local.yaml`` and the code
cannot drift apart. Validation happens here, at the edge (DESIGN invariant 6). What the
kernels and readers take (``KMeansParams``, ``ReadSettings``, ...) is projected from
these objects by one method each, never copied field by field elsewhere.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pseudolabel.ops.dataset import STRATEGIES
from pseudolabel.ops.hard_balance import DEFAULT_TOL
from pseudolabel.ops.kmeans import ALGORITHMS, APPROX_FROM_K, SEARCHES, KMeansParams
from pseudolabel.ops.sinkhorn import DEFAULT_EPSILON
from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.plan import BAD_ROW_POLICIES, Plan, ReadSettings

# How a Lloyd step's statistics are summed (``runtime.shards.reduce_mode``); "auto"
# reduce-scatters from this many bytes of float64 sums over all workers (W x k x d x 8),
# when they span several nodes.
REDUCES = ("auto", "gather", "scatter")
SCATTER_FROM_BYTES = 1 << 30
# Where a run labels its rows (``RunConfig.label_source``): on the fit's workers, which
# hold every row after a Lloyd fit, or in a streaming Ray Data pass that reads them again.
LABEL_SOURCES = ("auto", "workers", "stream")
# Where a run's stages execute (``runtime.session.choose_backend``): on Ray, or in this
# process with no Ray at all (``runtime.calls``).
BACKENDS = ("auto", "ray", "local")

# --fit-sample auto: rows per centroid, faiss's default subsampling (max_points_per_centroid).
SAMPLE_PER_CENTROID = 256


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help text (and, for the CLI, ``choices`` or ``json``)."""
    return field(default=default, metadata={"help": help, **kw})


# The columns the label pass writes (DESIGN.md's output contract).
OUTPUT_COLUMNS = (
    "id", "label", "distance", "cosine", "nearest_label", "topk_labels", "topk_distances",
    "topk_probs",
)  # fmt: skip


@dataclass
class RunConfig:
    # What to cluster and where to write.
    input: str = _opt(
        "", "input folder or URL of .parquet or .npy shards", required=True, metavar="URL"
    )
    output: str = _opt(
        "", "output folder or URL (labels/, centroids.npy, ...)", required=True, metavar="URL"
    )
    k: int = _opt(0, "number of clusters", required=True, metavar="K")
    id_column: str | None = _opt("id", "parquet id column; empty: use global row numbers")
    embedding_column: str = _opt("embedding", "parquet embedding column")
    truth_column: str | None = _opt(
        None, "ground-truth column: copied into the labels, scored with NMI/ARI/accuracy"
    )
    keep_columns: str | None = _opt(
        None, "input columns copied into the labels, comma-separated (parquet)", metavar="A,B"
    )
    # Nightly runs. URLs may hold {date} and {previous_date} (run date, and the day before).
    run_date: str | None = _opt(None, "YYYY-MM-DD for {date} in URLs; default: today (UTC)")
    init_centroids: str | None = _opt(
        None,
        "warm start from a (k, d) centroids.npy; missing: seed from the data",
        metavar="URL",
    )
    previous_run: str | None = _opt(
        None, "a previous run's --output: report label drift against it", metavar="URL"
    )
    allow_incomplete_previous: bool = _opt(
        False, "use --init-centroids/--previous-run of a run without _SUCCESS (warns)"
    )
    # The algorithm.
    algorithm: str = _opt(
        "lloyd", "lloyd (full passes) or minibatch (streamed on Ray)", choices=ALGORITHMS
    )
    iterations: int = _opt(20, "Lloyd iterations, or mini-batch epochs (at most)", metavar="N")
    fit_sample: str = _opt(
        "0",
        f"Lloyd: fit on a uniform sample of N rows (auto: min(rows, {SAMPLE_PER_CENTROID} k)), "
        "held by the workers; every row is still labelled. 0: fit on all rows",
        metavar="N|auto",
    )
    tol: float = _opt(1e-4, "stop once inertia improves by less than this fraction")
    init: str = _opt(
        "auto", "seeding: auto, kmeans++ or random", choices=("auto", "kmeans++", "random")
    )
    seed: int = _opt(0, "random seed (same seed, data and workers: same result)", metavar="S")
    search: str = _opt(
        "auto",
        "nearest-centroid search: flat (exact), approx (only near each row's previous "
        f"centroid), auto (approx for Lloyd from k = {APPROX_FROM_K})",
        choices=SEARCHES,
    )
    spherical: bool = _opt(False, "cosine k-means: unit-normalise rows and centroids")
    balanced: bool = _opt(
        False, "balanced labels: equal (or --cluster-proportions) sizes (SeLa, SwAV)"
    )
    epsilon: float = _opt(
        DEFAULT_EPSILON, "Sinkhorn entropy, relative to the std of the scores", metavar="X"
    )
    sinkhorn_iterations: int = _opt(
        5000, "Sinkhorn steps at most, over all eps stages (again for a restarted solve)"
    )
    sinkhorn_tol: float = _opt(
        1e-3,
        "Sinkhorn stops at this L1 error of the cluster sizes (on a sample: first at the "
        "sample's own error x 0.3, and here only if the size corrections end far off)",
    )
    balance_sample: int = _opt(
        256, "Sinkhorn runs on this many rows per cluster (a uniform sample); 0: all rows"
    )
    balance_tol: float = _opt(
        DEFAULT_TOL, "balanced sizes end within this fraction of their targets (>= 1 row)"
    )
    balance_passes: int = _opt(
        40, "passes over the rows at most to correct balanced sizes (again after a restart)"
    )
    cluster_proportions: str | None = _opt(
        None,
        "target cluster sizes: .npy or JSON list of k weights (default: equal)",
        metavar="FILE",
    )
    score_cache_gb: float = _opt(
        4.0,
        "per worker (in process: per CPU): cache the sample's Sinkhorn scores under this "
        "size, else recompute",
    )
    topk: int = _opt(0, "also write the M nearest labels and distances per row", metavar="M")
    resampling_steps: int = _opt(
        0,
        "resampling refinement after the fit (Vo et al. 2024): rounds of refitting on "
        "an equal number of points per cluster",
    )
    resample_size: int | None = _opt(
        None, "points per cluster in each resampling round; default: half the mean size"
    )
    resample_strategy: str = _opt(
        "closest",
        "resampled points: closest to the centroid, or random",
        choices=("closest", "random"),
    )
    batch_rows: int = _opt(16384, "mini-batch rows per worker per step")
    dtype: str = _opt(
        "auto",
        "rows in worker memory: auto, float32 or float16",
        choices=("auto", "float32", "float16"),
    )
    on_bad_rows: str = _opt(
        "error", "NaN/null/short rows: error, or skip and count them", choices=BAD_ROW_POLICIES
    )
    # Resources.
    workers: int | None = _opt(
        None, "ShardWorker actors; default: one per CPU (or GPU)", metavar="W"
    )
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per worker and per labeler")
    gpus_per_worker: float = _opt(
        0.0, "GPUs per worker and per labeler (0: CPU faiss)", metavar="G"
    )
    label_workers: int | None = _opt(
        None,
        "labeler actors of a streaming label pass (--label-from stream); default: CPUs "
        "minus one for reads (GPU: GPUs, or --workers)",
    )
    label_batch_rows: int = _opt(65536, "rows per label batch (streaming or on the workers)")
    max_restarts: int = _opt(3, "times a lost worker actor is rebuilt before the run fails")
    startup_timeout: float = _opt(600.0, "seconds to wait for workers to start before failing")
    task_timeout: float = _opt(
        0.0,
        "seconds a worker may take to answer one step before the run fails "
        "(0: from the step's size: 300 s plus 1 s per 5e7 row x centre x dim)",
    )
    reduce: str = _opt(
        "auto",
        "Lloyd: sum the workers' statistics on the driver (gather), or on the workers, "
        "one slice of the centroids each (scatter); auto: scatter when the workers span "
        f"several nodes and hold {SCATTER_FROM_BYTES >> 30} GiB of sums (workers x k x "
        "dim x 8 bytes) or more",
        choices=REDUCES,
    )
    label_from: str = _opt(
        "auto",
        "label on the fit's workers, which hold every row after a Lloyd fit (no second "
        "read), or in a streaming pass that reads the input again; auto: the workers, "
        "unless --keep-columns would make them hold those columns too",
        choices=LABEL_SOURCES,
    )
    # Ray and storage.
    backend: str = _opt(
        "auto",
        "where the stages run: on Ray (embedded, or --ray-address), or in this process "
        "with no Ray (one worker on every core, CPUs only); auto: in this process when "
        "no cluster is given, the fit runs on CPUs without --workers, and the rows take "
        "at most a quarter of the memory",
        choices=BACKENDS,
    )
    ray_address: str | None = _opt(
        None,
        "Ray cluster to join (auto, ray://...); default: RAY_ADDRESS, else an embedded local Ray",
    )
    ray_num_cpus: int | None = _opt(None, "CPUs of the embedded local Ray; default: all")
    storage_options: dict = field(
        default_factory=dict,
        repr=False,  # may hold credentials
        metadata={"help": 'fsspec options as JSON, e.g. {"endpoint_url": ...}', "json": True},
    )
    overwrite: bool = _opt(False, "recompute a run whose output already has _SUCCESS")

    def validate(self, paths: bool = True) -> RunConfig:
        """Check every setting (``paths``: --input and --output are required)."""
        for name in ("input", "output") if paths else ():
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        _require(self.k >= 1, f"--k must be at least 1, got {self.k}")
        _require(self.iterations >= 1, f"--iterations must be at least 1, got {self.iterations}")
        _require(self.tol >= 0, f"--tol must be >= 0, got {self.tol}")
        _require(self.topk >= 0, f"--topk must be >= 0, got {self.topk}")
        _require(self.topk <= self.k, f"--topk {self.topk} exceeds --k {self.k}")
        _require(self.batch_rows >= 1, f"--batch-rows must be >= 1, got {self.batch_rows}")
        _require(self.label_batch_rows >= 1, "--label-batch-rows must be >= 1")
        _require(self.workers is None or self.workers >= 1, "--workers must be at least 1")
        _require(
            self.label_workers is None or self.label_workers >= 1,
            "--label-workers must be at least 1",
        )
        _require(self.cpus_per_worker > 0, "--cpus-per-worker must be > 0")
        _require(self.gpus_per_worker >= 0, "--gpus-per-worker must be >= 0")
        _require(self.max_restarts >= 0, "--max-restarts must be >= 0")
        _require(self.startup_timeout > 0, "--startup-timeout must be > 0")
        _require(self.task_timeout >= 0, "--task-timeout must be >= 0")
        _require(self.epsilon > 0, f"--epsilon must be > 0, got {self.epsilon}")
        _require(self.resampling_steps >= 0, "--resampling-steps must be >= 0")
        _require(
            self.resample_size is None or self.resample_size >= 1,
            "--resample-size must be at least 1",
        )
        _require(self.sinkhorn_iterations >= 1, "--sinkhorn-iterations must be at least 1")
        _require(self.sinkhorn_tol > 0, "--sinkhorn-tol must be > 0")
        _require(self.score_cache_gb >= 0, "--score-cache-gb must be >= 0")
        _require(self.balance_sample >= 0, "--balance-sample must be >= 0")
        _require(0 <= self.balance_tol < 1, "--balance-tol must be in [0, 1)")
        _require(self.balance_passes >= 1, "--balance-passes must be at least 1")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a mapping")
        # Resampling refits on points the workers hold; mini-batch workers stream their
        # rows and hold none, so the flag would otherwise be silently ignored.
        _require(
            not self.resampling_steps or self.algorithm == "lloyd",
            "--resampling-steps needs --algorithm lloyd (the refinement takes Lloyd steps "
            "on each cluster's rows)",
        )
        self.fit_sample = str(self.fit_sample).strip()
        _require(
            self.fit_sample == "auto" or self.fit_sample.isdigit(),
            f"--fit-sample must be a row count or auto, got {self.fit_sample!r}",
        )
        _require(
            self.fit_sample == "0" or self.algorithm == "lloyd",
            "--fit-sample needs --algorithm lloyd (mini-batch streams every row once an "
            "epoch: lower --iterations instead)",
        )
        _require(
            self.reduce == "auto" or self.algorithm == "lloyd",
            "--reduce needs --algorithm lloyd (mini-batch steps are small: their "
            "statistics are gathered)",
        )
        _require(
            self.label_from != "workers"
            or ((self.algorithm == "lloyd" or self.backend == "local") and self.fit_sample == "0"),
            "--label-from workers needs --algorithm lloyd (or mini-batch with --backend "
            "local) without --fit-sample: only then do the fit's workers hold every row",
        )
        _require(
            self.backend != "local" or not (self.ray_address or self.gpus_per_worker),
            "--backend local runs in this process on its CPUs: --ray-address and "
            "--gpus-per-worker need --backend ray or auto",
        )
        _require(
            self.search != "approx" or self.algorithm == "lloyd",
            "--search approx needs --algorithm lloyd (it starts each row from its label of "
            "the previous full pass; mini-batch steps search exactly)",
        )
        if self.id_column == "":
            self.id_column = None
        taken = set(OUTPUT_COLUMNS) | {self.id_column or "id", self.embedding_column}
        clash = sorted(taken & set(self.kept_columns()))
        _require(not clash, f"--keep-columns {clash}: the labels have columns of that name already")
        self._expand_dates()
        return self

    def _expand_dates(self) -> None:
        """Fill {date} and {previous_date} in every URL setting."""
        expand_dates(
            self, ("input", "output", "init_centroids", "previous_run", "cluster_proportions")
        )

    @property
    def metric(self) -> str:
        """The search metric: inner products of unit vectors for --spherical, else L2."""
        return "ip" if self.spherical else "l2"

    def fit_sample_rows(self, total_rows: int) -> int:
        """Rows the fit samples from ``total_rows``; 0: all of them (no sampling)."""
        wanted = SAMPLE_PER_CENTROID * self.k if self.fit_sample == "auto" else int(self.fit_sample)
        return 0 if wanted >= total_rows else wanted

    def kmeans_params(self) -> KMeansParams:
        """The k-means loop's parameters."""
        return KMeansParams(
            k=self.k,
            algorithm=self.algorithm,
            iterations=self.iterations,
            tol=self.tol,
            seed=self.seed,
            spherical=self.spherical,
            init=self.init,
            search=self.search,
        )

    def kept_columns(self) -> tuple[str, ...]:
        """--keep-columns as names, in order, without repeats or the truth column."""
        names = [c.strip() for c in (self.keep_columns or "").split(",") if c.strip()]
        return tuple(dict.fromkeys(c for c in names if c != self.truth_column))

    def fit_streams(self, backend: str) -> bool:
        """Whether the fit streams its rows (mini-batch on Ray, through Ray Data) rather
        than holding them on its workers (Lloyd; mini-batch in this process, ``backend``
        local, cuts its batches from the rows its worker holds)."""
        return self.algorithm == "minibatch" and backend != "local"

    def label_source(
        self, total_rows: int, value_type: str = "float32", backend: str = "ray"
    ) -> str:
        """Where the rows are labelled when the fit's workers are up: "workers" or
        "stream" (``--label-from``). auto: the workers, if they hold every row (a Lloyd
        fit that sampled none, or a mini-batch fit in this process: ``backend`` local),
        no --keep-columns (they would hold those too), and their rows are the input's:
        spherical rows held in float16 are rounded unit vectors, whose distances differ
        from the input's by up to ~2e-3 relative."""
        if self.label_from != "auto":
            return self.label_from
        every_row = not self.fit_streams(backend) and not self.fit_sample_rows(total_rows)
        rounded = self.spherical and self.held_dtype(value_type) != "float32"
        resident = every_row and not self.kept_columns() and not rounded
        return "workers" if resident else "stream"

    def held_dtype(self, value_type: str) -> str:
        """The dtype workers hold rows in (--dtype; auto: float16 rows stay float16)."""
        if self.dtype == "auto":
            return "float16" if value_type == "float16" else "float32"
        return self.dtype

    def read_settings(
        self,
        plan: Plan | None = None,
        dim: int = 0,
        value_type: str = "float32",
        label_pass: bool = False,
    ) -> ReadSettings:
        """What the readers need; the dim and stored value type come from a plan (or are
        given, for a Dataset). dtype "auto": float16 rows stay float16. The label pass
        (and the plan, which checks every file has them) also reads --keep-columns; the
        fit's workers do not hold them."""
        if plan is not None:
            dim, value_type = plan.dim, plan.value_type
        dtype = self.held_dtype(value_type)
        return ReadSettings(
            id_column=self.id_column,
            embedding_column=self.embedding_column,
            extra_columns=((self.truth_column,) if self.truth_column else ())
            + (self.kept_columns() if label_pass else ()),
            dim=dim,
            dtype=dtype,
            on_bad_rows=self.on_bad_rows,
            unit_norm=self.spherical,
            storage_options=self.storage_options,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings for the manifest; storage option values are redacted."""
        out = dataclasses.asdict(self)
        out["storage_options"] = {k: "<redacted>" for k in self.storage_options}
        return out


@dataclass
class CurateConfig(RunConfig):
    """``pseudolabel curate``: a run at the first level's k, then the levels above it."""

    k: int = _opt(0, "clusters of the first level; default: the first of --levels", metavar="K")
    levels: str = _opt(
        "",
        "clusters per level, shrinking: e.g. 10000,1000,100",
        required=True,
        metavar="K1,K2,...",
    )
    sample_size: int = _opt(0, "ids to select", required=True, metavar="N")
    strategy: str = _opt(
        "random",
        "within a level-1 cluster: random ids, or the closest to it",
        choices=STRATEGIES,
    )

    def validate(self) -> CurateConfig:
        ks = self.level_sizes()
        self.k = self.k or ks[0]
        _require(self.k == ks[0], f"--k {self.k} differs from the first level {ks[0]}")
        _require(self.sample_size >= 1, f"--sample-size must be at least 1, got {self.sample_size}")
        super().validate()
        return self

    def level1_config(self, **changes: Any) -> RunConfig:
        """The first level's run: this config's run settings, with ``changes``."""
        return RunConfig(**{**run_settings(vars(self)), **changes}).validate()

    def level_sizes(self) -> list[int]:
        """The cluster counts of ``levels``, checked: positive and shrinking."""
        text = self.levels
        try:
            ks = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--levels must be comma-separated integers, got {text!r}") from None
        if not ks or any(k < 1 for k in ks):
            raise ConfigError(f"--levels needs positive cluster counts, got {text!r}")
        if any(b >= a for a, b in itertools.pairwise(ks)):
            raise ConfigError(f"--levels must shrink from level to level, got {ks}")
        return ks


def expand_dates(settings: Any, url_fields: tuple[str, ...]) -> None:
    """Fill {date} and {previous_date} in the ``url_fields`` of ``settings`` from its
    ``run_date`` (default: today, UTC), which is set to the date used."""
    try:
        day = (
            datetime.date.fromisoformat(settings.run_date)
            if settings.run_date
            else datetime.datetime.now(datetime.timezone.utc).date()
        )
    except ValueError:
        raise ConfigError(f"--run-date must be YYYY-MM-DD, got {settings.run_date!r}") from None
    settings.run_date = day.isoformat()
    values = {"date": day.isoformat(), "previous_date": (day - datetime.timedelta(1)).isoformat()}
    for name in url_fields:
        url = getattr(settings, name)
        if url and "{" in url:
            try:
                setattr(settings, name, url.format(**values))
            except (KeyError, IndexError, ValueError):
                raise ConfigError(
                    f"--{name.replace('_', '-')} {url!r}: only {{date}} and "
                    "{previous_date} can be filled in"
                ) from None


def run_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are RunConfig settings: from a manifest's "config",
    or from another command's settings."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in values.items() if k in names}


def _as_in_run(name: str) -> Any:
    """RunConfig's field ``name`` (default, help) for another command's settings."""
    f = RunConfig.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, repr=f.repr, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


@dataclass
class LabelConfig:
    """``pseudolabel label``: rows labelled with centroids fitted before; nothing is fitted."""

    input: str = _as_in_run("input")
    output: str = _as_in_run("output")
    centroids: str = _opt(
        "",
        "a finished run's --output (its centroids; its duals if it was balanced), or a "
        "centroids .npy (k, d)",
        required=True,
        metavar="URL",
    )
    duals: str | None = _opt(
        None, "log duals .npy (k,) for balanced labels, as a run's duals.npy", metavar="URL"
    )
    epsilon: float | None = _opt(
        None,
        "the duals' eps in score units (a run's manifest balance.epsilon); default: the "
        "run's, when --centroids is a balanced run",
    )
    spherical: bool | None = _opt(
        None, "unit-normalise rows (cosine); default: the run's setting, else off"
    )
    topk: int = _as_in_run("topk")
    id_column: str | None = _as_in_run("id_column")
    embedding_column: str = _as_in_run("embedding_column")
    truth_column: str | None = _as_in_run("truth_column")
    keep_columns: str | None = _as_in_run("keep_columns")
    run_date: str | None = _as_in_run("run_date")
    dtype: str = _as_in_run("dtype")
    on_bad_rows: str = _as_in_run("on_bad_rows")
    cpus_per_worker: float = _as_in_run("cpus_per_worker")
    gpus_per_worker: float = _as_in_run("gpus_per_worker")
    label_workers: int | None = _as_in_run("label_workers")
    label_batch_rows: int = _as_in_run("label_batch_rows")
    max_restarts: int = _as_in_run("max_restarts")
    startup_timeout: float = _as_in_run("startup_timeout")
    task_timeout: float = _as_in_run("task_timeout")
    backend: str = _as_in_run("backend")
    ray_address: str | None = _as_in_run("ray_address")
    ray_num_cpus: int | None = _as_in_run("ray_num_cpus")
    storage_options: dict = _as_in_run("storage_options")  # noqa: RUF009 (a field, factory)
    overwrite: bool = _as_in_run("overwrite")

    def validate(self) -> LabelConfig:
        for name in ("input", "output", "centroids"):
            _require(bool(getattr(self, name)), f"--{name} is required")
        _require(self.topk >= 0, f"--topk must be >= 0, got {self.topk}")
        _require(self.epsilon is None or self.epsilon > 0, "--epsilon must be > 0")
        _require(not self.duals or bool(self.epsilon), "--duals need --epsilon")
        if self.id_column == "":
            self.id_column = None
        expand_dates(self, ("input", "output", "centroids", "duals"))  # as a run does
        return self


HEADS = ("linear", "mlp")


@dataclass
class TrainConfig:
    """``pseudolabel train``: a head trained with Ray Train on a finished run's labels."""

    input: str = _opt("", "the embeddings (as given to the run)", required=True, metavar="URL")
    labels: str = _opt("", "a finished run's --output", required=True, metavar="RUN_URL")
    output: str = _opt(
        "", "where the head, metrics and checkpoints go", required=True, metavar="URL"
    )
    head: str = _opt("mlp", "the head trained on the pseudo-labels", choices=HEADS)
    hidden: int = _opt(256, "MLP width", metavar="N")
    epochs: int = _opt(5, "training epochs", metavar="E")
    workers: int = _opt(2, "Ray Train workers", metavar="W")
    cpus_per_worker: float = _opt(0.5, "CPUs per Ray Train worker")
    batch_size: int = _opt(256, "rows per training step", metavar="N")
    # Adam on a small head: 1e-3 left a 4k-row mixture untrained.
    lr: float = _opt(1e-2, "Adam learning rate")
    label_column: str = _opt("label", "label (balanced, if the run was) or nearest_label")
    truth_column: str | None = _opt(
        None, "score against it: held-out accuracy after Hungarian matching"
    )
    heldout: float = _opt(0.1, "held-out share of the ids")
    rounds: int = _opt(0, "DeepCluster rounds: re-embed, re-cluster, retrain", metavar="R")
    compare: bool = _opt(False, "also train on nearest-centroid and random labels; probe all")
    seed: int = _opt(0, "random seed", metavar="S")
    overwrite: bool = _opt(
        False, "train anew into an output that holds another head (removes _SUCCESS first)"
    )
    id_column: str | None = _opt("id", "parquet id column")
    embedding_column: str = _opt("embedding", "parquet embedding column")
    storage_options: dict = field(
        default_factory=dict,
        repr=False,
        metadata={"help": 'fsspec options as JSON, e.g. {"endpoint_url": ...}', "json": True},
    )

    def validate(self) -> TrainConfig:
        for name in ("input", "labels", "output"):
            _require(bool(getattr(self, name)), f"--{name} is required")
        _require(self.head in HEADS, f"--head must be one of {HEADS}, got {self.head!r}")
        for name in ("epochs", "workers", "batch_size", "hidden"):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        _require(0 < self.heldout < 1, f"--heldout must be in (0, 1), got {self.heldout}")
        _require(not self.compare or bool(self.truth_column), "--compare needs --truth-column")
        return self

    def read_settings(self, extra_columns: tuple[str, ...] = ()) -> ReadSettings:
        """How the embeddings are read (float32; the dim comes from the plan)."""
        return ReadSettings(
            id_column=self.id_column,
            embedding_column=self.embedding_column,
            extra_columns=extra_columns,
            storage_options=self.storage_options,
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def fields(cls: type = RunConfig) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def load_yaml(path: str | Path, cls: type = RunConfig) -> dict[str, Any]:
    """Settings from a YAML mapping whose keys are fields of ``cls``."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}")
    return values


def build_config(cls: type, yaml_values: dict[str, Any] | None = None, **overrides: Any):
    """Defaults <- YAML <- overrides (None means "not given"), validated."""
    values = dict(yaml_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values).validate()
    except TypeError as e:
        raise ConfigError(str(e)) from None


def build(yaml_values: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """A validated RunConfig: defaults <- YAML <- overrides."""
    return build_config(RunConfig, yaml_values, **overrides)
