"""fqt_compile/amx.py: the AMX int8 GEMM equals torch._int_mm bit for bit (integer arithmetic),
for every operand layout the lowering hands it, and it can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fqt_compile
from fqt_compile import FQTConfig, amx

from conftest import needs_inductor_torch

needs_amx = pytest.mark.skipif(not amx.available(), reason=f"AMX kernel {amx.status()}")

SHAPES = [  # (M, K, N): aligned, and every padding case (M % 32, K % 64, N % 32)
    (64, 128, 64), (96, 64, 32), (33, 70, 50), (1, 8, 1), (512, 64, 512), (128, 1000, 96),
]


def _ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a.contiguous(), b.contiguous()) if a.shape[0] > 16 else (a.int() @ b.int())


@needs_amx
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("layout", ["rowmajor", "b_transposed", "a_transposed", "b_strided", "a_row_stride"])
def test_amx_gemm_is_exact(m, k, n, layout):
    torch.manual_seed(m * 7 + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    if layout == "b_transposed":  # a weight: (N, K) storage, K contiguous
        b = b.t().contiguous().t()
    elif layout == "a_transposed":  # grad_weight's Q_b2(G)^T: M contiguous
        a = a.t().contiguous().t()
    elif layout == "a_row_stride":  # K contiguous, rows further apart than K (a column slice)
        a = torch.randint(-128, 128, (m, k + 64), dtype=torch.int8)[:, 32:32 + k]
    elif layout == "b_strided":  # neither dimension contiguous: the generic packing loop
        b = torch.randint(-128, 128, (k, 2 * n), dtype=torch.int8)[:, ::2]
    out = torch.ops.fqt.int_mm_amx(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n) and out.is_contiguous()
    assert torch.equal(out, (a.int() @ b.int()))
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        assert torch.equal(out, _ref(a, b))


@needs_amx
def test_amx_batched_gemm_is_exact_with_transposed_operands():
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (6, 64, 96), dtype=torch.int8)
    b = torch.randint(-128, 128, (6, 96, 40), dtype=torch.int8)
    exact = torch.bmm(a.int(), b.int())
    assert torch.equal(torch.ops.fqt.int_mm_amx(a, b), exact)
    at = a.transpose(1, 2).contiguous().transpose(1, 2)  # K-major entries (attention's P^T, dS^T)
    bt = b.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(torch.ops.fqt.int_mm_amx(at, bt), exact)
    # K-major entries that need padding (M = 80, K = 208) are copied row-major first; aligned
    # ones (M = 96, K = 128) are transposed as the kernel packs them, 16 x 32 bytes at a time
    for m, k in ((80, 208), (96, 128)):
        a = torch.randint(-128, 128, (3, m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (3, k, 32), dtype=torch.int8)
        at = a.transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(torch.ops.fqt.int_mm_amx(at, b), torch.bmm(a.int(), b.int()))
    # more entries than threads, and a row stride larger than K (a slice of a wider tensor)
    a = torch.randint(-128, 128, (7, 64, 256), dtype=torch.int8)[:, :, :128]
    b = torch.randint(-128, 128, (7, 128, 64), dtype=torch.int8)
    assert torch.equal(torch.ops.fqt.int_mm_amx(a, b), torch.bmm(a.int(), b.int()))
    # 2-D, K-major, both threads' row ranges and two 512-column panels of B (K = 2048)
    a = torch.randint(-128, 128, (2048, 256), dtype=torch.int8).t()
    b = torch.randint(-128, 128, (2048, 640), dtype=torch.int8)
    assert torch.equal(torch.ops.fqt.int_mm_amx(a, b), torch._int_mm(a.contiguous(), b))
    # int32 accumulation at the largest int32-safe K for int8 codes stays exact
    k = 2**31 // 2**14 - 64
    big_a = torch.full((32, k), -128, dtype=torch.int8)
    big_b = torch.full((k, 32), -128, dtype=torch.int8)
    assert torch.equal(torch.ops.fqt.int_mm_amx(big_a, big_b), torch.full((32, 32), k * 2**14, dtype=torch.int32))


def test_bad_operands_are_refused():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="contraction sizes differ"):
        torch.ops.fqt.int_mm_amx(a, torch.zeros(7, 4, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8 operands only"):
        torch.ops.fqt.int_mm_amx(a.float(), torch.zeros(8, 4))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.fqt.int_mm_amx(torch.empty(3, 5, 64, dtype=torch.int8), torch.empty(3, 64, 7, dtype=torch.int8))
    assert out.shape == (3, 5, 7) and out.dtype == torch.int32


def test_fqt_amx_0_turns_it_off():
    """With FQT_AMX=0 the op computes the same through torch._int_mm and the lowering pass
    picks aten._int_mm (the kernel name the inspection report shows)."""
    code = (
        "import torch, torch.nn as nn, fqt_compile\n"
        "from fqt_compile import amx, FQTConfig\n"
        "assert not amx.available() and amx.status() == 'off (FQT_AMX=0)', amx.status()\n"
        "a = torch.randint(-128, 128, (40, 64), dtype=torch.int8); b = torch.randint(-128, 128, (64, 24), dtype=torch.int8)\n"
        "assert torch.equal(torch.ops.fqt.int_mm_amx(a, b), a.int() @ b.int())\n"
        "m = fqt_compile.compile(nn.Linear(32, 16), FQTConfig(compiler='eager'))\n"
        "m(torch.randn(24, 32)).sum().backward()\n"
        "low = dict(fqt_compile.records(m)[0].aten_passes['forward'])['lower_int_gemm']\n"
        "print(sorted({d.kernel for d in low.decisions}))\n"
    )
    env = {**os.environ, "FQT_AMX": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['aten._int_mm']"


def test_status_says_why():
    s = amx.status()
    assert s == "in use (AMX-INT8)" if amx.available() else s.startswith(("off", "not available"))


@needs_amx
@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=needs_inductor_torch)])
def test_lowering_uses_amx_for_large_products_and_matches_the_simulated_graph(compiler):
    """A 512 x 256 x 256 linear layer (2^25 multiply-adds per GEMM, amx.MIN_MACS) lowers all
    three GEMMs to the AMX kernel; a small one keeps aten._int_mm. The lowered step gives the
    simulated step's output and gradients (same seeds) to float rounding."""
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    results = {}
    for lower in (True, False):
        torch.manual_seed(1)
        lin = torch.nn.Linear(256, 256)
        model = fqt_compile.compile(lin, FQTConfig(compiler=compiler, lower_int_gemm=lower))
        torch.manual_seed(2)
        out = model(x)
        out.square().mean().backward()
        results[lower] = (out.detach(), lin.weight.grad.clone(), fqt_compile.records(model)[0])
    rec = results[True][2]
    kernels = {d.gemm: d.kernel for k in ("forward", "backward")
               for d in dict(rec.aten_passes[k])["lower_int_gemm"].decisions}
    assert kernels == {"output": "fqt.int_mm_amx", "grad_weight": "fqt.int_mm_amx"}  # x needs no grad
    for got, want in zip(results[True][:2], results[False][:2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert amx.suits(1, 512, 256, 256) and not amx.suits(1, 8, 64, 32) and not amx.suits(1, 512, 288, 256)
