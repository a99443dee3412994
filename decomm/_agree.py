"""Cross-rank agreement: every rank contributes a row of integers (usually digests), all
rows are gathered, and the ranks whose row differs from rank 0's are named.

The single implementation behind every "do all ranks agree?" check in decomm:
``set_topology``, the machine grouping and machine topology of the hierarchical ops,
window creation, the CUDA setup and the optimizer wrappers' parameter check. It takes
the ``allgather`` to use (a C++ backend's, or an optimizer communicator's), so it
works on any communicator and imports nothing above it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["differing_ranks", "digest", "gather_rows", "topology_digest"]


def digest(value: Any) -> int:
    """A 60-bit non-negative integer digest of ``repr(value)`` (or of bytes), stable
    across processes and Python versions (unlike ``hash``)."""
    data = value if isinstance(value, bytes) else repr(value).encode()
    return int(hashlib.sha256(data).hexdigest()[:15], 16)


def topology_digest(topology: Any) -> int:
    """The 60-bit digest of a topology's fingerprint (what message headers carry)."""
    return int(topology.fingerprint()[:15], 16)


def gather_rows(allgather: Callable[..., Any], row: Sequence[int], label: str
                ) -> list[list[int]]:
    """Every rank's ``row`` (ints of equal length on every rank), in rank order."""
    mine = torch.tensor([list(row)], dtype=torch.int64)
    table = allgather(mine, label)
    return [[int(v) for v in r] for r in torch.as_tensor(table).reshape(-1, len(row)).tolist()]


def differing_ranks(table: Sequence[Sequence[int]], columns: Sequence[int] | None = None
                    ) -> list[int]:
    """The ranks whose row differs from rank 0's (in ``columns`` only, if given)."""
    cols = range(len(table[0])) if columns is None else columns
    ref = [table[0][c] for c in cols]
    return [r for r, row in enumerate(table) if [row[c] for c in cols] != ref]
