"""Tests of :mod:`fqt_compile.quantizers`: the paper's forward and gradient quantizers.

Tiers (STYLE.md 10):

* exact: round trips of values on the grid, codes in range, the stochastic-rounding formula
  against :func:`fqt_compile.rng.uniform_from_seed`, BHQ against a dense reference written from
  DESIGN.md section 3, the Hadamard mix against a Sylvester matrix, edge cases;
* statistical: unbiasedness and variance, with fixed seeds and tolerances derived from the
  quantizer's own (exactly computable) variance, stated next to each assertion.

The exact variance. Every gradient quantizer is ``est = A @ SR(z)`` with ``z`` the (possibly
transformed) ``(N', D)`` view, ``SR`` stochastic rounding with one affine range per tensor, row
or column, and ``A`` the inverse transform (identity, ``T^-1`` for BHQ, the Hadamard inverse).
Element ``z_kj`` sits at fractional level ``p_kj = frac((z_kj - lo) / scale)`` and rounds up
with probability ``p_kj``, so ``Var SR(z)_kj = scale^2 p_kj (1 - p_kj)``; the draws are
independent across elements, so ``Var est_rj = sum_k A_rk^2 Var SR(z)_kj``. ``A``, ``z``, the
ranges and scales depend on the gradient only (not on the seed), so :func:`_exact_moments`
computes this once from one call.
"""

from __future__ import annotations

import math

import pytest
import torch

from fqt_compile import quantizers as Q
from fqt_compile.config import MAX_BITS, MIN_BITS
from fqt_compile.rng import uniform_from_seed

BITS = list(range(MIN_BITS, MAX_BITS + 1))
KINDS = Q.GRAD_KINDS
EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _unequal_rows(n: int = 24, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows whose ranges span four decades (rows scaled by logspace(-3, 1)), plus a zero row and
    a constant row, whose elements have zero variance under PSQ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 1, n)[:, None]
    x[3] = 0.0
    x[5] = 0.25
    return x


def _dominant_rows(n: int = 64, d: int = 32, seed: int = 0) -> torch.Tensor:
    """A gradient with a few dominant rows (three samples with 100-1000x larger gradients)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 0.01
    x[:3] *= torch.tensor([1000.0, 300.0, 100.0])[:, None]
    return x


def _inverse_matrix(gq: Q.GradQuantized, n_rows: int) -> torch.Tensor:
    """``A`` with ``est = A @ dequantized rows``: (N, N')."""
    n_prime = gq.q.codes.shape[0]
    eye = torch.eye(n_prime)
    if gq.kind == "bhq":
        return Q.bhq_inverse(eye, gq.plan)
    if gq.kind == "hadamard":
        return Q.hadamard_inverse(eye, n_rows, gq.block)
    return eye


def _quantized_view(x2d: torch.Tensor, gq: Q.GradQuantized) -> torch.Tensor:
    """The ``(N', D)`` tensor ``z`` that the stochastic rounding of ``gq`` saw."""
    if gq.kind == "bhq":
        return Q.bhq_transform(x2d, gq.plan)[0]
    if gq.kind == "hadamard":
        return Q.hadamard_transform(x2d, gq.block)
    return x2d.to(torch.float32)


def _exact_moments(x2d: torch.Tensor, kind: str, bits: int) -> dict[str, torch.Tensor]:
    """Per element of ``x2d``: the exact variance of one estimate, the bound ``c`` on
    ``|est - E est|`` (each rounded element moves by less than one ``scale``), and the float32
    rounding allowance of the dequantize-and-invert path (see the module docstring)."""
    gq = Q.quantize_grad(x2d, kind, bits, seed=torch.tensor(0))
    half = 2 ** (bits - 1)
    scale = gq.q.scale.expand_as(gq.q.codes)
    lo = gq.q.offset.expand_as(gq.q.codes) - half * scale
    z = _quantized_view(x2d, gq)
    y = torch.where(scale > 0, (z - lo) / torch.where(scale > 0, scale, 1.0), 0.0)
    p = y - torch.floor(y)
    var_z = scale**2 * p * (1 - p)
    a = _inverse_matrix(gq, x2d.shape[0])
    # Rounding of codes * scale + offset (a few ulps of the range end) and of T, T^-1 (a few
    # ulps of the group's magnitude): 64 ulps of |A| @ max(|lo|, |hi|) covers both.
    mag = torch.maximum(lo.abs(), (lo + (2**bits - 1) * scale).abs())
    return {
        "z": z,
        "var_z": var_z,
        "var": (a**2) @ var_z,
        "c": a.abs() @ scale,
        "fp": 64 * EPS32 * (a.abs() @ torch.maximum(mag, z.abs())) + 1e-30,
    }


def _draws(x: torch.Tensor, kind: str, bits: int, k: int) -> torch.Tensor:
    """``k`` independent estimates, stacked: (k, *x.shape). Seeds 1..k are distinct 0-d
    tensors, so each call draws a fresh stream (see tests/test_rng.py for stream independence)."""
    return torch.stack([Q.fake_quantize_grad(x, kind, bits, seed=torch.tensor(i + 1)) for i in range(k)])


def _bernstein_tol(var: torch.Tensor, c: torch.Tensor, k: int, n_elems: int, delta: float = 1e-6) -> torch.Tensor:
    """Half-width ``t`` with ``P(|mean of k draws - mean| >= t) <= delta / n_elems`` per element.

    Bernstein's inequality for i.i.d. draws bounded by ``c`` around their mean with variance
    ``var``: ``P(|mean - mu| >= t) <= 2 exp(-k t^2 / (2 var + 2 c t / 3))``, which holds for
    ``t = sqrt(2 var L / k) + 2 c L / (3 k)``, ``L = ln(2 n_elems / delta)``. For the sizes
    used here ``sqrt(2 L)`` is about 6.6: six to seven standard errors per element, plus a term
    for the skew of rarely-rounding elements (``p`` near 0 or 1) where the normal
    approximation behind "5 standard errors" fails. The union bound over all elements keeps the
    chance of any false failure below ``delta``; elements with zero variance get ``t = 0``.
    """
    log_term = math.log(2 * n_elems / delta)
    return torch.sqrt(2 * var * log_term / k) + torch.where(var > 0, 2 * c * log_term / (3 * k), 0.0)


# ---------------------------------------------------------------------------------------------
# Forward quantizers: exact round trips and ranges
# ---------------------------------------------------------------------------------------------


def _on_grid(scheme: str, bits: int, shape: tuple[int, ...], step: float, seed: int) -> torch.Tensor:
    """Values exactly on ``scheme``'s grid with spacing ``step`` (a power of two, so every
    value, the range ends and the recovered scale are exact in float32), both range ends
    included so the quantizer recovers this very grid."""
    g = torch.Generator().manual_seed(seed)
    levels = 2**bits - 1
    n = math.prod(shape)
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        k = torch.randint(-qmax, qmax + 1, (n,), generator=g)
        k[0] = qmax
        return (k.float() * step).reshape(shape)
    k = torch.randint(0, levels + 1, (n,), generator=g)
    k[0], k[1] = 0, levels
    if scheme == "affine":
        lo = -0.5 - step * (levels // 4)  # an arbitrary origin on the step's lattice
        return (lo + k.float() * step).reshape(shape)
    zero = levels // 3  # affine_zero: 0.0 is level `zero`
    return ((k - zero).float() * step).reshape(shape)


@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_forward_round_trip_per_tensor_exact(scheme, bits):
    x = _on_grid(scheme, bits, (6, 7), step=2.0**-5, seed=bits)
    q = Q.quantize_forward(x, bits, scheme)
    assert q.codes.dtype == torch.int8 and q.scale.shape == ()
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_forward_round_trip_per_channel_exact(scheme, bits, axis):
    # Each channel on its own grid (spacing 2^-2 .. 2^-5): one range per channel recovers each.
    shape = [3, 4, 5]
    n_ch = shape[axis]
    rest = [s for i, s in enumerate(shape) if i != axis % 3]
    chans = [_on_grid(scheme, bits, (math.prod(rest),), step=2.0 ** -(c + 2), seed=c) for c in range(n_ch)]
    x = torch.stack(chans, dim=0).reshape(n_ch, *rest).movedim(0, axis % 3)
    q = Q.quantize_forward(x, bits, scheme, "channel", axis)
    expected_scale_shape = [1, 1, 1]
    expected_scale_shape[axis % 3] = n_ch
    assert list(q.scale.shape) == expected_scale_shape
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_forward_codes_in_range_and_error_half_a_level(scheme, bits, granularity):
    torch.manual_seed(bits)
    x = torch.randn(16, 33) * torch.logspace(-2, 1, 16)[:, None] + 0.3
    q = Q.quantize_forward(x, bits, scheme, granularity, 0)
    half = 2 ** (bits - 1)
    lo_code, hi_code = (-(half - 1), half - 1) if scheme == "symmetric" else (-half, half - 1)
    assert int(q.codes.min()) >= lo_code and int(q.codes.max()) <= hi_code
    if scheme == "affine":  # the range ends are levels: min -> first code, max -> last code
        assert int(q.codes.min()) == -half and int(q.codes.max()) == half - 1
    # Round to nearest on a range that contains every value: error <= scale / 2, plus float32
    # rounding of (x - lo) / scale and of codes * scale + offset (a few ulps of |x| + range).
    err = (q.dequantize() - x).abs()
    slack = 8 * EPS32 * (x.abs().amax() + 1)
    assert bool((err <= q.scale / 2 + slack).all()), float((err - q.scale / 2).max())


def test_forward_affine_zero_keeps_zero_exact():
    x = torch.tensor([[-1.3, 0.0, 0.7], [0.0, 2.1, -0.2]])
    for bits in BITS:
        y = Q.fake_quantize_forward(x, bits, "affine_zero")
        assert torch.equal(y[x == 0], torch.zeros(2)), bits


# ---------------------------------------------------------------------------------------------
# Stochastic rounding: formula, ranges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "row", "column"])
def test_stochastic_quantize_is_floor_y_plus_u(granularity):
    # Exact: codes = floor((x - lo) / scale + u) - 2^(b-1), u = uniform_from_seed(seed, shape).
    x = _unequal_rows()
    seed = torch.tensor(1234)
    bits = 4
    q = Q.stochastic_quantize(x, bits, granularity, seed)
    dims = {"tensor": (0, 1), "row": (1,), "column": (0,)}[granularity]
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    scale = (hi - lo) / 15
    div = torch.where(scale > 0, scale, 1.0)
    u = uniform_from_seed(seed, x.shape)
    expected = torch.clamp(torch.floor((x - lo) / div + u), 0, 15) - 8
    assert torch.equal(q.codes, expected.to(torch.int8))
    torch.testing.assert_close(q.scale.expand_as(x), scale.expand_as(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_gradient_codes_in_range_and_within_one_level(kind, bits):
    x = _unequal_rows(seed=bits)
    gq = Q.quantize_grad(x, kind, bits, seed=torch.tensor(bits))
    half = 2 ** (bits - 1)
    assert gq.q.codes.dtype == torch.int8
    assert int(gq.q.codes.min()) >= -half and int(gq.q.codes.max()) <= half - 1
    # Stochastic rounding moves each (transformed) element to one of its two neighbouring
    # levels: |SR(z) - z| < scale, plus float32 rounding.
    z = _quantized_view(x, gq)
    err = (gq.q.dequantize(torch.float32) - z).abs()
    assert bool((err <= gq.q.scale * (1 + 1e-5) + 8 * EPS32 * z.abs()).all())


# ---------------------------------------------------------------------------------------------
# Unbiasedness and variance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_every_kind(kind):
    """E[Q(x)] = x: the mean of K draws is within a Bernstein bound of x, element by element,
    on rows whose ranges differ by 10^4 (and a zero row and a constant row)."""
    x = _unequal_rows()
    bits, k = 4, 1500
    mom = _exact_moments(x, kind, bits)
    est_sum = torch.zeros_like(x, dtype=torch.float64)  # float64 sums: no drift over K adds
    zq_sum = torch.zeros_like(mom["z"], dtype=torch.float64)
    for i in range(k):
        gq = Q.quantize_grad(x, kind, bits, seed=torch.tensor(i + 1))
        est_sum += gq.dequantize()
        zq_sum += gq.q.dequantize(torch.float32)
    mean = (est_sum / k).float()
    tol = _bernstein_tol(mom["var"], mom["c"], k, x.numel()) + mom["fp"]
    err = (mean - x).abs()
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), (kind, worst, float(err.flatten()[worst]), float(tol.flatten()[worst]))
    # Zero-variance elements (range ends; the zero and constant rows under psq) were held to
    # the float rounding allowance alone.
    if kind in ("ptq", "psq", "column"):
        assert bool((mom["var"] == 0).any())
    # A small bias in one direction hides under the per-element bound but not in the average
    # of the standardized errors of the rounded elements z (independent across elements, each
    # with variance exactly 1 by construction, so the average has standard deviation
    # 1/sqrt(n)): |average| <= 5/sqrt(n). The rule floor(y + 0.98 u) fails it by 2x or more.
    live = mom["var_z"] > 0
    zscore = (zq_sum / k - mom["z"].double())[live] / torch.sqrt(mom["var_z"][live] / k)
    assert abs(float(zscore.mean())) <= 5 / math.sqrt(int(live.sum())), float(zscore.mean())


@pytest.mark.parametrize("kind", KINDS)
def test_exact_variance_matches_measured(kind):
    """The variance formula used by the statistical tests agrees with K draws.

    The total of K-draw sample variances has a relative standard error of about sqrt(2 / K)
    = 3.7% at K = 1500 for a single Gaussian element, less for a sum; 15% is 4 of those."""
    x = _unequal_rows(seed=1)
    k = 1500
    draws = _draws(x, kind, 3, k)
    measured = draws.var(0).sum()
    exact = _exact_moments(x, kind, 3)["var"].sum()
    assert abs(float(measured / exact) - 1) < 0.15, (float(measured), float(exact))


def _total_variance(x: torch.Tensor, kind: str, bits: int, k: int) -> tuple[float, float]:
    """(measured over k draws, exact) total variance sum_ij Var(est_ij)."""
    measured = float(_draws(x, kind, bits, k).var(0).sum())
    exact = float(_exact_moments(x, kind, bits)["var"].sum())
    return measured, exact


def test_variance_order_ptq_psq_bhq_with_dominant_rows():
    """Var(PTQ) >= Var(PSQ) >= Var(BHQ) (DESIGN.md section 3) on a gradient whose three
    dominant rows carry most of the range. With K = 400 the measured totals have a relative
    standard error of a few percent; the gaps asserted (2x) are far wider."""
    x = _dominant_rows()
    bits, k = 4, 400
    v = {kind: _total_variance(x, kind, bits, k) for kind in ("ptq", "psq", "bhq")}
    measured = {kind: m for kind, (m, _) in v.items()}
    exact = {kind: e for kind, (_, e) in v.items()}
    assert measured["ptq"] >= 2 * measured["psq"], measured
    assert measured["psq"] >= 2 * measured["bhq"], measured
    assert exact["ptq"] >= exact["psq"] >= exact["bhq"], exact


@pytest.mark.parametrize("kind", ["psq", "bhq"])
def test_variance_scales_as_inverse_square_levels(kind):
    """Var(b) * (2^b - 1)^2 is the same at 4, 6 and 8 bits.

    Var = sum_ij scale_i^2 p_ij (1 - p_ij) with scale_i = range_i / (2^b - 1), and the
    transform does not depend on bits; what is left, the average of p (1 - p), is 1/6 for
    evenly spread fractional levels at every bit-width, with a per-element standard deviation
    of sqrt(1/30 - 1/36) = 0.075. Over the ~2000 elements that carry most of the variance here
    (row ranges within one decade, 64 x 64) the average has a relative standard deviation of
    0.075 * 6 / sqrt(2000) = 1%, a ratio of two such 1.4%; the K = 200 draw estimate of the
    total adds sqrt(2 / K) / sqrt(2000) < 0.3%. The 10% tolerance is about 7 of those."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 64, generator=g) * torch.logspace(-1, 0, 64)[:, None]
    k = 200
    norm = {}
    for bits in (4, 6, 8):
        measured, exact = _total_variance(x, kind, bits, k)
        levels = 2**bits - 1
        norm[bits] = (measured * levels**2, exact * levels**2)
    for bits in (6, 8):
        for which in (0, 1):
            ratio = norm[bits][which] / norm[4][which]
            assert 0.9 < ratio < 1.1, (kind, bits, which, ratio, norm)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_psq_and_ptq_variance_bounds(bits):
    """PSQ: Var <= D * sum_i R_i^2 / (4 B^2); PTQ: Var <= N * D * R^2 / (4 B^2) (each element
    has variance scale^2 p (1 - p) <= scale^2 / 4). Measured with K = 400; the bound is about
    1.5x the typical value (p(1-p) averages 1/6, not 1/4), and 5% covers the sampling error."""
    x = _unequal_rows(n=32, d=16)
    n, d = x.shape
    levels = 2**bits - 1
    row_range = x.amax(1) - x.amin(1)
    psq_bound = d * float((row_range**2).sum()) / (4 * levels**2)
    ptq_bound = n * d * float(x.amax() - x.amin()) ** 2 / (4 * levels**2)
    psq_measured, psq_exact = _total_variance(x, "psq", bits, 400)
    ptq_measured, ptq_exact = _total_variance(x, "ptq", bits, 400)
    assert psq_measured <= 1.05 * psq_bound and psq_exact <= psq_bound
    assert ptq_measured <= 1.05 * ptq_bound and ptq_exact <= ptq_bound
    assert psq_bound <= ptq_bound  # "never above PTQ's"


# ---------------------------------------------------------------------------------------------
# BHQ
# ---------------------------------------------------------------------------------------------


def _reference_bhq_groups(m: list[float]) -> list[list[int]]:
    """DESIGN.md section 3, written as plain loops: groups as lists of row indices, the leader
    first, small rows in descending range order."""
    n_rows = len(m)
    order = sorted(range(n_rows), key=lambda r: -m[r])  # stable, descending
    ms = [m[r] for r in order]
    n_small = 0
    while n_small + 1 <= n_rows - 1:
        k = n_small + 1
        lead_sum = sum(ms[: n_rows - k])
        if lead_sum > 0 and k * ms[n_rows - k - 1] <= lead_sum:
            n_small = k
        else:
            break
    n_lead = n_rows - n_small
    total = sum(ms[:n_lead])
    groups = [[order[i]] for i in range(n_lead)]
    cum, acc, prev = 0.0, [], 0
    for i in range(n_lead):
        cum += n_small * ms[i] / total if total > 0 else 0.0
        acc.append(math.floor(cum + 0.5))
    small = order[n_lead:]
    for i in range(n_lead):
        groups[i] += small[prev : acc[i]]
        prev = acc[i]
    assert prev == n_small or total == 0
    return groups


def _reference_bhq_matrix(x2d: torch.Tensor) -> torch.Tensor:
    """Dense block-diagonal T = H_n diag(s) per group, float64 (DESIGN.md section 3)."""
    m = (x2d.amax(1) - x2d.amin(1)).tolist()
    n_rows = len(m)
    t = torch.eye(n_rows, dtype=torch.float64)
    for grp in _reference_bhq_groups(m):
        n = len(grp)
        lam1 = m[grp[0]]
        lam2 = max((m[r] for r in grp[1:]), default=0.0)
        if n < 2 or lam1 <= 0 or lam2 <= 0:
            continue  # identity
        e1 = torch.zeros(n, dtype=torch.float64)
        e1[0] = 1
        v = torch.ones(n, dtype=torch.float64) / math.sqrt(n) - e1
        v = v / v.norm()
        h = torch.eye(n, dtype=torch.float64) - 2 * torch.outer(v, v)
        w1 = lam1 / math.sqrt(n)
        w2 = lam2 * float(h.abs().max())
        s = torch.tensor([w1 ** (-1 / 3)] + [(w2 / (n - 1)) ** (-1 / 3)] * (n - 1), dtype=torch.float64)
        idx = torch.tensor(grp)
        t[idx[:, None], idx[None, :]] = h * s[None, :]
    return t


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_bhq_matches_dense_reference(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) * torch.logspace(-2, 1, n)[torch.randperm(n, generator=g)][:, None]
    if n == 40:
        x[:2] *= 30  # dominant rows: large groups
    plan = Q.bhq_plan(x)
    ref_groups = _reference_bhq_groups((x.amax(1) - x.amin(1)).tolist())
    for grp in ref_groups:
        assert plan.group[grp].tolist() == [grp[0]] * len(grp), (grp, plan.group.tolist())
    y, _ = Q.bhq_transform(x, plan)
    ref = _reference_bhq_matrix(x) @ x.double()
    # float32 transform: a few ulps of each group's largest transformed entry.
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("n", [1, 5, 24, 64, 257])
def test_bhq_transform_inverse_round_trip(n):
    torch.manual_seed(n)
    x = torch.randn(n, 16) * torch.logspace(-3, 1, n)[:, None]
    y, plan = Q.bhq_transform(x)
    back = Q.bhq_inverse(y, plan)
    # T^-1 T = I in float32: errors are a few ulps of the group's largest row, scaled back by
    # 1/s; relative to the largest row of the tensor that is < 1e-5.
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_bhq_group_structure():
    x = _dominant_rows(n=64)
    x[10:14] *= torch.logspace(-3, 0, 4)[:, None]
    plan = Q.bhq_plan(x)
    n = x.shape[0]
    group = plan.group
    assert group.shape == (n,) and group.dtype == torch.int64
    # Group ids are leader rows, and every leader is in its own group.
    leaders = torch.unique(group)
    assert torch.equal(group[leaders], leaders)
    sizes = plan.group_sizes()
    assert int(sizes.sum()) == n and bool((sizes[leaders] >= 1).all())
    assert bool((sizes[~torch.isin(torch.arange(n), leaders)] == 0).all())
    assert plan.num_groups == leaders.numel()
    # The leader has the largest range of its group.
    m = x.amax(1) - x.amin(1)
    assert bool((m <= m[group]).all())
    # Each dominant row leads a group that mixes several small rows.
    assert all(int(group[r]) == r and int(sizes[r]) >= 2 for r in range(3))
    # Unmixed rows (v = 0) have s = 1; H_n is orthogonal: sum of v^2 over a mixed group is 1.
    v2 = torch.zeros(n).index_add_(0, group, plan.v**2)
    mixed = plan.v != 0
    torch.testing.assert_close(v2[torch.unique(group[mixed])], torch.ones(int(torch.unique(group[mixed]).numel())))
    assert bool((plan.s[~mixed] == 1).all())


def test_bhq_single_row_is_psq():
    x = torch.randn(1, 32)
    a = Q.quantize_grad(x, "bhq", 4, seed=torch.tensor(5))
    b = Q.quantize_grad(x, "psq", 4, seed=torch.tensor(5))
    assert a.plan.num_groups == 1 and float(a.plan.v.abs().sum()) == 0
    assert torch.equal(a.q.codes, b.q.codes)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Hadamard
# ---------------------------------------------------------------------------------------------


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@pytest.mark.parametrize("block", [2, 4, 16, 64])
def test_hadamard_is_orthonormal_and_self_inverse(block):
    eye = torch.eye(block)
    h = Q.hadamard_transform(eye, block)  # the matrix itself (transform of the identity's columns)
    torch.testing.assert_close(h, _sylvester(block), rtol=0, atol=1e-6)
    torch.testing.assert_close(h @ h.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(Q.hadamard_transform(h, block), eye, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("n", "block", "padded"), [(20, 16, 32), (32, 16, 32), (3, 16, 4), (1, 16, 2), (5, 4, 8)])
def test_hadamard_padding(n, block, padded):
    x = torch.randn(n, 6)
    y = Q.hadamard_transform(x, block)
    assert y.shape == (padded, 6)
    torch.testing.assert_close(Q.hadamard_inverse(y, n, block), x, rtol=1e-5, atol=1e-6)
    gq = Q.quantize_grad(x, "hadamard", 8, seed=torch.tensor(0), block=block)
    assert gq.q.codes.shape == (padded, 6) and gq.dequantize().shape == (n, 6)


def test_hadamard_rejects_bad_block():
    with pytest.raises(ValueError, match="power of two >= 2, got 12"):
        Q.hadamard_transform(torch.randn(4, 4), 12)


# ---------------------------------------------------------------------------------------------
# Edge cases: each has a defined behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_gradient_comes_back_zero(kind):
    x = torch.zeros(6, 10)
    for bits in (2, 8):
        y = Q.fake_quantize_grad(x, kind, bits, seed=torch.tensor(3))
        assert torch.equal(y, x)


@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_all_zero_forward_comes_back_zero(scheme, granularity):
    x = torch.zeros(4, 5)
    q = Q.quantize_forward(x, 4, scheme, granularity)
    assert torch.equal(q.dequantize(), x) and bool(torch.isfinite(q.scale).all())


@pytest.mark.parametrize("kind", ["psq", "bhq"])
def test_constant_rows_come_back_exactly(kind):
    # A row with zero range has nothing to round: PSQ returns it exactly (stored scale 0,
    # offset = the value), also for tiny values (a scale of 1 would round 1e-7 to 0).
    # BHQ leaves zero-range rows unmixed, so the same holds there.
    x = torch.tensor([1e-7, -3.5, 0.25, 12345.0, 0.0])[:, None].expand(5, 9).contiguous()
    for bits in (2, 8):
        assert torch.equal(Q.fake_quantize_grad(x, kind, bits, seed=torch.tensor(1)), x)


def test_single_value_rows_and_columns_are_exact():
    # D = 1: every PSQ row is a constant; N = 1: every column is a constant (a batch of one).
    col = torch.randn(7, 1) * 1e-4
    row = torch.randn(1, 7) * 1e-4
    assert torch.equal(Q.fake_quantize_grad(col, "psq", 4, seed=torch.tensor(2)), col)
    assert torch.equal(Q.fake_quantize_grad(row, "column", 4, seed=torch.tensor(2)), row)
    assert torch.equal(Q.fake_quantize_forward(torch.full((3,), 1e-7), 4, "affine"), torch.full((3,), 1e-7))


@pytest.mark.parametrize("kind", KINDS)
def test_single_row(kind):
    x = torch.randn(1, 17)
    gq = Q.quantize_grad(x, kind, 8, seed=torch.tensor(0))
    y = gq.dequantize()
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    # 8 bits: within one level of the row's (transformed) range.
    assert float((y - x).abs().max()) <= float(gq.q.scale.max()) * 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0,), (2, 0, 3)])
def test_empty_gradients(kind, shape):
    x = torch.empty(shape)
    y = Q.fake_quantize_grad(x, kind, 4)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0,)])
def test_empty_forward(scheme, shape):
    x = torch.empty(shape)
    assert Q.fake_quantize_forward(x, 8, scheme).shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_input_same_as_contiguous(kind):
    base = _unequal_rows(n=8, d=24)
    x = base.T  # (24, 8), non-contiguous
    assert not x.is_contiguous()
    a = Q.fake_quantize_grad(x, kind, 4, seed=torch.tensor(9))
    b = Q.fake_quantize_grad(x.contiguous(), kind, 4, seed=torch.tensor(9))
    assert torch.equal(a, b)
    xs = _unequal_rows(n=16, d=8)[::2]  # strided rows
    torch.testing.assert_close(
        Q.fake_quantize_forward(xs.T, 8), Q.fake_quantize_forward(xs.T.contiguous(), 8), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_gradients_keep_dtype(dtype, kind):
    x = _unequal_rows(n=8, d=16).to(dtype)
    gq = Q.quantize_grad(x, kind, 4, seed=torch.tensor(4))
    ref = Q.quantize_grad(x.float(), kind, 4, seed=torch.tensor(4))
    assert gq.dequantize().dtype == dtype
    # The quantizers compute in float32, so the codes equal those of the float32 copy.
    assert torch.equal(gq.q.codes, ref.q.codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
def test_low_precision_forward_keeps_dtype(dtype, scheme):
    x = torch.randn(5, 7).to(dtype)
    assert Q.fake_quantize_forward(x, 8, scheme).dtype == dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_raises_naming_tensor(kind, bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="grad_output of fc1 contains NaN or Inf"):
        Q.quantize_grad(x, kind, 4, name="grad_output of fc1")


@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
def test_non_finite_forward_raises_naming_tensor(scheme):
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        Q.quantize_forward(x, 8, scheme, name="weight")


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_outside_range_raise(bits):
    msg = r"bits must be an integer in \[2, 8\], got "
    with pytest.raises(ValueError, match=msg):
        Q.quantize_forward(torch.randn(3), bits)
    with pytest.raises(ValueError, match=msg):
        Q.stochastic_quantize(torch.randn(3, 3), bits, "row")
    for kind in KINDS:
        with pytest.raises(ValueError, match=msg):
            Q.quantize_grad(torch.randn(3, 3), kind, bits)


def test_bad_names_raise_with_choices():
    with pytest.raises(ValueError, match=r"kind must be one of \('ptq', 'psq', 'column', 'bhq', 'hadamard'\), got 'pqs'"):
        Q.quantize_grad(torch.randn(2, 2), "pqs", 4)
    with pytest.raises(ValueError, match=r"scheme must be one of .*'symmetric'\), got 'sym'"):
        Q.quantize_forward(torch.randn(2, 2), 4, "sym")
    with pytest.raises(ValueError, match="granularity must be 'tensor' or 'channel', got 'row'"):
        Q.quantize_forward(torch.randn(2, 2), 4, "affine", "row")
    with pytest.raises(ValueError, match="granularity must be 'tensor', 'row' or 'column', got 'channel'"):
        Q.stochastic_quantize(torch.randn(2, 2), 4, "channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expects a 2-D \(N, D\) tensor, got shape \(2, 2, 2\)"):
        Q.stochastic_quantize(torch.randn(2, 2, 2), 4, "row")
    with pytest.raises(ValueError, match=r"row_dims must be in \[1, 2\] for a 3-d tensor, got 3"):
        Q.as_rows(torch.randn(2, 2, 2), 3)


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_seeds_reproduce_and_differ(kind):
    x = _unequal_rows()
    a = Q.quantize_grad(x, kind, 4, seed=torch.tensor(11))
    b = Q.quantize_grad(x, kind, 4, seed=torch.tensor(11))
    c = Q.quantize_grad(x, kind, 4, seed=torch.tensor(12))
    assert torch.equal(a.q.codes, b.q.codes)
    assert not torch.equal(a.q.codes, c.q.codes)
    # Without a seed, each call draws a fresh one from the global generator.
    d = Q.quantize_grad(x, kind, 4)
    e = Q.quantize_grad(x, kind, 4)
    assert not torch.equal(d.q.codes, e.q.codes)


def test_manual_seed_reproduces_a_sequence_of_calls():
    x = _unequal_rows()

    def run() -> list[torch.Tensor]:
        torch.manual_seed(2024)
        return [Q.fake_quantize_grad(x, kind, 3) for kind in KINDS for _ in range(2)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # two calls in the sequence differ


def test_row_dims_choose_the_rows():
    # row_dims = 1 on a (B, T, D) gradient: one row per sample of T * D values.
    x = torch.randn(3, 4, 5) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    gq = Q.quantize_grad(x, "psq", 8, seed=torch.tensor(0), row_dims=1)
    assert gq.q.codes.shape == (3, 20) and gq.q.scale.shape == (3, 1)
    assert gq.dequantize().shape == x.shape
