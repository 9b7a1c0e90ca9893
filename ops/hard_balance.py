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

The method is Newton's on c(g) = t, as for semi-discrete optimal transport (Kitagawa,
Merigot & Thibert, "Convergence of a Newton algorithm for semi-discrete optimal transport",
JEMS 2019): the Jacobian of the counts is a graph Laplacian whose weight between clusters
j and l is the density of rows on their boundary. From rows, the weight is the softmax
Hessian at temperature h over each row's few best columns: p_a p_b / h for a pair, which
for two columns is the logistic kernel sigma(m / h) sigma(-m / h) / h of the row's margin
m between them. Steps are sized by a line search on the dual objective
F(g) = sum_i max_j (S_ij + g_j) - sum_j t_j g_j (convex; its subgradient is c - t): a step
that does not lower F is halved and tried again. A pass over the rows returns k counts,
k-vectors of gaps, F's first term and the summed pair weights: never rows, so it runs
where the rows are, at any scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pseudolabel.ops.arrays import iter_chunks
from pseudolabel.ops.scores import scores
from pseudolabel.ops.sinkhorn import DEFAULT_EPSILON, RowShards, SinkhornResult, sinkhorn

# Each row's CANDIDATES best clusters enter the kernel: a row near a corner where several
# clusters meet moves to any of them (in d = 128, k = 1000, a cluster touches ~50 others).
CANDIDATES = 4
# Passes after the first score the HOT columns whose duals moved most exactly, and bound
# the others by the largest remaining move (see BoundaryBlock).
HOT = 32
REBASE = 0.25  # a pass that would score more than this share of rows afresh scores all
NEGLIGIBLE = 1e-9  # pair weights below this / h are left out
TRUST = 8.0  # a Newton move of one cluster's dual spans at most this many start widths
# A lone cluster moves just past the gap it must cross, by PAST kernel widths: a whole
# width let 70k rows of a dense component flood a far cluster at once (100k x 128).
PAST = 1e-3
RIDGE = 1e-3  # L + RIDGE diag L: positive definite within a group, nearly Newton
# After a step the kernel narrows to WIDTH_FOLLOW x the median |step| (within
# [MIN_WIDTH, 1] x the start width): the rows that the next step moves lie that close to a
# boundary. At 1000 rows per cluster (200k x 32, k = 200) this took the last 1% from 13
# passes to 4; a fixed width averages the count curve over too wide a band near the end.
WIDTH_FOLLOW = 2.0
MIN_WIDTH = 0.01
DEFAULT_TOL = 0.01  # each size within 1% of its target (and at least 1 row)


@dataclass
class Boundary:
    """What one pass over rows learns about the hard labels under g (sums over shards)."""

    counts: np.ndarray  # (k,) int64: rows whose argmax_j S_ij + g_j is j
    pairs: np.ndarray  # (p,) int64 codes j * k + l, j < l: clusters sharing near rows
    weights: np.ndarray  # (p,) float64: the kernel weight summed over those rows
    enter_gap: np.ndarray  # (k,) least rise of g_j that brings some row into j (inf: none)
    leave_gap: np.ndarray  # (k,) least fall of g_j that lets one of j's rows go (inf: none)
    # For each cluster asked to gain (shed) r rows: its r smallest enter (leave) gaps
    # over the rows' candidates, as flat arrays of (cluster, or cluster + k to shed; gap).
    solo_cols: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    solo_gaps: np.ndarray = field(default_factory=lambda: np.empty(0))
    best_total: float = 0.0  # sum_i max_j (S_ij + g_j), float64

    def dual_objective(self, g: np.ndarray, targets: np.ndarray) -> float:
        """F(g) = sum_i max_j (S_ij + g_j) - sum_j t_j g_j: the LP dual of the balanced
        assignment, convex in g, least exactly at the duals whose labels have sizes t
        (its subgradient is c(g) - t)."""
        return self.best_total - float(np.dot(targets, g))

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
            solo_cols=np.concatenate([p.solo_cols for p in parts]),
            solo_gaps=np.concatenate([p.solo_gaps for p in parts]),
            best_total=float(sum(p.best_total for p in parts)),
        )

    def solo_moves(self, wanted: np.ndarray, limit: float) -> np.ndarray:
        """(k,) the move of each cluster's dual that, alone, gains (sheds) its |wanted|
        rows: its |wanted|-th smallest gap on that side. Where fewer gaps were gathered
        (few rows have the cluster among their candidates), the largest known, at most
        ``limit``: the rows beyond the candidates can lie anywhere. 0 where wanted is 0."""
        k = len(wanted)
        need = np.concatenate([np.maximum(wanted, 0), np.maximum(-wanted, 0)])
        cols, gaps = _smallest_per_column(self.solo_cols, self.solo_gaps, need)
        move = np.zeros(2 * k)
        np.maximum.at(move, cols, gaps)
        short = np.bincount(cols, minlength=2 * k) < need
        move[short] = np.minimum(move[short], limit)
        return np.where(wanted > 0, move[:k], move[k:])


class BoundaryShards(Protocol):
    """Rows over however many shards; ``boundary`` includes the sum over shards.
    ``wanted`` (k,): rows each cluster should gain (> 0) or shed (< 0), for the gaps."""

    def boundary(
        self, g: np.ndarray, width: float, wanted: np.ndarray | None = None
    ) -> Boundary: ...


def _smallest_per_column(
    cols: np.ndarray, gaps: np.ndarray, need: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The need[c] smallest gaps of each column c, as flat (column, gap) arrays."""
    order = np.lexsort((gaps, cols))
    cols, gaps = cols[order], gaps[order]
    starts = np.searchsorted(cols, np.arange(len(need)))
    keep = np.arange(len(cols)) - starts[cols] < need[cols]
    return cols[keep], gaps[keep]


@dataclass
class _Part:
    """One block of rows' statistics before the sum: counts, gaps, pair weights."""

    counts: np.ndarray
    enter: np.ndarray
    leave: np.ndarray
    wanted: np.ndarray | None = None
    codes: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    solo_cols: list[np.ndarray] = field(default_factory=list)
    solo_gaps: list[np.ndarray] = field(default_factory=list)
    best_total: float = 0.0

    @classmethod
    def empty(cls, k: int, wanted: np.ndarray | None = None) -> _Part:
        return cls(np.zeros(k, np.int64), np.full(k, np.inf), np.full(k, np.inf), wanted)

    def add_candidates(self, best: np.ndarray, z: np.ndarray, width: float) -> None:
        """Rows given by their candidate columns ``best`` (m, top) and adjusted scores
        ``z`` (float64, best first): counts, leave gaps, candidates' enter gaps, pairs."""
        k = len(self.counts)
        self.counts += np.bincount(best[:, 0], minlength=k)
        self.best_total += float(z[:, 0].sum())
        if best.shape[1] > 1:
            np.minimum.at(self.leave, best[:, 0], z[:, 0] - z[:, 1])
            np.minimum.at(self.enter, best[:, 1:].ravel(), (z[:, :1] - z[:, 1:]).ravel())
            codes, weights = _softmax_pairs(best, z, width, k)
            self.codes.append(codes)
            self.weights.append(weights)
            if self.wanted is not None:
                self._solo(best, z)

    def _solo(self, best: np.ndarray, z: np.ndarray) -> None:
        k = len(self.counts)
        shed = self.wanted[best[:, 0]] < 0
        self.solo_cols.append(best[shed, 0] + k)
        self.solo_gaps.append(z[shed, 0] - z[shed, 1])
        gain = self.wanted[best[:, 1:]] > 0
        self.solo_cols.append(best[:, 1:][gain])
        self.solo_gaps.append((z[:, :1] - z[:, 1:])[gain])
        need = np.concatenate([np.maximum(self.wanted, 0), np.maximum(-self.wanted, 0)])
        cols, gaps = _smallest_per_column(
            np.concatenate(self.solo_cols), np.concatenate(self.solo_gaps), need
        )
        self.solo_cols, self.solo_gaps = [cols], [gaps]

    def result(self) -> Boundary:
        if self.codes:
            pairs, inverse = np.unique(np.concatenate(self.codes), return_inverse=True)
            w = np.bincount(inverse, np.concatenate(self.weights), len(pairs))
        else:
            pairs, w = np.empty(0, np.int64), np.empty(0)
        out = Boundary(self.counts, pairs, w, self.enter, self.leave)
        out.best_total = self.best_total
        if self.solo_cols:
            out.solo_cols = np.concatenate(self.solo_cols)
            out.solo_gaps = np.concatenate(self.solo_gaps)
        return out


def _candidates(
    x: np.ndarray, centroids: np.ndarray, metric: str, g: np.ndarray, part: _Part
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every column of rows x under g: enter gaps over all columns into ``part``; returns
    the rows' CANDIDATES best columns (m, top), their adjusted scores (float32, best
    first) and the best adjusted score outside them (m,), -inf when there is none."""
    k = len(centroids)
    top = min(k, CANDIDATES)
    S = scores(x, centroids, metric)
    S += np.asarray(g, np.float32)
    # The best columns by repeated argmax (an argpartition of the whole row costs 5x the
    # sgemm here), masked while found; all but the best are restored afterwards.
    rows = np.arange(len(S))
    best = np.empty((len(S), top), np.int64)
    z = np.empty((len(S), top), np.float32)
    for r in range(top):
        best[:, r] = S.argmax(axis=1)
        z[:, r] = S[rows, best[:, r]]
        S[rows, best[:, r]] = -np.inf
    outside = S.max(axis=1) if top < k else np.full(len(S), -np.inf, np.float32)
    for r in range(1, top):
        S[rows, best[:, r]] = z[:, r]
    S -= z[:, :1]  # -(the rise of g_j that would bring row i into j); its own: -inf
    part.enter = np.minimum(part.enter, -S.max(axis=0).astype(np.float64))
    return best, z, outside


def boundary(
    x: np.ndarray,
    centroids: np.ndarray,
    metric: str,
    g: np.ndarray,
    width: float,
    chunk_rows: int = 8192,
    wanted: np.ndarray | None = None,
) -> Boundary:
    """One block of rows' ``Boundary`` under duals g (k,) and kernel width (score units),
    every score computed afresh."""
    part = _Part.empty(len(centroids), wanted)
    for sl in iter_chunks(len(x), chunk_rows):
        best, z, _ = _candidates(x[sl], centroids, metric, g, part)
        part.add_candidates(best, z.astype(np.float64), width)
    return part.result()


class BoundaryBlock:
    """One block of rows (``BoundaryShards`` for one process; a Ray worker holds one for
    its rows), with the candidates of its last full pass kept for the next passes.

    Passes after the first cost O(n x CANDIDATES) instead of a sgemm over all k: each row
    keeps its best columns' raw scores and an upper bound ``outside`` on every other
    column's adjusted score, S_ij + base_j, at the duals ``base`` of the cache. Under new
    duals g, S_ij + g_j <= outside_i + max_j (g_j - base_j) for the others. The HOT
    columns that moved most are scored exactly (a thin sgemm), so the max runs over the
    rest; a row whose best candidate beats that bound is labelled exactly from its
    candidates (the counts are exact), the other rows are scored afresh and their
    candidates replaced. The kernel
    weights and gaps of cached rows are over their candidates only.
    """

    def __init__(self, x: np.ndarray, centroids: np.ndarray, metric: str, chunk_rows: int = 8192):
        self.x, self.centroids, self.metric = x, np.asarray(centroids, np.float32), metric
        self.chunk_rows = chunk_rows
        self.base: np.ndarray | None = None
        self.recomputed = 0  # rows scored afresh over all columns by the last pass

    def boundary(self, g: np.ndarray, width: float, wanted: np.ndarray | None = None) -> Boundary:
        g = np.asarray(g, np.float64)
        if self.base is None:
            return self._full(g, width, wanted)
        moved = g - self.base
        k = len(moved)
        if k <= HOT:
            return self._full(g, width, wanted)
        order = np.argsort(-moved, kind="stable")
        hot, shift = order[:HOT], float(moved[order[HOT]])
        hot_c = self.centroids[hot]
        part = _Part.empty(k, wanted)
        stale_rows = []
        for sl in iter_chunks(len(self.x), self.chunk_rows):
            cand = self.cand[sl]
            z = self.raw[sl] + g[cand]
            # The columns that moved most are scored exactly; the bound covers the rest.
            zh = scores(self.x[sl], hot_c, self.metric).astype(np.float64) + g[hot]
            zh[(cand[:, :, None] == hot[None, None, :]).any(axis=1)] = -np.inf
            cols = np.concatenate([cand, np.broadcast_to(hot, zh.shape)], axis=1)
            z = np.concatenate([z, zh], axis=1)
            order = np.argsort(-z, axis=1, kind="stable")[:, : cand.shape[1]]
            cand, z = np.take_along_axis(cols, order, 1), np.take_along_axis(z, order, 1)
            safe = z[:, 0] > self.outside[sl] + shift
            part.add_candidates(cand[safe], z[safe], width)
            stale_rows.append(np.flatnonzero(~safe) + sl.start)
        stale = np.concatenate(stale_rows)
        self.recomputed = len(stale)
        if self.recomputed > REBASE * len(self.x):  # the bound has gone loose: start over
            self.base = None
            return self._full(g, width, wanted)
        for sl in iter_chunks(len(stale), self.chunk_rows):
            rows = stale[sl]
            best, z, outside = _candidates(self.x[rows], self.centroids, self.metric, g, part)
            part.add_candidates(best, z.astype(np.float64), width)
            self._keep(rows, best, z, outside, g)
        return part.result()

    def _full(self, g: np.ndarray, width: float, wanted: np.ndarray | None) -> Boundary:
        n, top = len(self.x), min(len(self.centroids), CANDIDATES)
        self.base = g.copy()
        self.cand = np.empty((n, top), np.int64)
        self.raw = np.empty((n, top), np.float64)
        self.outside = np.empty(n, np.float64)
        part = _Part.empty(len(self.centroids), wanted)
        for sl in iter_chunks(n, self.chunk_rows):
            best, z, outside = _candidates(self.x[sl], self.centroids, self.metric, g, part)
            part.add_candidates(best, z.astype(np.float64), width)
            self._keep(np.arange(sl.start, sl.stop), best, z, outside, g)
        self.recomputed = n
        return part.result()

    def _keep(self, rows, best, z, outside, g) -> None:
        """Cache rows scored under g, with the bound moved to the cache's base duals:
        S_ij + base_j <= (S_ij + g_j) - min_j (g_j - base_j)."""
        self.cand[rows] = best
        self.raw[rows] = z.astype(np.float64) - g[best]
        self.outside[rows] = outside.astype(np.float64) - float((g - self.base).min())


def _softmax_pairs(
    best: np.ndarray, z: np.ndarray, width: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair codes and weights p_a p_b / h of the softmax at temperature h over each row's
    candidates (the off-diagonal of its Hessian, diag(p) - p p^T, over h), for the rows
    and pairs whose weight is not negligible."""
    p = np.exp((z - z[:, :1]) / width)
    p /= p.sum(axis=1, keepdims=True)
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


def newton_step(b: Boundary, targets: np.ndarray, width: float, reach: float) -> np.ndarray:
    """The move (k,) of the duals.

    Over the clusters with rows near a boundary: the Newton step
    (L + RIDGE diag L) delta = t - c, each move clipped to ``reach`` or to what the
    cluster needs alone (its solo move), whichever is larger: a cluster far from its
    neighbours has almost no rows near a boundary, so Newton's step for it is huge and
    only its own gaps bound it. A cluster with none moves by its solo move (else just past
    its nearest row) the way it must. The ridge keeps the step finite where a group of
    clusters holds too many or too few rows in all; the caller's line search on the dual
    objective sizes whatever remains too large.
    """
    k = len(targets)
    j, m = np.divmod(b.pairs, k)
    w = b.weights
    diag = np.bincount(j, w, k) + np.bincount(m, w, k)
    rhs = (targets - b.counts).astype(np.float64)
    solo = b.solo_moves(rhs, reach)
    linked = diag * width >= 0.25  # at least a row's worth: a row on the boundary adds 1/(4h)

    def matvec(v: np.ndarray) -> np.ndarray:
        out = (1.0 + RIDGE) * diag * v
        out -= np.bincount(j, w * v[m], k) + np.bincount(m, w * v[j], k)
        return out

    # Within a group of clusters joined by near rows the step moves rows between them:
    # the group's net excess is taken out of the right-hand side (L's null space is the
    # constant on each group), and rows cross between groups only by capped moves later.
    inner = linked[j] & linked[m]
    group = components(k, j[inner], m[inner])
    size = np.bincount(group, minlength=k)
    net = np.bincount(group, rhs, k) / np.maximum(size, 1)
    delta = np.zeros(k)
    if linked.any():
        precondition = np.where(linked, (1.0 + RIDGE) * diag, 0.0)
        delta = conjugate_gradient(matvec, np.where(linked, rhs - net[group], 0.0), precondition)
        delta -= (np.bincount(group, delta, k) / np.maximum(size, 1))[group]
        cap = np.maximum(reach, solo + PAST * width)
        np.clip(delta, -cap, cap, out=delta)
    lone = ~linked & (rhs != 0)
    gap = np.where(rhs > 0, b.enter_gap, b.leave_gap)
    gap = np.where(solo > 0, solo, gap)
    lone &= np.isfinite(gap)
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
    max_passes: int = 30,
    on_pass: Callable[[dict], None] | None = None,
) -> HardBalance:
    """Duals near ``g`` whose hard sizes are within max(1, tol * t_j) rows of ``targets``.

    ``width`` is the boundary kernel's, in score units (Sinkhorn's final eps is the
    natural one: the width over which its plan splits rows). Stops after ``max_passes``
    passes over the rows if the sizes are not yet within the tolerance.
    """
    targets = np.asarray(targets, np.int64)
    allowed = np.maximum(1.0, np.floor(tol * targets))
    g = np.asarray(g, np.float64).copy()
    current = rows.boundary(g, width)
    passes, history, h, scale = 1, [], width, 1.0

    def done(b: Boundary) -> bool:
        return bool((np.abs(b.counts - targets) <= allowed).all())

    def record(b: Boundary, accepted: bool, h: float) -> None:
        dev = np.abs(b.counts - targets)
        entry = {
            "pass": passes,
            "width": h,
            "step": scale,
            "l1_rows": int(dev.sum()),
            "max_rows": int(dev.max()),
            "accepted": accepted,
        }
        history.append(entry)
        if on_pass is not None:
            on_pass(entry)

    record(current, True, h)
    best = (_size_error(current, targets), g, current)
    while not done(current) and passes < max_passes:
        delta = scale * newton_step(current, targets, h, TRUST * width)
        h_trial = _follow(delta, width, h)
        wanted = targets - current.counts
        candidate = rows.boundary(g + delta, h_trial, wanted)
        passes += 1
        # The merit is the dual objective, not the size error: a good step may pass rows
        # through clusters on target (raising their error for a pass) and still be the
        # way down to the optimum, where the sizes are exact. (On 200k x 128, k = 1000,
        # accepting by the size error stalled at 1.5% off; by the objective, converged.)
        better = candidate.dual_objective(g + delta, targets) < current.dual_objective(g, targets)
        record(candidate, better, h_trial)
        error = _size_error(candidate, targets)
        if error < best[0]:
            best = (error, g + delta, candidate)
        if better:
            g, current, h = g + delta, candidate, h_trial
            scale = min(1.0, 2.0 * scale)
        else:
            scale /= 2.0
    # F can fall while sizes get worse on the way (seen on well-separated clusters), so
    # the result is the duals with the best sizes seen: never worse than the start.
    _, g, current = best
    return HardBalance(g, current.counts, targets, passes, done(current), history)


def _size_error(b: Boundary, targets: np.ndarray) -> tuple[int, int]:
    """(largest, total) size error in rows: the order in which results are preferred."""
    dev = np.abs(b.counts - targets)
    return int(dev.max()), int(dev.sum())


def _follow(delta: np.ndarray, width: float, h: float) -> float:
    """The kernel width for the rows after a step ``delta`` (see WIDTH_FOLLOW)."""
    moved = np.abs(delta[delta != 0])
    if not len(moved):
        return h
    return float(np.clip(WIDTH_FOLLOW * np.median(moved), MIN_WIDTH * width, width))


@dataclass
class BalancedDuals:
    """The balanced labels' duals: Sinkhorn's start, then its sizes made exact."""

    beta: np.ndarray  # (k,) score units: the label of row i is argmax_j S_ij + beta_j
    epsilon: float  # Sinkhorn's final eps (score units): soft top-M is softmax(. / eps)
    sinkhorn: SinkhornResult
    sizes: HardBalance

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
    max_passes: int = 30,
    warm: np.ndarray | None = None,
    on_stage: Callable[[dict], None] | None = None,
    on_pass: Callable[[dict], None] | None = None,
) -> BalancedDuals:
    """Duals whose hard labels over all n ``rows`` have sizes q * n (within ``tol``).

    Sinkhorn on ``sample`` (a uniform sample, or all rows) estimates the k potentials;
    ``equalize`` then corrects them on every row, a pass at a time. The potentials are k
    numbers, so a sample of a few hundred rows per cluster estimates them as well as all
    rows do, up to its sampling error, which the passes remove. ``warm`` (score units)
    starts Sinkhorn from earlier potentials.
    """
    start = sinkhorn(
        sample, q, epsilon, sinkhorn_tol, sinkhorn_iterations, on_stage=on_stage, beta0=warm
    )
    sizes = equalize(
        rows, integer_targets(q, n), start.beta, start.epsilon, tol, max_passes, on_pass
    )
    return BalancedDuals(sizes.g, start.epsilon, start, sizes)
