import os
import sys

import pytest
import torch

from fqt_compile.backend import MIN_INDUCTOR_TORCH, torch_version
from fqt_compile.gemm import conv_int8_available

# tests import helpers (oracle.py) from this folder
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many calls on tiny tensors: on a busy 2-core machine
    every parallel region (e.g. BHQ's index_add_) waits for the second core, which made BHQ
    calls 40x slower; one thread keeps the runtime predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def import_transformers_or_skip():
    """``transformers`` with its PyTorch models, or a skip: transformers 5 needs torch >= 2.6 and
    disables its models on older torch (the dev extra installs the newest transformers)."""
    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_torch_available():
        pytest.skip(f"transformers {transformers.__version__} does not support torch {torch.__version__}",
                    allow_module_level=True)
    return transformers


#: for tests of what inductor itself does with the fqt graphs: below MIN_INDUCTOR_TORCH the
#: backend compiles with the eager inner compiler (test_backend.py checks that fallback)
needs_inductor_torch = pytest.mark.skipif(
    torch_version() < MIN_INDUCTOR_TORCH, reason="the fqt backend does not use inductor on this torch (MIN_INDUCTOR_TORCH)"
)


#: the kernel lower_int_gemm uses for the test models' 2-D CPU integer GEMMs: aten._int_mm, as
#: they are all below fqt_compile.amx.MIN_MACS (the AMX kernel's lowering is tested with larger
#: products in tests/test_amx.py)
CPU_INT_MM = "aten._int_mm"
#: the same for a lowered convolution's GEMM: fqt::mm_int8 (aten._int_mm on operands inductor
#: must lay out row-major; the im2col columns came out column-major otherwise)
CPU_CONV_INT_MM = "im2col+fqt.mm_int8"
#: whether this CPU runs a convolution's output GEMM (and a stride-1 grad_input) as oneDNN's
#: direct int8 convolution, ``fqt::conv_int8`` (VNNI or AMX: gemm.conv_int8_available), else
#: the im2col GEMM above
CONV_DIRECT = conv_int8_available()
CPU_CONV_OUTPUT = "fqt.conv_int8" if CONV_DIRECT else CPU_CONV_INT_MM


def quantizer_entries(gm) -> list[tuple[str, int, str]]:
    """The quantizers of an aten graph as ``(op, bits, granularity)``, op ``"quantize"`` (forward)
    or ``"sr_quantize"`` (stochastic), whether a quantizer is its own node or part of a fused
    softmax kernel (``passes/fuse_softmax.py``): ``fqt::softmax_quantize`` holds one per-tensor
    forward quantizer (``fqt::gelu_quantize`` too), ``fqt::softmax_backward_sr_quantize`` and ``fqt::gelu_backward_sr_quantize``
    (``passes/fuse_gelu.py``) and ``fqt::sr_quantize_multi`` (``passes/fuse_quantizers.py``) one
    stochastic quantizer per entry of their bits lists."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is torch.ops.fqt.quantize.default:
            out.append(("quantize", n.args[1], n.args[3]))
        elif n.target is torch.ops.fqt.softmax_quantize.default:
            out.append(("quantize", n.args[1], "tensor"))
        elif n.target is torch.ops.fqt.gelu_quantize.default:
            out.append(("quantize", n.args[2], "tensor"))
        elif n.target is torch.ops.fqt.sr_quantize.default:
            out.append(("sr_quantize", n.args[2], n.args[3]))
        elif n.target in (torch.ops.fqt.softmax_backward_sr_quantize.default,
                          torch.ops.fqt.gelu_backward_sr_quantize.default):
            out += [("sr_quantize", b, g) for b, g in zip(n.args[4], n.args[5].split(","))]
        elif n.target is torch.ops.fqt.sr_quantize_multi.default:
            out += [("sr_quantize", b, g) for b, g in zip(n.args[2], n.args[3].split(","))]
    return out
