"""The k-means loop, written once against ``ops.dataset.ShardedData``.

Lloyd's algorithm and mini-batch k-means share the state, the empty-cluster split, the
stopping rule and the per-iteration record; they differ only in the update:

* Lloyd: c_j = s_j / n_j from the statistics of a full pass.
* Mini-batch (Sculley, "Web-scale k-means clustering", WWW 2010; scikit-learn's
  ``_mini_batch_step``): with per-centroid weights w_j, each batch with counts b_j and
  sums s_j moves c_j by the learning rate b_j / w_j, i.e. c_j <- c_j + (s_j - b_j c_j) / w_j.

The dataset may be an in-memory matrix or a set of Ray actors; nothing here knows which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.dataset import ArrayData, EpochLost, ShardedData, StreamingData
from pseudolabel.ops.init import init_sample_size, resolve_init, seed_centroids
from pseudolabel.ops.neighbours import CentroidGraph, cell_count, graph_from_cells
from pseudolabel.ops.stats import PartialStats, reduce_stats, tree_sum

ALGORITHMS = ("lloyd", "minibatch")
SEARCHES = ("flat", "approx", "auto")
# "auto" searches near the previous centroid (``ops.neighbours``) from this many centres:
# below it an exact search is cheap enough, and the graph's build does not pay.
APPROX_FROM_K = 16384

# Inertia moves this little (relative) between steps with the same labels: float32
# distances found by different routes (a search, or ops.bounds' direct one) round apart.
ROUNDING_REL = 1e-6

# Relative size of the split perturbation, as in faiss's Clustering.cpp (1/1024).
SPLIT_EPS = 1.0 / 1024


@dataclass(frozen=True)
class KMeansParams:
    k: int
    algorithm: str = "lloyd"
    iterations: int = 20  # Lloyd iterations, or mini-batch epochs
    tol: float = 1e-4  # stop once inertia improves by less than this fraction
    seed: int = 0
    spherical: bool = False
    init: str = "auto"  # auto | kmeans++ | random
    search: str = "auto"  # flat | approx | auto: see resolve_search

    @property
    def metric(self) -> str:
        """Inner products of unit vectors for spherical k-means, else squared L2."""
        return "ip" if self.spherical else "l2"

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.search == "approx" and self.algorithm != "lloyd":
            raise ValueError("search 'approx' needs algorithm 'lloyd': it starts each row "
                             "from its label of the previous full pass")  # fmt: skip

    @property
    def resolved_search(self) -> str:
        """ "flat" or "approx": "auto" is approx for Lloyd fits from APPROX_FROM_K."""
        return resolve_search(self.search, self.k, self.algorithm)


def resolve_search(search: str, k: int, algorithm: str = "lloyd") -> str:
    """ "auto" -> "approx" for Lloyd with k >= APPROX_FROM_K, else "flat"."""
    if search == "auto":
        return "approx" if algorithm == "lloyd" and k >= APPROX_FROM_K else "flat"
    return search


@dataclass
class IterationRecord:
    """One progress line: inertia is measured with the centroids the iteration started from."""

    iteration: int
    inertia: float
    rel_change: float | None
    seconds: float
    n_split: int
    rows: int
    steps: int = 1
    changed: int | None = None  # rows whose label differs from the previous iteration's

    def line(self, total: int) -> str:
        change = "      -" if self.rel_change is None else f"{-100 * self.rel_change:+7.3f}%"
        steps = f"  steps {self.steps}" if self.steps > 1 else ""
        return (
            f"iter {self.iteration:>3}/{total}  inertia {self.inertia:.6e}  {change}"
            f"  {self.seconds:6.2f} s  split {self.n_split}{steps}"
        )


class HeldCentroids(Protocol):
    """Centroids kept where they were computed: a reduce-scatter's slices, each on the
    worker that summed it (``pipelines.runtime.held.SlicedCentroids``). The loop hands
    them back to the data that holds them. Only a split of empty clusters (it needs the
    donors' rows) and the end of ``fit`` fetch them here."""

    def __len__(self) -> int: ...

    def fetch(self) -> np.ndarray:
        """All k centroids, (k, d) float32, here."""
        ...

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> HeldCentroids:
        """These centroids with ``fn`` applied to their rows where they are used: ``fn``
        must treat each row on its own (``normalize_rows``), so that any slicing gives
        the same bits."""
        ...

    def derive(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(centroids, *args)`` computed where the centroids are, as a value the
        data holding them takes back (a ``neighbour_graph`` for its ``partial_stats``),
        and whose ``fetch()`` gives it here; ``args`` may be such values."""
        ...


def fetched(centroids: np.ndarray | HeldCentroids) -> np.ndarray:
    """The centroids as an array here: ``HeldCentroids.fetch`` where they are held."""
    return centroids if isinstance(centroids, np.ndarray) else centroids.fetch()


@dataclass
class KMeansState:
    """Everything a resumed fit needs; ``pipelines.io.checkpoints.Checkpoints`` stores it."""

    # (k, d) float32; while ``fit`` runs on a reduce-scatter, possibly HeldCentroids
    centroids: np.ndarray | HeldCentroids
    iteration: int = 0  # iterations (or epochs) completed
    weight_sums: np.ndarray | None = None  # (k,) float64, mini-batch only
    history: list[IterationRecord] = field(default_factory=list)
    converged: bool = False
    extra: dict = field(default_factory=dict)  # JSON-able notes of steps after the loop

    def history_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.history]


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, iteration): resuming replays nothing."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def split_empty_clusters(
    centroids: np.ndarray, weights: np.ndarray, rng: np.random.Generator
) -> int:
    """Replace each empty cluster by half of a large one, in place, as faiss does.

    centroids (k, d) float32, weights (k,) counts or weight sums. A donor j is drawn with
    probability proportional to max(w_j - 1, 0); the empty centroid and j move to
    c_j + delta and c_j - delta and share its weight. Returns the number of splits.

    faiss uses delta = +-EPS * c_j with a fixed sign pattern; those factors commute, so a
    cluster split twice, (c (1 + EPS)) (1 - EPS) = (c (1 - EPS)) (1 + EPS), yields two
    identical centroids. Here each split draws its own direction, and a floor moves zero
    coordinates as well.
    """
    k, d = centroids.shape
    empty = np.flatnonzero(weights == 0)
    n_split = 0
    while empty.size:
        p = np.maximum(weights - 1.0, 0.0)
        if p.sum() <= 0:
            break  # every cluster holds at most one point: nothing left to split
        donors = rng.choice(k, size=min(empty.size, int((p > 0).sum())), p=p / p.sum())
        for ci, cj in zip(empty, donors, strict=False):  # donors may be fewer
            c = centroids[cj].copy()
            scale = np.maximum(np.abs(c), 1e-6 * (np.abs(c).max() + 1e-3))
            delta = (SPLIT_EPS * rng.uniform(-1.0, 1.0, d) * scale).astype(np.float32)
            centroids[ci] = c + delta
            centroids[cj] = c - delta
            weights[ci] = weights[cj] / 2 if weights.dtype.kind == "f" else weights[cj] // 2
            weights[cj] -= weights[ci]
            n_split += 1
        empty = empty[len(donors) :]
    return n_split


def cluster_means(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """c_j = s_j / n_j as float32 where n_j > 0; an empty cluster keeps its centroid (the
    split follows). Any slice of the k centroids with its sums and counts works alike."""
    new = centroids.copy()
    filled = counts > 0
    new[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return new


def reduce_slice(
    centroids: np.ndarray, parts: list[PartialStats]
) -> tuple[np.ndarray, PartialStats]:
    """One worker's share of a reduce-scatter: the workers' statistics of one slice of
    the centroids (``PartialStats.split``), summed as the driver would sum whole ones
    (``ops.stats.tree_sum``), to that slice's means, and its counts and scalars without
    sums (``join_slices``): the means stay with the worker, the rest goes to the driver."""
    total = tree_sum(parts, reduce_stats)
    means = cluster_means(centroids, total.sums, total.counts)
    total.sums = None
    return means, total


def lloyd_update(
    centroids: np.ndarray | HeldCentroids,
    stats: PartialStats,
    rng: np.random.Generator,
    spherical: bool,
) -> tuple[np.ndarray | HeldCentroids, int]:
    """New centroids c_j = s_j / n_j, empty clusters split. Returns (centroids, n_split).

    The means come from ``stats.means`` when the workers computed them (reduce-scatter),
    else from the sums here: the same arithmetic, the same bits. Means held on the
    workers stay there unless a cluster is empty: the split needs the donors' rows, so
    it fetches them and runs here, on k x d."""
    counts = stats.counts
    held = stats.means is not None and not isinstance(stats.means, np.ndarray)
    if held and counts.all():  # nothing to split (split_empty_clusters would do nothing)
        return (stats.means.map_rows(normalize_rows) if spherical else stats.means), 0
    if held:
        new = stats.means.fetch()
    elif stats.means is not None:
        new = stats.means.copy()
    else:
        new = cluster_means(fetched(centroids), stats.sums, counts)
    n_split = split_empty_clusters(new, counts.copy(), rng)
    if spherical:
        new = normalize_rows(new)
    return new, n_split


def minibatch_update(
    centroids: np.ndarray, weight_sums: np.ndarray, stats: PartialStats, spherical: bool
) -> None:
    """Sculley's step with per-centroid learning rates b_j / w_j, in place.

    centroids (k, d) float32, weight_sums (k,) float64 (updated), stats of one batch.
    """
    b = stats.counts
    hit = b > 0
    weight_sums[hit] += b[hit]
    w = weight_sums[hit, None]
    c = centroids[hit].astype(np.float64)
    updated = c + (stats.sums[hit] - b[hit, None] * c) / w
    centroids[hit] = normalize_rows(updated) if spherical else updated.astype(np.float32)


def init_state(
    data: ShardedData,
    params: KMeansParams,
    init_centroids: np.ndarray | None = None,
    max_sample: int | None = None,
) -> tuple[KMeansState, str]:
    """Seed the fit from a sample of ``data`` (or given centroids). Returns (state, init).

    ``max_sample`` caps the rows the seeding draws (``ops.init.init_sample_size`` else).
    """
    if init_centroids is not None:
        centroids, init = np.ascontiguousarray(init_centroids, dtype=np.float32), "given"
        if params.spherical:
            centroids = normalize_rows(centroids)
    else:
        init = resolve_init(params.init, params.k)
        size = init_sample_size(init, params.k, data.count(), data.dim())
        sample = data.sample(min(size, max_sample or size), params.seed)
        if len(sample) < params.k:  # rows were left out as bad, or there are too few
            raise ValueError(f"k={params.k} exceeds the {len(sample)} rows to seed from")
        centroids = seed_centroids(sample, params.k, init, rng_for(params.seed, 0))
    weights = np.zeros(params.k) if params.algorithm == "minibatch" else None
    return KMeansState(centroids, weight_sums=weights), init


def fit(
    data: ShardedData,
    params: KMeansParams,
    state: KMeansState,
    on_iteration: Callable[[KMeansState, IterationRecord], None] | None = None,
    on_step: Callable[[KMeansState, int, PartialStats], None] | None = None,
) -> KMeansState:
    """Run iterations ``state.iteration .. params.iterations - 1`` and return the state.

    Stops early once inertia improves by less than ``params.tol`` (relative) in an
    iteration that split no cluster. ``on_iteration`` runs after each one (progress,
    checkpoint); ``on_step`` after each mini-batch update (step number, batch stats).
    Same data, seed and state give the same centroids (invariant 4).

    With ``params.resolved_search == "approx"`` the first iteration of each call is an
    exact search; each later one builds the centroids' neighbour graph
    (``ops.neighbours``) and the data scores each row only near its previous centroid.

    Centroids the data keeps on its workers (``HeldCentroids``, a reduce-scatter) stay
    there between iterations, the graph built beside them; the state's centroids are
    fetched once, at the end.
    """
    if params.algorithm == "minibatch" and not isinstance(data, StreamingData):
        raise TypeError("mini-batch k-means needs a dataset with start_epoch/next_batch_stats")
    prev = state.history[-1].inertia if state.history else None
    first = state.iteration
    near: Any = None  # the last approx iteration's graph (or the data's handle of it)
    for it in range(state.iteration, params.iterations):
        t0 = time.perf_counter()
        rng = rng_for(params.seed, 1, it)
        if params.algorithm == "lloyd":
            if params.resolved_search == "approx" and it > first:
                if isinstance(state.centroids, np.ndarray):
                    if near is not None and not isinstance(near, CentroidGraph):
                        near = near.fetch()  # built beside held centroids before a split
                    near = neighbour_graph(state.centroids, params.metric, params.seed, near)
                else:
                    near = state.centroids.derive(neighbour_graph, params.metric, params.seed, near)
            else:
                near = None
            stats = data.partial_stats(state.centroids, near)
            state.centroids, n_split = lloyd_update(state.centroids, stats, rng, params.spherical)
            inertia, rows, steps = stats.inertia, stats.n, 1
            # The first iteration of a call has no labels of its own to compare with:
            # the data's are from before (another fit on the same workers, or none).
            known = it > first and stats.compared == stats.n
            changed = stats.changed if known else None
        else:
            inertia, rows, steps, n_split = _whole_minibatch_epoch(data, state, params, it, on_step)
            changed = None
        rel = None if not prev else (prev - inertia) / prev
        if rel is not None and abs(rel) < ROUNDING_REL:
            rel = 0.0  # rounding, not a change: a tol of 0 runs every iteration
        record = IterationRecord(
            it + 1, inertia, rel, time.perf_counter() - t0, n_split, rows, steps, changed
        )
        state.history.append(record)
        state.iteration = it + 1
        prev = inertia
        state.converged = rel is not None and n_split == 0 and rel < params.tol
        if on_iteration is not None:
            on_iteration(state, record)
        if state.converged:
            break
    state.centroids = fetched(state.centroids)  # held on the workers: gathered once
    return state


# The cells of the neighbour graph only group centroids: a rough k-means is enough.
CELL_ITERATIONS = 5
# Cells that start from the previous iteration's cells (the centroids moved little)
# need fewer: the build's cost, 2 k c d per cell iteration, is most of an approx step.
CELL_ITERATIONS_WARM = 1


def neighbour_graph(
    centroids: np.ndarray,
    metric: str = "l2",
    seed: int = 0,
    previous: CentroidGraph | None = None,
) -> CentroidGraph:
    """``ops.neighbours``' search structure for ``centroids``: its cells are this module's
    loop run on the centroids themselves (exact search): CELL_ITERATIONS from a random
    seeding, or CELL_ITERATIONS_WARM from ``previous``' cells, the graph of the same
    centroids one Lloyd step earlier."""
    cells = cell_count(len(centroids))
    warm = previous is not None and previous.d == centroids.shape[1]
    params = KMeansParams(
        cells, iterations=CELL_ITERATIONS_WARM if warm else CELL_ITERATIONS, tol=0,
        seed=seed, init="random", search="flat",
    )  # fmt: skip
    data = ArrayData(np.ascontiguousarray(centroids, np.float32))
    if warm:  # cells left without a centroid were dropped: refill from the centroids
        missing = max(cells - previous.cells, 0)
        extra = data.x[rng_for(seed, 3).choice(len(data.x), missing, replace=False)]
        state = KMeansState(np.concatenate([previous.cell_centres[:cells], extra]))
    else:
        state, _ = init_state(data, params)
    return graph_from_cells(data.x, fit(data, params, state).centroids, metric)


# An epoch lost this many times in a row (each loss a rebuilt worker) ends the fit.
MAX_EPOCH_RESTARTS = 10


def _whole_minibatch_epoch(
    data: StreamingData,
    state: KMeansState,
    params: KMeansParams,
    epoch: int,
    on_step: Callable[[KMeansState, int, PartialStats], None] | None,
) -> tuple[float, int, int, int]:
    """One mini-batch epoch that saw every row: after an ``EpochLost`` the epoch runs
    again from the centroids, weights and random stream it started with: no update of
    the lost attempt survives, and the epoch that counts sees every row once."""
    centroids, weights = state.centroids.copy(), state.weight_sums.copy()
    for attempt in range(MAX_EPOCH_RESTARTS + 1):
        try:
            rng = rng_for(params.seed, 1, epoch)
            return _minibatch_epoch(data, state, params, rng, epoch, on_step)
        except EpochLost:
            if attempt == MAX_EPOCH_RESTARTS:
                raise
            state.centroids, state.weight_sums = centroids.copy(), weights.copy()
    raise AssertionError("unreachable")


def _minibatch_epoch(
    data: StreamingData,
    state: KMeansState,
    params: KMeansParams,
    rng: np.random.Generator,
    epoch: int,
    on_step: Callable[[KMeansState, int, PartialStats], None] | None,
) -> tuple[float, int, int, int]:
    """One pass in mini-batches. Inertia sums each batch's cost before its update."""
    data.start_epoch(epoch)
    inertia, rows, steps, n_split = 0.0, 0, 0, 0
    while (stats := data.next_batch_stats(state.centroids)) is not None:
        inertia += stats.inertia
        rows += stats.n
        steps += 1
        minibatch_update(state.centroids, state.weight_sums, stats, params.spherical)
        split = split_empty_clusters(state.centroids, state.weight_sums, rng)
        if split and params.spherical:
            state.centroids = normalize_rows(state.centroids)
        n_split += split
        if on_step is not None:
            on_step(state, steps, stats)
    if rows == 0:
        raise RuntimeError(f"mini-batch epoch {epoch + 1} saw no rows")
    return inertia, rows, steps, n_split
