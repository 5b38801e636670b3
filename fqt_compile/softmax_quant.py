"""Attention's softmax fused with its quantizers: ``fqt::softmax_quantize`` (forward) and
``fqt::softmax_backward_sr_quantize`` (backward).

In a quantized attention block the probabilities ``P = softmax(S)`` (B x H x L x L, the
largest tensor of the step) feed the integer product ``P @ V`` through a per-tensor forward
quantizer. Written as aten ops, inductor compiles that into one kernel of six passes over
L x L-sized buffers (scores, row max, exp and sum, normalisation, the global min/max, the
rounding): 87 ms of a 0.78 s GPT-block step on the development machine
(``benchmarks/profile_step.py``). The range of a per-tensor quantizer needs every row before
the first code can be rounded, so two passes are the minimum; this module's C kernel (gcc,
AVX-512, OpenMP; built at first use like ``amx.py``) does exactly two:

1. per row, in cache: the row max, ``exp(x - max)`` and its sum, ``P = e / sum`` written
   out, and the row's min and max of ``P``;
2. the quantizer's range from the row ranges (torch, on ``rows`` floats:
   :func:`fqt_compile.quantizers.forward_params`, the reference's own formula), then every
   code ``clamp(round((P - shift) / div) + zero, cmin, cmax) - bias`` from the stored ``P``.

The rounding and the range are those of :func:`fqt_compile.quantizers.quantize_forward` bit
for bit given ``P``; ``P`` itself differs from torch's softmax by float rounding only (our
``exp`` is a degree-7 polynomial after range reduction, within 2 ulp; the row sum is taken in
another order), so a code can differ by one level where ``P / div`` lies within an ulp of a
rounding boundary (``tests/test_softmax_quant.py`` bounds how often). A NaN or Inf in the
input makes the quantizer's range non-finite and the op raises, as ``fqt::quantize`` does
(the backward likewise, as ``fqt::sr_quantize``).

Both ops take their input either as a float tensor or as the int32 product of the lowered
GEMM that produced it (QK^T for the scores, dO V^T for the probabilities' gradient) with that
GEMM's scale epilogue (``passes/epilogue.py``); the forward one also takes the scores' scale
and additive (causal) mask. The kernels then build each row of the input in cache, and the
float scores / gradient (128 MiB each for the GPT benchmark's attention) are never written.

The backward, ``fqt::softmax_backward_sr_quantize``, is the same two-pass scheme for softmax's
backward and the stochastic quantizers of its result (the attention scores' gradient, rounded
by Q_b1 = PSQ and Q_b2 = per column by default): pass 1 writes ``ds = (g p - p sum(g p)) c``
per row with the row's range, per-thread column ranges, and rounds the row-range quantizers
while the row is in cache; pass 2 rounds the column- and tensor-range ones. Given the kernel's
``ds``, codes, scales and offsets are those of :func:`fqt_compile.quantizers.stochastic_quantize`
bit for bit, with the same counter-based draws (``fqt_compile.rng``, hashed in 16 lanes;
the shared pieces are in ``sr_fused.py``).

Attention dropout (``fqt::dropout`` of ``P`` before its quantizer, and of the incoming
gradient in the backward) can ride along: given its seed and ``p``, the kernels draw its mask
in their passes (the counter-based hash at each element's flat index, ``keep16``/``drop16`` in
``sr_fused.py``) and compute ``x * keep * (1 / (1 - p))`` as the op does, so the forward's
codes are those of the dropped ``P`` and the backward's of softmax's backward of the dropped
gradient, bit for bit given ``P`` / the gradient.

Where the kernel cannot run (no AVX-512, no compiler, ``FQT_FUSED_SOFTMAX=0``) the ops compute
the same with torch (``torch.softmax`` / the softmax-backward formula, then the reference
quantizers); the graph pass ``passes/fuse_softmax.py`` only puts them into graphs where the
kernel runs.
"""

from __future__ import annotations

import ctypes
import functools
from typing import List, Optional  # typing: torch 2.5's schema inference rejects list[...] / X | None

import torch
from torch import Tensor

from . import cbuild, sr_fused
from . import quantizers as Q

__all__ = ["available", "status", "softmax_quantize", "softmax_backward_sr_quantize"]


_FLAGS = ["-O3", "-shared", "-fPIC", "-mavx512f", "-fopenmp"]

_SOURCE = sr_fused.COMMON_C + r"""
// pass 1: p = softmax(x) over rows of length L; rmin/rmax: each row's min and max of p
// (NaN for a row with a NaN, an Inf or only -Inf, where p is NaN too). Where acc is not NULL the
// row of x is computed in cache from the int32 product acc and its epilogue (epilogue_row: M
// rows per batch, nt terms er/ec), times c, plus row (i mod Lq) of the (Lq, L) additive mask
// (NULL: none): the attention scores' scale and causal mask
// Where drop is not 0, rmin/rmax are the ranges of ops.dropout(p) (drop16/keep16 with the seed
// words dslo/dshi at p's flat index), which the forward quantizer rounds, and p is written undropped
void fqt_softmax_rows(const float* x, const int32_t* acc, int64_t M, int nt, const float* const* er,
                      const float* const* ec, float c, const float* mask, int64_t Lq, float* p, float* rmin,
                      float* rmax, int64_t rows, int64_t L, int drop, uint32_t dslo, uint32_t dshi, uint32_t kmin,
                      float inv, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float* xr = x + i * L;
        float* pr = p + i * L;
        if (acc) {  // the row of x in place of p's row, read back at once from cache
            epilogue_row(acc, i, L, M, nt, er, ec, pr);
            const float* mr = mask ? mask + (i % Lq) * L : 0;
            __m512 vc = _mm512_set1_ps(c);
            for (int64_t j = 0; j < L; j += 16) {
                __mmask16 m = tail_mask(L - j);
                __m512 v = _mm512_mul_ps(load16(m, pr + j), vc);
                if (mr) v = _mm512_add_ps(v, load16(m, mr + j));
                store16(pr + j, m, v);
            }
            xr = pr;
        }
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 bad = 0;
        for (int64_t j = 0; j < L; j += 16) {
            __mmask16 m = tail_mask(L - j);
            __m512 v = load16(m, xr + j);
            bad |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
        }
        float mx = _mm512_reduce_max_ps(vmax);
        __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; j += 16) {
            __mmask16 m = tail_mask(L - j);
            __m512 e = exp512(_mm512_sub_ps(load16(m, xr + j), vm));
            e = _mm512_maskz_mov_ps(m, e);
            store16(pr + j, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        __m512 vs = _mm512_set1_ps(_mm512_reduce_add_ps(vsum));
        __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < L; j += 16) {
            __mmask16 m = tail_mask(L - j);
            __m512 q = _mm512_div_ps(load16(m, pr + j), vs);
            store16(pr + j, m, q);
            if (drop) q = drop16(q, keep16(i * L + j, dslo, dshi, kmin), _mm512_set1_ps(inv));
            lo = _mm512_mask_min_ps(lo, m, lo, q);
            hi = _mm512_mask_max_ps(hi, m, hi, q);
        }
        if (bad || !isfinite(mx)) {
            rmin[i] = NAN;
            rmax[i] = NAN;
        } else {
            rmin[i] = _mm512_reduce_min_ps(lo);
            rmax[i] = _mm512_reduce_max_ps(hi);
        }
    }
}

// ---- backward -------------------------------------------------------------------------------

// pass 1: ds = (g * p - p * sum(g * p)) * c per row (softmax's backward, then the scale of the
// scores), g read from memory or, where acc is not NULL, computed in cache from the int32
// product acc and its epilogue (epilogue_row: M rows per batch, nt terms er/ec); rmin/rmax:
// each row's range of ds (NaN for a row holding a NaN); cmin/cmax: one (D) row per thread of
// column ranges, which the caller reduces (NULL: not needed); and the nr stochastic roundings
// with a row range, while the row is in cache (div as _safe_scale). Where drop is not 0, g is
// first ops.dropout(g) (drop16/keep16 with the seed words dslo/dshi at the flat index): the
// gradient of the forward's dropout of p
void fqt_softmax_bwd_rows(const float* g, const int32_t* acc, int64_t M, int nt, const float* const* er,
                          const float* const* ec, const float* p, float* ds, float* rmin, float* rmax, float* cmin,
                          float* cmax, int64_t rows, int64_t D, float c, int nr, const int* levels,
                          const int* half, const uint32_t* slo, const uint32_t* shi, int8_t* const* codes,
                          int drop, uint32_t dslo, uint32_t dshi, uint32_t kmin, float inv, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        float* tmin = cmin ? cmin + (int64_t)omp_get_thread_num() * D : 0;
        float* tmax = cmax ? cmax + (int64_t)omp_get_thread_num() * D : 0;
        __m512 vc = _mm512_set1_ps(c);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float* pr = p + i * D;
            float* dr = ds + i * D;
            const float* gr = g + i * D;
            if (acc) {  // the row of g in place of ds's row, read back at once from cache
                epilogue_row(acc, i, D, M, nt, er, ec, dr);
                gr = dr;
            }
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < D; j += 16) {
                __mmask16 m = tail_mask(D - j);
                __m512 gv = load16(m, gr + j);
                if (drop) gv = drop16(gv, keep16(i * D + j, dslo, dshi, kmin), _mm512_set1_ps(inv));
                __m512 gp = _mm512_mul_ps(gv, load16(m, pr + j));
                store16(dr + j, m, gp);
                sum = _mm512_add_ps(sum, gp);
            }
            __m512 vs = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
            __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
            __mmask16 bad = 0;
            for (int64_t j = 0; j < D; j += 16) {
                __mmask16 m = tail_mask(D - j);
                __m512 pv = load16(m, pr + j);
                __m512 v = _mm512_mul_ps(_mm512_fnmadd_ps(pv, vs, load16(m, dr + j)), vc);
                store16(dr + j, m, v);
                track_ranges(v, m, j, &lo, &hi, &bad, tmin, tmax);
            }
            finish_row(dr, i, D, lo, hi, bad, rmin, rmax, nr, levels, half, slo, shi, codes);
        }
    }
}
"""


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = cbuild.load("softmax_quant", _SOURCE, _FLAGS, env="FQT_FUSED_SOFTMAX", needs={"avx512f"},
                           fallback="softmax stays in the compiled graph")
    if lib is None:
        return None, why
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    drop = [ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, f32]  # sr_fused.Dropout.args
    lib.fqt_softmax_rows.argtypes = [ptr, ptr, i64, ctypes.c_int, ptr, ptr, f32, ptr, i64, ptr, ptr, ptr, i64, i64,
                                     *drop, ctypes.c_int]
    lib.fqt_softmax_rows.restype = None
    lib.fqt_softmax_bwd_rows.argtypes = [ptr, ptr, i64, ctypes.c_int, ptr, ptr] + [ptr] * 6 + [
        i64, i64, f32, ctypes.c_int] + [ptr] * 5 + [*drop, ctypes.c_int]
    lib.fqt_softmax_bwd_rows.restype = None
    sr_fused.bind_pass2(lib)
    return lib, "in use (AVX-512)"


def available() -> bool:
    """True when ``fqt::softmax_quantize`` runs the fused C kernel here."""
    return _load()[0] is not None


def status() -> str:
    """Why the fused softmax kernel is or is not in use, in words."""
    return _load()[1]


_OP_FWD = "fqt::softmax_quantize"


def _check_dropout(op: str, seed: Tensor | None, p: float, numel: int) -> None:
    if seed is None:
        return
    torch._check(seed.dim() == 0 and seed.dtype == torch.int64, lambda: f"{op}: the dropout seed must be a 0-d int64 tensor")
    torch._check(0.0 < p < 1.0, lambda: f"{op}: dropout_p must lie in (0, 1) with a seed, got {p}")
    torch._check(numel < 2**31, lambda: f"{op}: dropout on below 2**31 elements only")


def _dropped(t: Tensor, seed: Tensor | None, p: float) -> Tensor:
    return t if seed is None else torch.ops.fqt.dropout(t, seed, p)


def _check(x: Tensor, bits: int, scheme: str, scale: float, mask: Tensor | None, rows: list[Tensor],
           cols: list[Tensor], seed: Tensor | None, p: float) -> None:
    _check_dropout(_OP_FWD, seed, p, x.numel())
    Q.check_bits(bits)
    torch._check(scheme in Q.FORWARD_SCHEMES, lambda: f"{_OP_FWD}: scheme must be one of {Q.FORWARD_SCHEMES}")
    torch._check(x.dim() >= 1, lambda: f"{_OP_FWD}: input must have at least one dimension")
    sr_fused.check_epilogue(_OP_FWD, x, rows, cols, x.numel(), x.shape[-1])
    if x.dtype != torch.int32:
        torch._check(x.dtype == torch.float32, lambda: f"{_OP_FWD}: float32 input only, got {x.dtype}")
        torch._check(mask is None and scale == 1.0, lambda: f"{_OP_FWD}: a scale or mask goes with an int32 product only")
    if mask is not None:
        lq = x.shape[-2] if x.dim() >= 2 else 1
        torch._check(mask.dtype == torch.float32 and mask.dim() <= x.dim()
                     and all(s == 1 for s in mask.shape[:-2]) and mask.shape[-1] in (1, x.shape[-1])
                     and (mask.dim() < 2 or mask.shape[-2] in (1, lq)),
                     lambda: f"{_OP_FWD}: mask {tuple(mask.shape)} must broadcast to the last two dimensions "
                             f"{(lq, x.shape[-1])}")


@torch.library.custom_op("fqt::softmax_quantize", mutates_args=())
def softmax_quantize(
    x: Tensor, bits: int, scheme: str, scale: float, mask: Optional[Tensor], epi_rows: List[Tensor],
    epi_cols: List[Tensor], dropout_seed: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``P = softmax(s, -1)`` and ``fqt::quantize(P, bits, scheme, "tensor")``: returns ``(P,
    codes, scale, offset)`` (P and codes of ``x``'s shape, scale and offset 0-d).

    ``s = x`` for a float32 ``x`` (then ``scale`` 1.0, ``mask`` None, no epilogue terms); for the
    int32 product of a lowered GEMM with its epilogue terms (as in
    ``fqt::softmax_backward_sr_quantize``), ``s = epilogue(x) * scale + mask``, ``mask``
    (optional) broadcasting to the last two dimensions: the attention scores, their scale and
    additive (causal) mask.

    With ``dropout_seed`` (and ``0 < dropout_p < 1``) the codes are those of
    ``fqt::dropout(P, dropout_seed, dropout_p)`` (quantized attention's dropout, its mask drawn
    in the kernel's passes), while the returned ``P`` is softmax's (its backward reads it)."""
    _check(x, bits, scheme, scale, mask, epi_rows, epi_cols, dropout_seed, dropout_p)
    lib = _load()[0]
    if lib is None or x.device.type != "cpu" or x.numel() == 0:
        s = sr_fused.epilogue_reference(x, epi_rows, epi_cols).reshape(x.shape)
        if x.dtype == torch.int32:
            s = s * scale
            if mask is not None:
                s = s + mask
        p = torch.softmax(s, -1)
        q = Q.quantize_forward(_dropped(p, dropout_seed, dropout_p), bits, scheme, "tensor", name="softmax output")
        return p, q.codes, q.scale.reshape(()), q.offset.reshape(())
    L = x.shape[-1]
    rows = x.numel() // L
    lq = x.shape[-2] if x.dim() >= 2 else 1
    epi = sr_fused.Epilogue(x, epi_rows, epi_cols)
    xc = x.contiguous() if x.dtype == torch.float32 else None
    # (the mask's leading dimensions are 1: _check)
    mc = mask.reshape(mask.shape[-2:] if mask.dim() >= 2 else mask.shape).expand(lq, L).contiguous() if mask is not None else None
    p = torch.empty(x.shape)
    rmin, rmax = torch.empty(rows), torch.empty(rows)
    threads = torch.get_num_threads()
    drop = sr_fused.Dropout(dropout_seed, dropout_p)
    lib.fqt_softmax_rows(sr_fused.ptr_or_none(xc), *epi.args(), float(scale), sr_fused.ptr_or_none(mc), lq,
                         p.data_ptr(), rmin.data_ptr(), rmax.data_ptr(), rows, L, *drop.args, threads)
    codes, qscale, offset = sr_fused.forward_quantize(lib, p, rmin, rmax, bits, scheme, "softmax output", threads, drop)
    return p, codes, qscale, offset


@softmax_quantize.register_fake
def _(x, bits, scheme, scale, mask, epi_rows, epi_cols, dropout_seed=None, dropout_p=0.0):
    _check(x, bits, scheme, scale, mask, epi_rows, epi_cols, dropout_seed, dropout_p)
    return (x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


#: most stochastic quantizers one call of fqt::softmax_backward_sr_quantize applies
MAX_QUANTIZERS = sr_fused.MAX_QUANTIZERS
_OP = "fqt::softmax_backward_sr_quantize"


def _check_bwd(g: Tensor, p: Tensor, bits: list[int], grans: list[str], seeds: list[Tensor], rows: list[Tensor],
               cols: list[Tensor]) -> None:
    """(``grans`` here is the split list.)"""
    torch._check(p.dim() >= 1, lambda: f"{_OP}: inputs must have a dimension")
    torch._check(p.dtype == torch.float32, lambda: f"{_OP}: float32 inputs only")
    sr_fused.check_epilogue(_OP, g, rows, cols, p.numel(), p.shape[-1])
    if g.dtype != torch.int32:
        torch._check(g.shape == p.shape, lambda: f"{_OP}: shapes differ: {g.shape} vs {p.shape}")
    sr_fused.check_quantizers(_OP, p.numel(), bits, grans, seeds)


@torch.library.custom_op("fqt::softmax_backward_sr_quantize", mutates_args=())
def softmax_backward_sr_quantize(
    g: Tensor, p: Tensor, scale: float, seeds: List[Tensor], bits: List[int], granularities: str,
    epi_rows: List[Tensor], epi_cols: List[Tensor], dropout_seed: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> List[Tensor]:
    """``ds = softmax_backward(g, p) * scale`` (softmax over the last dimension, ``p`` its
    output) viewed as ``(N, D)`` with ``D`` the last dimension, and ``fqt::sr_quantize(ds,
    seed_k, bits_k, gran_k)`` for each quantizer (``granularities``: comma-separated, e.g.
    ``"row,column"``): returns ``[ds, codes_1, scale_1, offset_1, codes_2, ...]``.

    ``g`` is float32 of ``p``'s shape (``epi_rows``/``epi_cols`` empty), or a lowered GEMM's
    int32 product ((B, M, N) or (M, N), ``p``'s elements) with the terms of its epilogue:
    ``g = acc * epi_rows[0] * epi_cols[0] + sum_t epi_rows[t] * epi_cols[t]``
    (``sr_fused.check_epilogue`` gives the shapes).

    With ``dropout_seed`` (and ``0 < dropout_p < 1``), ``g`` is first
    ``fqt::dropout(g, dropout_seed, dropout_p)``: the gradient through the forward's dropout of
    ``p`` (:func:`softmax_quantize`'s), its mask drawn again in the kernel's pass."""
    grans = granularities.split(",")
    _check_bwd(g, p, bits, grans, seeds, epi_rows, epi_cols)
    _check_dropout(_OP, dropout_seed, dropout_p, p.numel())
    d = p.shape[-1]
    n = p.numel() // d
    lib = _load()[0]
    if lib is None or p.device.type != "cpu" or p.numel() == 0:
        gf = _dropped(sr_fused.epilogue_reference(g, epi_rows, epi_cols).reshape(p.shape), dropout_seed, dropout_p)
        gp = gf * p
        ds = ((gp - p * gp.sum(-1, keepdim=True)) * scale).reshape(n, d)
        return [ds, *sr_fused.reference_quantize(ds, seeds, bits, grans)]
    p = p.contiguous()
    epi = sr_fused.Epilogue(g, epi_rows, epi_cols)
    gc = g.contiguous() if g.dtype == torch.float32 else None
    threads = torch.get_num_threads()
    ds = torch.empty((n, d))
    rmin, rmax = torch.empty(n), torch.empty(n)
    qs = sr_fused.Quantizers(n, d, seeds, bits, grans)
    cmin, cmax = qs.column_buffers(threads)
    lib.fqt_softmax_bwd_rows(
        sr_fused.ptr_or_none(gc), *epi.args(), p.data_ptr(), ds.data_ptr(), rmin.data_ptr(), rmax.data_ptr(),
        sr_fused.ptr_or_none(cmin), sr_fused.ptr_or_none(cmax), n, d, float(scale), *qs.pass1_args(),
        *sr_fused.Dropout(dropout_seed, dropout_p).args, threads,
    )
    return [ds, *sr_fused.finish(lib, ds, qs, rmin, rmax, cmin, cmax, threads)]


@softmax_backward_sr_quantize.register_fake
def _(g, p, scale, seeds, bits, granularities, epi_rows, epi_cols, dropout_seed=None, dropout_p=0.0):
    grans = granularities.split(",")
    _check_bwd(g, p, bits, grans, seeds, epi_rows, epi_cols)
    _check_dropout(_OP, dropout_seed, dropout_p, p.numel())
    d = p.shape[-1]
    n = p.numel() // d
    return [p.new_empty((n, d)), *sr_fused.fake_outputs(p, n, d, grans)]
