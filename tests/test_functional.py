"""FQT products against an independent oracle (tests/oracle.py) and the QAT / float modes.

The compiled model uses the eager inner compiler: the numerics are the same as with inductor
but the seeds are drawn by ``aten.randint`` from the global generator, so the oracle, drawing
its seeds in the same order after the same ``torch.manual_seed``, sees the same random draws.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compile
from fqt_compile import FQTConfig, GradSpec
from fqt_compile.functional import QSpec, fqt_conv, fqt_conv_transpose, fqt_linear, fqt_matmul, fqt_sdpa

from oracle import FakeQuantQAT, PlainNet, RefNet

# Stochastic rounding is a step function of its input: float-rounding differences between two
# implementations (e.g. a different summation order upstream, which differs between CPUs) can
# move an element across a rounding boundary with probability ~ ulp/scale per element. One such
# crossing changes one code by one step, and the GEMM (and BHQ's inverse transform) spreads
# that over a row or block of the gradient: on a small tensor (c1.weight has 72 elements) that
# is several elements at once, so a mismatch fraction alone cannot bound it. An element may
# differ if the whole gradient still agrees to REL_NORM_TOL in L2: one crossing in one of the
# ~8k codes of a 4-bit gradient moves it by ~1/(15 * sqrt(8192)) ~ 7e-4 at most (measured:
# 5.6e-5 on an AMD Zen 5 CPU), while two different seeds give gradients that differ by 2.7e-2
# to 1.9e-1 (this file's models and configs), 13x above the bound or more.
MISMATCH_FRACTION = 1e-3
ELEM_TOL = dict(rtol=1e-4, atol=1e-5)
REL_NORM_TOL = 2e-3


def _grads(model, x, seed):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
    torch.manual_seed(seed)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close_mostly(a, b, what):
    close = torch.isclose(a, b, **ELEM_TOL)
    frac = 1.0 - close.float().mean().item()
    if frac <= MISMATCH_FRACTION:
        return
    rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert rel <= REL_NORM_TOL, (
        f"{what}: {frac:.2%} of elements differ (max |diff| {(a - b).abs().max():.3g}), "
        f"relative L2 difference {rel:.3g} > {REL_NORM_TOL}"
    )


@pytest.fixture(scope="module")
def digits_batch():
    torch.manual_seed(0)
    return torch.randn(16, 1, 8, 8)


@pytest.mark.parametrize(
    "gi, gw",
    [(("psq", 4), ("column", 8)), (("bhq", 4), ("column", 8)), (("ptq", 4), ("ptq", 8)),
     (("hadamard", 5), ("column", 8)), (("psq", 8), ("psq", 6))],
)
def test_compiled_matches_oracle_with_same_draws(gi, gw, digits_batch):
    torch.manual_seed(1)
    ref = RefNet(gi, gw)
    net = PlainNet()
    net.load_state_dict(ref.state_dict())
    cfg = FQTConfig(grad_input=GradSpec(*gi), grad_weight=GradSpec(*gw), compiler="eager")
    fqt_compile.compile(net, cfg)
    g_ref = _grads(ref, digits_batch, seed=7)
    g_fqt = _grads(net, digits_batch, seed=7)
    g_other = _grads(net, digits_batch, seed=8)
    for name in g_ref:
        _assert_close_mostly(g_fqt[name], g_ref[name], name)
    # and the draws matter: another seed gives a gradient far outside the tolerance above
    rel_other = max(((g_other[n] - g_ref[n]).norm() / g_ref[n].norm()).item() for n in g_ref if "weight" in n)
    assert rel_other > 10 * REL_NORM_TOL, rel_other


def test_prepare_matches_oracle(digits_batch):
    torch.manual_seed(1)
    ref = RefNet(("bhq", 4), ("column", 8))
    net = PlainNet()
    net.load_state_dict(ref.state_dict())
    gm = fqt_compile.prepare(net, "bhq4")
    g_ref = _grads(ref, digits_batch, seed=3)
    g_fqt = _grads(gm, digits_batch, seed=3)
    for name in g_ref:
        _assert_close_mostly(g_fqt[name], g_ref[name], name)


def test_qat_mode_matches_hand_written_fake_quant(digits_batch):
    torch.manual_seed(2)
    net = PlainNet()
    ref = FakeQuantQAT(copy.deepcopy(net))
    fqt_compile.compile(net, FQTConfig.recipe("qat8", compiler="eager"))
    g_ref = {k.removeprefix("net."): v for k, v in _grads(ref, digits_batch, 0).items()}
    g = _grads(net, digits_batch, 0)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6)


def test_off_mode_matches_float_exactly(digits_batch):
    torch.manual_seed(3)
    net = PlainNet()
    plain = copy.deepcopy(net)
    fqt_compile.compile(net, FQTConfig.recipe("off", compiler="eager"))
    g_ref, g = _grads(plain, digits_batch, 0), _grads(net, digits_batch, 0)
    for name in g:
        assert torch.equal(g[name], g_ref[name]), name
    assert fqt_compile.records(net)[0].insert.quantized == []


def test_functional_forward_is_deterministic_and_quantized():
    torch.manual_seed(4)
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    y1, y2 = fqt_linear(x, w, spec=QSpec()), fqt_linear(x, w, spec=QSpec())
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, x @ w.t(), rtol=0, atol=1e-6)  # quantized, not float
    torch.testing.assert_close(y1, x @ w.t(), rtol=0.05, atol=0.05)


def test_matmul_broadcast_and_sdpa_shapes():
    torch.manual_seed(5)
    a = torch.randn(2, 3, 4, 8, requires_grad=True)
    b = torch.randn(8, 5, requires_grad=True)  # broadcast over batch dims
    fqt_matmul(a, b).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    out = fqt_sdpa(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.05)  # 8-bit operands
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_conv_grouped_strided_dilated_and_same_padding():
    torch.manual_seed(6)
    for dim in (1, 2, 3):
        conv = getattr(nn, f"Conv{dim}d")(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        x = torch.randn(2, 4, *([9] * dim), requires_grad=True)
        out = fqt_conv(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert out.shape == conv(x).shape
        out.sum().backward()
        assert x.grad.shape == x.shape
    w = torch.randn(4, 4, 3, 3)
    assert fqt_conv(torch.randn(1, 4, 5, 5), w, padding="same").shape == (1, 4, 5, 5)
    with pytest.raises(NotImplementedError, match="asymmetric"):
        fqt_conv(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 2, 2), padding="same")


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((5, 8), (8, 3)), ((2, 5, 8), (8, 3)), ((2, 3, 5, 8), (2, 3, 8, 4)), ((2, 3, 5, 8), (3, 8, 4)), ((5, 8), (2, 8, 4))],
)
def test_matmul_layouts_qat_gradients_are_straight_through(a_shape, b_shape):
    """With exact gradients (QAT) every layout reaching the GEMM op (2-D, flattened rows,
    batched, broadcast batch dims) gives the straight-through gradients of A~ @ B~."""
    torch.manual_seed(7)
    a = torch.randn(a_shape, requires_grad=True)
    b = torch.randn(b_shape, requires_grad=True)
    spec = QSpec(gi_kind="none", gw_kind="none")
    out = fqt_matmul(a, b, spec=spec)
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    a_t = a.detach().clone().requires_grad_()
    b_t = b.detach().clone().requires_grad_()
    from fqt_compile.quantizers import fake_quantize_forward as fq

    ref = torch.matmul(a_t + (fq(a_t) - a_t).detach(), b_t + (fq(b_t) - b_t).detach())
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, a_t.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b_t.grad, rtol=1e-5, atol=1e-5)
    for kind in ("psq", "bhq", "hadamard", "ptq"):  # and FQT runs with the right shapes
        a.grad = b.grad = None
        fqt_matmul(a, b, spec=QSpec(gi_kind=kind, gi_bits=4, gw_kind="column")).sum().backward()
        assert a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("kind", ["ptq", "psq", "bhq", "hadamard"])
@pytest.mark.parametrize(
    "fn, shapes",
    [(fqt_linear, [(16, 8), (6, 8)]), (fqt_matmul, [(2, 16, 8), (2, 8, 6)]), (fqt_matmul, [(2, 16, 8), (8, 6)]),
     (fqt_matmul, [(16, 8), (8,)]), (fqt_matmul, [(8,), (2, 8, 16)])],
    ids=["linear", "bmm", "matmul2d", "matvec", "vecmat"],
)
def test_every_layout_gives_unbiased_gradients(fn, shapes, kind):
    """Mean of K=100 FQT gradients vs the exact (QAT) gradient. For an unbiased estimator the
    error of the mean is ~ (error of one draw) / sqrt(K) = 0.1x; a bias stays at its size.
    Tolerance 0.25x one draw's error (2.5 standard errors on the norm). The upstream
    gradient has rows of very different ranges, where BHQ's transform matters. The linear
    case uses per-channel symmetric weights, whose scales grad_input folds into Q_b1's input.
    A vector operand is a one-column (or one-row) matrix (functional.matvec_with)."""
    torch.manual_seed(11)
    ins = [torch.randn(s) for s in shapes]
    exact = QSpec(gi_kind="none", gw_kind="none")
    shape = fn(*ins, spec=exact).shape  # a matrix-vector product's output is (16,) or (2, 16)
    w = torch.randn(shape) * torch.logspace(-2, 1, 16)[(slice(None),) + (None,) * (len(shape) > 1 and shape[-1] != 16)]

    def grads(spec):
        ts = [t.clone().requires_grad_() for t in ins]
        (fn(*ts, spec=spec) * w).sum().backward()
        return [t.grad for t in ts]

    ref = grads(exact)
    spec = QSpec(gi_kind=kind, gi_bits=4, gw_kind="column", gw_bits=4)
    if fn is fqt_linear:  # per-channel symmetric weights: Q_b1 sees G diag(s_w) (folded)
        exact = exact._replace(b_gran="channel", b_scheme="symmetric")
        ref, spec = grads(exact), spec._replace(b_gran="channel", b_scheme="symmetric")
    draws = [grads(spec) for _ in range(100)]
    for i, name in enumerate(("first", "second")):
        one = torch.stack([(d[i] - ref[i]).norm() for d in draws]).mean()
        mean_err = (torch.stack([d[i] for d in draws]).mean(0) - ref[i]).norm()
        # + float rounding (1e-5 of the gradient's norm): a vector operand's one-column G puts
        # one element in a per-row (or a one-row G in a per-column) range, which is exact
        assert mean_err < 0.25 * one + 1e-5 * ref[i].norm(), f"{name} operand: mean error {mean_err:.4g} vs one draw {one:.4g}"


def test_sdpa_boolean_masks_are_a_bias_and_the_backward_reads_no_mask():
    """sdpa_with adds boolean masks as a 0 / -inf bias instead of masked_fill: same outputs and
    gradients as PyTorch's attention (float64, exact products; also with grouped-query attention
    and a float mask that needs a gradient), and the traced backward takes
    no boolean tensor (masked_fill's backward needs the mask; inductor's C++ loads a bool
    vector element by element, the hottest part of the compiled softmax backward)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function

    from fqt_compile.functional import sdpa_with

    def exact(a, b, which):
        return a @ b

    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.rand(6, 6) > 0.3
    keep[:, 0] = True  # no row fully masked
    for kw in (dict(is_causal=True), dict(attn_mask=keep), dict(attn_mask=torch.randn(6, 6, dtype=torch.float64))):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for as_bias in (True, False):  # the masked_fill form (used where attention is recomputed)
            out = sdpa_with(exact, q, k, v, **kw, mask_as_bias=as_bias)
            torch.testing.assert_close(out, ref)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r)

    # grouped-query attention (2 key/value heads for 4 query heads: torch's enable_gqa repeats
    # each one for consecutive query heads) with a learned float mask (T5's position bias)
    q4 = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 6, 6, dtype=torch.float64, requires_grad=True)
    kw = dict(attn_mask=bias, enable_gqa=True, scale=1.0)
    ref = torch.nn.functional.scaled_dot_product_attention(q4, k[:, :2], v[:, :2], **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q4, k, v, bias))
    out = sdpa_with(exact, q4, k[:, :2], v[:, :2], **kw)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out.square().sum(), (q4, k, v, bias)), ref_grads):
        torch.testing.assert_close(g, r)

    backward_graphs = []

    def keep_backward(gm, _):
        backward_graphs.append(gm)
        return make_boxed_func(gm)

    f = aot_function(lambda q, k, v: sdpa_with(exact, q, k, v, is_causal=True),
                     fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=keep_backward)
    f(q, k, v).sum().backward()
    inputs = [n.meta.get("val") for n in backward_graphs[0].graph.nodes if n.op == "placeholder"]
    assert inputs and not any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in inputs)


EINSUMS = [
    ("bhid,bhjd->bhij", (2, 3, 4, 5), (2, 3, 6, 5)),  # attention scores
    ("bhij,bhjd->bhid", (2, 3, 4, 6), (2, 3, 6, 5)),
    ("bld,df->blf", (2, 4, 5), (5, 7)),  # a linear layer
    ("b i d, d f -> f b i", (2, 3, 4), (4, 5)),  # spaces, output reordered
    ("bhqk,bhkd->bqhd", (2, 3, 4, 5), (2, 3, 5, 6)),
    ("ij,jk", (3, 4), (4, 5)),  # implicit output
    ("ik,kj->ji", (3, 4), (4, 2)),
    ("...id,...jd->...ij", (2, 3, 4, 5), (3, 6, 5)),  # ellipses of different lengths broadcast
    ("...d,df->...f", (2, 3, 4), (4, 5)),
    ("bhid,hjd->bhij", (2, 3, 4, 5), (3, 6, 5)),  # a batch index in both, a free one in one
    ("bxd,byd->bxy", (1, 3, 4), (2, 5, 4)),  # a size-1 batch index broadcasts
    ("bn,n->b", (3, 4), (4,)),  # matrix-vector: one free side
    ("bcd,dce->be", (2, 3, 4), (4, 3, 5)),  # two contracted indices
    ("ij,jk->ik", (2, 1), (3, 4)),  # a size-1 contracted index broadcasts (torch.einsum allows it)
]


@pytest.mark.parametrize("equation,sa,sb", EINSUMS)
def test_einsum_as_one_product_is_torch_einsum(equation, sa, sb):
    """einsum_with (what fqt_einsum and the inference form build on) computes torch.einsum, and
    its gradients, with one product of the operands permuted and reshaped (float64, exact
    product: differences are float rounding)."""
    from fqt_compile.functional import einsum_with

    torch.manual_seed(0)
    a = torch.randn(sa, dtype=torch.float64, requires_grad=True)
    b = torch.randn(sb, dtype=torch.float64, requires_grad=True)
    calls = []

    def matmul(x, y):
        calls.append((x.dim(), y.dim()))
        return torch.matmul(x, y)

    got, want = einsum_with(matmul, equation, a, b), torch.einsum(equation, a, b)
    assert len(calls) == 1 and min(calls[0]) >= 2  # one product, no vector operand
    torch.testing.assert_close(got, want)
    w = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad((got * w).sum(), (a, b)), torch.autograd.grad((want * w).sum(), (a, b))):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("equation,dims,reason", [
    ("ij,jk,kl->il", (2, 2), "einsum of 3 operands is not covered"),
    ("ii,ij->j", (2, 2), "an index repeated in one operand (a diagonal)"),
    ("ij,kl->ijkl", (2, 2), "without a contracted index"),
    ("bi,bi->b", (2, 2), "a vector product"),
    ("ij,jk->k", (2, 2), "sums an index of one operand alone"),
    ("ijk,jk->i", (2, 2), "does not fit operands of 2 and 2 dimensions"),
])
def test_einsums_that_are_not_one_product_say_why(equation, dims, reason):
    from fqt_compile.functional import einsum_plan

    assert reason in einsum_plan(equation, *dims)


TRANSPOSED = {  # (input shape, weight shape, arguments); 6 samples: a per-column Q_b2 of 2
    # samples would be exact (each column's two values are its range's ends)
    "2d_s2_outpad": ((6, 6, 5, 5), (6, 4, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    "1d_dilated": ((6, 6, 7), (6, 4, 3), dict(padding=2, dilation=2)),
    "2d_groups": ((6, 6, 4, 4), (6, 2, 3, 3), dict(stride=2, groups=2)),
    "3d": ((6, 4, 3, 3, 3), (4, 3, 2, 2, 2), dict(stride=2)),
}


@pytest.mark.parametrize("name", sorted(TRANSPOSED))
def test_conv_transpose_qat_gradients_are_straight_through_and_fqt_unbiased(name):
    """fqt_conv_transpose runs the transposed convolution as a convolution's GEMMs with the
    roles exchanged. With exact gradients (QAT) it gives F.conv_transpose on X~ and W~ and its
    straight-through gradients (per-channel weights ranged per output channel, dim 1); with
    FQT gradients their mean over K=100 draws is within 0.25x one draw's error (tolerance as in
    test_every_layout_gives_unbiased_gradients)."""
    from fqt_compile.quantizers import fake_quantize_forward as fq

    x_shape, w_shape, kw = TRANSPOSED[name]
    torch.manual_seed(3)
    x, weight, bias = torch.randn(x_shape), torch.randn(w_shape), torch.randn(w_shape[1] * kw.get("groups", 1))
    fn = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[len(x_shape)]
    exact = QSpec(gi_kind="none", gw_kind="none", b_gran="channel", b_scheme="symmetric")

    def grads(spec):
        ts = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fqt_conv_transpose(*ts, **kw, spec=spec)
        (out * g).sum().backward()
        return out.detach(), [t.grad for t in ts]

    w_fq = fq(weight.transpose(0, 1), 8, "symmetric", "channel", 0).transpose(0, 1)
    ref_in = [fq(x).requires_grad_(), w_fq.clone().requires_grad_(), bias.clone().requires_grad_()]
    ref = fn(*ref_in, **kw)
    g = torch.randn(ref.shape) * torch.logspace(-2, 1, ref.shape[0])[:, *([None] * (ref.dim() - 1))]
    (ref * g).sum().backward()
    out, got = grads(exact)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref_in):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-5)

    spec = exact._replace(gi_kind="psq", gi_bits=4, gw_kind="column", gw_bits=4)
    draws = [grads(spec)[1] for _ in range(100)]
    for i, operand in enumerate(("input", "weight")):
        one = torch.stack([(d[i] - got[i]).norm() for d in draws]).mean()
        mean_err = (torch.stack([d[i] for d in draws]).mean(0) - got[i]).norm()
        assert mean_err < 0.25 * one, f"{operand}: mean error {mean_err:.4g} vs one draw {one:.4g}"


def test_addbmm_is_one_product_over_the_batch():
    """fqt_addbmm: beta * bias + alpha * sum_i a[i] @ b[i], the sum taken by one product whose
    contraction includes the batch; with exact gradients (QAT) torch.addbmm on the quantized
    operands (per-tensor ranges: the same codes however the operands are laid out)."""
    from fqt_compile.functional import fqt_addbmm
    from fqt_compile.quantizers import fake_quantize_forward as fq

    torch.manual_seed(2)
    bias, a, b = torch.randn(5, 6), torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 4, 6, requires_grad=True)
    out = fqt_addbmm(bias, a, b, beta=0.5, alpha=2.0, spec=QSpec(gi_kind="none", gw_kind="none"))
    torch.testing.assert_close(out, torch.addbmm(bias, fq(a.detach()), fq(b.detach()), beta=0.5, alpha=2.0))
    out.sum().backward()
    torch.testing.assert_close(a.grad, 2.0 * torch.ones(5, 6) @ fq(b.detach()).transpose(1, 2))
