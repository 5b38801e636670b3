"""Compute a recomputed softmax once in the backward: store it instead of re-deriving it in
every kernel that reads it.

With ``config.sdpa="recompute"`` AOTAutograd's partitioner recomputes the attention in the
backward: the int32 scores, their dequantized form, the mask, the softmax P. P there is not a
graph output, so inductor treats it as a pointwise expression (``exp(s - max) / sum``) and
inlines it, with the score dequantization and the mask under it, into every loop that reads
it: the range pass and the rounding pass of P's quantizer (for ``dV = Q(P)^T dO``) and the
softmax backward's passes (``P * (dP - rowsum(dP * P))``). In a GPT block step (d 1024, 16
heads, batch 8 x 512) that made five softmax kernels of 350 ms together, against 117 ms for
the softmax backward of the default configuration, which reads the P saved by the forward.

This pass wraps each such softmax output in ``prims.inductor_force_stride_order`` (with the
strides it has), an identity that inductor lowers by *realizing* its input: P is written once
by one kernel and read by the others (three kernels, 116 ms in the same profile). The values
are the same (the same expression, evaluated once); the memory saved by recomputing is kept,
as the stored P lives only inside the backward.

Runs on backward graphs compiled by inductor only (the eager inner compiler runs the aten
ops as they are, and the prim's eager form would copy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..config import InnerCompiler

__all__ = ["materialize_softmax", "softmax_outputs"]

aten = torch.ops.aten


def _force_stride_order() -> Any:
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

    return torch.ops.prims.inductor_force_stride_order.default


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_softmax(node: fx.Node) -> bool:
    """``aten._softmax`` or its decomposition ``exp(x - amax(x)) / sum(exp(x - amax(x)))``."""
    if _is(node, aten._softmax.default):
        return True
    if not _is(node, aten.div.Tensor) or len(node.args) != 2:
        return False
    num, den = node.args
    if not (_is(num, aten.exp.default) and _is(den, aten.sum.dim_IntList) and den.args[0] is num):
        return False
    sub = num.args[0]
    return _is(sub, aten.sub.Tensor) and _is(sub.args[1], aten.amax.default)


def softmax_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The softmax outputs of ``gm`` that more than one node reads."""
    return [n for n in gm.graph.nodes if _is_softmax(n) and len(n.users) > 1]


def materialize_softmax(gm: fx.GraphModule, cfg: Any = None, kind: str | None = None) -> dict[str, Any]:
    """Route the readers of each multiply-read softmax in a backward graph through
    ``prims.inductor_force_stride_order`` so inductor stores it once, in place.

    Returns ``{"softmax": n}`` (outputs wrapped) or ``{"skipped": reason}``."""
    if kind != "backward":
        return {"skipped": f"{kind} graph (only backward graphs recompute a softmax)"}
    if cfg is not None and getattr(cfg, "compiler", InnerCompiler.INDUCTOR) is not InnerCompiler.INDUCTOR:
        return {"skipped": "eager inner compiler (nothing inlines the softmax)"}
    graph = gm.graph
    nodes = softmax_outputs(gm)
    for node in nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        with graph.inserting_after(node):
            stored = graph.call_function(_force_stride_order(), (node, list(val.stride())))
        stored.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        stored.meta["fqt_materialized"] = node.name  # the softmax this node stores
        node.replace_all_uses_with(stored, delete_user_cb=lambda user: user is not stored)
    if nodes:
        graph.lint()
        gm.recompile()
    return {"softmax": len(nodes)}
