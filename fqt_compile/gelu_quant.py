"""GELU's backward fused with the stochastic quantizers of its result:
``fqt::gelu_backward_sr_quantize``.

In a quantized MLP block ``fc2(gelu(fc1(x)))`` the gradient of fc1's output,
``ds = g * gelu'(h)`` (``h`` fc1's output with its bias, ``g`` the gradient of GELU's output:
fc2's grad_input GEMM), is rounded by the stochastic quantizers of fc1's two backward GEMMs
(Q_b1 = per row, Q_b2 = per column by default) and summed over rows for fc1's bias gradient.
Inductor compiled that into one kernel of six loops over the (tokens x d_ff) tensors -- the
error function and the exponential computed twice, column ranges read column-strip by
column-strip -- 52-69 ms of a 0.65 s GPT-block step (``benchmarks/profile_step.py``). This
module's C kernel (gcc, AVX-512, OpenMP; built at first use) runs the two passes of
``fqt_compile/sr_fused.py``:

1. per row, in cache: ``g`` (read, or computed from fc2's int32 product and its epilogue),
   ``h = x + bias``, ``ds = g * gelu'(h)`` written once, the row's range, per-thread column
   ranges and column sums (the bias gradient), the row-range quantizers rounded;
2. the column- and tensor-range quantizers from the stored ``ds``.

``gelu'(h) = cdf(h) + h pdf(h)`` (the exact, erf-based GELU; not the tanh approximation) with
one exponential ``e = exp(-h^2 / 2)`` for both terms: ``pdf = e / sqrt(2 pi)`` and
``cdf = 0.5 e F(t)`` for ``h < 0`` (``1 -`` that for ``h >= 0``), where
``F(z) = exp(z^2) erfc(z)`` at ``z = |h| / sqrt(2)`` is a degree-12 polynomial in
``t = 1 / (1 + z / 2)`` fitted (weighted least squares, float64) to ``erfcx`` over
``z`` in [0, 1e4]: 3.4e-7 relative error in float32 evaluation, so ``gelu'`` is within 2.1e-7
absolute of the exact value everywhere (torch's float32 ``gelu_backward``: 2.8e-7).
Given the kernel's ``ds``, codes, scales and offsets equal ``stochastic_quantize``'s bit for
bit; ``ds`` and the bias gradient equal torch's to float rounding. A NaN or Inf raises as
``fqt::sr_quantize`` does.

The same kernel with ``gelu'`` taken as 1 is ``fqt::sr_quantize_multi(g, seeds, bits,
granularities)``: the stochastic quantizers of any float (N, D) gradient and its column sums,
in the same two passes (``passes/fuse_quantizers.py`` uses it for the linear layers' output
gradients that the GELU and softmax fusions do not take).

Where the kernel cannot run (no AVX-512, no compiler, ``FQT_FUSED_GELU=0``) the ops compute
the same with torch; ``passes/fuse_gelu.py`` and ``passes/fuse_quantizers.py`` only put them
into graphs where the kernel runs.
"""

from __future__ import annotations

import ctypes
import functools
from typing import List, Optional  # typing: torch 2.5's schema inference rejects list[...] / X | None

import torch
from torch import Tensor

from . import cbuild, sr_fused
from . import quantizers as Q

__all__ = ["available", "status", "gelu_quantize", "gelu_backward_sr_quantize", "sr_quantize_multi", "sr_quantize_kernel"]

_FLAGS = ["-O3", "-shared", "-fPIC", "-mavx512f", "-fopenmp"]

# F(t) = exp(z^2) erfc(z), t = 1 / (1 + z / 2): coefficients of t^0 .. t^12 (see the docstring)
_ERFCX_COEFFS = (
    4.528615329957297e-12, 0.2820947766304016, 0.2820972502231598, 0.24676309525966644, 0.17706473171710968,
    0.0799490213394165, 0.003569188294932246, -0.05308562517166138, -0.09991215914487839, 0.053711362183094025,
    0.10500825941562653, -0.10530240833759308, 0.028042618185281754,
)


def _horner_c() -> str:
    lines = [f"    __m512 F = _mm512_set1_ps({_ERFCX_COEFFS[-1]!r}f);"]
    for c in reversed(_ERFCX_COEFFS[:-1]):
        lines.append(f"    F = _mm512_fmadd_ps(F, t, _mm512_set1_ps({c!r}f));")
    return "\n".join(lines)


_SOURCE = sr_fused.COMMON_C + r"""
// cdf(h) of the standard normal, and e = exp(-h^2 / 2) (module docstring)
static inline __m512 normal_cdf512(__m512 h, __m512* e_out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = exp512(_mm512_mul_ps(_mm512_mul_ps(h, h), _mm512_set1_ps(-0.5f)));
    __m512 z = _mm512_mul_ps(_mm512_abs_ps(h), _mm512_set1_ps(0.70710678118654752f));
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), one));
""" + _horner_c() + r"""
    __m512 half = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), e), F);
    __mmask16 neg = _mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_LT_OQ);
    *e_out = e;
    return _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, half), half);
}

// gelu'(h) = cdf(h) + h pdf(h), one exp for both
static inline __m512 gelu_grad512(__m512 h) {
    __m512 e;
    __m512 cdf = normal_cdf512(h, &e);
    return _mm512_fmadd_ps(h, _mm512_mul_ps(_mm512_set1_ps(0.3989422804014327f), e), cdf);
}

// gelu(h) = h cdf(h)
static inline __m512 gelu512(__m512 h) {
    __m512 e;
    return _mm512_mul_ps(h, normal_cdf512(h, &e));
}

// forward pass 1: y = gelu(x + bias) per row (bias NULL: none), each row's min and max of y
// (NaN for a row holding a NaN)
void fqt_gelu_rows(const float* x, const float* bias, float* y, float* rmin, float* rmax, int64_t rows, int64_t D,
                   int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float* xr = x + i * D;
        float* yr = y + i * D;
        __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
        __mmask16 bad = 0;
        for (int64_t j = 0; j < D; j += 16) {
            __mmask16 m = tail_mask(D - j);
            __m512 h = load16(m, xr + j);
            if (bias) h = _mm512_add_ps(h, load16(m, bias + j));
            __m512 v = gelu512(h);
            store16(yr + j, m, v);
            track_ranges(v, m, j, &lo, &hi, &bad, 0, 0);
        }
        rmin[i] = bad ? NAN : _mm512_reduce_min_ps(lo);
        rmax[i] = bad ? NAN : _mm512_reduce_max_ps(hi);
    }
}

// pass 1: ds = g * gelu'(x + bias) per row (bias NULL: none), g read from memory or, where acc is
// not NULL, computed in cache from the int32 product acc and its epilogue (epilogue_row); x NULL:
// ds = g (gelu' taken as 1; ds may then be g itself, and is not written); csum (NULL: none):
// one (D) row per thread of column sums of ds (the caller adds them up: the bias gradient);
// ranges and row-range roundings as in the softmax backward (sr_fused.py)
void fqt_gelu_bwd_rows(const float* g, const int32_t* acc, int64_t M, int nt, const float* const* er,
                       const float* const* ec, const float* x, const float* bias, float* ds, float* csum,
                       float* rmin, float* rmax, float* cmin, float* cmax, int64_t rows, int64_t D, int nr,
                       const int* levels, const int* half, const uint32_t* slo, const uint32_t* shi,
                       int8_t* const* codes, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num();
        float* tmin = cmin ? cmin + (int64_t)tid * D : 0;
        float* tmax = cmax ? cmax + (int64_t)tid * D : 0;
        float* tsum = csum ? csum + (int64_t)tid * D : 0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            float* dr = ds + i * D;
            const float* xr = x ? x + i * D : 0;
            const float* gr = g + i * D;
            if (acc) {
                epilogue_row(acc, i, D, M, nt, er, ec, dr);
                gr = dr;
            }
            __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
            __mmask16 bad = 0;
            for (int64_t j = 0; j < D; j += 16) {
                __mmask16 m = tail_mask(D - j);
                __m512 v = load16(m, gr + j);
                if (xr) {
                    __m512 h = load16(m, xr + j);
                    if (bias) h = _mm512_add_ps(h, load16(m, bias + j));
                    v = _mm512_mul_ps(v, gelu_grad512(h));
                }
                if (xr || dr != gr) store16(dr + j, m, v);
                track_ranges(v, m, j, &lo, &hi, &bad, tmin, tmax);
                if (tsum) store16(tsum + j, m, _mm512_add_ps(load16(m, tsum + j), v));
            }
            finish_row(dr, i, D, lo, hi, bad, rmin, rmax, nr, levels, half, slo, shi, codes);
        }
    }
}
"""


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = cbuild.load("gelu_quant", _SOURCE, _FLAGS, env="FQT_FUSED_GELU", needs={"avx512f"},
                           fallback="GELU's backward stays in the compiled graph")
    if lib is None:
        return None, why
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fqt_gelu_bwd_rows.argtypes = [ptr, ptr, i64, ctypes.c_int, ptr, ptr] + [ptr] * 8 + [
        i64, i64, ctypes.c_int] + [ptr] * 5 + [ctypes.c_int]
    lib.fqt_gelu_bwd_rows.restype = None
    lib.fqt_gelu_rows.argtypes = [ptr] * 5 + [i64, i64, ctypes.c_int]
    lib.fqt_gelu_rows.restype = None
    sr_fused.bind_pass2(lib)
    return lib, "in use (AVX-512)"


def available() -> bool:
    """True when ``fqt::gelu_backward_sr_quantize`` runs the fused C kernel here."""
    return _load()[0] is not None


def status() -> str:
    """Why the fused GELU-backward kernel is or is not in use, in words."""
    return _load()[1]


def _check_bias(op: str, x: Tensor, bias: Tensor | None) -> None:
    if bias is not None:
        d = x.shape[-1]
        torch._check(bias.dtype == torch.float32 and tuple(bias.shape) == (d,),
                     lambda: f"{op}: bias must be float32 of shape ({d},), got {tuple(bias.shape)}")


def _check_fwd(x: Tensor, bias: Tensor | None, bits: int, scheme: str) -> None:
    Q.check_bits(bits)
    torch._check(scheme in Q.FORWARD_SCHEMES, lambda: f"fqt::gelu_quantize: scheme must be one of {Q.FORWARD_SCHEMES}")
    torch._check(x.dim() >= 1 and x.dtype == torch.float32, lambda: "fqt::gelu_quantize: x must be float32 with a dimension")
    _check_bias("fqt::gelu_quantize", x, bias)


@torch.library.custom_op("fqt::gelu_quantize", mutates_args=())
def gelu_quantize(x: Tensor, bias: Optional[Tensor], bits: int, scheme: str) -> tuple[Tensor, Tensor, Tensor]:
    """``fqt::quantize(gelu(x + bias), bits, scheme, "tensor")`` (exact GELU; ``bias`` (D,) or
    None): returns ``(codes, scale, offset)``, codes in ``x``'s shape, scale and offset 0-d.
    GELU's output itself is not returned (the quantizer is its only reader in the graphs the
    pass fuses)."""
    _check_fwd(x, bias, bits, scheme)
    lib = _load()[0]
    if lib is None or x.device.type != "cpu" or x.numel() == 0:
        y = torch.nn.functional.gelu(x + bias if bias is not None else x)
        q = Q.quantize_forward(y, bits, scheme, "tensor", name="GELU output")
        return q.codes, q.scale.reshape(()), q.offset.reshape(())
    x = x.contiguous()
    d = x.shape[-1]
    rows = x.numel() // d
    y = torch.empty_like(x)
    rmin, rmax = torch.empty(rows), torch.empty(rows)
    threads = torch.get_num_threads()
    lib.fqt_gelu_rows(x.data_ptr(), sr_fused.ptr_or_none(bias.contiguous() if bias is not None else None), y.data_ptr(),
                      rmin.data_ptr(), rmax.data_ptr(), rows, d, threads)
    return sr_fused.forward_quantize(lib, y, rmin, rmax, bits, scheme, "GELU output", threads)


@gelu_quantize.register_fake
def _(x, bias, bits, scheme):
    _check_fwd(x, bias, bits, scheme)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(()), x.new_empty(())


_OP = "fqt::gelu_backward_sr_quantize"


def _check(g: Tensor, x: Tensor, bias: Tensor | None, bits: list[int], grans: list[str], seeds: list[Tensor],
           rows: list[Tensor], cols: list[Tensor]) -> None:
    torch._check(x.dim() >= 1 and x.dtype == torch.float32, lambda: f"{_OP}: x must be float32 with a dimension")
    d = x.shape[-1]
    _check_bias(_OP, x, bias)
    sr_fused.check_epilogue(_OP, g, rows, cols, x.numel(), d)
    if g.dtype != torch.int32:  # any shape of x's elements and last dimension (h may be a view of x + bias)
        torch._check(g.numel() == x.numel() and g.shape[-1:] == x.shape[-1:],
                     lambda: f"{_OP}: shapes differ: {g.shape} vs {x.shape}")
    sr_fused.check_quantizers(_OP, x.numel(), bits, grans, seeds)


@torch.library.custom_op("fqt::gelu_backward_sr_quantize", mutates_args=())
def gelu_backward_sr_quantize(
    g: Tensor, x: Tensor, bias: Optional[Tensor], seeds: List[Tensor], bits: List[int], granularities: str,
    epi_rows: List[Tensor], epi_cols: List[Tensor],
) -> List[Tensor]:
    """``ds = gelu_backward(g, x + bias)`` (exact GELU) viewed as ``(N, D)`` with ``D`` the last
    dimension, its column sums (the bias gradient), and ``fqt::sr_quantize(ds, seed_k, bits_k,
    gran_k)`` for each quantizer (``granularities`` comma-separated): returns ``[ds, dbias,
    codes_1, scale_1, offset_1, codes_2, ...]``. ``bias``: (D,) or None. ``g``: float32 with
    ``x``'s elements and last dimension (``epi_rows``/``epi_cols`` empty) or a lowered GEMM's int32 product with its
    epilogue terms, as in ``fqt::softmax_backward_sr_quantize``."""
    grans = granularities.split(",")
    _check(g, x, bias, bits, grans, seeds, epi_rows, epi_cols)
    d = x.shape[-1]
    n = x.numel() // d
    lib = _load()[0]
    if lib is None or x.device.type != "cpu" or x.numel() == 0:
        gf = sr_fused.epilogue_reference(g, epi_rows, epi_cols).reshape(x.shape)
        h = x + bias if bias is not None else x
        ds = torch.ops.aten.gelu_backward(gf, h).reshape(n, d)
        return [ds, ds.sum(0), *sr_fused.reference_quantize(ds, seeds, bits, grans)]
    x = x.contiguous()
    b = bias.contiguous() if bias is not None else None
    epi = sr_fused.Epilogue(g, epi_rows, epi_cols)
    gc = g.contiguous() if g.dtype == torch.float32 else None
    threads = torch.get_num_threads()
    ds = torch.empty((n, d))
    csum = torch.zeros((threads, d))
    rmin, rmax = torch.empty(n), torch.empty(n)
    qs = sr_fused.Quantizers(n, d, seeds, bits, grans)
    cmin, cmax = qs.column_buffers(threads)
    p = sr_fused.ptr_or_none
    lib.fqt_gelu_bwd_rows(
        p(gc), *epi.args(), x.data_ptr(), p(b), ds.data_ptr(), csum.data_ptr(), rmin.data_ptr(), rmax.data_ptr(),
        p(cmin), p(cmax), n, d, *qs.pass1_args(), threads,
    )
    return [ds, csum.sum(0), *sr_fused.finish(lib, ds, qs, rmin, rmax, cmin, cmax, threads)]


@gelu_backward_sr_quantize.register_fake
def _(g, x, bias, seeds, bits, granularities, epi_rows, epi_cols):
    grans = granularities.split(",")
    _check(g, x, bias, bits, grans, seeds, epi_rows, epi_cols)
    d = x.shape[-1]
    n = x.numel() // d
    return [x.new_empty((n, d)), x.new_empty((d,)), *sr_fused.fake_outputs(x, n, d, grans)]


_MULTI_OP = "fqt::sr_quantize_multi"


@torch.library.custom_op("fqt::sr_quantize_multi", mutates_args=())
def sr_quantize_multi(g: Tensor, seeds: List[Tensor], bits: List[int], granularities: str) -> List[Tensor]:
    """``fqt::sr_quantize(g, seed_k, bits_k, gran_k)`` for each quantizer of one float32 (N, D)
    tensor (``granularities`` comma-separated) and ``g``'s column sums (a linear layer's bias
    gradient): returns ``[colsum, codes_1, scale_1, offset_1, codes_2, ...]``. The GELU backward
    kernel with ``gelu'`` taken as 1: one pass over ``g`` for the row ranges, the column ranges
    and sums and the per-row quantizers, one more for the per-column and per-tensor ones, where
    a compiled graph reads ``g`` once per quantizer and once for the sums (a linear layer's
    output gradient, e.g. attention's concatenated q/k/v gradient, has a per-row Q_b1 and a
    per-column Q_b2). Codes, scales and offsets equal ``fqt::sr_quantize``'s bit for bit."""
    grans = granularities.split(",")
    torch._check(g.dim() == 2 and g.dtype == torch.float32, lambda: f"{_MULTI_OP}: g must be a 2-D float32 tensor")
    sr_fused.check_quantizers(_MULTI_OP, g.numel(), bits, grans, seeds)
    lib = _load()[0]
    if lib is None or g.device.type != "cpu" or g.numel() == 0:
        return [g.sum(0), *sr_fused.reference_quantize(g, seeds, bits, grans)]
    return _quantize_rows(lib, g, seeds, bits, grans, sums=True)


def _quantize_rows(lib: ctypes.CDLL, g: Tensor, seeds: List[Tensor], bits: List[int], grans: List[str],
                   sums: bool) -> List[Tensor]:
    """The kernel of ``fqt::sr_quantize_multi`` on a CPU float32 (N, D) ``g``: ``[colsum,
    codes_1, scale_1, offset_1, ...]``, without ``colsum`` where ``sums`` is False."""
    n, d = g.shape
    g = g.contiguous()
    threads = torch.get_num_threads()
    csum = torch.zeros((threads, d)) if sums else None
    rmin, rmax = torch.empty(n), torch.empty(n)
    qs = sr_fused.Quantizers(n, d, seeds, bits, grans)
    cmin, cmax = qs.column_buffers(threads)
    p = sr_fused.ptr_or_none
    no_epilogue = sr_fused.Epilogue(g, [], []).args()
    lib.fqt_gelu_bwd_rows(
        g.data_ptr(), *no_epilogue, None, None, g.data_ptr(), p(csum), rmin.data_ptr(), rmax.data_ptr(),
        p(cmin), p(cmax), n, d, *qs.pass1_args(), threads,
    )
    codes = sr_fused.finish(lib, g, qs, rmin, rmax, cmin, cmax, threads)
    return [csum.sum(0), *codes] if csum is not None else codes


def sr_quantize_kernel(x2d: Tensor, seed: Tensor, bits: int, granularity: str) -> tuple[Tensor, Tensor, Tensor] | None:
    """``fqt::sr_quantize`` by the C kernel of ``fqt::sr_quantize_multi`` (one quantizer, no
    column sums): ``(codes, scale, offset)``, equal to the reference's bit for bit; None where
    the kernel does not run (not built here, not a CPU float32 2-D tensor, empty, 2**31
    elements or more), and the caller quantizes with the reference. Arguments are checked by
    the caller (``fqt::sr_quantize``)."""
    lib = _load()[0]
    if (lib is None or x2d.device.type != "cpu" or x2d.dtype != torch.float32 or x2d.dim() != 2
            or x2d.numel() == 0 or x2d.numel() >= 2**31 or granularity not in sr_fused.GRANS):
        return None
    codes, scale, offset = _quantize_rows(lib, x2d, [seed], [bits], [granularity], sums=False)
    return codes, scale, offset


@sr_quantize_multi.register_fake
def _(g, seeds, bits, granularities):
    grans = granularities.split(",")
    torch._check(g.dim() == 2 and g.dtype == torch.float32, lambda: f"{_MULTI_OP}: g must be a 2-D float32 tensor")
    sr_fused.check_quantizers(_MULTI_OP, g.numel(), bits, grans, seeds)
    n, d = g.shape
    return [g.new_empty((d,)), *sr_fused.fake_outputs(g, n, d, grans)]
