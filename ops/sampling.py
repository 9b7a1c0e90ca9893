"""Samples that do not depend on how the rows are split over workers.

Every row gets a sampling key from its global row number and the seed (a splitmix64
hash, uniform in [0, 1)), or, to take the rows closest to a centroid, its squared
distance. A selection is "the m smallest (key, row) pairs", overall or per cluster:
each worker ranks its own rows, the driver merges the candidates' keys and row numbers
(never their embeddings), and the result is the same for one worker or many, because
ties are broken by the global row number.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """Uniform keys in [0, 1) (float64) for global row numbers ``rows`` (n,) under ``seed``.

    splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
    OOPSLA 2014) of seed * golden + row: a pure function of (seed, row).
    """
    with np.errstate(over="ignore"):
        z = np.asarray(rows, np.uint64) + np.uint64(seed % 2**63) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def smallest(keys: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` smallest (key, row) pairs, in increasing order of row."""
    if m >= len(keys):
        return np.argsort(rows, kind="stable")
    order = np.lexsort((rows, keys))[:m]
    return order[np.argsort(rows[order], kind="stable")]


def cluster_samples(
    labels: np.ndarray, keys: np.ndarray, rows: np.ndarray, k: int, quota: int | np.ndarray
) -> np.ndarray:
    """Indices of the ``quota`` smallest (key, row) pairs of each of the k clusters given
    by ``labels`` (one quota for all, or one per cluster); fewer where a cluster is
    smaller. Sorted by (label, key, row)."""
    order = np.lexsort((rows, keys, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_labels]
    quota = np.broadcast_to(np.asarray(quota), (k,))
    return order[rank < quota[sorted_labels]]


def cluster_thresholds(
    labels: np.ndarray, keys: np.ndarray, rows: np.ndarray, k: int, quota: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster, the largest (key, row) pair that ``cluster_samples`` keeps; (+inf,
    max row) where the cluster holds no more than the quota. Given the workers' own
    candidates (each worker's ``cluster_samples``), these k pairs select the same rows
    as ``cluster_samples`` over all rows at once."""
    key_t = np.full(k, np.inf)
    row_t = np.full(k, np.iinfo(np.int64).max, np.int64)
    picked = cluster_samples(labels, keys, rows, k, quota)
    if len(picked) == 0:
        return key_t, row_t
    full = np.bincount(labels[picked], minlength=k) >= quota
    last = picked[np.r_[labels[picked][1:] != labels[picked][:-1], True]]  # each cluster's
    full_last = last[full[labels[last]]]
    key_t[labels[full_last]] = keys[full_last]
    row_t[labels[full_last]] = rows[full_last]
    return key_t, row_t


def below_thresholds(
    labels: np.ndarray,
    keys: np.ndarray,
    rows: np.ndarray,
    key_t: np.ndarray,
    row_t: np.ndarray,
) -> np.ndarray:
    """Mask of the rows whose (key, row) is at most their cluster's threshold pair."""
    kt, rt = key_t[labels], row_t[labels]
    return (keys < kt) | ((keys == kt) & (rows <= rt))


def epoch_batches(rows: np.ndarray, seed: int, epoch: int, batches: int) -> list[np.ndarray]:
    """Mini-batch ``b`` of ``epoch`` (0 <= b < ``batches``) over rows ``rows`` (n,): the
    positions of the rows whose epoch key falls in [b / batches, (b + 1) / batches),
    ascending. The keys are ``row_keys`` under a seed of (seed, epoch), so a global
    batch is the union of every worker's batch b, however the rows are split; batches
    hold n / ``batches`` rows each on average."""
    epoch_seed = int(np.random.SeedSequence(seed, spawn_key=(2, epoch)).generate_state(1)[0])
    slot = np.minimum((row_keys(rows, epoch_seed) * batches).astype(np.int64), batches - 1)
    order = np.argsort(slot, kind="stable")  # positions ascending within each batch
    edges = np.searchsorted(slot[order], np.arange(batches + 1))
    return [order[edges[b] : edges[b + 1]] for b in range(batches)]
