"""Array helpers every kernel shares: row chunks, float32 views, row norms."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Rows per faiss call. faiss blocks queries internally (4096 rows per BLAS call), so this
# only bounds the float32 copy of a float16 chunk and the (chunk, m) result buffers.
DEFAULT_CHUNK_ROWS = 65536


def iter_chunks(n: int, chunk_rows: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_rows`` rows covering ``range(n)``."""
    for start in range(0, n, chunk_rows):
        yield slice(start, min(start + chunk_rows, n))


def as_float32(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view of ``x`` (a copy only when needed)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def squared_norms(x: np.ndarray) -> np.ndarray:
    """|x_i|^2 (n,) float32 for rows x (n, d)."""
    return np.einsum("ij,ij->i", x, x, dtype=np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32). Prior validation: no zero rows."""
    import faiss  # here, not above: ops.gpu (torch only) imports this module

    x = np.array(x, dtype=np.float32, copy=True)
    faiss.normalize_L2(x)
    return x


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` for a 1-d array, by a sort: numpy 2.4's ``np.unique`` hashes
    first and sorts after, x14 slower on 1.1M int64 (0.85 s against 0.06 s, measured)."""
    s = np.sort(a, axis=None)
    return s[np.concatenate([[True], s[1:] != s[:-1]])] if len(s) else s
