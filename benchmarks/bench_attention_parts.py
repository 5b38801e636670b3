"""The attention's score-sized work in one fqt step of the GPT benchmark, part by part.

    python benchmarks/bench_attention_parts.py --out benchmarks/results/attention_parts.json

At the GPT benchmark's attention shape (batch 8 x 16 heads = 128 (512, 64) heads, causal), times
each kernel that reads or writes a (128, 512, 512) tensor, as the default step calls it, on
random inputs (median of ``--repeats`` calls after a warm-up, the kernels' calls interleaved,
with ``--malloc keep``):

- ``copy``: a copy of one 128 MiB float tensor (the memory bandwidth reference);
- ``qk_bmm_int8``: ``fqt::bmm_int8`` of the q and k^T codes, the (128, 512, 512) int32 scores
  written to memory (the forward's QK^T, its recomputation in the backward, and dP = dO V^T
  have this shape);
- ``qk_in_cache``: the same integer products by an AVX-512 VNNI micro-kernel of this script
  that keeps each block of 6 score rows in a per-thread buffer and writes nothing (its sums
  are checked against ``torch.bmm`` on part of the heads first): what the GEMM of a fused
  attention kernel, which keeps a row block's scores in cache through the softmax, would cost;
- ``qk_vnni_written``: that kernel writing the int32 scores out, as ``fqt::bmm_int8`` does;
- ``softmax_quantize``: ``fqt::softmax_quantize`` on those int32 scores (scale, causal mask,
  the per-tensor quantizer of the probabilities: two passes);
- ``softmax_backward_sr_quantize``: softmax's backward on an int32 dP with the probabilities,
  and its two stochastic quantizers (per row and per column).

The sum of ``qk_bmm_int8 - qk_in_cache`` and the time ``softmax_quantize`` spends reading the
int32 scores back bounds what fusing the score GEMM into the softmax kernels can save per call
(docs/performance.md). Needs the fused softmax kernel (AVX-512) and, for ``qk_in_cache``,
AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fqt_compile  # noqa: E402
from fqt_compile import cbuild, softmax_quant  # noqa: E402
from bench_conv import bench  # noqa: E402
from malloc_option import add_malloc_argument, apply_malloc  # noqa: E402

# rows a of (B, M, K) int8 times b of (B, K, N) int8, exact int32 sums, a row block of RB rows
# at a time in a per-thread buffer; vpdpbusd multiplies unsigned by signed bytes, so a is
# shifted by 128 (a ^ 0x80) and each sum corrected by -128 * (column sum of b), folded into the
# accumulators' start. With out == NULL nothing is written (the first value of each block goes
# into a checksum, so that the compiler keeps the work).
_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#define RB 6

// b (K, N) row-major -> bp[k4][n][4] (the 4 bytes of k = 4 k4 .. 4 k4 + 3 for column n, zero
// past K), N a multiple of 16; cs[n] = -128 * sum_k b[k][n]
static void pack_b(const int8_t* b, int64_t K, int64_t N, int8_t* bp, int32_t* cs) {
    const __m128i zero = _mm_setzero_si128();
    for (int64_t n = 0; n < N; n += 16) _mm512_storeu_si512(cs + n, _mm512_setzero_si512());
    for (int64_t k4 = 0; 4 * k4 < K; k4++) {
        for (int64_t n = 0; n < N; n += 16) {
            __m128i r[4];
            for (int t = 0; t < 4; t++)
                r[t] = 4 * k4 + t < K ? _mm_loadu_si128((const __m128i*)(b + (4 * k4 + t) * N + n)) : zero;
            __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
            __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
            int8_t* dst = bp + (k4 * N + n) * 4;
            _mm_storeu_si128((__m128i*)dst, _mm_unpacklo_epi16(lo01, lo23));
            _mm_storeu_si128((__m128i*)(dst + 16), _mm_unpackhi_epi16(lo01, lo23));
            _mm_storeu_si128((__m128i*)(dst + 32), _mm_unpacklo_epi16(hi01, hi23));
            _mm_storeu_si128((__m128i*)(dst + 48), _mm_unpackhi_epi16(hi01, hi23));
            __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512(cs + n), _mm512_set1_epi8(1), _mm512_loadu_si512(dst));
            _mm512_storeu_si512(cs + n, s);
        }
    }
    for (int64_t n = 0; n < N; n += 16)
        _mm512_storeu_si512(cs + n, _mm512_mullo_epi32(_mm512_loadu_si512(cs + n), _mm512_set1_epi32(-128)));
}

static void block(const uint8_t* au, int64_t K4, int64_t N, const int8_t* bp, const int32_t* cs, int32_t* out) {
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        __m512i acc[RB][4];
        for (int r = 0; r < RB; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_si512(cs + n0 + 16 * c);
        for (int64_t k4 = 0; k4 < K4; k4++) {
            const int8_t* bb = bp + (k4 * N + n0) * 4;
            __m512i b0 = _mm512_loadu_si512(bb), b1 = _mm512_loadu_si512(bb + 64);
            __m512i b2 = _mm512_loadu_si512(bb + 128), b3 = _mm512_loadu_si512(bb + 192);
            for (int r = 0; r < RB; r++) {
                __m512i av = _mm512_set1_epi32(*(const int32_t*)(au + (r * K4 + k4) * 4));
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
                acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
                acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
            }
        }
        for (int r = 0; r < RB; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_si512(out + r * N + n0 + 16 * c, acc[r][c]);
    }
}

// N a multiple of 64; returns a checksum
int64_t qk_rows(const int8_t* a, const int8_t* b, int64_t B, int64_t M, int64_t K, int64_t N, int32_t* out,
                int nthreads) {
    int64_t K4 = (K + 3) / 4, sum = 0;
    #pragma omp parallel num_threads(nthreads) reduction(+:sum)
    {
        int8_t* bp = aligned_alloc(64, ((K4 * N * 4 + 63) / 64) * 64);
        int32_t* cs = aligned_alloc(64, ((N * 4 + 63) / 64) * 64);
        uint8_t* au = aligned_alloc(64, ((RB * K4 * 4 + 63) / 64) * 64);
        int32_t* buf = aligned_alloc(64, ((RB * N * 4 + 63) / 64) * 64);
        #pragma omp for schedule(static)
        for (int64_t h = 0; h < B; h++) {
            pack_b(b + h * K * N, K, N, bp, cs);
            for (int64_t r0 = 0; r0 < M; r0 += RB) {
                int R = M - r0 < RB ? (int)(M - r0) : RB;
                memset(au, 128, RB * K4 * 4);  // zero codes past K and in rows past M
                for (int r = 0; r < R; r++) {
                    const int8_t* ar = a + (h * M + r0 + r) * K;
                    for (int64_t k = 0; k < K; k += 64) {
                        __mmask64 m = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
                        __m512i v = _mm512_maskz_loadu_epi8(m, ar + k);
                        _mm512_mask_storeu_epi8(au + r * K4 * 4 + k, m, _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80)));
                    }
                }
                block(au, K4, N, bp, cs, buf);
                if (out) memcpy(out + (h * M + r0) * N, buf, (size_t)R * N * 4);
                else sum += buf[0];
            }
        }
        free(bp); free(cs); free(au); free(buf);
    }
    return sum;
}
"""
_FLAGS = ["-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]


def _in_cache_kernel() -> ctypes.CDLL | None:
    if cbuild.unsupported_platform({"avx512f", "avx512bw", "avx512_vnni"}) is not None:
        return None
    lib = ctypes.CDLL(cbuild.build("bench_qk_rows", _SOURCE, _FLAGS))
    lib.qk_rows.restype = ctypes.c_int64
    lib.qk_rows.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int]
    return lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=128, help="batch x heads")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    malloc = apply_malloc(args.malloc)
    if not softmax_quant.available():
        print(f"the fused softmax kernel is {softmax_quant.status()}: nothing to measure")
        return 1
    bh, lq, d = args.heads, args.seq, args.head_dim
    if lq % 64:
        print("--seq must be a multiple of 64 (the in-cache kernel's column blocks)")
        return 2
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (bh, lq, d), dtype=torch.int8, generator=gen)
    kt = torch.randint(-128, 128, (bh, d, lq), dtype=torch.int8, generator=gen)
    rows_scale = [torch.rand(bh, lq, 1, generator=gen) * 1e-4]
    cols_scale = [torch.rand(bh, 1, lq, generator=gen)]
    mask = torch.full((lq, lq), float("-inf")).triu(1)
    p = torch.softmax(torch.randn(bh, lq, lq, generator=gen) + mask, -1)
    seeds = [torch.tensor(11), torch.tensor(12)]
    x, y = torch.empty(bh, lq, lq), torch.empty(bh, lq, lq)
    scores = torch.ops.fqt.bmm_int8(q, kt)

    lib = _in_cache_kernel()
    threads = torch.get_num_threads()
    fns = {
        "copy": lambda: y.copy_(x),
        "qk_bmm_int8": lambda: torch.ops.fqt.bmm_int8(q, kt),
        "softmax_quantize": lambda: softmax_quant.softmax_quantize(scores, 8, "affine", d ** -0.5, mask, rows_scale,
                                                                   cols_scale),
        "softmax_backward_sr_quantize": lambda: softmax_quant.softmax_backward_sr_quantize(
            scores, p, d ** -0.5, seeds, [8, 8], "row,column", rows_scale, cols_scale),
    }
    if lib is not None:
        part = min(bh, 4)
        out = torch.empty(part, lq, lq, dtype=torch.int32)
        lib.qk_rows(q.data_ptr(), kt.data_ptr(), part, lq, d, lq, out.data_ptr(), threads)
        if not torch.equal(out, torch.bmm(q[:part].int(), kt[:part].int())):
            print("the in-cache kernel's sums differ from torch.bmm: not measured")
            return 1
        fns["qk_in_cache"] = lambda: lib.qk_rows(q.data_ptr(), kt.data_ptr(), bh, lq, d, lq, None, threads)
        written = torch.empty(bh, lq, lq, dtype=torch.int32)
        fns["qk_vnni_written"] = lambda: lib.qk_rows(q.data_ptr(), kt.data_ptr(), bh, lq, d, lq, written.data_ptr(),
                                                     threads)
    # the calls interleaved, one of each in turn (bench_conv.bench): drift hits all alike
    ms: dict[str, float | None] = {k: v * 1e3 for k, v in bench(fns, args.repeats).items()}
    ms.setdefault("qk_in_cache", None)
    ms.setdefault("qk_vnni_written", None)
    for name, v in ms.items():
        print(f"{name:30s} {'-' if v is None else f'{v:8.2f}'} ms")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "machine": platform.machine(), "cpu": fqt_compile.cpu.describe(),
                       "threads": threads, "malloc": malloc, "heads": bh, "seq": lq, "head_dim": d,
                       "repeats": args.repeats, "ms": ms}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
