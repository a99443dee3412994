"""Sparse storage of one mixing matrix (one round of a topology).

A round is an n x n row-stochastic matrix ``W`` stored in CSR form (``indptr``,
``indices``, ``data``; float64 weights, column indices sorted inside each row,
explicit zeros dropped).  Row ``i`` holds what node ``i`` receives:
``x_new[i] = sum_j W[i, j] x[j]``.  Memory is O(nnz), so n = 10^4 with a handful
of neighbours per node costs a few hundred kilobytes per round.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

__all__ = ["SparseRound"]

_INT = np.int64


class SparseRound:
    """One mixing matrix in CSR form (immutable by convention).

    ``indptr`` has length n + 1; row i's column indices are
    ``indices[indptr[i]:indptr[i + 1]]`` (sorted ascending) and its weights the same
    slice of ``data``.  The diagonal is stored like any other entry.
    """

    def __init__(self, n: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        self.n = int(n)
        self.indptr = np.ascontiguousarray(indptr, dtype=_INT)
        self.indices = np.ascontiguousarray(indices, dtype=_INT)
        self.data = np.ascontiguousarray(data, dtype=np.float64)
        for arr in (self.indptr, self.indices, self.data):
            arr.flags.writeable = False

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_coo(
        cls,
        n: int,
        rows: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
        diag: np.ndarray | None = None,
    ) -> SparseRound:
        """Build from COO triplets (duplicates are summed).

        Diagonal triplets (``rows == cols``) set the self weight of their node.  A node
        with no diagonal triplet gets ``1 - (its off-diagonal row sum)``, which makes
        it row-stochastic to machine precision (an untouched node keeps weight
        exactly 1).  ``diag`` overrides all self weights.  A node's diagonal triplet
        must therefore come with its whole row (e.g. a uniform clique).
        """
        rows = np.asarray(rows, dtype=_INT).ravel()
        cols = np.asarray(cols, dtype=_INT).ravel()
        vals = np.asarray(vals, dtype=np.float64).ravel()
        on = rows == cols
        if diag is None:
            off = ~on
            diag = 1.0 - np.bincount(rows[off], weights=vals[off], minlength=n)
            # values that are zero up to rounding (a node giving all its weight away)
            diag[np.abs(diag) < 8 * np.finfo(np.float64).eps] = 0.0
            if on.any():
                has = np.bincount(rows[on], minlength=n) > 0
                diag[has] = np.bincount(rows[on], weights=vals[on], minlength=n)[has]
        else:
            diag = np.asarray(diag, dtype=np.float64)
        rows, cols, vals = rows[~on], cols[~on], vals[~on]
        ar = np.arange(n, dtype=_INT)
        keys = np.concatenate([rows * n + cols, ar * n + ar])
        allv = np.concatenate([vals, diag])
        uniq, inv = np.unique(keys, return_inverse=True)
        summed = np.bincount(inv.ravel(), weights=allv, minlength=uniq.size)
        keep = summed != 0.0
        uniq, summed = uniq[keep], summed[keep]
        r = uniq // n
        indptr = np.zeros(n + 1, dtype=_INT)
        np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
        return cls(n, indptr, uniq - r * n, summed)

    @classmethod
    def from_dense(cls, mat: np.ndarray) -> SparseRound:
        """Build from a dense square matrix (zeros dropped)."""
        mat = np.asarray(mat, dtype=np.float64)
        n = mat.shape[0]
        rows, cols = np.nonzero(mat)
        indptr = np.zeros(n + 1, dtype=_INT)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(n, indptr, cols, mat[rows, cols])

    @classmethod
    def identity(cls, n: int) -> SparseRound:
        """The n x n identity (every node keeps its value)."""
        ar = np.arange(n, dtype=_INT)
        return cls(n, np.arange(n + 1, dtype=_INT), ar, np.ones(n))

    # ------------------------------------------------------------------ queries
    @property
    def nnz(self) -> int:
        """Number of stored entries, diagonal included."""
        return int(self.indices.size)

    @cached_property
    def row_ids(self) -> np.ndarray:
        """Row index of every stored entry (COO rows)."""
        return np.repeat(np.arange(self.n, dtype=_INT), np.diff(self.indptr))

    @cached_property
    def offdiag_mask(self) -> np.ndarray:
        """Boolean mask of stored entries that are not on the diagonal."""
        return self.row_ids != self.indices

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(column indices, weights) of row i, diagonal included."""
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.data[a:b]

    def diagonal(self) -> np.ndarray:
        """The diagonal W[i, i] as a length-n array."""
        d = np.zeros(self.n)
        m = ~self.offdiag_mask
        d[self.row_ids[m]] = self.data[m]
        return d

    @cached_property
    def T(self) -> SparseRound:
        """The transposed round (CSR of W^T, i.e. CSC of W); cached."""
        # entries are in row order, so a stable sort by column keeps rows ascending
        order = np.argsort(self.indices, kind="stable")
        cols = self.indices[order]
        indptr = np.zeros(self.n + 1, dtype=_INT)
        np.cumsum(np.bincount(cols, minlength=self.n), out=indptr[1:])
        return SparseRound(self.n, indptr, self.row_ids[order], self.data[order])

    def in_degrees(self) -> np.ndarray:
        """Number of in-neighbours j != i of every node i."""
        return np.bincount(self.row_ids[self.offdiag_mask], minlength=self.n)

    def out_degrees(self) -> np.ndarray:
        """Number of out-neighbours j != i (nodes with W[j, i] != 0) of every node i."""
        return np.bincount(self.indices[self.offdiag_mask], minlength=self.n)

    def row_sums(self) -> np.ndarray:
        """Sum of each row of W."""
        return np.bincount(self.row_ids, weights=self.data, minlength=self.n)

    def col_sums(self) -> np.ndarray:
        """Sum of each column of W."""
        return np.bincount(self.indices, weights=self.data, minlength=self.n)

    def to_dense(self) -> np.ndarray:
        """The round as a dense float64 n x n array."""
        out = np.zeros((self.n, self.n))
        out[self.row_ids, self.indices] = self.data
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """Return ``W @ x`` for x of shape (n,) or (n, d), in O(nnz * d)."""
        x = np.asarray(x, dtype=np.float64)
        contrib = self.data.reshape((-1,) + (1,) * (x.ndim - 1)) * x[self.indices]
        # every row of a row-stochastic round has at least one entry, so no empty
        # segments; guard anyway for hand-built rounds.
        if np.all(np.diff(self.indptr) > 0):
            return np.add.reduceat(contrib, self.indptr[:-1], axis=0)
        out = np.zeros_like(x)
        np.add.at(out, self.row_ids, contrib)
        return out

    def gram_dense(self) -> np.ndarray:
        """``W^T W`` as a dense array, from the pairs of entries in each row
        (O(sum_i deg_i^2 + n^2), no dense matrix product)."""
        n = self.n
        cnt = np.diff(self.indptr)
        start = self.indptr[:-1]
        e = np.arange(self.nnz, dtype=_INT)
        reps = cnt[self.row_ids]
        e1 = np.repeat(e, reps)
        first = np.repeat(np.cumsum(reps) - reps, reps)
        e2 = start[self.row_ids[e1]] + (np.arange(e1.size, dtype=_INT) - first)
        keys = self.indices[e1] * n + self.indices[e2]
        vals = self.data[e1] * self.data[e2]
        return np.bincount(keys, weights=vals, minlength=n * n).reshape(n, n)

    def is_symmetric(self, tol: float = 0.0) -> bool:
        """True when W == W^T (entrywise, up to ``tol``)."""
        t = self.T
        if np.array_equal(self.indptr, t.indptr) and np.array_equal(self.indices, t.indices):
            return bool(np.all(np.abs(self.data - t.data) <= tol))
        if tol == 0.0:
            return False
        return bool(np.all(np.abs(self.to_dense() - t.to_dense()) <= tol))

    def content_bytes(self) -> bytes:
        """Platform-independent bytes of the CSR arrays (for hashing)."""
        return (
            self.indptr.astype("<i8").tobytes()
            + self.indices.astype("<i8").tobytes()
            + self.data.astype("<f8").tobytes()
        )

    def __repr__(self) -> str:
        return f"SparseRound(n={self.n}, nnz={self.nnz})"
