r"""Compression operators for communication-efficient gossip (pure torch, no MPI).

A :class:`Compressor` turns a floating-point tensor ``x`` into a compact
:class:`Payload` - the values that travel (``values`` + ``int32`` ``indices``, or
packed ``uint8`` ``codes`` + a ``scale``) - and back into a dense tensor
``Q(x) = decompress(compress(x))``.  :meth:`Payload.to_bytes` lays a payload out as
one ``uint8`` vector, which is what :class:`decomm.optim.ChocoSGD` sends with
``decomm.neighbor_allgather``; :meth:`Compressor.from_bytes` reads it back.  The
payload's size depends only on ``(numel, dtype)``, never on the values
(:meth:`Compressor.payload_bytes`), so every rank's message has the same length.

The operators, with ``d = numel`` and ``k = max(1, round(ratio · d))``:

``TopK(ratio)``
    keeps the ``k`` entries of largest ``|x_i|``.  A deterministic contraction:
    ``‖x − Q(x)‖² ≤ (1 − k/d) ‖x‖²`` (Stich, Cordonnier & Jaggi, "Sparsified SGD
    with Memory", NeurIPS 2018).  Payload: ``k`` values + ``k`` int32 indices.
``RandomK(ratio, seed)``
    keeps ``k`` coordinates drawn uniformly without replacement; ``E[Q(x)] =
    (k/d) x`` and ``E‖x − Q(x)‖² = (1 − k/d) ‖x‖²`` (``unbiased=True`` scales the
    kept values by ``d/k``: ``E[Q(x)] = x``).  Payload as TopK.
``QSGD(levels)``
    stochastic quantisation of Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD:
    Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
    2017, with ``s = levels``: ``Q(x)_i = ‖x‖₂ · sign(x_i) · ξ_i / s`` where, with
    ``r_i = s |x_i| / ‖x‖₂`` and ``l_i = ⌊r_i⌋``, ``ξ_i = l_i + 1`` with probability
    ``r_i − l_i`` and ``l_i`` otherwise.  Unbiased, ``E[Q(x)] = x``, with
    ``Var Q(x)_i = (‖x‖₂/s)² p_i (1 − p_i)``, ``p_i = r_i − l_i``, and ``E‖Q(x) − x‖² ≤
    min(d/s², √d/s) ‖x‖²``.  ``rescale=True`` divides by ``τ = 1 + min(d/s², √d/s)``,
    the biased contraction (``δ = 1/τ``) of Koloskova, Stich & Jaggi (ICML 2019,
    Sec. 5) that CHOCO-SGD's analysis needs when ``min(d/s², √d/s) ≥ 1``.  Codes
    ``ξ_i sign(x_i) + s ∈ [0, 2s]`` are packed at ``bits`` = 2, 4 or 8 bits each
    (``bits=8``: ``s`` up to 127); payload: packed ``uint8`` codes + the norm.
``Sign()``
    scaled sign, ``Q(x) = (‖x‖₁ / d) · sign(x)`` (``sign(0) = +1``), the
    error-feedback form of Karimireddy, Rebjock, Stich & Jaggi, "Error Feedback
    Fixes SignSGD and other Gradient Compression Schemes", ICML 2019.  A
    deterministic contraction with ``‖x − Q(x)‖² = ‖x‖² − ‖x‖₁²/d``.  Payload: one
    bit per entry (packed, little-endian within a byte) + the scale.
``Identity()``
    no compression (dense values); CHOCO-SGD with it and ``consensus_step=1`` is DSGD.

Stochastic operators (RandomK, QSGD) draw from a ``torch.Generator``: pass
``generator=`` to :meth:`Compressor.compress` (what ChocoSGD does, one stream per
rank and bucket from :meth:`Compressor.make_generator`), or let the compressor use
its own, seeded once with ``seed``: the same seed gives the same sequence of draws.
A compressor holds no other state, so one instance may be shared by many wrappers
(the simulator passes one to every node).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "QSGD",
    "Compressor",
    "Identity",
    "Payload",
    "RandomK",
    "Sign",
    "TopK",
]

#: dtypes a compressor accepts (real floating point)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: largest numel the int32 indices of TopK / RandomK can address
MAX_NUMEL = 2**31 - 1


class Payload:
    """What a compressor sends for one tensor: named parts in a fixed layout.

    ``parts`` maps part names (``"values"``, ``"indices"``, ``"codes"``, ``"scale"``)
    to 1-D tensors, in the compressor's layout order; ``numel`` and ``dtype`` are
    those of the compressed tensor.
    """

    __slots__ = ("dtype", "numel", "parts")

    def __init__(self, parts: dict[str, Tensor], numel: int, dtype: torch.dtype) -> None:
        self.parts = parts
        self.numel = int(numel)
        self.dtype = dtype

    def __getitem__(self, name: str) -> Tensor:
        return self.parts[name]

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the sum of the parts' sizes (no header, no padding)."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def to_bytes(self) -> Tensor:
        """The parts laid end to end as one ``uint8`` vector (on the parts' device)."""
        chunks = [t.detach().contiguous().reshape(-1).view(torch.uint8)
                  for t in self.parts.values()]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0].clone()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.parts.items())
        return f"Payload({parts}; numel={self.numel}, {self.dtype}, {self.nbytes} bytes)"


def _check_ratio(ratio: Any, who: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{who}: ratio must be a float in (0, 1], got {type(ratio).__name__}")
    r = float(ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"{who}: ratio must be in (0, 1], got {ratio!r}")
    return r


def _check_seed(seed: Any, who: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{who}: seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and scales are computed and sent in: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (< 2**bits) into uint8, ``8 // bits`` per byte, low bits first."""
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    d = codes.numel()
    padded = torch.zeros(-(-d // per) * per, dtype=torch.uint8, device=codes.device)
    padded[:d] = codes
    grid = padded.view(-1, per)
    out = grid[:, 0].clone()
    for k in range(1, per):
        out |= grid[:, k] << (bits * k)
    return out


def _unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`_pack`: ``numel`` codes as uint8."""
    per = 8 // bits
    if per == 1:
        return packed[:numel]
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]


class Compressor(abc.ABC):
    """Base class: ``compress(x) -> Payload``, ``decompress(payload, shape) -> Tensor``.

    Subclasses implement :meth:`layout`, :meth:`_compress` and :meth:`_decompress`.
    """

    #: whether compress draws random numbers (then a generator matters)
    stochastic: ClassVar[bool] = False
    seed: int = 0

    # ---------------------------------------------------------------- layout
    @abc.abstractmethod
    def layout(self, numel: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, int]]:
        """``(part name, dtype, element count)`` of the payload of a ``numel`` tensor."""

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes of the payload of a ``numel``-element ``dtype`` tensor (values-independent)."""
        numel, dtype = self._check_meta(numel, dtype)
        return sum(n * torch.empty((), dtype=dt).element_size()
                   for _, dt, n in self.layout(numel, dtype))

    def ratio(self, numel: int, dtype: torch.dtype = torch.float32) -> float:
        """Compressed bytes / dense bytes for a ``numel``-element ``dtype`` tensor."""
        numel, dtype = self._check_meta(numel, dtype)
        dense = numel * torch.empty((), dtype=dtype).element_size()
        return self.payload_bytes(numel, dtype) / dense

    # ------------------------------------------------------------ (de)compress
    def compress(self, tensor: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """The payload of ``tensor`` (any shape; compressed as its flattening).

        ``generator`` feeds the random draws of stochastic compressors (default:
        the compressor's own, seeded with ``seed`` at construction).
        """
        x = self._check_tensor(tensor)
        flat = x.detach().reshape(-1)
        if self.stochastic and generator is None:
            generator = self._own_generator(flat.device)
        parts = self._compress(flat, generator)
        return Payload(parts, flat.numel(), flat.dtype)

    def decompress(self, payload: Payload, shape: Sequence[int] | torch.Size | None = None
                   ) -> Tensor:
        """The dense ``Q(x)`` of ``payload``, shaped ``shape`` (default: flat)."""
        if not isinstance(payload, Payload):
            raise TypeError(f"{type(self).__name__}.decompress: expected a Payload, got "
                            f"{type(payload).__name__}")
        self._check_parts(payload)
        out = self._decompress(payload)
        if shape is None:
            return out
        shape = torch.Size(shape)
        if shape.numel() != payload.numel:
            raise ValueError(f"{type(self).__name__}.decompress: shape {tuple(shape)} has "
                             f"{shape.numel()} elements but the payload holds {payload.numel}")
        return out.view(shape)

    def decompress_add_(self, out: Tensor, payload: Payload, alpha: float = 1.0) -> Tensor:
        """``out += alpha · Q(x)`` in place (``out`` flat, ``payload.numel`` elements).

        Bitwise what ``out.add_(decompress(payload), alpha=alpha)`` gives; sparse
        compressors add only their ``k`` entries.
        """
        out.add_(self.decompress(payload).view_as(out), alpha=alpha)
        return out

    def __call__(self, tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``Q(tensor) = decompress(compress(tensor))``, shaped like ``tensor``."""
        return self.decompress(self.compress(tensor, generator=generator), tensor.shape)

    # ----------------------------------------------------------------- wire
    def from_bytes(self, buf: Tensor, numel: int, dtype: torch.dtype) -> Payload:
        """Read a payload that :meth:`Payload.to_bytes` wrote for a ``numel`` ``dtype`` tensor."""
        numel, dtype = self._check_meta(numel, dtype)
        if not isinstance(buf, Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
            raise TypeError(f"{type(self).__name__}.from_bytes: expected a 1-D uint8 tensor")
        want = self.payload_bytes(numel, dtype)
        if buf.numel() != want:
            raise ValueError(f"{type(self).__name__}.from_bytes: {buf.numel()} bytes, but the "
                             f"payload of {numel} {dtype} elements has {want}")
        parts: dict[str, Tensor] = {}
        off = 0
        for name, dt, n in self.layout(numel, dtype):
            size = n * torch.empty((), dtype=dt).element_size()
            # clone: a slice at an odd offset cannot be viewed as a wider dtype
            parts[name] = buf[off:off + size].clone().view(dt)
            off += size
        return Payload(parts, numel, dtype)

    # ------------------------------------------------------------ generators
    def make_generator(self, *stream: int, device: torch.device | str = "cpu"
                       ) -> torch.Generator | None:
        """A generator seeded from ``(seed, *stream)`` (``None`` if not stochastic).

        Different streams (ChocoSGD uses ``(rank, bucket)``) draw independently;
        the same ``(seed, stream)`` always draws the same numbers.
        """
        if not self.stochastic:
            return None
        for s in stream:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise ValueError(f"make_generator: stream ids must be non-negative ints, "
                                 f"got {stream!r}")
        words = np.random.SeedSequence([self.seed, *[int(s) for s in stream]]).generate_state(
            2, dtype=np.uint32)
        g = torch.Generator(device=device)
        g.manual_seed((int(words[0]) << 31) ^ int(words[1]))
        return g

    def _own_generator(self, device: torch.device) -> torch.Generator:
        gens: dict[str, torch.Generator] = self.__dict__.setdefault("_generators", {})
        key = str(device)
        if key not in gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            gens[key] = g
        return gens[key]

    # ------------------------------------------------------------ internals
    @abc.abstractmethod
    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        ...

    @abc.abstractmethod
    def _decompress(self, payload: Payload) -> Tensor:
        ...

    def _check_meta(self, numel: Any, dtype: Any) -> tuple[int, torch.dtype]:
        who = type(self).__name__
        if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or numel < 1:
            raise ValueError(f"{who}: numel must be a positive int, got {numel!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{who} compresses float16, bfloat16, float32 or float64 "
                            f"tensors, got {dtype}")
        if int(numel) > MAX_NUMEL:
            raise ValueError(f"{who}: {numel} elements is more than a payload addresses "
                             f"({MAX_NUMEL}, int32 indices); compress it in parts")
        return int(numel), dtype

    def _check_tensor(self, tensor: Any) -> Tensor:
        who = type(self).__name__
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{who}.compress: expected a torch.Tensor, got "
                            f"{type(tensor).__name__}")
        if tensor.is_sparse:
            raise TypeError(f"{who}.compress: sparse tensors are not supported")
        self._check_meta(tensor.numel(), tensor.dtype)
        return tensor

    def _check_parts(self, payload: Payload) -> None:
        want = self.layout(*self._check_meta(payload.numel, payload.dtype))
        got = [(k, v.dtype, v.numel()) for k, v in payload.parts.items()]
        if got != want:
            raise ValueError(f"{type(self).__name__}.decompress: the payload has parts {got}, "
                             f"expected {want} (was it made by another compressor?)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Compressor):
    """No compression: the payload is the dense values (``Q(x) = x``)."""

    def layout(self, numel: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, int]]:
        return [("values", dtype, numel)]

    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {"values": flat.clone()}

    def _decompress(self, payload: Payload) -> Tensor:
        return payload["values"].clone()


class _Sparse(Compressor):
    """Common part of TopK and RandomK: ``k`` values + ``k`` int32 indices."""

    def __init__(self, ratio: float) -> None:
        self.ratio_kept = _check_ratio(ratio, type(self).__name__)

    def k(self, numel: int) -> int:
        """Entries kept of a ``numel`` tensor: ``max(1, round(ratio · numel))``, at most numel."""
        return min(int(numel), max(1, math.floor(self.ratio_kept * numel + 0.5)))

    def layout(self, numel: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, int]]:
        k = self.k(numel)
        return [("values", dtype, k), ("indices", torch.int32, k)]

    def _decompress(self, payload: Payload) -> Tensor:
        vals = payload["values"]
        out = torch.zeros(payload.numel, dtype=payload.dtype, device=vals.device)
        out[payload["indices"]] = vals
        return out

    def decompress_add_(self, out: Tensor, payload: Payload, alpha: float = 1.0) -> Tensor:
        self._check_parts(payload)
        if out.dim() != 1 or out.numel() != payload.numel:
            raise ValueError(f"{type(self).__name__}.decompress_add_: out must be flat with "
                             f"{payload.numel} elements, got shape {tuple(out.shape)}")
        out.index_add_(0, payload["indices"], payload["values"].to(out.dtype),
                       alpha=alpha)
        return out


class TopK(_Sparse):
    """Keep the ``k = max(1, round(ratio · d))`` entries of largest magnitude."""

    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        k = self.k(flat.numel())
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        return {"values": flat[idx], "indices": idx.to(torch.int32)}

    def __repr__(self) -> str:
        return f"TopK(ratio={self.ratio_kept})"


class RandomK(_Sparse):
    """Keep ``k = max(1, round(ratio · d))`` coordinates drawn uniformly without replacement.

    ``unbiased=True`` scales the kept values by ``d/k`` (``E[Q(x)] = x``, no longer
    a contraction); the default keeps them as they are (``E[Q(x)] = (k/d) x``, the
    contraction ``rand_k`` that CHOCO-SGD's analysis uses).
    """

    stochastic = True

    def __init__(self, ratio: float, seed: int = 0, *, unbiased: bool = False) -> None:
        super().__init__(ratio)
        self.seed = _check_seed(seed, "RandomK")
        self.unbiased = bool(unbiased)

    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        d = flat.numel()
        k = self.k(d)
        # int32 draws: the permutation is O(d) memory per call (4 bytes per entry)
        idx = torch.randperm(d, generator=generator, dtype=torch.int32, device=flat.device)[:k]
        vals = flat[idx]
        if self.unbiased:
            vals = vals * (d / k)
        return {"values": vals, "indices": idx.clone()}

    def __repr__(self) -> str:
        extra = ", unbiased=True" if self.unbiased else ""
        return f"RandomK(ratio={self.ratio_kept}, seed={self.seed}{extra})"


class QSGD(Compressor):
    """Stochastic quantisation to ``levels`` levels per sign (Alistarh et al. 2017).

    Args:
        levels: ``s >= 1``; default ``2**(bits-1) - 1`` (127 at 8 bits).
        bits: bits per code, 2, 4 or 8 (default: the fewest that hold the
            ``2s + 1`` codes).  ``QSGD(bits=8)`` is the 8-bit option.
        seed: seed of the compressor's own generator.
        rescale: divide by ``τ = 1 + min(d/s², √d/s)`` (a biased contraction).
    """

    stochastic = True
    BITS = (2, 4, 8)

    def __init__(self, levels: int | None = None, *, bits: int | None = None, seed: int = 0,
                 rescale: bool = False) -> None:
        if bits is not None and (isinstance(bits, bool) or bits not in self.BITS):
            raise ValueError(f"QSGD: bits must be 2, 4 or 8, got {bits!r}")
        if levels is None:
            if bits is None:
                raise ValueError("QSGD: give levels (e.g. QSGD(16)) or bits (e.g. QSGD(bits=8))")
            levels = 2 ** (bits - 1) - 1
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
            raise ValueError(f"QSGD: levels must be a positive int, got {levels!r}")
        levels = int(levels)
        need = next((b for b in self.BITS if 2 * levels + 1 <= 2**b), None)
        if need is None:
            raise ValueError(f"QSGD: levels={levels} needs {2 * levels + 1} codes, more than "
                             f"8 bits hold; use levels <= 127")
        if bits is None:
            bits = need
        elif 2 * levels + 1 > 2**bits:
            raise ValueError(f"QSGD: levels={levels} needs {2 * levels + 1} codes, more than "
                             f"bits={bits} hold (at most {(2**bits - 1) // 2} levels)")
        self.levels: int = levels
        self.bits: int = int(bits)
        self.seed = _check_seed(seed, "QSGD")
        self.rescale = bool(rescale)

    def variance_bound(self, numel: int) -> float:
        """``ω = min(d/s², √d/s)``: ``E‖Q(x) − x‖² ≤ ω ‖x‖²`` (unscaled QSGD)."""
        d, s = float(numel), float(self.levels)
        return min(d / s**2, math.sqrt(d) / s)

    def layout(self, numel: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, int]]:
        per = 8 // self.bits
        return [("codes", torch.uint8, -(-numel // per)), ("scale", _work_dtype(dtype), 1)]

    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        s = self.levels
        work = flat.to(_work_dtype(flat.dtype))
        norm = torch.linalg.vector_norm(work)
        a = work.abs()
        r = a * (s / norm) if bool(norm > 0) else torch.zeros_like(a)
        r = r.clamp_(max=float(s))  # |x_i| / ‖x‖ <= 1 up to rounding
        low = r.floor()
        u = torch.rand(r.shape, generator=generator, dtype=r.dtype, device=r.device)
        level = (low + (u < (r - low)).to(r.dtype)).clamp_(max=float(s))
        signed = torch.where(work < 0, -level, level)
        codes = (signed + s).to(torch.uint8)
        return {"codes": _pack(codes, self.bits), "scale": norm.reshape(1)}

    def _decompress(self, payload: Payload) -> Tensor:
        s = self.levels
        scale = payload["scale"]
        codes = _unpack(payload["codes"], self.bits, payload.numel)
        step = scale / s
        if self.rescale:
            step = step / (1.0 + self.variance_bound(payload.numel))
        return ((codes.to(scale.dtype) - s) * step).to(payload.dtype)

    def __repr__(self) -> str:
        extra = ", rescale=True" if self.rescale else ""
        return f"QSGD(levels={self.levels}, bits={self.bits}, seed={self.seed}{extra})"


class Sign(Compressor):
    """Scaled sign ``(‖x‖₁/d) · sign(x)``, one bit per entry (Karimireddy et al. 2019)."""

    def layout(self, numel: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, int]]:
        return [("codes", torch.uint8, -(-numel // 8)), ("scale", _work_dtype(dtype), 1)]

    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        work = flat.to(_work_dtype(flat.dtype))
        scale = work.abs().sum() / work.numel()
        bits = (work >= 0).to(torch.uint8)  # sign(0) = +1
        return {"codes": _pack(bits, 1), "scale": scale.reshape(1)}

    def _decompress(self, payload: Payload) -> Tensor:
        scale = payload["scale"]
        bits = _unpack(payload["codes"], 1, payload.numel)
        return ((bits.to(scale.dtype) * 2 - 1) * scale).to(payload.dtype)
