"""Nearest-centroid search whose cost grows slower than k: look only near where a row was.

Between two Lloyd iterations a row's nearest centroid is, almost always, its previous
centroid or one of that centroid's near neighbours. ``CentroidGraph`` turns that into a
search (the idea of Elkan, "Using the triangle inequality to accelerate k-means", ICML
2003, and of the neighbour-graph k-means of Deng & Zhao, without their bounds):

1. the k centroids are grouped into ``cells`` by a small k-means over the centroids
   themselves (the one loop: ``ops.kmeans.neighbour_graph`` fits them);
2. each centroid's ``NEIGHBOURS`` nearest centroids are found with a faiss inverted
   file over those cells (``PROBES`` cells probed);
3. a cell's candidates are its members and all of their neighbours;
4. a row is scored, with one GEMM per cell, against the candidates of the cell of its
   previous centroid; a row with none (a new row, a restarted worker's) starts from the
   centroid that an inverted file over the cells finds for it.

Invariant: a cell's candidates hold every member of the cell, so a row that starts from
its previous centroid is scored against that centroid too; its new distance is never
worse than keeping its old label, and Lloyd's objective still decreases every iteration.

Cost per row: (cells + candidates per cell) x d instead of k x d; at k = 65536 and d = 32
about 130 candidates per cell (``bench.scale``). Building the graph is O(k (cells +
PROBES k / cells) d), done once per iteration on the driver (or, where the workers hold
the centroids, on one of them); the workers receive the candidate lists, O(k NEIGHBOURS)
integers, without the centroids (``CentroidGraph.without_centroids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from pseudolabel.ops.arrays import (
    DEFAULT_CHUNK_ROWS,
    as_float32,
    iter_chunks,
    sorted_unique,
    squared_norms,
)
from pseudolabel.ops.scores import METRICS, scores, sq_distances_from_scores

# Measured at k = 65536, n = 600k, d = 32 (bench.scale): 16 neighbours probed in 4 cells
# reach flat search's objective to 6 digits in 1.2 s an iteration, 32 neighbours in 8
# cells the same in 1.6 s; flat takes 21.6 s.
NEIGHBOURS = 16
PROBES = 4
# Probes go up where cells are small (small k), so that a search scans at least this
# many centroids per wanted neighbour: at k = 256 every cell is probed.
SCAN_PER_NEIGHBOUR = 16
CELLS_PER_SQRT_K = 4  # cells = 4 sqrt(k), about 64 centroids a cell at k = 65536
# New rows (no previous centroid) probe this many cells, then take one graph step from
# the centroid found: 0.23x flat's time at 1.0005x its distances (bench.scale).
FRESH_PROBES = 8
# Rows scored at once within a cell: bounds the (rows, candidates) score block.
CELL_CHUNK_ROWS = 8192


@dataclass
class CentroidGraph:
    """Candidate lists for the nearest-centroid search, built from ``centroids``.

    cell_of (k,) int64: each centroid's cell. cell_centres (c, d) float32: the cells'
    centres. offsets (c + 1,), candidates: cell i's candidates are
    ``candidates[offsets[i]:offsets[i + 1]]``, sorted centroid ids.
    """

    centroids: np.ndarray | None  # None while it travels: ``without_centroids``
    metric: str
    cell_of: np.ndarray
    cell_centres: np.ndarray
    offsets: np.ndarray
    candidates: np.ndarray
    _ivf: faiss.IndexIVFFlat | None = field(default=None, repr=False, compare=False)

    # partial_stats hands the search this many rows at once: rows are grouped by cell.
    rows_per_call = 1 << 22

    @property
    def k(self) -> int:
        return len(self.cell_of)

    @property
    def d(self) -> int:
        return self.cell_centres.shape[1]

    def without_centroids(self) -> CentroidGraph:
        """The graph less its centroids, to send where the centroids are sent anyway
        (a worker's step): k x d x 4 bytes less a step. ``with_centroids`` there."""
        return replace(self, centroids=None, _ivf=None)

    def with_centroids(self, centroids: np.ndarray) -> CentroidGraph:
        """The graph searching ``centroids``, the ones it was built from."""
        if centroids.shape != (self.k, self.d):
            raise ValueError(f"a graph of {self.k} x {self.d} centroids, got {centroids.shape}")
        return replace(self, centroids=as_float32(centroids), _ivf=None)

    @property
    def cells(self) -> int:
        return len(self.cell_centres)

    def start_cells(self, x: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """Each row's cell: its previous centroid's where ``previous`` (labels, -1 for
        none) says. A new row starts from the nearest centroid that an inverted file over
        the cells finds in its ``FRESH_PROBES`` nearest cells: the nearest cell alone
        misses often, because a cell's centre, a mean of its members, can lie far from
        all of them."""
        start = np.full(len(x), -1, np.int64)
        if previous is not None:  # labels from other centroids (another k) do not count
            known = (previous >= 0) & (previous < self.k)
            start[known] = self.cell_of[previous[known]]
        fresh = np.flatnonzero(start < 0)
        if fresh.size:
            index = self._inverted_file()
            for sl in iter_chunks(fresh.size, DEFAULT_CHUNK_ROWS):
                found = index.search(as_float32(x[fresh[sl]]), 1)[1][:, 0]
                start[fresh[sl]] = self.cell_of[found]
        return start

    def _inverted_file(self) -> faiss.IndexIVFFlat:
        """The centroids in an inverted file over the cells, built where first needed
        (faiss indices do not travel to workers; the build is one pass over k)."""
        if self._ivf is None:
            self._ivf = inverted_file(self.centroids, self.cell_centres, FRESH_PROBES, 1)
        return self._ivf

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ivf": None}

    def search(
        self, x: np.ndarray, m: int = 1, previous: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """x (n, d) -> D (n, m) float32, I (n, m) int64 in faiss's conventions (squared
        L2 for "l2", inner products for "ip"), best first, among each row's candidates.
        Slots beyond a cell's candidate count hold I = -1 and the worst distance."""
        n = len(x)
        worst = np.inf if self.metric == "l2" else -np.inf
        D = np.full((n, m), worst, np.float32)
        I = np.full((n, m), -1, np.int64)
        start = self.start_cells(x, previous)
        order = np.argsort(start, kind="stable")
        bounds = np.searchsorted(start[order], np.arange(self.cells + 1))
        for cell in np.flatnonzero(np.diff(bounds)):
            cand = self.candidates[self.offsets[cell] : self.offsets[cell + 1]]
            mine = order[bounds[cell] : bounds[cell + 1]]
            top = min(m, len(cand))
            for sl in iter_chunks(len(mine), CELL_CHUNK_ROWS):
                rows = mine[sl]
                xr = as_float32(x[rows])
                s = scores(xr, self.centroids[cand], self.metric)  # larger is nearer
                best = _top(s, top)
                picked = np.take_along_axis(s, best, axis=1)
                I[rows, :top] = cand[best]
                if self.metric == "l2":
                    D[rows, :top] = sq_distances_from_scores(picked, squared_norms(xr)[:, None])
                else:
                    D[rows, :top] = picked
        return D, I


def _top(s: np.ndarray, m: int) -> np.ndarray:
    """Column indices of each row's m largest scores, largest first."""
    if m == 1:
        return s.argmax(axis=1)[:, None]
    part = np.argpartition(-s, m - 1, axis=1)[:, :m]
    within = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, within, axis=1)


def cell_count(k: int) -> int:
    """Cells for k centroids: CELLS_PER_SQRT_K sqrt(k), within [1, k]."""
    return int(np.clip(round(CELLS_PER_SQRT_K * np.sqrt(k)), 1, k))


def graph_from_cells(
    centroids: np.ndarray,
    cell_centres: np.ndarray,
    metric: str = "l2",
    neighbours: int = NEIGHBOURS,
    probes: int = PROBES,
) -> CentroidGraph:
    """The candidate lists for ``centroids`` (k, d) grouped around ``cell_centres``
    (``ops.kmeans.neighbour_graph`` fits them). For "ip" the centroids are unit vectors,
    whose L2 order is their inner-product order, so cells and neighbours are found in
    L2 either way."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    c = as_float32(centroids)
    k, d = c.shape
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(as_float32(cell_centres))
    cell_of = quantizer.search(c, 1)[1][:, 0]
    # Cells that hold no centroid are dropped: every row must start where candidates are.
    used = sorted_unique(cell_of)
    centres = np.ascontiguousarray(cell_centres[used], np.float32)
    cell_of = np.searchsorted(used, cell_of)
    wanted = min(neighbours, k)
    near = inverted_file(c, centres, probes, wanted).search(c, wanted)[1]

    # A cell's candidates: its members and every member's neighbours (-1: fewer found).
    pairs_cell = np.concatenate([cell_of, np.repeat(cell_of, near.shape[1])])
    pairs_id = np.concatenate([np.arange(k), near.ravel()])
    keep = pairs_id >= 0
    pairs = sorted_unique(pairs_cell[keep] * k + pairs_id[keep])  # by cell, then id
    cand_cell, candidates = np.divmod(pairs, k)
    offsets = np.searchsorted(cand_cell, np.arange(len(used) + 1))
    return CentroidGraph(c, metric, cell_of, centres, offsets, candidates)


def inverted_file(
    centroids: np.ndarray, cell_centres: np.ndarray, probes: int, wanted: int
) -> faiss.IndexIVFFlat:
    """A faiss IndexIVFFlat holding ``centroids`` in the lists of ``cell_centres``,
    probing ``probes`` cells, or more where that scans fewer than SCAN_PER_NEIGHBOUR
    centroids per ``wanted`` result."""
    d = centroids.shape[1]
    per_cell = len(centroids) / len(cell_centres)
    probes = max(probes, int(np.ceil(SCAN_PER_NEIGHBOUR * wanted / per_cell)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, len(cell_centres))
    ivf.quantizer.add(cell_centres)  # a trained quantizer: IVF's own training is skipped
    ivf.is_trained = True
    ivf.add(centroids)
    ivf.nprobe = min(probes, len(cell_centres))
    return ivf
