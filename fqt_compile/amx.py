"""Integer GEMMs on AMX tiles: ``fqt::int_mm_amx``, an int8 x int8 -> int32 kernel of our own.

``torch._int_mm`` runs oneDNN's AVX-512 VNNI kernel on this project's CPUs; its AMX path is
taken only for operands that are strided along both dimensions, where it fell back to a
kernel 300x slower (docs/performance.md), and torch's bundled oneDNN is not callable from an
extension. So where the CPU has AMX-INT8 this module compiles a small C kernel (gcc, at first
use, cached under ``$FQT_CACHE_DIR`` or ``~/.cache/fqt_compile``) and runs it through ctypes:

* B (K x N, any strides; fast paths for K- or N-contiguous) is packed into AMX's VNNI layout
  (16-column blocks of 64 x 16 bytes), in parallel over column blocks; an N-contiguous B is
  read 64 columns (one cache line per row) at a time;
* each thread packs its half of the rows of A into 32-row blocks of 1 KB tiles (row-major A
  is copied; K-major A, a transposed view such as grad_weight's Q(G)^T or attention's P^T, is
  transposed on the way, so it needs no separate transposed copy), then computes them as
  32 x 32 blocks of C in four int32 accumulator tiles (``tdpbssd``), over panels of B of
  about 1 MiB that stay in L2;
* a batch (attention's per-head products) is split over threads entry by entry, each thread
  packing its entry's A and B into its own buffers.

The result is exact integer arithmetic, so it equals ``torch._int_mm`` bit for bit
(``tests/test_amx.py``); the caller keeps K within the int32-safe bound as for ``_int_mm``.
Operands are zero-padded to M, N multiples of 32 and K a multiple of 64 where needed (exact).
``FQT_AMX=0`` in the environment turns it off (``torch._int_mm`` and ``fqt::bmm_int8`` are
then used, as on CPUs without AMX); :func:`status` says why it is or is not in use.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import cbuild
from .gemm import _bmm_int32, _pad_to

__all__ = ["available", "status", "suits", "int_mm_amx", "int_mm_amx_sums"]


_FLAGS = ["-O3", "-shared", "-fPIC", "-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]

_SOURCE = r"""
// int8 x int8 -> int32 GEMM on AMX tiles
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <omp.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int fqt_amx_request(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette_id, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

static void config_tiles(void) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

// one 16-column block of B (K, N) strides (sk, sn) -> dst[kb][16][64]:
// dst[kb][r][n*4+j] = B[kb*64 + r*4 + j][n0 + n]; K % 64 == 0, n0 + 16 <= N
static void pack_b_block(const int8_t* b, int64_t sk, int64_t sn, int64_t n0, int64_t kblocks, int8_t* dst) {
    if (sk == 1) {  // K contiguous: 4-byte units of each column, transposed 16 x 16
        for (int64_t kb = 0; kb < kblocks; kb++) {
            int32_t* d = (int32_t*)(dst + kb * 1024);
            for (int n = 0; n < 16; n++) {
                const int32_t* src = (const int32_t*)(b + (n0 + n) * sn + kb * 64);
                for (int r = 0; r < 16; r++) d[r * 16 + n] = src[r];  // unaligned reads are fine on x86
            }
        }
    } else if (sn == 1) {  // N contiguous: interleave 4 rows of 16 bytes
        for (int64_t kb = 0; kb < kblocks; kb++) {
            for (int r = 0; r < 16; r++) {
                const int8_t* s = b + (kb * 64 + r * 4) * sk + n0;
                __m128i r0 = _mm_loadu_si128((const __m128i*)s);
                __m128i r1 = _mm_loadu_si128((const __m128i*)(s + sk));
                __m128i r2 = _mm_loadu_si128((const __m128i*)(s + 2 * sk));
                __m128i r3 = _mm_loadu_si128((const __m128i*)(s + 3 * sk));
                __m128i a01l = _mm_unpacklo_epi8(r0, r1), a01h = _mm_unpackhi_epi8(r0, r1);
                __m128i a23l = _mm_unpacklo_epi8(r2, r3), a23h = _mm_unpackhi_epi8(r2, r3);
                int8_t* d = dst + kb * 1024 + r * 64;
                _mm_storeu_si128((__m128i*)d, _mm_unpacklo_epi16(a01l, a23l));
                _mm_storeu_si128((__m128i*)(d + 16), _mm_unpackhi_epi16(a01l, a23l));
                _mm_storeu_si128((__m128i*)(d + 32), _mm_unpacklo_epi16(a01h, a23h));
                _mm_storeu_si128((__m128i*)(d + 48), _mm_unpackhi_epi16(a01h, a23h));
            }
        }
    } else {
        for (int64_t kb = 0; kb < kblocks; kb++)
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    for (int j = 0; j < 4; j++)
                        dst[kb * 1024 + r * 64 + n * 4 + j] = b[(kb * 64 + r * 4 + j) * sk + (n0 + n) * sn];
    }
}


// four 16-column blocks at once (N contiguous, n0 + 64 <= N): 64-byte rows, the 128-bit lanes
// of the unpacks are the four blocks
static void pack_b_block4(const int8_t* b, int64_t sk, int64_t n0, int64_t kblocks, int8_t* dst, int64_t bstride) {
    for (int64_t kb = 0; kb < kblocks; kb++) {
        for (int r = 0; r < 16; r++) {
            const int8_t* s = b + (kb * 64 + r * 4) * sk + n0;
            __m512i r0 = _mm512_loadu_si512((const void*)s);
            __m512i r1 = _mm512_loadu_si512((const void*)(s + sk));
            __m512i r2 = _mm512_loadu_si512((const void*)(s + 2 * sk));
            __m512i r3 = _mm512_loadu_si512((const void*)(s + 3 * sk));
            __m512i a01l = _mm512_unpacklo_epi8(r0, r1), a01h = _mm512_unpackhi_epi8(r0, r1);
            __m512i a23l = _mm512_unpacklo_epi8(r2, r3), a23h = _mm512_unpackhi_epi8(r2, r3);
            __m512i o0 = _mm512_unpacklo_epi16(a01l, a23l), o1 = _mm512_unpackhi_epi16(a01l, a23l);
            __m512i o2 = _mm512_unpacklo_epi16(a01h, a23h), o3 = _mm512_unpackhi_epi16(a01h, a23h);
            __m512i t0 = _mm512_shuffle_i64x2(o0, o1, 0x44), t1 = _mm512_shuffle_i64x2(o2, o3, 0x44);
            __m512i t2 = _mm512_shuffle_i64x2(o0, o1, 0xEE), t3 = _mm512_shuffle_i64x2(o2, o3, 0xEE);
            int8_t* d = dst + kb * 1024 + r * 64;
            _mm512_storeu_si512((void*)d, _mm512_shuffle_i64x2(t0, t1, 0x88));
            _mm512_storeu_si512((void*)(d + bstride), _mm512_shuffle_i64x2(t0, t1, 0xDD));
            _mm512_storeu_si512((void*)(d + 2 * bstride), _mm512_shuffle_i64x2(t2, t3, 0x88));
            _mm512_storeu_si512((void*)(d + 3 * bstride), _mm512_shuffle_i64x2(t2, t3, 0xDD));
        }
    }
}

// columns [c0, c1) (multiples of 32) of 32 rows of C (ldc) from a packed 32-row block of A
// (ap: [kblocks][32][64]) and packed B (bp: 16-column blocks of kblocks * 1024 bytes)
static void kernel_2x2(const int8_t* ap, const int8_t* bp, int32_t* c, int64_t ldc, int64_t c0, int64_t c1,
                       int64_t kblocks) {
    const int64_t bstride = kblocks * 1024;
    for (int64_t n = c0; n < c1; n += 32) {
        const int8_t* b0 = bp + (n / 16) * bstride;
        const int8_t* b1 = b0 + bstride;
        int32_t* cc = c + n;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(4, ap + kb * 2048, 64);
            _tile_loadd(6, b0 + kb * 1024, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_loadd(7, b1 + kb * 1024, 64);
            _tile_dpbssd(1, 4, 7);
            _tile_loadd(5, ap + kb * 2048 + 1024, 64);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, cc, ldc * 4);
        _tile_stored(1, cc + 16, ldc * 4);
        _tile_stored(2, cc + 16 * ldc, ldc * 4);
        _tile_stored(3, cc + 16 * ldc + 16, ldc * 4);
    }
}

// 16 source rows of 16 * lanes bytes (lanes <= 4 blocks of 16 x 16 side by side, one per
// 128-bit lane), transposed with 4 rounds of unpacks: dst row (16 * L + c) = column c of
// lane L, for L < lanes and c < 16. Bytes past 16 * lanes are neither read nor written.
static inline void transpose16xl(const int8_t* src, int64_t ss, int8_t* dst, int64_t ds, int lanes) {
    const __mmask64 mask = lanes >= 4 ? ~0ULL : (1ULL << (16 * lanes)) - 1;
    __m512i r[16], l[8], h[8], p[2][4][2], q[2][2][2][2];
    for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_epi8(mask, (const void*)(src + i * ss));
    for (int i = 0; i < 8; i++) {
        l[i] = _mm512_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
        h[i] = _mm512_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        p[0][i][0] = _mm512_unpacklo_epi16(l[2 * i], l[2 * i + 1]);
        p[0][i][1] = _mm512_unpackhi_epi16(l[2 * i], l[2 * i + 1]);
        p[1][i][0] = _mm512_unpacklo_epi16(h[2 * i], h[2 * i + 1]);
        p[1][i][1] = _mm512_unpackhi_epi16(h[2 * i], h[2 * i + 1]);
    }
    for (int g = 0; g < 2; g++)
        for (int hh = 0; hh < 2; hh++)
            for (int i = 0; i < 2; i++) {
                q[g][hh][i][0] = _mm512_unpacklo_epi32(p[g][2 * i][hh], p[g][2 * i + 1][hh]);
                q[g][hh][i][1] = _mm512_unpackhi_epi32(p[g][2 * i][hh], p[g][2 * i + 1][hh]);
            }
#define FQT_STORE_LANES(v, col) do { \
        __m512i v_ = (v); \
        _mm_storeu_si128((__m128i*)(dst + (col) * ds), _mm512_castsi512_si128(v_)); \
        if (lanes > 1) _mm_storeu_si128((__m128i*)(dst + (16 + (col)) * ds), _mm512_extracti32x4_epi32(v_, 1)); \
        if (lanes > 2) _mm_storeu_si128((__m128i*)(dst + (32 + (col)) * ds), _mm512_extracti32x4_epi32(v_, 2)); \
        if (lanes > 3) _mm_storeu_si128((__m128i*)(dst + (48 + (col)) * ds), _mm512_extracti32x4_epi32(v_, 3)); \
    } while (0)
    for (int g = 0; g < 2; g++)
        for (int hh = 0; hh < 2; hh++)
            for (int qq = 0; qq < 2; qq++) {
                int col = 8 * g + 4 * hh + 2 * qq;
                FQT_STORE_LANES(_mm512_unpacklo_epi64(q[g][hh][0][qq], q[g][hh][1][qq]), col);
                FQT_STORE_LANES(_mm512_unpackhi_epi64(q[g][hh][0][qq], q[g][hh][1][qq]), col + 1);
            }
#undef FQT_STORE_LANES
}

// row sums of a packed 32-row block of A (the zero-point corrections' rowsum_K(cA)): dpbusd
// of the bytes with ones adds each 4 of a row; exact in int32 (|sum| <= 128 K)
static void rowsums_packed_a(const int8_t* d, int64_t kblocks, int32_t* rows) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int r = 0; r < 32; r++) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t kb = 0; kb < kblocks; kb++)
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512((const void*)(d + kb * 2048 + r * 64)));
        rows[r] = _mm512_reduce_add_epi32(acc);
    }
}

// column sums of a packed 16-column block of B (colsum_K(cB)): lane n of a 64-byte row of
// the block holds 4 consecutive K of column n
static void colsums_packed_b(const int8_t* d, int64_t kblocks, int32_t* cols) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < kblocks * 16; i++) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512((const void*)(d + i * 64)));
    _mm512_storeu_si512((void*)cols, acc);
}

// rows [m0, m1) (multiples of 32) of A (M x K, strides sam, sak; one of them 1) -> dst, one
// [kblocks][32][64] block per 32 rows, so that a tile load reads 1 KB of consecutive bytes (rows
// of A 4096 bytes apart all fell into one L1 set). K-major A (a transposed view: grad_weight's
// Q(G)^T, attention's P^T and dS^T) is transposed on the way, 16 x 32 bytes at a time.
static void pack_a(const int8_t* a, int64_t sam, int64_t sak, int64_t m0, int64_t m1, int64_t kblocks, int8_t* dst) {
    for (int64_t m = m0; m < m1; m += 32) {
        int8_t* d = dst + (m - m0) * kblocks * 64;
        if (sak == 1) {
            for (int r = 0; r < 32; r++) {
                const int8_t* s = a + (m + r) * sam;
                for (int64_t kb = 0; kb < kblocks; kb++)
                    _mm512_storeu_si512((void*)(d + kb * 2048 + r * 64), _mm512_loadu_si512((const void*)(s + kb * 64)));
            }
        } else {
            for (int64_t kb = 0; kb < kblocks; kb++)
                for (int kg = 0; kg < 64; kg += 16)
                    transpose16xl(a + (kb * 64 + kg) * sak + m * sam, sak, d + kb * 2048 + kg, 64, 2);
        }
    }
}

size_t fqt_amx_packed_b_bytes(int64_t K, int64_t N) {
    return (size_t)((K / 64) * (N / 16) * 1024);
}


static void pack_b(const int8_t* b, int64_t sk, int64_t sn, int64_t nb0, int64_t nb1, int64_t kblocks, int8_t* dst) {
    const int64_t bstride = kblocks * 1024;
    for (int64_t nb = nb0; nb < nb1;) {
        if (sn == 1 && sk != 1 && nb + 4 <= nb1) { pack_b_block4(b, sk, nb * 16, kblocks, dst + nb * bstride, bstride); nb += 4; }
        else { pack_b_block(b, sk, sn, nb * 16, kblocks, dst + nb * bstride); nb += 1; }
    }
}

// c[i] (M, N) contiguous = a[i] (M, K; strides sam, sak, one of them 1) @ b[i] (K, N; strides
// sbk, sbn), i < B. M % 32 == 0, N % 32 == 0, K % 64 == 0 (the caller pads). Scratch: bp,
// packed B (B > 1: one per thread); ap, packed A (B > 1: M * K bytes per thread, else M * K).
// rows (B x M) and cols (B x N), unless NULL, get rowsum_K(a[i]) and colsum_K(b[i]), taken
// from the packed operands while they are in cache.
int fqt_amx_bmm(const int8_t* a, int64_t sab, int64_t sam, int64_t sak, const int8_t* b, int64_t sbb, int64_t sbk,
                int64_t sbn, int32_t* c, int8_t* bp, int8_t* ap, int64_t B, int64_t M, int64_t K, int64_t N,
                int nthreads, int64_t ncols, int32_t* rows, int32_t* cols) {
    const int64_t kblocks = K / 64, nblocks = N / 16, per = kblocks * nblocks * 1024;
    if (ncols <= 0) {  // a K x ncols panel of packed B of about 1 MiB stays in L2 across the rows
        ncols = ((1 << 20) / K) / 32 * 32;
        if (ncols < 32) ncols = 32;
    }
    if (ncols > N) ncols = N;
    if (B > 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            config_tiles();
            int8_t* bpt = bp + omp_get_thread_num() * per;
            int8_t* apt = ap + omp_get_thread_num() * M * K;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < B; i++) {
                pack_b(b + i * sbb, sbk, sbn, 0, nblocks, kblocks, bpt);
                pack_a(a + i * sab, sam, sak, 0, M, kblocks, apt);
                if (cols)
                    for (int64_t nb = 0; nb < nblocks; nb++) colsums_packed_b(bpt + nb * kblocks * 1024, kblocks, cols + i * N + nb * 16);
                if (rows)
                    for (int64_t m = 0; m < M; m += 32) rowsums_packed_a(apt + m * K, kblocks, rows + i * M + m);
                for (int64_t m = 0; m < M; m += 32)
                    kernel_2x2(apt + m * K, bpt, c + i * M * N + m * N, N, 0, N, kblocks);
            }
            _tile_release();
        }
        return 0;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t ng = 0; ng < (nblocks + 3) / 4; ng++) {
            int64_t nb1 = ng * 4 + 4 < nblocks ? ng * 4 + 4 : nblocks;
            pack_b(b, sbk, sbn, ng * 4, nb1, kblocks, bp);
            if (cols)
                for (int64_t nb = ng * 4; nb < nb1; nb++) colsums_packed_b(bp + nb * kblocks * 1024, kblocks, cols + nb * 16);
        }
        config_tiles();
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t mblocks = M / 32;
        int64_t m0 = (mblocks * t / nt) * 32, m1 = (mblocks * (t + 1) / nt) * 32;
        pack_a(a, sam, sak, m0, m1, kblocks, ap + m0 * K);
        if (rows)
            for (int64_t m = m0; m < m1; m += 32) rowsums_packed_a(ap + m * K, kblocks, rows + m);
        for (int64_t c0 = 0; c0 < N; c0 += ncols) {
            int64_t c1 = c0 + ncols < N ? c0 + ncols : N;
            for (int64_t m = m0; m < m1; m += 32)
                kernel_2x2(ap + m * K, bp, c + m * N, N, c0, c1, kblocks);
        }
        _tile_release();
    }
    return 0;
}
"""


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = cbuild.load("amx_gemm", _SOURCE, _FLAGS, env="FQT_AMX", needs={"amx_tile", "amx_int8", "avx512bw", "avx512_vnni"},
                           fallback="integer GEMMs use torch._int_mm")
    if lib is None:
        return None, why
    if not lib.fqt_amx_request():
        return None, "not available: the kernel refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fqt_amx_packed_b_bytes.argtypes, lib.fqt_amx_packed_b_bytes.restype = [i64, i64], ctypes.c_size_t
    lib.fqt_amx_bmm.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64,
                                ctypes.c_int, i64, ptr, ptr]
    lib.fqt_amx_bmm.restype = ctypes.c_int
    return lib, "in use (AMX-INT8)"


def available() -> bool:
    """True when ``fqt::int_mm_amx`` runs on AMX tiles here (built and permitted)."""
    return _load()[0] is not None


def status() -> str:
    """Why the AMX kernel is or is not in use, in words."""
    return _load()[1]


#: below this many multiply-adds (B * M * K * N) the ctypes call and thread start-up cost more
#: than AMX saves: a single 512 x 64 x 512 product took 0.08 ms against 0.04 ms with
#: torch._int_mm (benchmarks/bench_gemm.py), 128 of them batched 10.8 ms against 25.5 ms
MIN_MACS = 2**25


def suits(b: int, m: int, k: int, n: int) -> bool:
    """Whether the lowering pass should use the AMX kernel for a (b x) m x k x n product: it is
    available, no operand needs zero padding (M, N multiples of 32, K of 64: a padded copy of a
    convolution's im2col columns made a small CNN's step slower), and the product is large."""
    return available() and m % 32 == 0 and n % 32 == 0 and k % 64 == 0 and b * m * k * n >= MIN_MACS


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# Inductor hands a custom op's inputs over in whatever layout it chose for them unless the op
# carries a layout tag; with none, a row-major copy the lowering pass asked for (``clone``) came
# in transposed, and ``.contiguous()`` here then cost an ATen strided copy (162 ms per GPT
# block step). ``needs_exact_strides`` makes inductor pass the strides of the graph's values
# (torch 2.5 lacks the tag; the fixed stride order is the same constraint for these operands).
_LAYOUT_TAG = getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order)
torch.library.define("fqt::int_mm_amx", "(Tensor a, Tensor b) -> Tensor", tags=(_LAYOUT_TAG,))
torch.library.define("fqt::int_mm_amx_sums", "(Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)", tags=(_LAYOUT_TAG,))


@torch.library.impl("fqt::int_mm_amx", "CPU")
def int_mm_amx(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 GEMM with int32 result on AMX: (M, K) @ (K, N) or (B, M, K) @ (B, K, N).
    The caller keeps K within the int32-safe bound of its codes. Where AMX is not available
    it computes the same with ``torch._int_mm``."""
    return _run(a, b, sums=False)[0]


@torch.library.impl("fqt::int_mm_amx_sums", "CPU")
def int_mm_amx_sums(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``int_mm_amx(a, b)`` and the operands' sums along K, all int32: ``(a @ b, a.sum(-1,
    keepdim=True), b.sum(-2, keepdim=True))``. The sums are the lowering's zero-point
    correction terms (rowsum_K(cA), colsum_K(cB)); the kernel takes them from the packed
    operands while they are in cache instead of another pass over the codes."""
    c, rows, cols = _run(a, b, sums=True)
    return c, rows, cols


def _run(a: Tensor, b: Tensor, sums: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    _check(a, b)
    if not available():
        c = _bmm_int32(a[None], b[None])[0] if a.dim() == 2 else _bmm_int32(a, b)
        if not sums:
            return c, None, None
        return c, a.sum(-1, keepdim=True, dtype=torch.int32), b.sum(-2, keepdim=True, dtype=torch.int32)
    squeeze = a.dim() == 2
    a3, b3 = (a[None], b[None]) if squeeze else (a, b)
    nb, m, k = a3.shape
    n = b3.shape[2]
    mp, kp, np_ = _round_up(m, 32), _round_up(k, 64), _round_up(n, 32)
    # A is read row-major (K contiguous) or K-major (M contiguous: a transposed view, e.g.
    # grad_weight's Q(G)^T, attention's P^T and dS^T), which the kernel transposes as it packs
    if (mp, kp) != (m, k) or (a3.stride(2) != 1 and a3.stride(1) != 1):
        a3 = _pad_to(_pad_to(a3.contiguous(), 1, 32), 2, 64)
    if (kp, np_) != (k, n):
        b3 = _pad_to(_pad_to(b3, 1, 64), 2, 32)
    lib = _load()[0]
    threads = torch.get_num_threads()
    c = torch.empty((nb, mp, np_), dtype=torch.int32)
    rows = torch.empty((nb, mp, 1), dtype=torch.int32) if sums else None
    cols = torch.empty((nb, 1, np_), dtype=torch.int32) if sums else None
    copies = threads if nb > 1 else 1  # a batch: one packed A and B per thread
    b_scratch = torch.empty(copies * lib.fqt_amx_packed_b_bytes(kp, np_), dtype=torch.int8)
    a_scratch = torch.empty(copies * mp * kp, dtype=torch.int8)
    sak, sam = (1, a3.stride(1)) if a3.stride(2) == 1 else (a3.stride(2), 1)
    lib.fqt_amx_bmm(a3.data_ptr(), a3.stride(0), sam, sak, b3.data_ptr(), b3.stride(0), b3.stride(1),
                    b3.stride(2), c.data_ptr(), b_scratch.data_ptr(), a_scratch.data_ptr(), nb, mp, kp, np_,
                    threads, 0, rows.data_ptr() if sums else None, cols.data_ptr() if sums else None)
    if (mp, np_) != (m, n):
        c = c[:, :m, :n].contiguous()
        if sums:
            rows, cols = rows[:, :m].contiguous(), cols[:, :, :n].contiguous()
    if squeeze:
        return c[0], (rows[0] if sums else None), (cols[0] if sums else None)
    return c, rows, cols


def _check(a: Tensor, b: Tensor) -> None:
    torch._check(a.dim() in (2, 3) and b.dim() == a.dim(), lambda: "fqt::int_mm_amx: operands must both be 2-D or 3-D")
    torch._check(a.shape[-1] == b.shape[-2], lambda: f"fqt::int_mm_amx: contraction sizes differ: {a.shape} @ {b.shape}")
    torch._check(a.dtype == torch.int8 and b.dtype == torch.int8, lambda: "fqt::int_mm_amx: int8 operands only")
    torch._check(a.dim() == 2 or a.shape[0] == b.shape[0], lambda: "fqt::int_mm_amx: batch sizes differ")
    torch._check(a.device.type == "cpu" and b.device.type == "cpu", lambda: "fqt::int_mm_amx: CPU tensors only")


@torch.library.register_fake("fqt::int_mm_amx")
def _(a, b):
    _check(a, b)
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


@torch.library.register_fake("fqt::int_mm_amx_sums")
def _(a, b):
    _check(a, b)
    i32 = torch.int32
    return (a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=i32), a.new_empty((*a.shape[:-1], 1), dtype=i32),
            b.new_empty((*b.shape[:-2], 1, b.shape[-1]), dtype=i32))
