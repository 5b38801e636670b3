"""fqt_compile.gemm: the direct integer convolution ``fqt::conv_int8`` (oneDNN).

Its results are integers (the int32 sums of int8 code products, returned as float32), so the
tests compare them exactly with a float64 convolution of the same codes: float64 holds every
such sum exactly (|sum| <= K * 128 * 128 < 2^53), and float32 holds it exactly up to 2^24, which
the extreme-code case below goes beyond on purpose (its sums reach ~1.5e8, where the float32
spacing is 8 or 16; the op's float32 result is the exact int32 value rounded once, which the
float64 reference rounded to float32 reproduces bit for bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fqt_compile import gemm
from fqt_compile.gemm import CONV_INT8_MAX_K, conv_int8_available, shift_codes

pytestmark = pytest.mark.skipif(not conv_int8_available(), reason="oneDNN's int8 convolution is not exact on this CPU")

# (input shape, weight shape, stride, padding, dilation)
GEOMETRIES = {
    "3x3_pad1": ((2, 16, 9, 9), (8, 16, 3, 3), [1, 1], [1, 1], [1, 1]),
    "stride2_tail": ((2, 8, 10, 10), (6, 8, 3, 3), [2, 2], [1, 1], [1, 1]),
    "asym_dilated": ((3, 5, 7, 11), (4, 5, 2, 3), [1, 2], [0, 3], [2, 1]),
    "1x1": ((2, 32, 5, 5), (7, 32, 1, 1), [1, 1], [0, 0], [1, 1]),
    "1d_as_2d": ((3, 8, 1, 11), (6, 8, 1, 3), [1, 1], [0, 2], [1, 2]),
    "stem_one_channel": ((2, 1, 12, 12), (16, 1, 3, 3), [1, 1], [1, 1], [1, 1]),
}


def _codes(shape: tuple[int, ...], g: torch.Generator, low: int = -128, high: int = 128) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=g, dtype=torch.int8)


def _reference(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """(B, Ho, Wo, O), as the op returns it."""
    return F.conv2d(x.double(), w.double(), None, stride, padding, dilation).float().permute(0, 2, 3, 1)


def conv_int8(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """The op on (B, C, H, W) int8 codes, as the lowering pass calls it."""
    return torch.ops.fqt.conv_int8(shift_codes(x), w, stride, padding, dilation)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_conv_int8_equals_the_convolution_of_the_codes(name):
    """Random codes over the whole int8 range, with code 0 in the zero padding (the codes go
    in shifted to uint8 with zero point 128: a padded entry must still count as 0)."""
    xs, ws, stride, padding, dilation = GEOMETRIES[name]
    g = torch.Generator().manual_seed(0)
    x, w = _codes(xs, g), _codes(ws, g)
    got = conv_int8(x, w, stride, padding, dilation)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, _reference(x, w, stride, padding, dilation)), name


def test_conv_int8_is_exact_at_the_extreme_codes():
    """Every input code -128 and every weight code -128 (or +127): the largest |sums| oneDNN's
    uint8 x int8 arithmetic meets, K = 9216 channel-positions (sums 1.5e8), within
    CONV_INT8_MAX_K; a saturating 16-bit pairwise product (CPUs without VNNI) would fail here."""
    c, k = 1024, 3
    assert c * k * k <= CONV_INT8_MAX_K
    x = torch.full((1, c, 4, 4), -128, dtype=torch.int8)
    for wv in (-128, 127):
        w = torch.full((2, c, k, k), wv, dtype=torch.int8)
        w[1, ::2] = -wv - (wv < 0)  # mixed signs in the second filter
        got = conv_int8(x, w, [1, 1], [1, 1], [1, 1])
        ref = _reference(x, w, [1, 1], [1, 1], [1, 1])
        assert ref.abs().max() > 2**27
        assert torch.equal(got, ref), wv


def test_conv_int8_rejects_bad_operands():
    x, w = torch.zeros(1, 4, 5, 5, dtype=torch.int8), torch.zeros(3, 4, 3, 3, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="uint8 shifted codes"):
        torch.ops.fqt.conv_int8(x.permute(0, 2, 3, 1), w, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="operands"):
        conv_int8(x, w[:, :3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="2-D geometry"):
        conv_int8(x, w, [1], [1], [1])


def test_conv_int8_passes_opcheck():
    """Schema, fake implementation ((B, Ho, Wo, O) float32) and dispatch."""
    g = torch.Generator().manual_seed(1)
    for xs, ws, stride, padding, dilation in GEOMETRIES.values():
        opcheck(torch.ops.fqt.conv_int8.default, (shift_codes(_codes(xs, g)), _codes(ws, g), stride, padding, dilation))


def test_the_self_test_runs_under_fake_tensor_mode_and_catches_wrong_sums(monkeypatch):
    """conv_int8_available() runs one real convolution the first time the lowering pass asks,
    which is while AOTAutograd traces with fake tensors: the self-test leaves that mode. It
    rejects an op whose sums are off by one, or that raises (an op signature this torch does
    not have)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert gemm._conv_int8_self_test() == ""
    real = gemm.conv_int8
    monkeypatch.setattr(gemm, "conv_int8", lambda *a: real(*a) + 1)
    assert "differ from the exact ones" in gemm._conv_int8_self_test()

    def boom(*a):
        raise RuntimeError("no such overload")

    monkeypatch.setattr(gemm, "conv_int8", boom)
    assert "self-test failed: RuntimeError: no such overload" in gemm._conv_int8_self_test()
