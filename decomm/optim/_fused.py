"""Fused elementwise updates of the wrappers' flat buffers.

An update such as ``y ← y + g − g_old`` written as torch ops runs one pass over
memory per op (``y.add_(g).sub_(g_old)``: read y and g, write y, then read y and
g_old, write y again). On a model-sized buffer these passes are what a wrapper
costs beyond its exchange. :func:`linear_map_` computes several such combinations
of the same inputs in one pass, each input read once and each output written
once::

    outs[i] ← Σ_j coefs[i][j] · ins[j]

in the accumulator type of the dtype (float32 for half precision), in a fixed
order, rounded once; an output may be one of the inputs (``x, h ← x + h, x`` reads
both before writing either). Contiguous float CPU tensors of one dtype go to the
C++ kernel; anything else (CUDA tensors) runs as torch ops with the same result up
to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["linear_map_"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_OUTPUTS = 4  # csrc/weighted_sum.h kMaxLinearMapOutputs


def _kernel():
    try:
        from .. import _C
    except ImportError:  # a source tree without the built extension (docs)
        return None
    return getattr(_C, "linear_map_", None)


def linear_map_(outs: Sequence[Tensor], coefs: Sequence[Sequence[float]],
                ins: Sequence[Tensor]) -> None:
    """``outs[i] ← Σ_j coefs[i][j] ins[j]`` for every i, in one pass over memory.

    Args:
        outs: 1 to 4 tensors to write; each may be one of ``ins`` (the same tensor),
            but must not partly overlap any other buffer.
        coefs: one row of ``len(ins)`` coefficients per output; zeros skip the input.
        ins: the inputs, all of the outputs' shape, dtype and device.
    """
    if not 1 <= len(outs) <= _MAX_OUTPUTS or len(coefs) != len(outs):
        raise ValueError(f"linear_map_: 1 to {_MAX_OUTPUTS} outputs with one coefficient "
                         f"row each, got {len(outs)} outputs and {len(coefs)} rows")
    rows = [[float(c) for c in row] for row in coefs]
    ref = outs[0]
    kernel = _kernel() if ref.dtype in _KERNEL_DTYPES else None
    if kernel is not None and all(t.is_cpu and t.is_contiguous() for t in (*outs, *ins)):
        kernel(list(outs), rows, list(ins))
        return
    # torch ops: every output is computed before any is written (outputs alias inputs)
    results = []
    for row in rows:
        acc = torch.zeros_like(ref, memory_format=torch.contiguous_format)
        for c, t in zip(row, ins):
            if c != 0.0:
                acc.add_(t, alpha=c)
        results.append(acc)
    for out, acc in zip(outs, results):
        out.copy_(acc)
