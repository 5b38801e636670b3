"""fqt_compile: fully quantized training (Chen et al., NeurIPS 2020) as a torch.compile backend.

    model = torch.compile(model, backend="fqt")
    model = fqt_compile.compile(model, fqt_compile.FQTConfig.recipe("bhq5"))
"""

from __future__ import annotations

import logging

from . import ops as _ops  # noqa: F401  (registers the fqt:: custom ops)
from . import cpu
from .cpu import keep_freed_memory
from .config import (
    RECIPES,
    FQTConfig,
    ForwardSpec,
    GradKind,
    GradSpec,
    Granularity,
    InnerCompiler,
    Mode,
    OpKind,
    Override,
    SdpaPolicy,
)
from .backend import FQTBackend, GraphRecord
from .frontend import FQTTraceError, compile, prepare, records
from .inspect import Report, inspect
from .export import export, export_onnx
from .variance import gradient_variance, variance_vs_bits
from .quantizers import (
    dequantize_grad,
    fake_quantize_forward,
    fake_quantize_grad,
    quantize_forward,
    quantize_grad,
)

__version__ = "0.1.0"

__all__ = [
    # config
    "FQTConfig",
    "ForwardSpec",
    "GradSpec",
    "Override",
    "Mode",
    "GradKind",
    "Granularity",
    "OpKind",
    "InnerCompiler",
    "SdpaPolicy",
    "RECIPES",
    # entry points
    "compile",
    "prepare",
    "FQTBackend",
    # tools
    "keep_freed_memory",
    "records",
    "GraphRecord",
    "FQTTraceError",
    "gradient_variance",
    "variance_vs_bits",
    # quantizers
    "quantize_forward",
    "fake_quantize_forward",
    "quantize_grad",
    "dequantize_grad",
    "fake_quantize_grad",
    # inspection and export
    "inspect",
    "Report",
    "export_onnx",
    "export",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
