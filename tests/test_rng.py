"""Tests of :mod:`fqt_compile.rng`, the counter-based generator behind stochastic rounding.

Statistical checks use ``n = 2**20`` draws; for i.i.d. U[0, 1) values each tolerance is five
standard errors of the statistic, derived next to the assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

from fqt_compile.rng import hash32, new_seed, uniform_at, uniform_from_seed

N = 2**20


def _u(seed: int, n: int = N) -> torch.Tensor:
    return uniform_from_seed(torch.tensor(seed, dtype=torch.int64), (n,))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).mean() / (a.std() * b.std()))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 3, 2**62 - 1])
def test_values_in_unit_interval_on_the_2_pow_minus_24_grid(seed):
    u = _u(seed)
    assert u.dtype == torch.float32 and u.shape == (N,)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    k = u * 2**24  # exact in float32
    assert torch.equal(k, torch.floor(k))


@pytest.mark.parametrize("seed", [0, 7, 2**33 + 1])
def test_mean_variance_and_histogram(seed):
    u = _u(seed).double()
    # mean: SE = sqrt(1/12 / n) = 2.8e-4 -> 5 SE = 1.4e-3
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    # variance: Var((u - 1/2)^2) = 1/80 - 1/144 = 1/180, SE = sqrt(1/180 / n) = 7.3e-5
    assert abs(float(((u - 0.5) ** 2).mean()) - 1 / 12) < 5 * math.sqrt(1 / 180 / N)
    # 64-bin histogram: chi^2 with 63 degrees of freedom, mean 63, sd sqrt(126) = 11.2
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = float(((counts - N / 64) ** 2 / (N / 64)).sum())
    assert chi2 < 63 + 5 * math.sqrt(2 * 63), chi2


@pytest.mark.parametrize("lag", [1, 2, 3, 16, 255, 1024, 65536])
def test_no_correlation_between_nearby_indices(lag):
    # Sample correlation of independent pairs: SE = 1 / sqrt(n - lag) ~ 1e-3 -> 5 SE.
    u = _u(42)
    r = _corr(u[:-lag], u[lag:])
    assert abs(r) < 5 / math.sqrt(N - lag), (lag, r)


@pytest.mark.parametrize("seed", [0, 1, 99, 2**31 - 1, 2**32 - 1, 2**40])
def test_seed_and_next_seed_are_unrelated(seed):
    a, b = _u(seed), _u(seed + 1)
    assert abs(_corr(a, b)) < 5 / math.sqrt(N)
    # P(two independent 24-bit draws are equal) = 2^-24: expect ~0.06 equal pairs in 2^20.
    assert int((a == b).sum()) <= 5
    # The high seed bits matter too: s and s + 2^32 give different streams.
    c = _u(seed + 2**32)
    assert abs(_corr(a, c)) < 5 / math.sqrt(N) and int((a == c).sum()) <= 5


def test_same_seed_same_draws_and_shape_handling():
    s = torch.tensor(2024)
    a = uniform_from_seed(s, (3, 5, 7))
    assert a.shape == (3, 5, 7)
    assert torch.equal(a, uniform_from_seed(s, torch.Size([3, 5, 7])))
    # Row-major index: a shape is a view of the flat stream.
    assert torch.equal(a.flatten(), uniform_from_seed(s, (105,)))
    assert uniform_from_seed(s, ()).shape == ()
    assert uniform_from_seed(s, (0, 4)).shape == (0, 4)


def test_large_index_counts_are_fast_and_distinct():
    # 4M elements; the stream does not repeat itself at a shift of 2^20 or 2^21 (the
    # counter index is hashed, not truncated).
    # (Its speed shows in --durations; tests hold no timing asserts.)
    n = 2**22
    u = _u(5, n)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.double().mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    for shift in (2**20, 2**21):
        assert int((u[:shift] == u[shift : 2 * shift]).sum()) <= 5


def _hash32_reference(v: int) -> int:
    # the xorshift-multiply finalizer in Python's unbounded ints, reduced mod 2^32
    for _ in range(2):
        v = (((v >> 16) ^ v) * 0x45D9F3B) & 0xFFFFFFFF
    return (v >> 16) ^ v


def test_hash32_int32_lanes_match_unsigned_32_bit_arithmetic():
    # int32 emulates uint32: arithmetic shift + mask = logical shift, the multiply wraps.
    vals = [0, 1, 2, 0x7FFF, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**31 + 5, 2**32 - 1, 0xDEADBEEF]
    x = torch.tensor([v - 2**32 if v >= 2**31 else v for v in vals], dtype=torch.int32)
    got = [int(h) & 0xFFFFFFFF for h in hash32(x)]
    assert got == [_hash32_reference(v) for v in vals]
    # int64 input: its low 32 bits
    assert torch.equal(hash32(torch.tensor([2**40 + 7, -1])), hash32(torch.tensor([7, -1], dtype=torch.int32)))


def test_indices_past_2_pow_31_and_2_pow_32():
    # Tensors of 2^31 elements and more index in int64 (too large to draw here): below 2^31 the
    # int64 path gives the int32 path's values; at 2^32 + k the high word makes them differ.
    s = torch.tensor(77)
    k = torch.arange(4096, dtype=torch.int32)
    assert torch.equal(uniform_at(s, k.long()), uniform_at(s, k))
    assert torch.equal(uniform_at(s, k), uniform_from_seed(s, (4096,)))
    far = uniform_at(s, k.long() + 2**32)
    assert abs(_corr(far, uniform_at(s, k))) < 5 / math.sqrt(4096) and int((far == uniform_at(s, k)).sum()) <= 2
    mid = uniform_at(s, k.long() + 2**31)  # int32 lanes wrap to negative values: still distinct
    assert int((mid == uniform_at(s, k)).sum()) <= 2 and float(mid.min()) >= 0 and float(mid.max()) < 1


def test_stream_matches_the_formula_in_python_integers():
    # u_i = (h >> 8) * 2^-24, h = h32(h32(i_lo ^ s_lo) ^ (s_hi + i_hi)), s_lo = h32(seed_lo),
    # s_hi = h32(seed_hi ^ 0x5BD1E995): the same stream the earlier int64 form of the generator
    # produced (it computed this formula with 64-bit masks), so results seeded before the int32
    # rewrite are reproduced.
    for seed in (0, 12345, 2**40 + 17, 2**62 - 5):
        s_lo = _hash32_reference(seed & 0xFFFFFFFF)
        s_hi = _hash32_reference((seed >> 32) ^ 0x5BD1E995)
        idx = [0, 1, 2, 7, 1000, 2**20 + 3]
        want = [(_hash32_reference(_hash32_reference(i ^ s_lo) ^ s_hi) >> 8) * 2.0**-24 for i in idx]
        got = uniform_from_seed(torch.tensor(seed), (2**20 + 4,))[idx]
        assert got.tolist() == want, seed


def test_hash32_is_a_32_bit_mixer():
    x = torch.arange(2**16, dtype=torch.int32)
    h = hash32(x)
    assert h.dtype == torch.int32
    assert torch.unique(h).numel() == x.numel()  # a bijection on 32 bits: no collisions
    # Avalanche: flipping one input bit flips about half of the 32 output bits.
    diff = (h ^ hash32(x ^ 1)).to(torch.int64) & 0xFFFFFFFF
    bits = sum(((diff >> b) & 1).sum() for b in range(32)) / x.numel()
    assert 14 < float(bits) < 18, float(bits)


def test_new_seed_draws_from_the_global_generator():
    s = new_seed()
    assert s.dtype == torch.int64 and s.shape == () and 0 <= int(s) < 2**62
    assert int(new_seed()) != int(new_seed())
    torch.manual_seed(3)
    a = [int(new_seed()) for _ in range(4)]
    torch.manual_seed(3)
    b = [int(new_seed()) for _ in range(4)]
    assert a == b and len(set(a)) == 4


def test_rounding_generator_redirects_rounding_seeds_only():
    """Inside rounding_generator(g), rounding seeds (stream 0) come from g, dropout seeds
    (stream 1) from the global generator, eager and in a compiled graph (the draw is an op that
    runs every call); outside, both from the global generator. Bad arguments are refused."""
    from fqt_compile.rng import DROPOUT_STREAM, rounding_generator

    def draws():
        return [int(new_seed()), int(new_seed(stream=DROPOUT_STREAM))]

    def graph_draws(x):
        return x + new_seed(), x + new_seed(stream=DROPOUT_STREAM)

    compiled = torch.compile(graph_draws, backend="aot_eager", fullgraph=True)
    zero = torch.zeros((), dtype=torch.int64)
    runs = []
    for rounding_seed in (1, 2):
        torch.manual_seed(7)
        with rounding_generator(torch.Generator().manual_seed(rounding_seed)):
            runs.append(draws() + [int(t) for t in compiled(zero)])
    assert runs[0][1] == runs[1][1] and runs[0][3] == runs[1][3]  # dropout: global generator
    assert runs[0][0] != runs[1][0] and runs[0][2] != runs[1][2]  # rounding: the given one
    torch.manual_seed(7)
    with rounding_generator(torch.Generator().manual_seed(1)):
        assert draws() + [int(t) for t in compiled(zero)] == runs[0]  # reproducible
    torch.manual_seed(7)
    a = draws()
    torch.manual_seed(7)
    assert a[0] == int(new_seed())  # outside: the global generator again
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        with rounding_generator(7):
            pass
    with pytest.raises(ValueError, match="stream"):
        new_seed(stream=2)


def test_compiled_generator_matches_eager():
    # One inductor compile (CPU): the hash is int32 elementwise code (wrapping multiplies,
    # masked shifts) that must give the same bits in generated C++ as in eager, for low and
    # high seeds (the s_hi path).
    def draw(seed: torch.Tensor) -> torch.Tensor:
        return uniform_from_seed(seed, (8, 1000))

    compiled = torch.compile(draw, backend="inductor", fullgraph=True, dynamic=False)
    for seed in (0, 123456789, 2**40 + 17, 2**62 - 5):
        s = torch.tensor(seed, dtype=torch.int64)
        assert torch.equal(compiled(s), draw(s)), seed


def test_column_index_op_is_an_int32_arange_with_a_fake_kernel():
    # fqt::column_index: the generator's column index in passes/decompose_fqt.py (a loaded
    # vector in inductor's CPU code); int32 values 0 .. n-1, symbolic sizes traced through.
    from torch.fx.experimental.proxy_tensor import make_fx

    out = torch.ops.fqt.column_index(37, torch.device("cpu"))
    assert out.dtype == torch.int32 and torch.equal(out, torch.arange(37, dtype=torch.int32))
    assert torch.ops.fqt.column_index(0, torch.device("cpu")).shape == (0,)
    torch.library.opcheck(torch.ops.fqt.column_index.default, (5, torch.device("cpu")))
    gm = make_fx(lambda x: torch.ops.fqt.column_index(x.shape[1], x.device), tracing_mode="symbolic")(torch.randn(2, 9))
    assert torch.equal(gm(torch.randn(3, 11)), torch.arange(11, dtype=torch.int32))


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**31, 2**32 + 5, 2**40 + 17, 2**62 - 5, -1, -(2**40) - 3])
def test_seed_words_of_a_python_int_equal_the_tensor_ones(seed):
    # rng.seed_words_int (the C kernels' seed words) against rng.seed_words (the reference's)
    from fqt_compile.rng import seed_words, seed_words_int

    lo, hi = seed_words(torch.tensor(seed, dtype=torch.int64))
    assert seed_words_int(seed) == (int(lo) & 0xFFFFFFFF, int(hi) & 0xFFFFFFFF)
