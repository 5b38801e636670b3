"""CUDA checks (skipped without a GPU): the lowering on cuBLASLt shapes, and a compiled step.

Run on a lent GPU through benchmarks/gpu_check.sh."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import fqt_compile
from fqt_compile import FQTConfig, GradSpec
from fqt_compile.models import TransformerBlock

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("m, k, n", [(5, 7, 3), (17, 24, 40), (64, 1000, 24)])
def test_int_mm_pads_to_cublaslt_shapes_and_is_exact(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, device="cuda")
    exact = (a.double() @ b.double()).float()
    assert torch.equal(torch.ops.fqt.int_mm(a, b, 10**6), exact)
    assert torch.equal(torch.ops.fqt.int_mm(a, b, 9), exact)
    a3, b3 = a.expand(2, m, k), b.expand(2, k, n)  # batched, int32 out, padded per entry
    assert torch.equal(torch.ops.fqt.bmm_int8(a3, b3), exact.to(torch.int32).expand(2, m, n))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_lowered_step_matches_simulated_on_cuda(compiler):
    torch.manual_seed(0)
    base = TransformerBlock(64, 4).cuda()
    x = torch.randn(2, 16, 64, device="cuda")
    cfg = FQTConfig.recipe("psq8", compiler=compiler)
    outs = []
    for c in (cfg, dataclasses.replace(cfg, lower_int_gemm=False)):
        m = TransformerBlock(64, 4).cuda()
        m.load_state_dict(base.state_dict())
        fqt_compile.compile(m, c)
        torch.manual_seed(1)
        y = m(x)
        y.square().mean().backward()
        outs.append((y.detach(), m.fc1.weight.grad.clone(), fqt_compile.records(m)[0]))
    (y_l, g_l, rec), (y_s, g_s, _) = outs
    torch.testing.assert_close(y_l, y_s, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(g_l).all() and g_l.norm() > 0
    low = [r for k in ("forward", "backward") for name, r in rec.aten_passes[k] if name == "lower_int_gemm"]
    assert sum(len(r.lowered) for r in low) == 6 + 12
    if compiler == "eager":  # same draws only where the seeds come from the same generator
        torch.testing.assert_close(g_l, g_s, rtol=1e-3, atol=1e-4)


def _conv_lowered_vs_simulated(make, shape, device):
    """One convolution module run with lowering on and off from the same seeds (one product
    per graph, so both draw the same codes); returns the decisions of the lowered run, after
    checking that the output and every gradient agree to 1e-5 of each tensor's scale."""
    cfg = FQTConfig(grad_input=GradSpec("psq", 8), grad_weight=GradSpec("ptq", 8), compiler="eager")
    torch.manual_seed(0)
    base, x = make().to(device), torch.randn(*shape, device=device)
    runs = []
    for c in (cfg, dataclasses.replace(cfg, lower_int_gemm=False)):
        m, xi = copy.deepcopy(base), x.clone().requires_grad_()
        fqt_compile.compile(m, c)
        torch.manual_seed(5)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        runs.append([y.detach(), xi.grad, *(p.grad for p in m.parameters()), fqt_compile.records(m)[-1]])
    for a, b in zip(runs[0][:-1], runs[1][:-1]):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) < 1e-5
    rec = runs[0][-1]
    return [d for k in ("forward", "backward") for name, r in rec.aten_passes[k] if name == "lower_int_gemm"
            for d in r.decisions]


def test_conv_lowering_matches_simulated_on_cuda(monkeypatch):
    """Convolutions on CUDA lower through im2col + fqt::int_mm (oneDNN's direct int8
    convolution is CPU only), a strided grad_input (a stride-2 transposed convolution's output)
    as its phases' stride-1 convolutions: the same values as the simulated float convolutions
    (TF32 off) from the same codes. The speed rules are off, as these shapes are small."""
    import fqt_compile.passes.lower_int_gemm as lig

    monkeypatch.setattr(lig, "CONV_RULE", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for make, shape in ((lambda: nn.Conv2d(8, 6, 3, padding=1, stride=2), (3, 8, 10, 10)),
                        (lambda: nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), (3, 8, 5, 5))):
        decisions = _conv_lowered_vs_simulated(make, shape, "cuda")
        assert len(decisions) == 3 and all(d.lowered for d in decisions), [(d.gemm, d.reason) for d in decisions]
        kernels = {d.gemm: d.kernel for d in decisions}
        strided = "output" if isinstance(make(), nn.ConvTranspose2d) else "grad_input"
        assert kernels[strided] == "phases+im2col+fqt.int_mm", kernels
        assert all(k == "im2col+fqt.int_mm" for g, k in kernels.items() if g != strided), kernels


def test_counter_dropout_on_cuda_matches_the_cpu_mask_and_saves_a_seed():
    """fqt::dropout on CUDA: the mask is the same function of (seed, index) as on the CPU, the
    inlined (inductor) form equals the op, and a compiled block with attention and residual
    dropout keeps a seed, no bool mask, for its backward."""
    x = torch.randn(4, 8, 64, 64)
    seed = torch.tensor(12345)
    ref = torch.ops.fqt.dropout(x, seed, 0.2)
    assert torch.equal(torch.ops.fqt.dropout(x.cuda(), seed.cuda(), 0.2).cpu(), ref)
    torch.manual_seed(0)
    m = TransformerBlock(64, 4, dropout=0.2, resid_dropout=0.1).cuda()
    fqt_compile.compile(m, FQTConfig())
    y = m(torch.randn(2, 16, 64, device="cuda"))
    y.square().mean().backward()
    rec = fqt_compile.records(m)[0]
    assert rec.insert.counter_dropouts == 2
    assert sum(n.target is torch.ops.fqt.dropout.default for n in rec.backward.graph.nodes) == 3
    saved = [n.meta["val"] for n in rec.backward.graph.nodes if n.op == "placeholder"]
    assert not any(v.dtype == torch.bool for v in saved)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
