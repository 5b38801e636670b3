"""Shared pieces of the fused "elementwise backward + stochastic quantizers" kernels
(``fqt::softmax_backward_sr_quantize`` in ``softmax_quant.py``, ``fqt::gelu_backward_sr_quantize``
in ``gelu_quant.py``).

Each such kernel computes a gradient ``ds`` (N x D) row by row and rounds it with 1 to
:data:`MAX_QUANTIZERS` stochastic quantizers (``fqt::sr_quantize``) in two passes:

1. per row, in cache: ``ds`` written once, the row's range, per-thread column ranges, and the
   row-range (PSQ) quantizers rounded while the row is in cache;
2. the column- and tensor-range quantizers, from the stored ``ds`` (:func:`finish`).

Given the kernel's ``ds``, codes, scales and offsets equal those of
:func:`fqt_compile.quantizers.stochastic_quantize` bit for bit, with the same counter-based
draws (``fqt_compile.rng``, hashed in 16 lanes).

The incoming gradient of a kernel may be the int32 product of a lowered GEMM together with its
scale epilogue (``passes/epilogue.py``) instead of a float tensor: the kernel then computes
each row of the gradient in cache, ``acc * r0 * c0 + sum_t r_t * c_t`` (``r_t`` per row,
``c_t`` per column, per batch), and the float gradient is never written to memory.

This module holds the C source both kernels include (:data:`COMMON_C`) and the Python side of
pass 2 and of the epilogue.
"""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

import torch
from torch import Tensor

from . import quantizers as Q
from .rng import seed_words_int

__all__ = ["COMMON_C", "GRANS", "MAX_QUANTIZERS", "check_quantizers", "check_epilogue", "epilogue_reference",
           "Epilogue", "Quantizers", "finish", "reference_quantize", "fake_outputs", "bind_pass2", "range_shape",
           "MAX_EPILOGUE_TERMS", "ptr_or_none", "forward_quantize", "Dropout", "NO_DROPOUT"]

#: most stochastic quantizers one call of a fused kernel applies
MAX_QUANTIZERS = 4
#: most terms of a GEMM epilogue a fused kernel takes
MAX_EPILOGUE_TERMS = 4
GRANS = {"tensor": 0, "row": 1, "column": 2}

COMMON_C = r"""
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <omp.h>

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

// 16 lanes loaded or stored under a tail mask: a plain load or store where the mask is full.
// On the AMD Zen 5 machine of docs/performance.md a masked load made the streaming pass of these
// kernels 3-4x slower than a plain one, with every mask full (fqt::sr_quantize_multi's first
// pass over an 8192 x 1024 gradient: 2.0-2.8 ms against 0.56-0.71 ms; a single-threaded scratch
// loop of masked loads over 128 MiB ran as fast as plain loads, so it is their use here, not
// masked loads as such, and the mechanism was not pinned down); the branch is predicted.
static inline __m512 load16(__mmask16 m, const float* p) {
    return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
static inline __m512 load16_or(__m512 other, __mmask16 m, const float* p) {  // lanes off the mask: other's
    return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_mask_loadu_ps(other, m, p);
}
static inline __m512i load16_i32(__mmask16 m, const int32_t* p) {
    return m == 0xFFFF ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(m, p);
}
static inline void store16(float* p, __mmask16 m, __m512 v) {
    if (m == 0xFFFF) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, m, v);
}
static inline void store16_i8(int8_t* p, __mmask16 m, __m512i q) {  // the low bytes of 16 int32 lanes
    if (m == 0xFFFF) _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(q)); else _mm512_mask_cvtepi32_storeu_epi8(p, m, q);
}

// exp(x) in float32: x = n ln2 + r (|r| <= ln2/2, ln2 in two parts), e^r by its Taylor
// polynomial of degree 7 (truncation error < 1e-8 relative), times 2^n by scalef. Results
// below the smallest normal float (x < -87.3365) are 0, as with flush-to-zero: denormal
// results take a microcode assist on these CPUs (a causal mask's -inf entries made the
// softmax pass 3.7x slower). exp(0) is exactly 1; NaN stays NaN.
static inline __m512 exp512(__m512 x0) {
    __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x0);  // NaN in the second operand is kept
    x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __mmask16 tiny = _mm512_cmp_ps_mask(x0, _mm512_set1_ps(-87.33654475f), _CMP_LT_OQ);
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

// fqt_compile.rng.hash32 on 16 lanes: x ^= x >> 16; x *= M; x ^= x >> 16; x *= M; x ^= x >> 16
static inline __m512i hash32x16(__m512i x) {
    const __m512i mult = _mm512_set1_epi32(0x45D9F3B);
    x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 16), x), mult);
    x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 16), x), mult);
    return _mm512_xor_si512(_mm512_srli_epi32(x, 16), x);
}

// the 24-bit integers of rng.uniform_at's draws at the 16 flat indices base .. base + 15 (below
// 2**31: a 32-bit index) for the seed words (slo, shi): h(h(i ^ slo) ^ shi) >> 8; the draw is
// this times 2**-24
static inline __m512i draw24x16(int64_t base, __m512i vslo, __m512i vshi) {
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), iota);
    return _mm512_srli_epi32(hash32x16(_mm512_xor_si512(hash32x16(_mm512_xor_si512(idx, vslo)), vshi)), 8);
}

// ops.dropout_keep at the 16 flat indices base .. base + 15: an element is kept where its draw
// is at least p, i.e. where the 24-bit integer is at least kmin (ops.keep_threshold(p), the
// least one the float comparison keeps)
static inline __mmask16 keep16(int64_t base, uint32_t slo, uint32_t shi, uint32_t kmin) {
    __m512i k = draw24x16(base, _mm512_set1_epi32((int)slo), _mm512_set1_epi32((int)shi));
    return _mm512_cmpge_epu32_mask(k, _mm512_set1_epi32((int)kmin));
}

// ops.dropout's arithmetic on 16 lanes: x * keep * inv, keep 0.0 or 1.0 (so a NaN stays NaN)
static inline __m512 drop16(__m512 x, __mmask16 keep, __m512 inv) {
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_mask_blend_ps(keep, _mm512_setzero_ps(), _mm512_set1_ps(1.0f))), inv);
}

// one row i of a stochastic rounding (quantizers.stochastic_quantize): codes = clamp(floor((x - lo)
// / div + u), 0, levels) - half, u the draw of rng.uniform_from_seed at the flat index i * D + j
// (below 2**31 elements: a 32-bit index) for the seed words (slo, shi); lo/div per column from
// the arrays clo/cdiv, else the scalars lo/div
static inline void sr_round_row(const float* xr, int64_t i, int64_t D, const float* clo, const float* cdiv,
                                float lo, float div, int levels, int half, uint32_t slo, uint32_t shi,
                                int8_t* cr) {
    const __m512 inv24 = _mm512_set1_ps(1.0f / 16777216.0f);
    __m512 vlo = _mm512_set1_ps(lo), vdiv = _mm512_set1_ps(div), vtop = _mm512_set1_ps((float)levels);
    __m512i vhalf = _mm512_set1_epi32(half), vslo = _mm512_set1_epi32((int)slo), vshi = _mm512_set1_epi32((int)shi);
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = tail_mask(D - j);
        if (clo) {
            vlo = load16(m, clo + j);
            vdiv = load16_or(_mm512_set1_ps(1.0f), m, cdiv + j);
        }
        __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(draw24x16(i * D + j, vslo, vshi)), inv24);
        __m512 y = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(load16(m, xr + j), vlo), vdiv), u);
        y = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        y = _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), vtop);
        __m512i q = _mm512_sub_epi32(_mm512_cvtps_epi32(y), vhalf);
        store16_i8(cr + j, m, q);
    }
}

// row i (length D) of a lowered GEMM's float result from its int32 product acc (rows of D, M
// rows per batch): out_j = acc_ij * r0_i * c0_bj + sum_{t >= 1} r_t,i * c_t,bj, b = i / M;
// r[t] holds one float per row (all batches), c[t] D floats per batch
static inline void epilogue_row(const int32_t* acc, int64_t i, int64_t D, int64_t M, int nt,
                                const float* const* r, const float* const* c, float* out) {
    const int32_t* ar = acc + i * D;
    int64_t cb = (i / M) * D;
    __m512 vr[4];
    for (int t = 0; t < nt; t++) vr[t] = _mm512_set1_ps(r[t][i]);
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = tail_mask(D - j);
        __m512 v = _mm512_cvtepi32_ps(load16_i32(m, ar + j));
        v = _mm512_mul_ps(_mm512_mul_ps(v, vr[0]), load16(m, c[0] + cb + j));
        for (int t = 1; t < nt; t++) v = _mm512_fmadd_ps(vr[t], load16(m, c[t] + cb + j), v);
        store16(out + j, m, v);
    }
}

// pass 1 helper: fold row v (16 lanes, mask m) of ds into the row range and the thread's column
// ranges (tmin/tmax NULL: not needed); bad collects NaN lanes
static inline void track_ranges(__m512 v, __mmask16 m, int64_t j, __m512* lo, __m512* hi, __mmask16* bad,
                                float* tmin, float* tmax) {
    *bad |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    *lo = _mm512_mask_min_ps(*lo, m, *lo, v);
    *hi = _mm512_mask_max_ps(*hi, m, *hi, v);
    if (tmin) {
        store16(tmin + j, m, _mm512_min_ps(load16(m, tmin + j), v));
        store16(tmax + j, m, _mm512_max_ps(load16(m, tmax + j), v));
    }
}

// pass 1 helper, at the end of row i: store its range (NaN for a row holding a NaN) and round
// the nr row-range quantizers (div as quantizers._safe_scale)
static inline void finish_row(const float* dr, int64_t i, int64_t D, __m512 lo, __m512 hi, __mmask16 bad,
                              float* rmin, float* rmax, int nr, const int* levels, const int* half,
                              const uint32_t* slo, const uint32_t* shi, int8_t* const* codes) {
    float rlo = _mm512_reduce_min_ps(lo), rhi = _mm512_reduce_max_ps(hi);
    rmin[i] = bad ? NAN : rlo;
    rmax[i] = bad ? NAN : rhi;
    for (int k = 0; k < nr; k++) {
        float scale = (rhi - rlo) / (float)levels[k];
        sr_round_row(dr, i, D, 0, 0, rlo, scale > 0.0f ? scale : 1.0f, levels[k], half[k], slo[k], shi[k],
                     codes[k] + i * D);
    }
}

// a forward quantizer's rounding (quantizers.quantize_forward with its scalars from
// quantizers.forward_params): codes = clamp(round((p - shift) / div) + zero, cmin, cmax) - bias, round half to even;
// where drop is not 0, of ops.dropout(p) (drop16 with the seed words dslo/dshi, keep16 at p's flat index) instead
void fqt_quantize_affine(const float* p, int8_t* codes, int64_t n, float shift, float div, float zero,
                         float cmin, float cmax, float bias, int drop, uint32_t dslo, uint32_t dshi, uint32_t kmin,
                         float inv, int nthreads) {
    const int64_t chunk = 1 << 14;
    int64_t nchunks = (n + chunk - 1) / chunk;
    __m512 vshift = _mm512_set1_ps(shift), vdiv = _mm512_set1_ps(div), vzero = _mm512_set1_ps(zero);
    __m512 vlo = _mm512_set1_ps(cmin), vhi = _mm512_set1_ps(cmax), vbias = _mm512_set1_ps(bias);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        for (int64_t j = c * chunk; j < end; j += 16) {
            __mmask16 m = tail_mask(end - j);
            __m512 x = load16(m, p + j);
            if (drop) x = drop16(x, keep16(j, dslo, dshi, kmin), _mm512_set1_ps(inv));
            __m512 v = _mm512_div_ps(_mm512_sub_ps(x, vshift), vdiv);
            v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzero);
            v = _mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(v, vlo), vhi), vbias);
            store16_i8(codes + j, m, _mm512_cvtps_epi32(v));
        }
    }
}

// pass 2: the stochastic roundings of the (rows, D) tensor x with a column or tensor range
// (the row-range ones are done in pass 1): arrays of nq quantizers as in sr_round_row, lo/div
// pointing at D (column) or 1 (tensor) floats
void fqt_sr_quantize_rows(const float* x, int64_t rows, int64_t D, int nq, const int* gran,
                          const float* const* lo, const float* const* div, const int* levels,
                          const int* half, const uint32_t* slo, const uint32_t* shi, int8_t* const* codes,
                          int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < rows; i++)
        for (int k = 0; k < nq; k++)
            sr_round_row(x + i * D, i, D, gran[k] == 2 ? lo[k] : 0, gran[k] == 2 ? div[k] : 0, lo[k][0], div[k][0],
                         levels[k], half[k], slo[k], shi[k], codes[k] + i * D);
}
"""


def bind_pass2(lib: ctypes.CDLL) -> None:
    """Declare the argument types of :data:`COMMON_C`'s exported pass-2 functions."""
    f32 = ctypes.c_float
    u32 = ctypes.c_uint32
    lib.fqt_quantize_affine.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, f32, f32, f32, f32, f32, f32,
                                        ctypes.c_int, u32, u32, u32, f32, ctypes.c_int]
    lib.fqt_quantize_affine.restype = None
    lib.fqt_sr_quantize_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int] + [
        ctypes.c_void_p] * 8 + [ctypes.c_int]
    lib.fqt_sr_quantize_rows.restype = None


def range_shape(gran: str, n: int, d: int) -> list[int]:
    return {"tensor": [], "row": [n, 1], "column": [1, d]}[gran]


def check_quantizers(op: str, n_elements: int, bits: Sequence[int], grans: Sequence[str], seeds: Sequence[Tensor]) -> None:
    torch._check(len(bits) == len(grans) == len(seeds) and 1 <= len(bits) <= MAX_QUANTIZERS,
                 lambda: f"{op}: 1 to {MAX_QUANTIZERS} quantizers, one bits/granularity/seed each")
    for b, gr in zip(bits, grans):
        Q.check_bits(b)
        torch._check(gr in GRANS, lambda: f"{op}: granularity must be one of {tuple(GRANS)}, got {gr!r}")
    torch._check(n_elements < 2**31, lambda: f"{op}: below 2**31 elements only")


def check_epilogue(op: str, g: Tensor, rows: Sequence[Tensor], cols: Sequence[Tensor], numel: int, d: int) -> None:
    """``g`` is a float gradient (no epilogue terms) or an int32 product ((B, M, N) or (M, N),
    ``numel`` elements, N = ``d``) with 1 to MAX_EPILOGUE_TERMS terms: ``rows[t]``
    broadcastable to (B, M, 1), ``cols[t]`` to (B, 1, N), float32."""
    if g.dtype != torch.int32:
        torch._check(g.dtype == torch.float32, lambda: f"{op}: the gradient must be float32 (or an int32 product)")
        torch._check(len(rows) == len(cols) == 0, lambda: f"{op}: epilogue terms given with a float gradient")
        return
    torch._check(g.dim() in (2, 3), lambda: f"{op}: an int32 product must be 2-D or 3-D, got {g.dim()}-D")
    torch._check(g.numel() == numel and g.shape[-1] == d,
                 lambda: f"{op}: the int32 product's shape {tuple(g.shape)} does not match the output's")
    torch._check(1 <= len(rows) == len(cols) <= MAX_EPILOGUE_TERMS,
                 lambda: f"{op}: an int32 product needs 1 to {MAX_EPILOGUE_TERMS} epilogue terms (rows and cols)")
    b, m, n = (1, *g.shape) if g.dim() == 2 else tuple(g.shape)
    for r, c in zip(rows, cols):
        torch._check(r.dtype == torch.float32 and c.dtype == torch.float32, lambda: f"{op}: epilogue terms must be float32")
        torch._check(r.dim() <= 3 and c.dim() <= 3, lambda: f"{op}: epilogue terms have at most 3 dimensions")
        try:
            ok = torch.broadcast_shapes(r.shape, (b, m, 1)) == (b, m, 1) and torch.broadcast_shapes(c.shape, (b, 1, n)) == (b, 1, n)
        except RuntimeError:  # not broadcastable at all
            ok = False
        torch._check(ok, lambda: f"{op}: epilogue term shapes {tuple(r.shape)} / {tuple(c.shape)} do not broadcast "
                                 f"to rows {(b, m, 1)} / columns {(b, 1, n)}")


def _bmn(g: Tensor) -> tuple[int, int, int]:
    return (1, *g.shape) if g.dim() == 2 else tuple(g.shape)  # type: ignore[return-value]


def epilogue_reference(g: Tensor, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
    """The float gradient: ``g`` itself, or ``acc * rows[0] * cols[0] + sum_t rows[t] * cols[t]``
    for an int32 product (as (B, M, N))."""
    if g.dtype != torch.int32:
        return g
    b, m, n = _bmn(g)
    out = g.reshape(b, m, n).float() * rows[0] * cols[0]
    for r, c in zip(rows[1:], cols[1:]):
        out = out + r * c
    return out


class Epilogue:
    """The C kernels' view of an int32 product and its epilogue terms (or of no epilogue)."""

    def __init__(self, g: Tensor, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> None:
        self.keep: list[Tensor] = []
        if g.dtype != torch.int32:
            self.acc, self.m, self.nt, self.r, self.c = None, 1, 0, None, None
            return
        b, m, n = _bmn(g)
        acc = g.contiguous()
        rs = [r.expand(b, m, 1).reshape(b * m).contiguous() for r in rows]
        cs = [c.expand(b, 1, n).reshape(b * n).contiguous() for c in cols]
        self.keep = [acc, *rs, *cs]
        self.acc, self.m, self.nt = acc.data_ptr(), m, len(rs)
        self.r = (ctypes.c_void_p * len(rs))(*[t.data_ptr() for t in rs])
        self.c = (ctypes.c_void_p * len(cs))(*[t.data_ptr() for t in cs])

    def args(self) -> tuple[Any, ...]:
        """``(acc, M, nt, r, c)`` as the kernels take them."""
        return self.acc, self.m, self.nt, self.r, self.c


class Quantizers:
    """One fused call's quantizers: codes buffers, levels, seed words, and the split into the
    row-range ones (rounded in pass 1) and the others (pass 2)."""

    def __init__(self, n: int, d: int, seeds: Sequence[Tensor], bits: Sequence[int], grans: Sequence[str]) -> None:
        self.n, self.d, self.grans = n, d, list(grans)
        self.codes = [torch.empty((n, d), dtype=torch.int8) for _ in grans]
        self.words = [seed_words_int(int(sd)) for sd in seeds]
        self.levels = [2**b - 1 for b in bits]
        self.halves = [2 ** (b - 1) for b in bits]
        self.row_k = [k for k, gr in enumerate(grans) if gr == "row"]
        self.rest_k = [k for k, gr in enumerate(grans) if gr != "row"]
        self.columns = "column" in grans

    def c_arrays(self, ks: list[int]) -> tuple[Any, ...]:
        """The kernels' per-quantizer arrays (levels, half, seed words, code pointers) for ``ks``."""
        n = len(ks)
        return (
            (ctypes.c_int * n)(*[self.levels[k] for k in ks]), (ctypes.c_int * n)(*[self.halves[k] for k in ks]),
            (ctypes.c_uint32 * n)(*[self.words[k][0] for k in ks]), (ctypes.c_uint32 * n)(*[self.words[k][1] for k in ks]),
            (ctypes.c_void_p * n)(*[self.codes[k].data_ptr() for k in ks]),
        )

    def pass1_args(self) -> tuple[Any, ...]:
        """``(nr, levels, half, slo, shi, codes)`` of the row-range quantizers."""
        return (len(self.row_k), *self.c_arrays(self.row_k))

    def column_buffers(self, threads: int) -> tuple[Tensor | None, Tensor | None]:
        """Per-thread column min/max rows (None when no quantizer needs them)."""
        if not self.columns:
            return None, None
        return torch.full((threads, self.d), float("inf")), torch.full((threads, self.d), float("-inf"))


def ptr_or_none(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def finish(lib: ctypes.CDLL, ds: Tensor, qs: Quantizers, rmin: Tensor, rmax: Tensor, cmin: Tensor | None,
           cmax: Tensor | None, threads: int) -> list[Tensor]:
    """After pass 1: check the ranges, compute scales and offsets, run pass 2; returns
    ``[codes_1, scale_1, offset_1, codes_2, ...]``."""
    Q._check_finite_range(rmin, rmax, "gradient")
    n, d = qs.n, qs.d
    ranges = {
        "tensor": (rmin.amin(), rmax.amax()),
        "row": (rmin.unsqueeze(1), rmax.unsqueeze(1)),
        "column": (cmin.amin(0, keepdim=True), cmax.amax(0, keepdim=True)) if cmin is not None and cmax is not None else None,
    }
    out: list[Tensor] = []
    los, divs = [], []
    for k, gr in enumerate(qs.grans):
        lo, hi = ranges[gr]
        sc, div = Q._safe_scale(hi - lo, qs.levels[k])
        los.append(lo.contiguous())
        divs.append(div.contiguous())
        shape = range_shape(gr, n, d)
        out += [qs.codes[k], sc.expand(shape).contiguous(), (lo + qs.halves[k] * sc).expand(shape).contiguous()]
    if qs.rest_k:
        c_int, c_ptr = ctypes.c_int, ctypes.c_void_p
        ks = qs.rest_k
        nq = len(ks)
        lib.fqt_sr_quantize_rows(
            ds.data_ptr(), n, d, nq, (c_int * nq)(*[GRANS[qs.grans[k]] for k in ks]),
            (c_ptr * nq)(*[los[k].data_ptr() for k in ks]), (c_ptr * nq)(*[divs[k].data_ptr() for k in ks]),
            *qs.c_arrays(ks), threads,
        )
    return out


class Dropout:
    """The C kernels' arguments for ``fqt::dropout(x, seed, p)`` applied on the way (``drop,
    seed words, kmin, inv``; ``drop`` 0 and the rest unused where ``seed`` is None)."""

    def __init__(self, seed: Tensor | None, p: float) -> None:
        from .ops import keep_threshold

        if seed is None:
            self.args = (0, 0, 0, 0, 1.0)
        else:
            slo, shi = seed_words_int(int(seed))
            self.args = (1, slo, shi, keep_threshold(p), 1.0 / (1.0 - p))


NO_DROPOUT = Dropout(None, 0.0)


def forward_quantize(lib: ctypes.CDLL, y: Tensor, rmin: Tensor, rmax: Tensor, bits: int, scheme: str, name: str,
                     threads: int, dropout: Dropout = NO_DROPOUT) -> tuple[Tensor, Tensor, Tensor]:
    """A per-tensor forward quantizer of ``y`` (of ``fqt::dropout(y)`` with ``dropout``) from its
    row ranges (pass 1's): the range and scalars of :func:`fqt_compile.quantizers.quantize_forward`,
    then the rounding in C; returns ``(codes, scale, offset)`` (0-d scale and offset)."""
    lo, hi = rmin.amin(), rmax.amax()
    Q._check_finite_range(lo, hi, name)
    prm = Q.forward_params(lo, hi, bits, scheme)
    codes = torch.empty_like(y, dtype=torch.int8)
    lib.fqt_quantize_affine(y.data_ptr(), codes.data_ptr(), y.numel(), float(prm.shift), float(prm.div),
                            float(prm.zero), float(prm.cmin), float(prm.cmax), float(prm.bias), *dropout.args, threads)
    return codes, prm.scale, prm.offset


def reference_quantize(ds: Tensor, seeds: Sequence[Tensor], bits: Sequence[int], grans: Sequence[str]) -> list[Tensor]:
    """The reference quantizers' ``[codes_1, scale_1, offset_1, ...]`` of an (N, D) ``ds``, in
    the fused ops' output shapes."""
    n, d = ds.shape
    out: list[Tensor] = []
    for seed, b, gr in zip(seeds, bits, grans):
        q = Q.stochastic_quantize(ds, b, gr, seed)  # type: ignore[arg-type]
        shape = range_shape(gr, n, d)
        out += [q.codes, q.scale.expand(shape).contiguous(), q.offset.expand(shape).contiguous()]
    return out


def fake_outputs(like: Tensor, n: int, d: int, grans: Sequence[str]) -> list[Tensor]:
    """Fake (meta) ``[codes, scale, offset] * k`` for the fused ops' register_fake."""
    out: list[Tensor] = []
    for gr in grans:
        shape = range_shape(gr, n, d)
        out += [like.new_empty((n, d), dtype=torch.int8), like.new_empty(shape, dtype=torch.float32),
                like.new_empty(shape, dtype=torch.float32)]
    return out

