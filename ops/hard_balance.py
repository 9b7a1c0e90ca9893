"""Hard balance: column duals g whose argmax labels meet integer target sizes.

Sinkhorn's entropic plan is balanced as a plan, but its hard labels argmax_j S_ij + beta_j
are only roughly so: rows near a boundary are split in the plan and go whole to one side
in the labels (sizes within +-15% at 200 rows per cluster). This module moves beta to g
so that the hard counts c_j(g) = #{i : argmax_l S_il + g_l = j} meet targets t_j.

Why that is the exact balanced optimum: if the argmax labels a_i under g have sizes t,
then for any labelling a' with the same sizes,

    sum_i S_ia'_i = sum_i (S_ia'_i + g_a'_i) - sum_j t_j g_j
                 <= sum_i max_j (S_ij + g_j) - sum_j t_j g_j = sum_i S_ia_i,

so a has the least total squared distance of all labellings with those sizes (g is the
dual of the balanced assignment LP). Sizes within a few rows of t certify the optimum for
sizes within a few rows of t.

The method is Newton's, as for semi-discrete optimal transport (Kitagawa, Merigot &
Thibert, "Convergence of a Newton algorithm for semi-discrete optimal transport", JEMS
2019), on the smoothed dual

    F_h(g) = sum_i h log sum_j exp((S_ij + g_j) / h) - sum_j t_j g_j,

smooth and convex, with gradient soft - t (soft_j = sum_i p_ij, p_i the softmax of
(S_i + g) / h) and Hessian a graph Laplacian whose weight between clusters j and l is
sum_i p_ij p_il / h: the density of rows on their boundary, seen at width h. Over each
row's few best columns, so that a pass costs O(n) after the first. Steps are sized by a
line search on F_h: a step that does not lower it is halved and tried again.
F_h -> F = sum_i max_j (S_ij + g_j) - sum_j t_j g_j as h -> 0, so h is halved whenever
F_h's minimum is reached (continuation, as Sinkhorn's eps-scaling), until the hard sizes
are within the tolerance. It starts at Sinkhorn's final eps, from Sinkhorn's duals: near
F_h's minimum already, up to the sample's error. (An earlier version took Newton steps on
the hard counts with the kernel's Hessian and accepted them by F: the two disagree, and at
1M x 128, k = 1000 it stopped 5% off after 30 passes; this one reaches 0.6% in 32.)
A pass over the rows returns k-vectors (counts, soft counts, gaps), F_h's first term
and the summed pair weights: never rows, so it runs where the rows are, at any
scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pseudolabel.ops.arrays import iter_chunks
from pseudolabel.ops.scores import BLOCK_ROWS, AugmentedScores, scores
from pseudolabel.ops.sinkhorn import (
    DEFAULT_EPSILON,
    RowShards,
    SinkhornResult,
    sample_tolerance,
    sinkhorn,
)

# Each row's CANDIDATES best clusters enter the kernel: a row near a corner where several
# clusters meet moves to any of them (in d = 128, k = 1000, a cluster touches ~50 others).
CANDIDATES = 4
# Passes after the first score the HOT columns whose duals moved most exactly, and bound
# the others by the largest remaining move (see BoundaryBlock).
HOT = 32
REBASE = 0.5  # a pass that would score more than this share of rows afresh scores all
MAX_EPOCHS = 64  # and so does a pass after this many partial ones
# A row whose best column beats every other by this many kernel widths after the duals'
# moves is settled: a pass adds it without looking at it (see BoundaryBlock._active).
# e^-16 ~ 1e-7 of soft mass a row is left out. A pass that would look at more than
# SETTLE_SHARE of the rows looks at all of them and settles them again.
SETTLED_WIDTHS = 16.0
SETTLE_SHARE = 0.5
NEGLIGIBLE = 1e-4  # pair weights below this / h are left out (rows ~9 widths off a boundary)
# A lone cluster (no rows near its boundary) moves just past the gap it must cross, by
# PAST kernel widths.
PAST = 1e-3
RIDGE = 1e-3  # L + RIDGE diag L: positive definite within a group, nearly Newton's step
# Continuation: F_h counts as solved once every soft size is within SOFT_SHARE of the
# tolerance; h then shrinks by STAGE_FACTOR. After a halved step, the next tries RECOVER x.
SOFT_SHARE = 0.5
STAGE_FACTOR = 0.5
RECOVER = 2.0
# A cluster is linked (takes Newton moves) when its curvature is at least LINK / h: a row
# right on its boundary adds 1 / (4h). Measured passes to 1% (1M x 128 k = 1000; 200k x 128
# k = 200; 300k x 128 k = 3000): 0.25: 24, 18, not in 40; 0.1: 18, 14, 38; 0.01: 26, 16,
# not in 40. Below, a cluster moves only past its nearest row, a row a pass.
LINK = 0.1
REACH = 64.0  # a Newton move spans at most this many kernel widths (see newton_step)
DEFAULT_TOL = 0.01  # each size within 1% of its target (and at least 1 row)
FAR_OFF = 4.0  # passes ending further off than this many tolerances restart Sinkhorn


@dataclass
class Boundary:
    """What one pass over rows learns about the hard labels under g (sums over shards)."""

    counts: np.ndarray  # (k,) int64: rows whose argmax_j S_ij + g_j is j
    pairs: np.ndarray  # (p,) int64 codes j * k + l, j < l: clusters sharing near rows
    weights: np.ndarray  # (p,) float64: the kernel weight summed over those rows
    enter_gap: np.ndarray  # (k,) least rise of g_j that brings some row into j (inf: none)
    leave_gap: np.ndarray  # (k,) least fall of g_j that lets one of j's rows go (inf: none)
    # The smoothed problem at the pass's width h, over each row's candidates:
    soft: np.ndarray = field(default_factory=lambda: np.empty(0))  # (k,) sum_i p_ij
    soft_total: float = 0.0  # sum_i h log sum_j exp((S_ij + g_j) / h)

    def smoothed_objective(self, g: np.ndarray, targets: np.ndarray) -> float:
        """F_h(g) = sum_i h lse_j((S_ij + g_j) / h) - sum_j t_j g_j: smooth and convex, with
        gradient soft - t and Hessian the Laplacian of the pair weights; F_h -> F as h -> 0."""
        return self.soft_total - float(np.dot(targets, g))

    @staticmethod
    def merge(parts: list[Boundary]) -> Boundary:
        """The sum over shards; pair weights are added per pair, in pair order."""
        codes = np.concatenate([p.pairs for p in parts])
        weights = np.concatenate([p.weights for p in parts])
        pairs, inverse = np.unique(codes, return_inverse=True)
        return Boundary(
            counts=np.sum([p.counts for p in parts], axis=0),
            pairs=pairs,
            weights=np.bincount(inverse, weights, len(pairs)),
            enter_gap=np.min([p.enter_gap for p in parts], axis=0),
            leave_gap=np.min([p.leave_gap for p in parts], axis=0),
            soft=np.sum([p.soft for p in parts], axis=0),
            soft_total=float(sum(p.soft_total for p in parts)),
        )


class BoundaryShards(Protocol):
    """Rows over however many shards; ``boundary`` includes the sum over shards."""

    def boundary(self, g: np.ndarray, width: float, fresh: bool = False) -> Boundary:
        """``fresh``: score every row anew, keeping nothing of earlier passes (the first
        pass of a solve)."""
        ...


@dataclass
class _Part:
    """One block of rows' statistics before the sum: counts, gaps, pair weights."""

    counts: np.ndarray
    enter: np.ndarray
    leave: np.ndarray
    soft: np.ndarray
    codes: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    soft_total: float = 0.0

    @classmethod
    def empty(cls, k: int) -> _Part:
        return cls(np.zeros(k, np.int64), np.full(k, np.inf), np.full(k, np.inf), np.zeros(k))

    def add_candidates(self, best: np.ndarray, z: np.ndarray, width: float) -> None:
        """Rows given by their candidate columns ``best`` (m, top) and adjusted scores
        ``z`` (float64, each row's best first, the rest in any order): counts, leave gaps,
        candidates' enter gaps, the softmax at temperature ``width`` over the candidates
        and its pair weights."""
        k = len(self.counts)
        self.counts += np.bincount(best[:, 0], minlength=k)
        if best.shape[1] == 1:
            self.soft += np.bincount(best[:, 0], minlength=k)
            self.soft_total += float(z[:, 0].sum())
            return
        np.minimum.at(self.leave, best[:, 0], z[:, 0] - _row_reduce(np.maximum, z[:, 1:]))
        np.minimum.at(self.enter, best[:, 1:].ravel(), (z[:, :1] - z[:, 1:]).ravel())
        p = np.exp((z - z[:, :1]) / width)
        mass = _row_reduce(np.add, p)
        self.soft_total += float((z[:, 0] + width * np.log(mass)).sum())
        p /= mass[:, None]
        self.soft += np.bincount(best.ravel(), p.ravel(), k)
        codes, weights = _softmax_pairs(best, p, width, k)
        self.codes.append(codes)
        self.weights.append(weights)

    def result(self) -> Boundary:
        if self.codes:
            pairs, inverse = np.unique(np.concatenate(self.codes), return_inverse=True)
            w = np.bincount(inverse, np.concatenate(self.weights), len(pairs))
        else:
            pairs, w = np.empty(0, np.int64), np.empty(0)
        out = Boundary(self.counts, pairs, w, self.enter, self.leave)
        out.soft, out.soft_total = self.soft, self.soft_total
        return out


@dataclass
class _Look:
    """What every chunk of a cached pass shares: the duals, the width, the HOT columns
    (scored exactly) and the bound's slack per epoch."""

    g: np.ndarray
    width: float
    hot: np.ndarray
    shifts: np.ndarray
    hot_centroids: np.ndarray

    def __post_init__(self) -> None:
        self.hot_slot = np.full(len(self.g), -1)
        self.hot_slot[self.hot] = np.arange(len(self.hot))


def _candidates(
    x: np.ndarray, scorer: AugmentedScores, g: np.ndarray, part: _Part
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every column of rows x under g: enter gaps over all columns into ``part``; returns
    the rows' CANDIDATES best columns (m, top), their adjusted scores (float32, best
    first) and the best adjusted score outside them (m,), -inf when there is none. A
    block of scores at a time, while it is in cache (``AugmentedScores``)."""
    n, k = len(x), scorer.k
    top = min(k, CANDIDATES)
    best = np.empty((n, top), np.int64)
    z = np.empty((n, top), np.float32)
    outside = np.full(n, -np.inf, np.float32)
    reach = np.full(k, -np.inf, np.float32)  # max_i S_ij + g_j - z_i0 over rows not in j
    g32 = np.asarray(g, np.float32)
    for sl in iter_chunks(n, BLOCK_ROWS):
        S = scorer.block(x[sl])
        S += g32
        # The best columns by repeated argmax (an argpartition of the whole row costs 5x
        # the sgemm here), masked while found; all but the best are restored afterwards.
        rows, b, zb = np.arange(len(S)), best[sl], z[sl]
        for r in range(top):
            b[:, r] = S.argmax(axis=1)
            zb[:, r] = S[rows, b[:, r]]
            S[rows, b[:, r]] = -np.inf
        if top < k:
            outside[sl] = S.max(axis=1)
        for r in range(1, top):
            S[rows, b[:, r]] = zb[:, r]
        S -= zb[:, :1]  # -(the rise of g_j that would bring row i into j); its own: -inf
        np.maximum(reach, S.max(axis=0), out=reach)
    part.enter = np.minimum(part.enter, -reach.astype(np.float64))
    return best, z, outside


def boundary(
    x: np.ndarray,
    centroids: np.ndarray,
    metric: str,
    g: np.ndarray,
    width: float,
    chunk_rows: int = 8192,
) -> Boundary:
    """One block of rows' ``Boundary`` under duals g (k,) and kernel width (score units),
    every score computed afresh."""
    part = _Part.empty(len(centroids))
    scorer = AugmentedScores(centroids, metric)
    for sl in iter_chunks(len(x), chunk_rows):
        best, z, _ = _candidates(x[sl], scorer, g, part)
        part.add_candidates(best, z.astype(np.float64), width)
    return part.result()


class BoundaryBlock:
    """One block of rows (``BoundaryShards`` for one process; a Ray worker holds one for
    its rows), with the candidates of its last full pass kept for the next passes.

    Passes after the first cost O(n x CANDIDATES) instead of a sgemm over all k: each row
    keeps its best columns' raw scores and an upper bound ``outside`` on every other
    column's adjusted score S_ij + e_j at the duals e of the pass that scored it (its
    epoch). Under new duals g, S_ij + g_j <= outside_i + max_j (g_j - e_j) for the others.
    The HOT columns that moved most are scored exactly (a thin sgemm), so the max runs
    over the rest; a row whose best candidate beats that bound is labelled exactly from
    its candidates (the counts are exact), the other rows are scored afresh under g, a new
    epoch. The kernel weights and gaps of cached rows are over their candidates only.

    A pass over every row also settles them: each row's label and margin at those duals.
    While the duals stay near, a pass looks only at rows within SETTLED_WIDTHS kernel
    widths of a boundary and adds the rest by their label (``_active``): at 1M x 128,
    k = 1000, the last passes looked at 10-30% of the rows.
    """

    def __init__(
        self,
        x: np.ndarray,
        centroids: np.ndarray,
        metric: str,
        chunk_rows: int = 8192,
    ):
        self.x, self.centroids, self.metric = x, np.asarray(centroids, np.float32), metric
        self.chunk_rows = chunk_rows
        self.scorer = AugmentedScores(self.centroids, metric)
        self.epochs: list[np.ndarray] = []  # the duals of each pass that scored rows
        self.recomputed = 0  # rows scored afresh over all columns by the last pass
        self.looked = 0  # rows the last pass looked at; it added the others as settled
        self.settled_at: np.ndarray | None = None  # the duals the rows last settled at

    def boundary(self, g: np.ndarray, width: float, fresh: bool = False) -> Boundary:
        g = np.asarray(g, np.float64)
        k = len(g)
        if fresh or not self.epochs or k <= HOT or len(self.epochs) >= MAX_EPOCHS:
            return self._full(g, width)
        active = self._active(g, width)
        every = active is None  # then the pass settles its rows again, at g
        moved = g - np.stack(self.epochs)  # (epochs, k)
        hot = np.argsort(-moved.max(axis=0), kind="stable")[:HOT]
        cold = np.ones(k, bool)
        cold[hot] = False
        shifts = moved[:, cold].max(axis=1)  # the bound's slack, per epoch
        look = _Look(g, width, hot, shifts, self.centroids[hot])
        part = _Part.empty(k)
        settling = _Settling(len(self.x)) if every else None
        stale = self._look_at(active, look, part, settling)
        self.looked = len(self.x)
        if not every:
            # Gaps that no looked-at row gave: the settled rows nearest to the edge.
            edge = self._edge_rows(part, g)
            stale = np.concatenate([stale, self._look_at(edge, look, part, None)])
            self.looked = len(active) + len(edge)
        self.recomputed = len(stale)
        if self.recomputed > REBASE * len(self.x):  # the bound has gone loose: start over
            return self._full(g, width)
        if len(stale):
            self.epochs.append(g.copy())
        for sl in iter_chunks(len(stale), self.chunk_rows):
            self._score_afresh(stale[sl], g, width, part, settling)
        if settling is None:
            self._add_settled(part, g)
        else:
            self._settle(settling, g)
        return part.result()

    def _look_at(
        self, active: np.ndarray | None, look: _Look, part: _Part, settling: _Settling | None
    ) -> np.ndarray:
        """Rows ``active`` (None: all) from their candidates into ``part`` (and the safe
        ones into ``settling``); returns the stale ones, which need scoring afresh."""
        every = active is None
        stale = []
        for sl in iter_chunks(len(self.x) if every else len(active), self.chunk_rows):
            index = np.arange(sl.start, sl.stop) if every else active[sl]
            unsafe, safe = self._cached_chunk(index, sl if every else index, look, part)
            stale.append(unsafe)
            if settling is not None:
                settling.add(*safe, look.g)
        return np.concatenate(stale) if stale else np.empty(0, np.int64)

    def _cached_chunk(
        self, index: np.ndarray, rows: np.ndarray | slice, look: _Look, part: _Part
    ) -> tuple[np.ndarray, tuple]:
        """Rows ``index`` (``rows`` reads them: a slice reads the cache without a copy)
        from their candidates: the safe ones into ``part``; returns the stale ones'
        indices, and the safe ones' indices, candidates, adjusted scores and bounds (for
        ``_Settling``)."""
        g, hot = look.g, look.hot
        cand = self.cand[rows]
        z = self.raw[rows] + g[cand]
        # The columns that moved most are scored exactly; the bound covers the rest.
        zh = scores(self.x[rows], look.hot_centroids, self.metric).astype(np.float64) + g[hot]
        slot = look.hot_slot[cand]
        held = np.nonzero(slot >= 0)
        zh[held[0], slot[held]] = -np.inf  # already a candidate
        cand = cand.copy()  # a view of the cache until now; z is already new
        _best_first(cand, z)
        enters = np.flatnonzero(_row_reduce(np.maximum, zh) > _row_reduce(np.minimum, z))
        if len(enters):  # a hot column beats a candidate: the best of both
            cols = np.concatenate([cand[enters], np.broadcast_to(hot, zh[enters].shape)], 1)
            both = np.concatenate([z[enters], zh[enters]], axis=1)
            order = np.argsort(-both, axis=1, kind="stable")[:, : cand.shape[1]]
            cand[enters] = np.take_along_axis(cols, order, 1)
            z[enters] = np.take_along_axis(both, order, 1)
        bound = self.outside[rows] + look.shifts[self.epoch[rows]]
        safe = z[:, 0] > bound
        cand, z = cand[safe], z[safe]
        part.add_candidates(cand, z, look.width)
        return index[~safe], (index[safe], cand, z, bound[safe])

    def _active(self, g: np.ndarray, width: float) -> np.ndarray | None:
        """The rows this pass must look at under g, or None for all of them.

        A row settled at duals s with label b and margin m (its best adjusted score
        above every other, at s) keeps b under g while m > max_j (g_j - s_j) - (g_b - s_b),
        and its softmax puts at most e^-SETTLED_WIDTHS on any other column when m exceeds
        that by SETTLED_WIDTHS widths: such a row adds 1 to its label's count and soft
        size, S_ib + g_b to F_h's first term and no pair weight, all without a look at it.
        """
        if self.settled_at is None:
            return None
        moved = g - self.settled_at
        limit = SETTLED_WIDTHS * width + moved.max() - moved
        look = self.margin < limit[self.label]
        if np.count_nonzero(look) > SETTLE_SHARE * len(self.x):
            return None
        self._settled = ~look
        return np.flatnonzero(look)

    def _edge_rows(self, part: _Part, g: np.ndarray) -> np.ndarray:
        """Settled rows to look at after all, taken out of the settled ones: for each
        cluster that no looked-at row was labelled, its settled rows that may be nearest
        to leaving it (its gap to leave), and for each column that no looked-at row had as
        a candidate, the settled rows that have it as one (its gap to enter).
        ``newton_step`` moves a lone cluster by these gaps; without them it would not move."""
        settled = self._settled
        k = len(part.counts)
        picks = []
        no_leave = np.isinf(part.leave)
        if no_leave.any():
            # Row i of cluster b can leave it for j at moved_b - moved_j + (its margin
            # to j at settling) >= margin_i - max(moved) + moved_b, and the row of least
            # margin m at most at m - min(moved) + moved_b when m is to a column (not to
            # the bound of a cached pass): only rows within the spread of the moves of
            # the least margin can be nearest.
            moved = g - self.settled_at
            rows = np.flatnonzero(settled & no_leave[self.label])
            least = np.full(k, np.inf)
            np.minimum.at(least, self.label[rows], self.margin[rows])
            near = self.margin[rows] <= least[self.label[rows]] + (moved.max() - moved.min())
            picks.append(rows[near])
        no_enter = np.isinf(part.enter)
        if no_enter.any():  # the settled rows that hold such a column as a candidate
            other = self.cand != self.label[:, None]
            picks.append(np.flatnonzero(settled & (no_enter[self.cand] & other).any(axis=1)))
        edge = np.unique(np.concatenate(picks)) if picks else np.empty(0, np.int64)
        settled[edge] = False
        return edge

    def _add_settled(self, part: _Part, g: np.ndarray) -> None:
        """The settled rows' counts, soft sizes and first term of F_h (see ``_active``)."""
        labels = self.label[self._settled]
        counts = np.bincount(labels, minlength=len(g))
        part.counts += counts
        part.soft += counts
        part.soft_total += float(self.best_raw[self._settled].sum()) + float(counts @ g)

    def _settle(self, settling: _Settling, g: np.ndarray) -> None:
        """Takes the labels and margins of a pass over every row as the settled state."""
        self.settled_at = g.copy()
        self.label, self.best_raw, self.margin = settling.label, settling.best_raw, settling.margin

    def _full(self, g: np.ndarray, width: float) -> Boundary:
        n, top = len(self.x), min(len(self.centroids), CANDIDATES)
        self.epochs = [g.copy()]
        self.epoch = np.zeros(n, np.int32)
        self.cand = np.empty((n, top), np.int64)
        self.raw = np.empty((n, top), np.float64)
        self.outside = np.empty(n, np.float64)
        part = _Part.empty(len(self.centroids))
        settling = _Settling(n)
        for sl in iter_chunks(n, self.chunk_rows):
            self._score_afresh(sl, g, width, part, settling)  # a slice: x read in place
        self.recomputed = self.looked = n
        self._settle(settling, g)
        return part.result()

    def _score_afresh(
        self, rows: np.ndarray | slice, g: np.ndarray, width: float, part: _Part, settling
    ) -> None:
        """Rows (indices or a slice) scored against every column under g into ``part``
        (and ``settling``), and cached as the newest epoch."""
        best, z, outside = _candidates(self.x[rows], self.scorer, g, part)
        z64, outside64 = z.astype(np.float64), outside.astype(np.float64)
        part.add_candidates(best, z64, width)
        self.epoch[rows] = len(self.epochs) - 1
        self.cand[rows] = best
        self.raw[rows] = z64 - g[best]
        self.outside[rows] = outside64
        if settling is not None:
            settling.add(rows, best, z64, outside64, g)


class _Settling:
    """A pass over every row, as the settled state it leaves (``BoundaryBlock._active``):
    each row's label, raw best score and margin."""

    def __init__(self, n: int):
        self.label = np.empty(n, np.int64)
        self.best_raw = np.empty(n, np.float64)
        self.margin = np.empty(n, np.float64)

    def add(self, rows, cand, z, bound, g) -> None:
        """Rows (indices) with their candidates ``cand``, adjusted scores ``z`` under g
        (best first) and a bound on every other column's adjusted score."""
        self.label[rows] = cand[:, 0]
        self.best_raw[rows] = z[:, 0] - g[cand[:, 0]]
        others = _row_reduce(np.maximum, z[:, 1:]) if z.shape[1] > 1 else bound
        self.margin[rows] = z[:, 0] - np.maximum(others, bound)


def _row_reduce(ufunc: np.ufunc, a: np.ndarray) -> np.ndarray:
    """ufunc over each row of a narrow (m, c) array, a column at a time: numpy reduces a
    short inner axis row by row, 16x slower here at c = 4."""
    out = a[:, 0].copy()
    for c in range(1, a.shape[1]):
        ufunc(out, a[:, c], out=out)
    return out


def _best_first(cand: np.ndarray, z: np.ndarray) -> None:
    """Swaps each row's best candidate and score into column 0, in place (the rest stay
    in no particular order)."""
    rows = np.arange(len(z))
    top, best = np.zeros(len(z), np.intp), z[:, 0]
    for c in range(1, z.shape[1]):  # argmax by columns: the first of equal maxima, as numpy's
        better = z[:, c] > best
        top[better] = c
        best = np.where(better, z[:, c], best)
    for a in (cand, z):
        first = a[:, 0].copy()
        a[:, 0] = a[rows, top]
        a[rows, top] = first


def _softmax_pairs(
    best: np.ndarray, p: np.ndarray, width: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair codes and weights p_a p_b / h of each row's softmax p over its candidates
    (the off-diagonal of its Hessian, diag(p) - p p^T, over h), for the rows and pairs
    whose weight is not negligible."""
    out_codes, out_weights = [], []
    for a in range(best.shape[1]):
        for b in range(a + 1, best.shape[1]):
            w = p[:, a] * p[:, b] / width
            keep = w > NEGLIGIBLE / width
            ja, jb = best[keep, a], best[keep, b]
            out_codes.append(np.minimum(ja, jb) * k + np.maximum(ja, jb))
            out_weights.append(w[keep])
    return np.concatenate(out_codes), np.concatenate(out_weights)


def integer_targets(q: np.ndarray, n: int) -> np.ndarray:
    """Sizes (k,) int64 summing to n, proportional to q (largest remainders)."""
    q = np.asarray(q, np.float64) / np.sum(q)
    exact = q * n
    t = np.floor(exact).astype(np.int64)
    short = n - int(t.sum())
    if short:
        t[np.argsort(-(exact - t), kind="stable")[:short]] += 1
    return t


def newton_step(b: Boundary, rhs: np.ndarray, width: float) -> np.ndarray:
    """The move (k,) of the duals: Newton's on F_h (h = ``width``) toward soft sizes
    ``rhs`` away.

    Over the linked clusters: (L + RIDGE diag L) delta = rhs, L the Hessian of F_h (a
    graph Laplacian, see the module docstring). The ridge keeps the step finite where a
    group of clusters holds too many or too few rows in all; the caller's line search
    sizes what remains too large. A lone cluster has (almost) no rows near a boundary at
    this width, so Newton's step for it would be huge: it moves just past its nearest row
    (its enter or leave gap), the one move its gaps certify.
    """
    k = len(rhs)
    j, m = np.divmod(b.pairs, k)
    w = b.weights
    diag = np.bincount(j, w, k) + np.bincount(m, w, k)
    rhs = np.asarray(rhs, np.float64)
    linked = diag * width >= LINK
    gap = np.where(rhs > 0, b.enter_gap, b.leave_gap)

    def matvec(v: np.ndarray) -> np.ndarray:
        out = (1.0 + RIDGE) * diag * v
        out -= np.bincount(j, w * v[m], k) + np.bincount(m, w * v[j], k)
        return out

    # Within a group of clusters joined by near rows the step moves rows between them:
    # the group's net excess is taken out of the right-hand side (L's null space is the
    # constant on each group); rows cross between groups through the lone clusters.
    inner = linked[j] & linked[m]
    group = components(k, j[inner], m[inner])
    size = np.bincount(group, minlength=k)
    net = np.bincount(group, rhs, k) / np.maximum(size, 1)
    delta = np.zeros(k)
    if linked.any():
        precondition = np.where(linked, (1.0 + RIDGE) * diag, 0.0)
        delta = conjugate_gradient(matvec, np.where(linked, rhs - net[group], 0.0), precondition)
        delta -= (np.bincount(group, delta, k) / np.maximum(size, 1))[group]
        # A cluster with a row or two on its boundary has a curvature that promises rows
        # the step may not find: a move of a hundred widths floods it with a whole
        # component (seen at 1M x 128, k = 1000). REACH widths took the passes from 32 to
        # 24 there; 16 stalls, 128 floods again.
        np.clip(delta, -REACH * width, REACH * width, out=delta)
    lone = ~linked & (np.abs(rhs) >= 0.5) & np.isfinite(gap)
    delta[lone] = np.sign(rhs[lone]) * (gap[lone] + PAST * width)
    return delta


def components(k: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on k nodes with edges (a_e, b_e): each node's
    label is the smallest node of its component (min-label propagation with pointer
    jumping)."""
    label = np.arange(k)
    while True:
        new = label.copy()
        np.minimum.at(new, a, label[b])
        np.minimum.at(new, b, label[a])
        new = new[new]
        if (new == label).all():
            return label
        label = new


def conjugate_gradient(
    matvec: Callable[[np.ndarray], np.ndarray],
    rhs: np.ndarray,
    diag: np.ndarray,
    rtol: float = 1e-8,
    max_iterations: int = 2000,
) -> np.ndarray:
    """Jacobi-preconditioned CG for a symmetric positive definite system (Hestenes &
    Stiefel 1952); entries with a zero ``diag`` stay 0."""
    active = diag > 0
    inv = np.where(active, 1.0 / np.where(active, diag, 1.0), 0.0)
    x = np.zeros_like(rhs)
    r = rhs * active
    z = inv * r
    p = z.copy()
    rz = r @ z
    stop = rtol * np.linalg.norm(r)
    for _ in range(max_iterations):
        if np.linalg.norm(r) <= stop:
            break
        ap = matvec(p) * active
        step = rz / (p @ ap)
        x += step * p
        r -= step * ap
        z = inv * r
        rz, previous = r @ z, rz
        p = z + (rz / previous) * p
    return x


@dataclass
class HardBalance:
    g: np.ndarray  # (k,) duals in score units: labels argmax_j S_ij + g_j
    counts: np.ndarray  # (k,) their sizes over all rows
    targets: np.ndarray  # (k,)
    passes: int  # passes over the rows, the first (at the start point) included
    converged: bool  # every |c_j - t_j| within the tolerance
    history: list[dict] = field(default_factory=list)

    @property
    def max_deviation(self) -> float:
        """max_j |c_j - t_j| / t_j (over clusters with t_j > 0)."""
        t = np.maximum(self.targets, 1)
        return float((np.abs(self.counts - self.targets) / t).max())


def equalize(
    rows: BoundaryShards,
    targets: np.ndarray,
    g: np.ndarray,
    width: float,
    tol: float = DEFAULT_TOL,
    max_passes: int = 40,
    on_pass: Callable[[dict], None] | None = None,
) -> HardBalance:
    """Duals near ``g`` whose hard sizes are within max(1, tol * t_j) rows of ``targets``.

    Newton's method on the smoothed dual F_h, with h halved whenever F_h's minimum is
    reached and the hard sizes are not yet within the tolerance (continuation, as
    eps-scaling does for Sinkhorn). ``width`` is the first h, in score units (Sinkhorn's
    final eps: ``g`` is then near F_h's minimum already). A step that does not lower F_h
    is halved and tried again. Stops after ``max_passes`` passes over the rows.
    """
    targets = np.asarray(targets, np.int64)
    allowed = _allowed_error(targets, tol)
    g = np.asarray(g, np.float64).copy()
    h = width
    # Every row scored anew: candidates cached by an earlier solve would shape this one's
    # softmax (a restarted solve on a block that kept them failed where a new block
    # converged, 2 of 8 seeds of the mixture in ``balanced_duals``).
    current = rows.boundary(g, h, fresh=True)
    passes, history, scale = 1, [], 1.0

    def done(b: Boundary) -> bool:
        return bool((np.abs(b.counts - targets) <= allowed).all())

    def record(b: Boundary, accepted: bool) -> None:
        dev = np.abs(b.counts - targets)
        entry = {
            "pass": passes,
            "width": h,
            "step": scale,
            "l1_rows": int(dev.sum()),
            "max_rows": int(dev.max()),
            "soft_max_rows": float(np.abs(b.soft - targets).max()),
            "accepted": accepted,
        }
        history.append(entry)
        if on_pass is not None:
            on_pass(entry)

    record(current, True)
    best = (_size_error(current.counts, targets), g, current)
    while not done(current) and passes < max_passes:
        residual = targets - current.soft
        if (np.abs(residual) <= SOFT_SHARE * allowed).all():
            h, scale = h * STAGE_FACTOR, 1.0  # F_h solved: a narrower kernel
            current = rows.boundary(g, h)
            passes += 1
            record(current, True)
            continue
        delta = scale * newton_step(current, residual, h)
        candidate = rows.boundary(g + delta, h)
        passes += 1
        better = candidate.smoothed_objective(g + delta, targets) < current.smoothed_objective(
            g, targets
        )
        record(candidate, better)
        error = _size_error(candidate.counts, targets)
        if error < best[0]:
            best = (error, g + delta, candidate)
        if better:
            g, current = g + delta, candidate
            scale = min(1.0, RECOVER * scale)
        else:
            scale /= 2.0
    # The result is the duals with the best hard sizes seen: never worse than the start.
    _, g, current = best
    return HardBalance(g, current.counts, targets, passes, done(current), history)


def _allowed_error(targets: np.ndarray, tol: float) -> np.ndarray:
    """Rows each size may be off its target: tol of it, at least one (``--balance-tol``)."""
    return np.maximum(1.0, np.floor(tol * np.asarray(targets)))


def _size_error(counts: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    """(largest, total) size error in rows: the order in which results are preferred."""
    dev = np.abs(counts - targets)
    return int(dev.max()), int(dev.sum())


@dataclass
class BalancedDuals:
    """The balanced labels' duals: Sinkhorn's start, then its sizes made exact."""

    beta: np.ndarray  # (k,) score units: the label of row i is argmax_j S_ij + beta_j
    epsilon: float  # Sinkhorn's final eps (score units): soft top-M is softmax(. / eps)
    sinkhorn: SinkhornResult
    sizes: HardBalance
    # Sinkhorn was solved again to the asked tolerance after the passes could not
    # correct its loose solution on a sample (``balanced_duals``).
    restarted: bool = False

    @property
    def log_duals(self) -> np.ndarray:
        """log v = beta / eps (``duals.npy``): the label is argmax_j S_ij / eps + log v_j."""
        return self.beta / self.epsilon

    @property
    def converged(self) -> bool:
        return self.sizes.converged


def balanced_duals(
    sample: RowShards,
    rows: BoundaryShards,
    q: np.ndarray,
    n: int,
    epsilon: float = DEFAULT_EPSILON,
    sinkhorn_tol: float = 1e-3,
    sinkhorn_iterations: int = 5000,
    tol: float = DEFAULT_TOL,
    max_passes: int = 40,
    warm: np.ndarray | None = None,
    on_stage: Callable[[dict], None] | None = None,
    on_pass: Callable[[dict], None] | None = None,
    sample_rows: int | None = None,
    on_restart: Callable[[HardBalance], None] | None = None,
) -> BalancedDuals:
    """Duals whose hard labels over all n ``rows`` have sizes q * n (within ``tol``).

    Sinkhorn on ``sample`` (a uniform sample, or all rows) estimates the k potentials;
    ``equalize`` then corrects them on every row, a pass at a time. The potentials are k
    numbers, so a sample of a few hundred rows per cluster estimates them as well as all
    rows do, up to its sampling error, which the passes remove: Sinkhorn on a sample of
    ``sample_rows`` (None: all n) stops at ``sample_tolerance``, and is solved again to
    ``sinkhorn_tol`` if the passes end far off (``on_restart`` hears of it; the second
    solve has the same budgets of steps and passes). ``warm`` (score units) starts
    Sinkhorn from earlier potentials.
    """
    targets = integer_targets(q, n)
    loose = sample_tolerance(sinkhorn_tol, q, sample_rows or n, n)
    start = sinkhorn(sample, q, epsilon, loose, sinkhorn_iterations, on_stage=on_stage, beta0=warm)
    sizes = equalize(rows, targets, start.beta, start.epsilon, tol, max_passes, on_pass)
    restarted = loose > sinkhorn_tol and _far_off(sizes, tol)
    if restarted:
        if on_restart is not None:
            on_restart(sizes)
        # The passes could not correct the loose solution (seen on well-separated
        # mixtures, 20k x 16, k = 100, 64 sample rows per cluster: 5 of 22 seeds
        # converged after tol 0.025, 14 after 1e-3): solve the sample to the asked
        # tolerance, correct again, and keep the better sizes.
        tight = sinkhorn(
            sample, q, epsilon, sinkhorn_tol, sinkhorn_iterations, on_stage=on_stage, beta0=warm
        )
        again = equalize(rows, targets, tight.beta, tight.epsilon, tol, max_passes, on_pass)
        if _size_error(again.counts, targets) <= _size_error(sizes.counts, targets):
            start, sizes = tight, again
    return BalancedDuals(sizes.g, start.epsilon, start, sizes, restarted)


def _far_off(sizes: HardBalance, tol: float) -> bool:
    """Whether some size is more than FAR_OFF times its allowed error from its target:
    stuck, not nearly there (SeLa's setting scaled ends 2 rows off where 1 is allowed)."""
    allowed = _allowed_error(sizes.targets, tol)
    return bool((np.abs(sizes.counts - sizes.targets) > FAR_OFF * allowed).any())
