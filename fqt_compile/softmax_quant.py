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

The backward, ``fqt::softmax_backward_sr_quantize``, is the same two-pass scheme for softmax's
backward and the stochastic quantizers of its result (the attention scores' gradient, rounded
by Q_b1 = PSQ and Q_b2 = per column by default): pass 1 writes ``ds = (g p - p sum(g p)) c``
per row with the row's range, per-thread column ranges, and rounds the row-range quantizers
while the row is in cache; pass 2 rounds the column- and tensor-range ones. Given the kernel's
``ds``, codes, scales and offsets are those of :func:`fqt_compile.quantizers.stochastic_quantize`
bit for bit, with the same counter-based draws (``fqt_compile.rng``, hashed in 16 lanes).

Where the kernel cannot run (no AVX-512, no compiler, ``FQT_FUSED_SOFTMAX=0``) the ops compute
the same with torch (``torch.softmax`` / the softmax-backward formula, then the reference
quantizers); the graph pass ``passes/fuse_softmax.py`` only puts them into graphs where the
kernel runs.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, List  # typing.List: torch 2.5's schema inference rejects list[...]

import torch
from torch import Tensor

from . import cbuild
from . import quantizers as Q
from .rng import seed_words

__all__ = ["available", "status", "softmax_quantize", "softmax_backward_sr_quantize"]


_FLAGS = ["-O3", "-shared", "-fPIC", "-mavx512f", "-fopenmp"]

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <omp.h>

// exp(x) in float32: x = n ln2 + r (|r| <= ln2/2, ln2 in two parts), e^r by its Taylor
// polynomial of degree 7 (truncation error < 1e-8 relative), times 2^n by scalef. Results
// below the smallest normal float (x < -87.3365) are 0, as with flush-to-zero: denormal
// results take a microcode assist on these CPUs (a causal mask's -inf entries made the pass
// 3.7x slower). exp(0) is exactly 1; NaN stays NaN.
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

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

// pass 1: p = softmax(x) over rows of length L; rmin/rmax: each row's min and max of p
// (NaN for a row with a NaN, an Inf or only -Inf, where p is NaN too)
void fqt_softmax_rows(const float* x, float* p, float* rmin, float* rmax, int64_t rows, int64_t L,
                      int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float* xr = x + i * L;
        float* pr = p + i * L;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 bad = 0;
        for (int64_t j = 0; j < L; j += 16) {
            __mmask16 m = tail_mask(L - j);
            __m512 v = _mm512_maskz_loadu_ps(m, xr + j);
            bad |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
        }
        float mx = _mm512_reduce_max_ps(vmax);
        __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; j += 16) {
            __mmask16 m = tail_mask(L - j);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + j), vm));
            e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(pr + j, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        __m512 vs = _mm512_set1_ps(_mm512_reduce_add_ps(vsum));
        __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < L; j += 16) {
            __mmask16 m = tail_mask(L - j);
            __m512 q = _mm512_div_ps(_mm512_maskz_loadu_ps(m, pr + j), vs);
            _mm512_mask_storeu_ps(pr + j, m, q);
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

// pass 2: codes = clamp(round((p - shift) / div) + zero, cmin, cmax) - bias, round half to even
void fqt_quantize_affine(const float* p, int8_t* codes, int64_t n, float shift, float div, float zero,
                         float cmin, float cmax, float bias, int nthreads) {
    const int64_t chunk = 1 << 14;
    int64_t nchunks = (n + chunk - 1) / chunk;
    __m512 vshift = _mm512_set1_ps(shift), vdiv = _mm512_set1_ps(div), vzero = _mm512_set1_ps(zero);
    __m512 vlo = _mm512_set1_ps(cmin), vhi = _mm512_set1_ps(cmax), vbias = _mm512_set1_ps(bias);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        for (int64_t j = c * chunk; j < end; j += 16) {
            __mmask16 m = tail_mask(end - j);
            __m512 v = _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + j), vshift), vdiv);
            v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzero);
            v = _mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(v, vlo), vhi), vbias);
            _mm512_mask_cvtepi32_storeu_epi8(codes + j, m, _mm512_cvtps_epi32(v));
        }
    }
}

// ---- backward -------------------------------------------------------------------------------

// fqt_compile.rng.hash32 on 16 lanes: x ^= x >> 16; x *= M; x ^= x >> 16; x *= M; x ^= x >> 16
static inline __m512i hash32x16(__m512i x) {
    const __m512i mult = _mm512_set1_epi32(0x45D9F3B);
    x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 16), x), mult);
    x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 16), x), mult);
    return _mm512_xor_si512(_mm512_srli_epi32(x, 16), x);
}

// one row i of a stochastic rounding (quantizers.stochastic_quantize): codes = clamp(floor((x - lo)
// / div + u), 0, levels) - half, u the draw of rng.uniform_from_seed at the flat index i * D + j
// (below 2**31 elements: a 32-bit index) for the seed words (slo, shi); lo/div per column from
// the arrays clo/cdiv, else the scalars lo/div
static inline void sr_round_row(const float* xr, int64_t i, int64_t D, const float* clo, const float* cdiv,
                                float lo, float div, int levels, int half, uint32_t slo, uint32_t shi,
                                int8_t* cr) {
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 inv24 = _mm512_set1_ps(1.0f / 16777216.0f);
    __m512 vlo = _mm512_set1_ps(lo), vdiv = _mm512_set1_ps(div), vtop = _mm512_set1_ps((float)levels);
    __m512i vhalf = _mm512_set1_epi32(half), vslo = _mm512_set1_epi32((int)slo), vshi = _mm512_set1_epi32((int)shi);
    for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = tail_mask(D - j);
        if (clo) {
            vlo = _mm512_maskz_loadu_ps(m, clo + j);
            vdiv = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, cdiv + j);
        }
        __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)(i * D + j)), iota);
        __m512i h = hash32x16(_mm512_xor_si512(hash32x16(_mm512_xor_si512(idx, vslo)), vshi));
        __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), inv24);
        __m512 y = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + j), vlo), vdiv), u);
        y = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        y = _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), vtop);
        __m512i q = _mm512_sub_epi32(_mm512_cvtps_epi32(y), vhalf);
        if (m == 0xFFFF)
            _mm_storeu_si128((__m128i*)(cr + j), _mm512_cvtepi32_epi8(q));
        else
            _mm512_mask_cvtepi32_storeu_epi8(cr + j, m, q);
    }
}

// pass 1: ds = (g * p - p * sum(g * p)) * c per row (softmax's backward, then the scale of the
// scores); rmin/rmax: each row's range of ds (NaN for a row holding a NaN); cmin/cmax: one
// (D) row per thread of column ranges, which the caller reduces (NULL: not needed); and the
// nr stochastic roundings with a row range, while the row is in cache (div as _safe_scale)
void fqt_softmax_bwd_rows(const float* g, const float* p, float* ds, float* rmin, float* rmax, float* cmin,
                          float* cmax, int64_t rows, int64_t D, float c, int nr, const int* levels,
                          const int* half, const uint32_t* slo, const uint32_t* shi, int8_t* const* codes,
                          int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        float* tmin = cmin ? cmin + (int64_t)omp_get_thread_num() * D : 0;
        float* tmax = cmax ? cmax + (int64_t)omp_get_thread_num() * D : 0;
        __m512 vc = _mm512_set1_ps(c);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float* gr = g + i * D;
            const float* pr = p + i * D;
            float* dr = ds + i * D;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < D; j += 16) {
                __mmask16 m = tail_mask(D - j);
                __m512 gp = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gr + j), _mm512_maskz_loadu_ps(m, pr + j));
                _mm512_mask_storeu_ps(dr + j, m, gp);
                acc = _mm512_add_ps(acc, gp);
            }
            __m512 vs = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
            __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
            __mmask16 bad = 0;
            for (int64_t j = 0; j < D; j += 16) {
                __mmask16 m = tail_mask(D - j);
                __m512 pv = _mm512_maskz_loadu_ps(m, pr + j);
                __m512 v = _mm512_mul_ps(_mm512_fnmadd_ps(pv, vs, _mm512_maskz_loadu_ps(m, dr + j)), vc);
                _mm512_mask_storeu_ps(dr + j, m, v);
                bad |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
                lo = _mm512_mask_min_ps(lo, m, lo, v);
                hi = _mm512_mask_max_ps(hi, m, hi, v);
                if (tmin) {
                    _mm512_mask_storeu_ps(tmin + j, m, _mm512_min_ps(_mm512_maskz_loadu_ps(m, tmin + j), v));
                    _mm512_mask_storeu_ps(tmax + j, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, tmax + j), v));
                }
            }
            float rlo = _mm512_reduce_min_ps(lo), rhi = _mm512_reduce_max_ps(hi);
            rmin[i] = bad ? NAN : rlo;
            rmax[i] = bad ? NAN : rhi;
            for (int k = 0; k < nr; k++) {
                float scale = (rhi - rlo) / (float)levels[k];
                sr_round_row(dr, i, D, 0, 0, rlo, scale > 0.0f ? scale : 1.0f, levels[k], half[k], slo[k], shi[k],
                             codes[k] + i * D);
            }
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


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = cbuild.load("softmax_quant", _SOURCE, _FLAGS, env="FQT_FUSED_SOFTMAX", needs={"avx512f"},
                           fallback="softmax stays in the compiled graph")
    if lib is None:
        return None, why
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.fqt_softmax_rows.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.fqt_softmax_rows.restype = None
    lib.fqt_quantize_affine.argtypes = [ptr, ptr, i64, f32, f32, f32, f32, f32, f32, ctypes.c_int]
    lib.fqt_quantize_affine.restype = None
    lib.fqt_softmax_bwd_rows.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, f32, ctypes.c_int] + [ptr] * 5 + [
        ctypes.c_int]
    lib.fqt_softmax_bwd_rows.restype = None
    lib.fqt_sr_quantize_rows.argtypes = [ptr, i64, i64, ctypes.c_int] + [ptr] * 8 + [ctypes.c_int]
    lib.fqt_sr_quantize_rows.restype = None
    return lib, "in use (AVX-512)"


def available() -> bool:
    """True when ``fqt::softmax_quantize`` runs the fused C kernel here."""
    return _load()[0] is not None


def status() -> str:
    """Why the fused softmax kernel is or is not in use, in words."""
    return _load()[1]


def _check(x: Tensor, bits: int, scheme: str) -> None:
    Q.check_bits(bits)
    torch._check(scheme in Q.FORWARD_SCHEMES, lambda: f"fqt::softmax_quantize: scheme must be one of {Q.FORWARD_SCHEMES}")
    torch._check(x.dim() >= 1, lambda: "fqt::softmax_quantize: input must have at least one dimension")
    torch._check(x.dtype == torch.float32, lambda: f"fqt::softmax_quantize: float32 input only, got {x.dtype}")


@torch.library.custom_op("fqt::softmax_quantize", mutates_args=())
def softmax_quantize(x: Tensor, bits: int, scheme: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``P = softmax(x, -1)`` and ``fqt::quantize(P, bits, scheme, "tensor")``:
    returns ``(P, codes, scale, offset)`` (scale and offset 0-d)."""
    _check(x, bits, scheme)
    lib = _load()[0]
    if lib is None or x.device.type != "cpu" or x.numel() == 0:
        p = torch.softmax(x, -1)
        q = Q.quantize_forward(p, bits, scheme, "tensor", name="softmax output")
        return p, q.codes, q.scale.reshape(()), q.offset.reshape(())
    x = x.contiguous()
    L = x.shape[-1]
    rows = x.numel() // L
    p = torch.empty_like(x)
    rmin, rmax = torch.empty(rows), torch.empty(rows)
    threads = torch.get_num_threads()
    lib.fqt_softmax_rows(x.data_ptr(), p.data_ptr(), rmin.data_ptr(), rmax.data_ptr(), rows, L, threads)
    lo, hi = rmin.amin(), rmax.amax()
    Q._check_finite_range(lo, hi, "softmax output")
    prm = Q.forward_params(lo, hi, bits, scheme)
    codes = torch.empty_like(x, dtype=torch.int8)
    lib.fqt_quantize_affine(p.data_ptr(), codes.data_ptr(), p.numel(), float(prm.shift), float(prm.div),
                            float(prm.zero), float(prm.cmin), float(prm.cmax), float(prm.bias), threads)
    return p, codes, prm.scale, prm.offset


@softmax_quantize.register_fake
def _(x, bits, scheme):
    _check(x, bits, scheme)
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int8), x.new_empty(()), x.new_empty(())


_GRANS = {"tensor": 0, "row": 1, "column": 2}
#: most stochastic quantizers one call of fqt::softmax_backward_sr_quantize applies
MAX_QUANTIZERS = 4


def _check_bwd(g: Tensor, p: Tensor, bits: list[int], grans: list[str], seeds: list[Tensor]) -> None:
    """(``grans`` here is the split list.)"""
    torch._check(g.shape == p.shape, lambda: f"fqt::softmax_backward_sr_quantize: shapes differ: {g.shape} vs {p.shape}")
    torch._check(g.dim() >= 1, lambda: "fqt::softmax_backward_sr_quantize: inputs must have a dimension")
    torch._check(g.dtype == torch.float32 and p.dtype == torch.float32,
                 lambda: "fqt::softmax_backward_sr_quantize: float32 inputs only")
    torch._check(len(bits) == len(grans) == len(seeds) and 1 <= len(bits) <= MAX_QUANTIZERS,
                 lambda: f"fqt::softmax_backward_sr_quantize: 1 to {MAX_QUANTIZERS} quantizers, one bits/granularity/seed each")
    for b, gr in zip(bits, grans):
        Q.check_bits(b)
        torch._check(gr in _GRANS, lambda: f"fqt::softmax_backward_sr_quantize: granularity must be one of {tuple(_GRANS)}, got {gr!r}")
    torch._check(g.numel() < 2**31, lambda: "fqt::softmax_backward_sr_quantize: below 2**31 elements only")


def _range_shape(gran: str, n: int, d: int) -> list[int]:
    return {"tensor": [], "row": [n, 1], "column": [1, d]}[gran]


@torch.library.custom_op("fqt::softmax_backward_sr_quantize", mutates_args=())
def softmax_backward_sr_quantize(
    g: Tensor, p: Tensor, scale: float, seeds: List[Tensor], bits: List[int], granularities: str
) -> List[Tensor]:
    """``ds = softmax_backward(g, p) * scale`` (softmax over the last dimension, ``p`` its
    output) viewed as ``(N, D)`` with ``D`` the last dimension, and ``fqt::sr_quantize(ds,
    seed_k, bits_k, gran_k)`` for each quantizer (``granularities``: comma-separated, e.g.
    ``"row,column"``): returns ``[ds, codes_1, scale_1, offset_1, codes_2, ...]``."""
    grans = granularities.split(",")
    _check_bwd(g, p, bits, grans, seeds)
    d = g.shape[-1]
    n = g.numel() // d
    lib = _load()[0]
    if lib is None or g.device.type != "cpu" or g.numel() == 0:
        gp = g * p
        ds = ((gp - p * gp.sum(-1, keepdim=True)) * scale).reshape(n, d)
        out = [ds]
        for seed, b, gr in zip(seeds, bits, grans):
            q = Q.stochastic_quantize(ds, b, gr, seed)  # type: ignore[arg-type]
            shape = _range_shape(gr, n, d)
            out += [q.codes, q.scale.expand(shape).contiguous(), q.offset.expand(shape).contiguous()]
        return out
    g, p = g.contiguous(), p.contiguous()
    threads = torch.get_num_threads()
    ds = torch.empty((n, d))
    rmin, rmax = torch.empty(n), torch.empty(n)
    cols = "column" in grans
    cmin = torch.full((threads, d), float("inf")) if cols else None
    cmax = torch.full((threads, d), float("-inf")) if cols else None
    codes = [torch.empty((n, d), dtype=torch.int8) for _ in grans]
    words = [tuple(int(w) & 0xFFFFFFFF for w in seed_words(sd)) for sd in seeds]
    levels = [2**b - 1 for b in bits]
    halves = [2 ** (b - 1) for b in bits]
    rows_k = [k for k, gr in enumerate(grans) if gr == "row"]  # rounded in pass 1
    rest_k = [k for k, gr in enumerate(grans) if gr != "row"]  # rounded in pass 2
    lib.fqt_softmax_bwd_rows(
        g.data_ptr(), p.data_ptr(), ds.data_ptr(), rmin.data_ptr(), rmax.data_ptr(),
        cmin.data_ptr() if cols else None, cmax.data_ptr() if cols else None, n, d, float(scale), len(rows_k),
        *_c_arrays(rows_k, levels, halves, [w[0] for w in words], [w[1] for w in words], codes), threads,
    )
    Q._check_finite_range(rmin, rmax, "gradient")
    ranges = {
        "tensor": (rmin.amin(), rmax.amax()),
        "row": (rmin.unsqueeze(1), rmax.unsqueeze(1)),
        "column": (cmin.amin(0, keepdim=True), cmax.amax(0, keepdim=True)) if cols else None,
    }
    out: list[Tensor] = [ds]
    los, divs = [], []
    for k, gr in enumerate(grans):
        lo, hi = ranges[gr]
        sc, div = Q._safe_scale(hi - lo, levels[k])
        los.append(lo.contiguous())
        divs.append(div.contiguous())
        shape = _range_shape(gr, n, d)
        out += [codes[k], sc.expand(shape).contiguous(), (lo + halves[k] * sc).expand(shape).contiguous()]
    if rest_k:
        c_int, c_ptr = ctypes.c_int, ctypes.c_void_p
        nq = len(rest_k)
        lib.fqt_sr_quantize_rows(
            ds.data_ptr(), n, d, nq, (c_int * nq)(*[_GRANS[grans[k]] for k in rest_k]),
            (c_ptr * nq)(*[los[k].data_ptr() for k in rest_k]), (c_ptr * nq)(*[divs[k].data_ptr() for k in rest_k]),
            *_c_arrays(rest_k, levels, halves, [w[0] for w in words], [w[1] for w in words], codes), threads,
        )
    return out


def _c_arrays(ks: list[int], levels: list[int], halves: list[int], slo: list[int], shi: list[int],
              codes: list[Tensor]) -> tuple[Any, ...]:
    """The kernels' per-quantizer arrays (levels, half, seed words, code pointers) for the
    quantizers ``ks``."""
    n = len(ks)
    return (
        (ctypes.c_int * n)(*[levels[k] for k in ks]), (ctypes.c_int * n)(*[halves[k] for k in ks]),
        (ctypes.c_uint32 * n)(*[slo[k] for k in ks]), (ctypes.c_uint32 * n)(*[shi[k] for k in ks]),
        (ctypes.c_void_p * n)(*[codes[k].data_ptr() for k in ks]),
    )


@softmax_backward_sr_quantize.register_fake
def _(g, p, scale, seeds, bits, granularities):
    grans = granularities.split(",")
    _check_bwd(g, p, bits, grans, seeds)
    d = g.shape[-1]
    n = g.numel() // d
    out = [g.new_empty((n, d))]
    for gr in grans:
        shape = _range_shape(gr, n, d)
        out += [g.new_empty((n, d), dtype=torch.int8), g.new_empty(shape), g.new_empty(shape)]
    return out
