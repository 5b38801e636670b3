"""The paper's quantizers as pure tensor functions (CPU and CUDA; float32/float16/bfloat16 in).

Every quantized tensor uses one representation, chosen so that integer GEMMs can consume it
directly (see DESIGN.md section 4)::

    x  ~=  codes * scale + offset          codes: int8 in [-2^(b-1), 2^(b-1) - 1]

``scale`` and ``offset`` are float32 and broadcast against ``codes``: shape ``()`` per tensor,
``(N, 1)`` per row, ``(1, D)`` per column, ``(C, 1, ...)`` per channel. An affine range
``[lo, hi]`` with ``B = 2^b - 1`` intervals has ``scale = (hi - lo) / B`` and
``offset = lo + 2^(b-1) * scale`` (level ``k`` in ``0..B`` is code ``k - 2^(b-1)``).

Forward quantizers (Q_f for ``input``, Q_w for ``weight``) round to nearest. Gradient
quantizers (Q_b1, Q_b2) round stochastically, ``floor(y + u)`` with ``u ~ U[0, 1)`` from the
counter-based generator in :mod:`fqt_compile.rng`, on a range that contains every value, so
``E[dequantize(quantize(x))] = x`` exactly (up to one float32 ulp of ``y``).

Gradient quantizers work on a 2-D view ``(N, D)`` of the gradient, one row per sample (per
token for sequence models):

=========  ==========================================  ==========================================
name       paper                                        range
=========  ==========================================  ==========================================
ptq        PTQ, per-tensor                             one [min, max]
psq        PSQ, per-sample                             one [min, max] per row
column     reference Q_b2 of PSQ/BHQ runs               one [min, max] per column
bhq        BHQ, block Householder                      per row, after T = H_n diag(s) per group
hadamard   (extra) block Hadamard                      per row, after a normalized Hadamard mix
=========  ==========================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .config import MAX_BITS, MIN_BITS
from .rng import new_seed, uniform_from_seed

__all__ = [
    "QuantizedTensor",
    "BHQPlan",
    "GradQuantized",
    "check_bits",
    "quantize_forward",
    "fake_quantize_forward",
    "dequantize",
    "stochastic_quantize",
    "bhq_plan",
    "bhq_transform",
    "bhq_inverse",
    "hadamard_transform",
    "hadamard_inverse",
    "quantize_grad",
    "dequantize_grad",
    "fake_quantize_grad",
    "as_rows",
    "GRAD_KINDS",
    "FORWARD_SCHEMES",
]

FORWARD_SCHEMES = ("affine", "affine_zero", "symmetric")
GRAD_KINDS = ("ptq", "psq", "column", "bhq", "hadamard")
RangeGranularity = Literal["tensor", "row", "column"]


def check_bits(bits: int, where: str = "bits") -> None:
    """Raise ``ValueError`` unless ``bits`` is an int in [2, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{where} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


@dataclass(frozen=True)
class QuantizedTensor:
    """``codes * scale + offset`` approximates the original tensor (see module docstring)."""

    codes: torch.Tensor  # int8, the original shape
    scale: torch.Tensor  # float32, broadcastable to codes
    offset: torch.Tensor  # float32, broadcastable to codes
    bits: int
    dtype: torch.dtype  # dtype of the original tensor

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.offset, dtype or self.dtype)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes * scale + offset`` in ``dtype``."""
    return (codes.to(torch.float32) * scale + offset).to(dtype)


def _check_finite_range(lo: torch.Tensor, hi: torch.Tensor, name: str) -> None:
    # min/max propagate NaN and Inf, so checking the (small) range tensors finds any
    # non-finite element of the input without another pass over it.
    if lo.numel() and not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError(
            f"{name} contains NaN or Inf values; fqt quantizers refuse non-finite tensors "
            "(a NaN/Inf gradient usually means the loss diverged: lower the learning rate or "
            "check the loss for overflow)"
        )


def _safe_scale(span: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, divisor)``: ``scale = span / levels`` is what the representation stores;
    ``divisor`` is the same with zeros replaced by 1, to map values to levels without 0 / 0.

    A zero range (all-equal values, e.g. a constant row or a row of one element) stores
    scale 0, so ``codes * scale + offset`` is exactly the offset, i.e. the value itself.
    (A stored scale of 1 would put the value through ``(value + 2^(b-1)) - 2^(b-1)`` in
    float32, which rounds it to a multiple of about 2^-16: a deterministic bias, and 0 for
    gradients below ~1e-5.)
    """
    scale = span / levels
    return scale, torch.where(scale > 0, scale, torch.ones_like(scale))


def _reduce_dims(x: torch.Tensor, granularity: str, axis: int) -> tuple[int, ...] | None:
    if granularity == "tensor":
        return None
    if granularity == "channel":
        axis = axis % x.dim()
        return tuple(d for d in range(x.dim()) if d != axis)
    raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")


def _minmax(x: torch.Tensor, dims: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if dims is None:
        return x.amin(), x.amax()
    if len(dims) == 0:
        return x, x
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def quantize_forward(
    x: torch.Tensor,
    bits: int = 8,
    scheme: str = "affine_zero",
    granularity: str = "tensor",
    axis: int = 0,
    *,
    name: str = "tensor",
) -> QuantizedTensor:
    """Forward quantizer Q_f / Q_w: deterministic round-to-nearest.

    ``scheme``: ``"affine"`` (plain [min, max]), ``"affine_zero"`` (the paper's variant: the
    range is widened to contain 0 and 0.0 is exactly a level), or ``"symmetric"`` (codes in
    ``[-(2^(b-1)-1), 2^(b-1)-1]``, offset 0). ``granularity``: ``"tensor"`` or ``"channel"``
    (one range per index of ``axis``).
    """
    check_bits(bits)
    if scheme not in FORWARD_SCHEMES:
        raise ValueError(f"scheme must be one of {FORWARD_SCHEMES}, got {scheme!r}")
    dims = _reduce_dims(x, granularity, axis)
    half = 2 ** (bits - 1)
    xf = x.to(torch.float32)
    if x.numel() == 0:
        one = torch.ones((), device=x.device)
        return QuantizedTensor(x.to(torch.int8), one, one * 0, bits, x.dtype)
    lo, hi = _minmax(xf, dims)
    _check_finite_range(lo, hi, name)
    p = forward_params(lo, hi, bits, scheme)
    if scheme == "symmetric":
        codes = torch.clamp(torch.round(xf / p.div), p.cmin, p.cmax)
    elif scheme == "affine":
        codes = torch.clamp(torch.round((xf - p.shift) / p.div), p.cmin, p.cmax) - half
    else:  # affine_zero
        codes = torch.clamp(torch.round(xf / p.div) + p.zero, p.cmin, p.cmax) - half
    return QuantizedTensor(codes.to(torch.int8), p.scale, p.offset, bits, x.dtype)


@dataclass(frozen=True)
class ForwardParams:
    """What :func:`quantize_forward` derives from a range ``[lo, hi]``: every scheme's codes
    are ``clamp(round((x - shift) / div) + zero, cmin, cmax) - bias`` (``shift`` 0 except for
    ``affine``, ``zero`` 0 except for ``affine_zero``; ``x - 0.0`` and ``y + 0.0`` change no
    float value, so one formula gives the codes of all three bit for bit), and
    ``codes * scale + offset`` is the dequantized value."""

    scale: torch.Tensor
    offset: torch.Tensor
    div: torch.Tensor
    shift: torch.Tensor
    zero: torch.Tensor
    cmin: int
    cmax: int
    bias: int


def forward_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, scheme: str) -> ForwardParams:
    """The scale, offset and level mapping of a forward quantizer with range ``[lo, hi]``."""
    half = 2 ** (bits - 1)
    if scheme == "symmetric":
        qmax = half - 1
        scale, div = _safe_scale(torch.maximum(lo.abs(), hi.abs()), qmax)
        zeros = torch.zeros_like(scale)
        return ForwardParams(scale, zeros, div, zeros, zeros, -qmax, qmax, 0)
    levels = 2**bits - 1
    if scheme == "affine":
        scale, div = _safe_scale(hi - lo, levels)
        return ForwardParams(scale, lo + half * scale, div, lo, torch.zeros_like(scale), 0, levels, half)
    # affine_zero
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale, div = _safe_scale(hi - lo, levels)
    zero = torch.clamp(torch.round(-lo / div), 0, levels)  # the level of 0.0
    return ForwardParams(scale, -(zero - half) * scale, div, torch.zeros_like(scale), zero, 0, levels, half)


def fake_quantize_forward(
    x: torch.Tensor, bits: int = 8, scheme: str = "affine_zero", granularity: str = "tensor", axis: int = 0
) -> torch.Tensor:
    """``dequantize(quantize_forward(x))`` in ``x.dtype``."""
    return quantize_forward(x, bits, scheme, granularity, axis).dequantize()


# ---------------------------------------------------------------------------------------------
# Stochastic (gradient) quantization on a 2-D view
# ---------------------------------------------------------------------------------------------


def as_rows(x: torch.Tensor, row_dims: int = -1) -> torch.Tensor:
    """The ``(N, D)`` view of ``x`` used by gradient quantizers: the first ``row_dims`` dims
    form the rows (``-1``: all but the last dim, i.e. one row per token)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(1, -1)
    k = x.dim() - 1 if row_dims < 0 else row_dims
    if not 1 <= k < x.dim():
        raise ValueError(f"row_dims must be in [1, {x.dim() - 1}] for a {x.dim()}-d tensor, got {row_dims}")
    # Explicit sizes, not -1: reshape(n, -1) is ambiguous for empty tensors.
    return x.reshape(math.prod(x.shape[:k]), math.prod(x.shape[k:]))


def stochastic_quantize(
    x2d: torch.Tensor,
    bits: int,
    granularity: RangeGranularity,
    seed: torch.Tensor | None = None,
    *,
    name: str = "gradient",
) -> QuantizedTensor:
    """Unbiased stochastic rounding of an ``(N, D)`` tensor on an affine range per tensor
    (PTQ), per row (PSQ) or per column (the reference Q_b2).

    ``y = (x - lo) / scale`` lies in ``[0, B]``; ``floor(y + u)`` with ``u ~ U[0,1)`` has mean
    ``y``, and the range contains every value so the clamp (kept only against float rounding
    of ``y`` at the top of the range) does not bite. Variance per element ``<= scale^2 / 4``.
    """
    check_bits(bits)
    if x2d.dim() != 2:
        raise ValueError(f"stochastic_quantize expects a 2-D (N, D) tensor, got shape {tuple(x2d.shape)}")
    if seed is None:
        seed = new_seed(x2d.device)
    half = 2 ** (bits - 1)
    levels = 2**bits - 1
    xf = x2d.to(torch.float32)
    if x2d.numel() == 0:
        one = torch.ones((), device=x2d.device)
        return QuantizedTensor(x2d.to(torch.int8), one, one * 0, bits, x2d.dtype)
    if granularity == "tensor":
        lo, hi = xf.amin(), xf.amax()
    elif granularity == "row":
        lo, hi = xf.amin(dim=1, keepdim=True), xf.amax(dim=1, keepdim=True)
    elif granularity == "column":
        lo, hi = xf.amin(dim=0, keepdim=True), xf.amax(dim=0, keepdim=True)
    else:
        raise ValueError(f"granularity must be 'tensor', 'row' or 'column', got {granularity!r}")
    _check_finite_range(lo, hi, name)
    scale, div = _safe_scale(hi - lo, levels)
    u = uniform_from_seed(seed, xf.shape, device=xf.device)
    codes = torch.clamp(torch.floor((xf - lo) / div + u), 0, levels) - half
    return QuantizedTensor(codes.to(torch.int8), scale, lo + half * scale, bits, x2d.dtype)


# ---------------------------------------------------------------------------------------------
# BHQ: block Householder transform
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BHQPlan:
    """The block-diagonal transform ``T = H_n diag(s)`` of BHQ, stored per row (O(N)).

    ``group[r]``: the row index of the leader of row ``r``'s group; ``v[r]``: row ``r``'s entry
    of the group's Householder vector (``H_n = I - 2 v v^T``; 0 in groups of one row, where T is
    the identity); ``s[r]``: row ``r``'s scaling. Applying T costs O(N * D): one weighted
    segment sum per group and one update per row.
    """

    group: torch.Tensor  # (N,) int64
    v: torch.Tensor  # (N,) float32
    s: torch.Tensor  # (N,) float32

    @property
    def num_groups(self) -> int:
        return int(torch.unique(self.group).numel())

    def group_sizes(self) -> torch.Tensor:
        return torch.bincount(self.group, minlength=self.group.numel())


def bhq_plan(x2d: torch.Tensor) -> BHQPlan:
    """Group rows by range and build the BHQ transform (DESIGN.md section 3).

    With row ranges ``m`` sorted descending, rows move from the bottom into the "small" set
    while ``n_small * m[N - n_small - 1] / sum(m[:N - n_small]) <= 1``; every other row leads
    a group; leader ``i`` receives ``round(cumsum(n_small * m_i / sum(m_leaders)))``
    differences of small rows, the largest small rows going to the largest leaders.
    In a group of ``n`` rows, ``v = normalize(1/sqrt(n) * 1 - e1)``,
    ``w1 = lambda1 / sqrt(n)``, ``w2 = lambda2 * max|H_n|``, ``s1 = w1^(-1/3)`` for the leader,
    ``s2 = (w2 / (n - 1))^(-1/3)`` for the others; ``lambda1`` is the leader's range and
    ``lambda2`` the largest range among its small rows. Groups whose small rows all have a zero
    range stay unmixed (identity), as does every row when all ranges are zero.

    Fully vectorized, no host synchronization: the cost is a sort plus O(N) work.
    """
    n_rows = x2d.shape[0]
    dev = x2d.device
    xf = x2d.to(torch.float32)
    if n_rows == 0 or x2d.numel() == 0:
        z = torch.zeros(n_rows, device=dev)
        return BHQPlan(torch.arange(n_rows, device=dev), z, z + 1)
    m = xf.amax(dim=1) - xf.amin(dim=1)  # (N,) row ranges
    m_sorted, order = torch.sort(m, descending=True, stable=True)
    prefix = torch.cumsum(m_sorted.to(torch.float64), 0)  # prefix[j] = sum(m_sorted[:j+1])
    # For k = 1..N-1 small rows: cond_k = k * m_sorted[N-k-1] <= sum(m_sorted[:N-k]).
    k = torch.arange(1, n_rows, device=dev, dtype=torch.float64)
    if n_rows > 1:
        lead_sum = prefix[n_rows - 1 - k.long()]  # sum(m_sorted[:N-k])
        cond = k * m_sorted[n_rows - 1 - k.long()].to(torch.float64) <= lead_sum
        cond = cond & (lead_sum > 0)
        n_small = torch.cumprod(cond.long(), 0).sum()
    else:
        n_small = torch.zeros((), dtype=torch.int64, device=dev)
    n_lead = n_rows - n_small
    pos = torch.arange(n_rows, device=dev)
    is_leader = pos < n_lead
    total_lead = prefix[(n_lead - 1).clamp(min=0)]
    share = torch.where(is_leader, n_small.to(torch.float64) * m_sorted.to(torch.float64), 0.0)
    share = share / torch.where(total_lead > 0, total_lead, torch.ones_like(total_lead))
    cum = torch.floor(torch.cumsum(share, 0) + 0.5)  # cumulative small-row counts per leader
    cum = torch.where(is_leader, cum, torch.full_like(cum, float("inf")))
    # Small row j (0-based, descending) goes to the first leader whose cumulative count > j.
    j = (pos - n_lead).to(torch.float64)
    leader_pos = torch.searchsorted(cum.contiguous(), j.contiguous(), right=True)
    leader_pos = torch.where(is_leader, pos, leader_pos.clamp(max=n_rows - 1))
    # Group sizes and ranks inside groups (leader first).
    size_sorted = torch.bincount(leader_pos, minlength=n_rows)  # indexed by leader position
    n = size_sorted[leader_pos].to(torch.float32)  # (N,) size of each row's group
    # lambda2: the largest small-row range of the group (small rows are in descending order,
    # so it is the range of the first one; computed with a scatter-max for clarity).
    small_range = torch.where(is_leader, torch.zeros_like(m_sorted), m_sorted)
    lam2 = torch.zeros(n_rows, device=dev).scatter_reduce(0, leader_pos, small_range, "amax")
    lam1 = m_sorted[leader_pos]
    lam2 = lam2[leader_pos]
    mixed = (n > 1) & (lam2 > 0) & (lam1 > 0)
    n_safe = torch.where(mixed, n, torch.full_like(n, 2.0))
    rs = torch.rsqrt(n_safe)  # 1/sqrt(n)
    norm = torch.sqrt(2.0 - 2.0 * rs)
    v0 = (rs - 1.0) / norm
    v1 = rs / norm
    h_max = torch.maximum(
        torch.maximum((1 - 2 * v0 * v0).abs(), (2 * v0 * v1).abs()),
        torch.maximum((1 - 2 * v1 * v1).abs(), torch.where(n_safe > 2, 2 * v1 * v1, 0.0)),
    )
    w1 = lam1 * rs
    w2 = lam2 * h_max
    s1 = torch.pow(torch.where(mixed, w1, torch.ones_like(w1)), -1.0 / 3.0)
    s2 = torch.pow(torch.where(mixed, w2 / (n_safe - 1.0), torch.ones_like(w2)), -1.0 / 3.0)
    v_sorted = torch.where(is_leader, v0, v1)
    s_sorted = torch.where(is_leader, s1, s2)
    v_sorted = torch.where(mixed, v_sorted, torch.zeros_like(v_sorted))
    s_sorted = torch.where(mixed, s_sorted, torch.ones_like(s_sorted))
    # Groups are identified by their leader's original row index.
    group = torch.empty_like(order)
    group[order] = order[leader_pos]
    v = torch.empty_like(v_sorted)
    v[order] = v_sorted
    s = torch.empty_like(s_sorted)
    s[order] = s_sorted
    return BHQPlan(group, v, s)


def _reflect(z: torch.Tensor, plan: BHQPlan) -> torch.Tensor:
    # Per group: z - 2 v (v^T z), as a segment sum over the rows of each group. O(N * D).
    u = torch.zeros_like(z).index_add_(0, plan.group, plan.v[:, None] * z)  # (N, D), at leaders
    return z - 2.0 * plan.v[:, None] * u[plan.group]


def bhq_transform(x2d: torch.Tensor, plan: BHQPlan | None = None) -> tuple[torch.Tensor, BHQPlan]:
    """``T x = H_n diag(s) x`` per group, in float32. Returns the transformed rows and the plan."""
    if plan is None:
        plan = bhq_plan(x2d)
    z = x2d.to(torch.float32) * plan.s[:, None]
    return _reflect(z, plan), plan


def bhq_inverse(y2d: torch.Tensor, plan: BHQPlan) -> torch.Tensor:
    """``T^-1 y = diag(1/s) H_n^T y`` (H_n is symmetric and orthogonal)."""
    return _reflect(y2d.to(torch.float32), plan) / plan.s[:, None]


# ---------------------------------------------------------------------------------------------
# Block Hadamard transform
# ---------------------------------------------------------------------------------------------


def _hadamard_block(n_rows: int, block: int) -> int:
    return max(2, min(block, 1 << max(0, (n_rows - 1).bit_length())))


def hadamard_transform(x2d: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Rows mixed by the normalized Hadamard matrix in blocks of ``block`` rows (a power of two,
    shrunk to the next power of two >= N for small N). N is zero-padded to a multiple of the
    block; the result has the padded row count. Self-inverse: see :func:`hadamard_inverse`.
    Fast Walsh-Hadamard butterflies: O(N * D * log2(block))."""
    if block < 2 or block & (block - 1):
        raise ValueError(f"hadamard block must be a power of two >= 2, got {block}")
    n_rows, d = x2d.shape
    b = _hadamard_block(n_rows, block)
    pad = (-n_rows) % b
    y = x2d.to(torch.float32)
    if pad:
        y = torch.cat([y, y.new_zeros(pad, d)])
    nb = y.shape[0] // b
    h = 1
    while h < b:
        y = y.reshape(nb, b // (2 * h), 2, h, d)
        a, c = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + c, a - c), dim=2)
        h *= 2
    return y.reshape(nb * b, d) * (1.0 / math.sqrt(b))


def hadamard_inverse(y2d: torch.Tensor, n_rows: int, block: int = 16) -> torch.Tensor:
    """Inverse of :func:`hadamard_transform` (the same transform), cut back to ``n_rows``."""
    b = _hadamard_block(n_rows, block)
    assert y2d.shape[0] % b == 0, (y2d.shape, b)
    return hadamard_transform(y2d, b)[:n_rows]


# ---------------------------------------------------------------------------------------------
# Gradient quantizers: the user-level API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradQuantized:
    """A gradient quantized by one of :data:`GRAD_KINDS`.

    ``q`` holds the codes of the (possibly transformed) ``(N', D)`` view: for ``bhq`` the rows
    of ``T G``, for ``hadamard`` those of the padded Hadamard mix; ``plan`` is the BHQ plan.
    """

    kind: str
    q: QuantizedTensor
    shape: torch.Size
    row_dims: int
    plan: BHQPlan | None = None
    block: int = 16

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_grad(self, dtype)


def quantize_grad(
    x: torch.Tensor,
    kind: str,
    bits: int,
    *,
    seed: torch.Tensor | None = None,
    row_dims: int = -1,
    block: int = 16,
    name: str = "gradient",
) -> GradQuantized:
    """Quantize a gradient with the unbiased quantizer ``kind`` (``ptq``, ``psq``, ``column``,
    ``bhq`` or ``hadamard``) at ``bits`` bits. ``seed``: a 0-d int64 tensor; a fresh one is
    drawn from the global generator when omitted (so calls never share draws)."""
    if kind not in GRAD_KINDS:
        raise ValueError(f"gradient quantizer kind must be one of {GRAD_KINDS}, got {kind!r}")
    check_bits(bits)
    x2d = as_rows(x, row_dims)
    if seed is None:
        seed = new_seed(x.device)
    if kind in ("ptq", "psq", "column"):
        gran = {"ptq": "tensor", "psq": "row", "column": "column"}[kind]
        return GradQuantized(kind, stochastic_quantize(x2d, bits, gran, seed, name=name), x.shape, row_dims)
    if kind == "bhq":
        lo, hi = (x2d.amin(), x2d.amax()) if x2d.numel() else (x2d.new_zeros(()),) * 2
        _check_finite_range(lo, hi, name)
        y, plan = bhq_transform(x2d)
        # y is float32; q.dtype records the gradient's dtype, which dequantize_grad returns.
        q = dataclasses.replace(stochastic_quantize(y, bits, "row", seed, name=name), dtype=x.dtype)
        return GradQuantized(kind, q, x.shape, row_dims, plan=plan)
    y = hadamard_transform(x2d, block)
    q = dataclasses.replace(stochastic_quantize(y, bits, "row", seed, name=name), dtype=x.dtype)
    return GradQuantized(kind, q, x.shape, row_dims, block=block)


def dequantize_grad(gq: GradQuantized, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The unbiased estimate of the original gradient, in its shape (and dtype by default)."""
    y = gq.q.dequantize(torch.float32)
    if gq.kind == "bhq":
        assert gq.plan is not None
        y = bhq_inverse(y, gq.plan)
    elif gq.kind == "hadamard":
        n_rows = as_rows(torch.empty(gq.shape, device="meta"), gq.row_dims).shape[0]
        y = hadamard_inverse(y, n_rows, gq.block)
    return y.reshape(gq.shape).to(dtype or gq.q.dtype)


def fake_quantize_grad(
    x: torch.Tensor, kind: str, bits: int, *, seed: torch.Tensor | None = None, row_dims: int = -1, block: int = 16
) -> torch.Tensor:
    """``dequantize_grad(quantize_grad(x, ...))``: one unbiased stochastic estimate of ``x``."""
    return dequantize_grad(quantize_grad(x, kind, bits, seed=seed, row_dims=row_dims, block=block))
