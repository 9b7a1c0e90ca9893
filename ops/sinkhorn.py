"""Balanced assignment as entropic optimal transport, solved by Sinkhorn-Knopp.

Rows i (n of them, mass 1/n each) go to clusters j (target mass q_j, uniform by
default) with the scores S_ij of ``ops.scores``: x.c for unit vectors, or
2 x.c_j - |c_j|^2, the negative squared distance up to a per-row constant. The plan
maximising <P, S> + eps H(P) under both marginals is

    P_ij = exp((S_ij + alpha_i + beta_j) / eps)        (Cuturi 2013; SeLa, Asano et al.
                                                        ICLR 2020; SwAV, Caron et al. 2020)

and the balanced hard label of row i is argmax_j S_ij + beta_j: it needs the k column
potentials beta and nothing else, so a label pass can apply it row by row at any scale.

Stabilised scaling (Schmitzer, "Stabilized sparse scaling algorithms for entropy
regularized transport problems", SIAM J. Sci. Comput. 2019): for each eps the kernel
K = exp((S + alpha + beta) / eps) is built once with the potentials absorbed (alpha_i
puts each row's largest entry at 1); iterations then scale rows and columns in the
linear domain, u = r / (K v), v = q / (K^T u) (over-relaxed, see OMEGA), and v is
absorbed into beta whenever it leaves [e^-30, e^30]. eps-scaling: eps halves from the
score scale down to its target, carrying beta, because a small eps alone converges too
slowly for balanced hard labels; every stage is solved to the tolerance.

The math is written once against ``RowShards``. ``RowBlock`` holds one shard's rows; in
one process it is the whole problem (the reduction over shards is the identity), and
``pipelines`` sums the column sums of Ray workers (only k numbers per step each way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pseudolabel.ops.arrays import as_float32, iter_chunks
from pseudolabel.ops.scores import scores

STAGE_FACTOR = 0.5  # eps shrinks by this factor per stage
# Over-relaxed column update, v <- v^(1 - w) (q / K^T u)^w (Thibault et al., "Overrelaxed
# Sinkhorn-Knopp algorithm for regularized optimal transport", 2017). With every stage
# solved to tol (a well-converged warm start), w = 1.8 took 364 steps where plain
# Sinkhorn with loose intermediate stages took 1766, for the same labels (100k x 32).
OMEGA = 1.8
ABSORB_LOG = 30.0  # absorb v into beta once |log v| exceeds this
UNDERFLOW = -80.0  # kernel entries below e^-80 are set to zero, not left denormal
DEFAULT_EPSILON = 0.005  # relative to the standard deviation of the scores
# A step reads the cached kernel twice, K v then K^T u, a chunk of rows at a time: chunks
# of CACHE_BYTES stay in cache between the two reads. Measured 2026-11-25 on this 2-core
# host, 64k x 1000: a step 22.6 ms against 33.1 ms in chunks of 8192 rows (medians of 30
# alternating repeats); a whole solve on real data x0.779. A constant, not the host's L2
# size: the chunks group the float64 sums, so they fix the result's last bits too.
CACHE_BYTES = 2 << 20
# The potential of a column with target 0: finite (JSON, float32), and far enough below
# any score that the column is never a row's label and its kernel entries underflow to 0.
EXCLUDED = -1e30
SAMPLE_NOISE_SHARE = 0.3  # of a sample's own L1 error: where Sinkhorn on it stops


class RowShards(Protocol):
    """The row side of the problem, over however many shards; methods include the
    reduction over shards (the identity for one ``RowBlock``)."""

    def score_moments(self) -> np.ndarray:
        """[count, sum S, sum S^2] over every entry, float64."""
        ...

    def prepare(self, beta: np.ndarray, eps: float) -> None:
        """Build the kernel for column potentials beta (k,) at this eps."""
        ...

    def column_sums(self, v: np.ndarray) -> np.ndarray:
        """Row update u = r / (K v), then the column sums K^T u (k,) float64."""
        ...


class RowBlock:
    """One shard's rows. Caches S and K (2 x n x k float32) when ``cache``; otherwise
    recomputes both per chunk of ``chunk_rows`` rows on every call, holding only x (a
    cached kernel is read in chunks of ``cached_chunk_rows``)."""

    def __init__(
        self,
        x: np.ndarray,
        centroids: np.ndarray,
        metric: str,
        n_total: int,
        cache: bool = True,
        chunk_rows: int = 8192,
    ):
        self.x, self.centroids, self.metric = x, as_float32(centroids), metric
        self.row_mass = 1.0 / n_total
        self.chunk_rows = chunk_rows
        self.S = scores(x, self.centroids, metric) if cache else None
        self.K: np.ndarray | None = None
        self.beta = np.zeros(len(self.centroids))
        self.eps = 1.0

    def _scores(self, sl: slice) -> np.ndarray:
        if self.S is not None:
            return self.S[sl]
        return scores(self.x[sl], self.centroids, self.metric)

    def _kernel(self, S: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        z = np.add(S, self.beta.astype(np.float32)[None, :], out=out)
        z -= z.max(axis=1, keepdims=True)  # alpha_i: the row's largest entry becomes 1
        z /= np.float32(self.eps)
        dead = z < UNDERFLOW
        np.exp(z, out=z)
        z[dead] = 0.0
        return z

    def score_moments(self) -> np.ndarray:
        m = np.zeros(3)
        for sl in iter_chunks(len(self.x), self.chunk_rows):
            S = self._scores(sl)  # float64 sums without a float64 copy (3.5x faster)
            m += (S.size, S.sum(dtype=np.float64), np.einsum("ij,ij->", S, S, dtype=np.float64))
        return m

    def prepare(self, beta: np.ndarray, eps: float) -> None:
        self.beta, self.eps = np.asarray(beta, np.float64), float(eps)
        if self.S is not None:
            if self.K is None:
                self.K = np.empty_like(self.S)
            # In cache-sized chunks, as the steps read it: the kernel's passes over a
            # chunk (shift, scale, exp, flush) then run in cache. Row by row, so the
            # kernel has the same bits in chunks of any size.
            for sl in iter_chunks(len(self.x), cached_chunk_rows(len(self.centroids))):
                self._kernel(self.S[sl], out=self.K[sl])

    def column_sums(self, v: np.ndarray) -> np.ndarray:
        v32 = v.astype(np.float32)
        total = np.zeros(len(v))
        rows = self.chunk_rows if self.K is None else cached_chunk_rows(len(v))
        for sl in iter_chunks(len(self.x), rows):
            K = self.K[sl] if self.K is not None else self._kernel(self._scores(sl))
            u = (self.row_mass / (K @ v32).astype(np.float64)).astype(np.float32)
            total += blocked_column_sums(K, u)
        return total

    def labels(self, beta: np.ndarray) -> np.ndarray:
        """argmax_j S_ij + beta_j for this block's rows (in-process use and tests)."""
        out = np.empty(len(self.x), np.int64)
        for sl in iter_chunks(len(self.x), self.chunk_rows):
            out[sl] = (self._scores(sl) + beta.astype(np.float32)[None, :]).argmax(axis=1)
        return out


def cached_chunk_rows(k: int) -> int:
    """Rows of a (rows, k) float32 chunk of CACHE_BYTES, a multiple of 16 (the blocks of
    ``blocked_column_sums``), at least 16."""
    return max(16, CACHE_BYTES // (4 * k) // 16 * 16)


def blocked_column_sums(K: np.ndarray, u: np.ndarray, block: int = 16) -> np.ndarray:
    """K^T u (k,) float64 from float32 K (n, k) and u (n,).

    Float32 partial sums over 16 rows, added in float64. One float32 sum over a whole
    chunk is 1e-5 relatively off, and Sinkhorn amplifies that into 1e-4 differences in
    the log-duals between shardings. Here the error is bounded by the 16-term float32
    partials, 16 u = 1e-6 relative for non-negative terms (about 1e-9 observed on random
    data), whatever the chunking, at 2.4x the cost of sgemv (measured on 500k x 1000),
    where a float64 einsum costs 8x.
    """
    n = len(K) - len(K) % block
    part = np.matmul(u[:n].reshape(-1, 1, block), K[:n].reshape(-1, block, K.shape[1]))
    total = part.sum(axis=0, dtype=np.float64)[0]
    if n < len(K):
        total += (u[n:].astype(np.float64)[:, None] * K[n:]).sum(axis=0)
    return total


@dataclass
class SinkhornResult:
    beta: np.ndarray  # (k,) column potentials, in score units
    epsilon: float  # the final eps, in score units
    iterations: int
    marginal_error: float  # L1 distance of the column marginals to q, last step
    converged: bool
    tol: float  # the L1 error it stopped at (``sample_tolerance``)
    stages: list[dict] = field(default_factory=list)

    @property
    def log_duals(self) -> np.ndarray:
        """log v = beta / eps: the balanced label is argmax_j S_ij / eps + log v_j."""
        return self.beta / self.epsilon


def epsilon_schedule(scale: float, eps: float) -> list[float]:
    """From the score scale down to eps, halving: [scale, scale/2, ..., eps]."""
    schedule = [scale]
    while schedule[-1] * STAGE_FACTOR > eps:
        schedule.append(schedule[-1] * STAGE_FACTOR)
    return [*schedule, eps] if schedule[-1] > eps else schedule


def sinkhorn(
    rows: RowShards,
    q: np.ndarray,
    epsilon: float = DEFAULT_EPSILON,
    tol: float = 1e-3,
    max_iterations: int = 5000,
    on_stage: Callable[[dict], None] | None = None,
    beta0: np.ndarray | None = None,
) -> SinkhornResult:
    """Column potentials of the balanced plan for target proportions q (k,), sum 1.

    ``epsilon`` is relative to the standard deviation of the scores, so one default fits
    data of any scale. Stops when the L1 error of the column marginals is below ``tol``
    at the final eps, or after ``max_iterations`` steps in all. ``beta0`` (score units,
    e.g. last night's potentials) is a warm start: the solve then runs at the final eps
    only, from there, instead of annealing from the score scale.
    """
    q = np.asarray(q, np.float64)
    count, total, squares = rows.score_moments()
    scale = float(np.sqrt(max(squares / count - (total / count) ** 2, 0.0))) or 1.0
    schedule = epsilon_schedule(scale, epsilon * scale)
    beta = np.zeros(len(q))
    if beta0 is not None:
        schedule, beta = schedule[-1:], np.array(beta0, np.float64)
    excluded = q <= 0  # a zero target: the column never wins a row, and v stays 1 there
    beta[excluded] = EXCLUDED
    steps, err = 0, np.inf
    stages = []
    for eps in schedule:
        rows.prepare(beta, eps)
        v = np.ones(len(q))
        start, omega, previous = steps, OMEGA, np.inf
        while steps < max_iterations:
            col = rows.column_sums(v)
            err = float(np.abs(v * col - q).sum())  # column marginals after the row update
            steps += 1
            if err < tol:
                break
            if err > 1.5 * previous:
                omega = 1.0  # over-relaxation overshoots here: plain steps for this stage
            previous = err
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                v = v ** (1.0 - omega) * (q / col) ** omega
            v[excluded] = 1.0
            logv = np.log(np.where(np.isfinite(v) & (v > 0), v, np.exp(2 * ABSORB_LOG)))
            if np.abs(logv).max() > ABSORB_LOG:  # keep the linear domain in range
                beta += eps * logv
                v = np.ones(len(q))
                rows.prepare(beta, eps)
        beta += eps * np.log(np.where(np.isfinite(v), v, 1.0))
        record = {"epsilon": eps, "iterations": steps - start, "marginal_error": err}
        stages.append(record)
        if on_stage is not None:
            on_stage(record)
        if steps >= max_iterations:
            break
    return SinkhornResult(beta, schedule[-1], steps, err, err < tol, tol, stages)


def sample_tolerance(tol: float, q: np.ndarray, sample_rows: int, total_rows: int) -> float:
    """Sinkhorn's stopping tolerance on a uniform sample of ``sample_rows`` of
    ``total_rows``: ``tol``, or SAMPLE_NOISE_SHARE of the sample's own error if that is
    larger. The sample's cluster shares N_j / m estimate the whole's with an L1 error of
    about sum_j sqrt(2 q_j (1 - q_j) (1 - m / n) / (pi m)) (the mean absolute deviation
    of a normal approximation to the hypergeometric count; 0.10 at k = 1000 and 64 rows
    per cluster), which the passes over every row remove: solving the sample below it
    buys nothing (1M x 128, k = 1000: 18 passes after tol 1e-3 and after 0.03; 393 steps
    against 58)."""
    m, n = int(sample_rows), int(total_rows)
    if m <= 0 or m >= n:
        return tol
    q = np.asarray(q, np.float64)
    noise = np.sqrt(2.0 * q * (1.0 - q) * (1.0 - m / n) / (np.pi * m)).sum()
    return max(tol, SAMPLE_NOISE_SHARE * float(noise))


def proportions(k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Target column masses: uniform, or the given non-negative weights normalised."""
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, np.float64)
    return w / w.sum()
