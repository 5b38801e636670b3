"""keep_codes: a recompute region keeps the int8 codes of the values it reads from outside.

``config.sdpa="recompute"`` and ``config.recompute_mlp`` tag torch-level nodes with the tags
activation checkpointing uses (``insert_qdq._tag_for_recompute``); AOTAutograd copies them onto
every aten node traced from those nodes, and its partitioner recomputes those nodes in the
backward. That includes the forward quantizers (``fqt::quantize``) of the region's inputs: the
attention's q, k and v, fc1's input. Left alone, the partitioner keeps each input as the float
tensor and quantizes it again in the backward. But the backward needs those codes anyway (the
grad_input and grad_weight GEMMs read the forward's int8 codes of the other operand), they are
a quarter of the float bytes, and re-quantizing costs a pass over the float tensor (a range
reduction for per-tensor scales, then the rounding). So this pass, run on the joint graph
before the partition, marks each such quantizer ``MUST_SAVE``: its codes, scale and offset
are saved, the rest of the region (the score GEMM, the softmax and the quantizer of its output;
fc1's GEMM and its activation) is still recomputed from them. The quantizers round to nearest, so
the values are the same either way; what changes is what the step keeps and recomputes.

A quantizer is taken when it lies in one of insert_qdq's recompute regions (``ac_graph_id`` at
least ``FQT_AC_ID_BASE``: a user's own ``torch.utils.checkpoint`` regions keep their meaning)
and its input, followed back through views, is neither recomputed itself nor a graph input
that outlives the step anyway (a parameter, a buffer, the batch: quantizing it again costs no
activation memory). A graph input that is an activation of an earlier graph (after a graph
break: the backend passes the positions of the inputs with a ``grad_fn``, ``activations``)
counts as a value from outside: saved as a float, it would be kept alive by this graph's
backward alone. A seed drawn in such a region
(``fqt::new_seed`` of the attention dropout) is saved too: drawn again, it would give the
recomputed attention another dropout mask than the forward's; so is an ``fqt::new_seed`` in a
user's ``torch.utils.checkpoint`` region (quantized attention inside one).

Installed by the backend: on inductor as ``torch._inductor.config.joint_custom_pre_pass``
(:class:`KeepCodesJointPass`, chained with a pass the user set there), with the eager inner
compiler in the partition function (:func:`partition_keeping_codes`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ..ops import quantize  # noqa: F401  (registers fqt::quantize)

__all__ = ["FQT_AC_ID_BASE", "KeepCodesJointPass", "activation_inputs", "keep_codes", "partition_keeping_codes"]

log = logging.getLogger(__name__)

#: insert_qdq numbers its recompute regions (``ac_graph_id``) from here, above the ids that
#: dynamo gives ``torch.utils.checkpoint`` regions (counted from 1 per graph).
FQT_AC_ID_BASE = 1 << 40

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)

#: the pass's cache identity for inductor: this file's contents
_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _recomputed(node: fx.Node) -> bool:
    return node.meta.get("recompute") in _RECOMPUTE


def _in_fqt_region(node: fx.Node) -> bool:
    ac_id = node.meta.get("ac_graph_id")
    return _recomputed(node) and isinstance(ac_id, int) and ac_id >= FQT_AC_ID_BASE


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and bool(getattr(node.target, "is_view", False))  # aten OpOverloads


def _source(node: Any) -> Any:
    """``node`` followed back through recomputed views (the region's own transposes and
    reshapes of its input)."""
    while isinstance(node, fx.Node) and _recomputed(node) and _is_view(node) and node.args:
        node = node.args[0]
    return node


def _activation_placeholders(graph: fx.Graph, activations: Collection[int], n_inputs: int | None) -> set[fx.Node]:
    """The joint graph's placeholders for the forward inputs at positions ``activations``:
    AOTAutograd's primals, in the order of the inputs the backend received, when there are
    ``n_inputs`` of them (duplicate or aliased inputs, or tensor subclasses, change the count;
    then none is taken, and those inputs are treated as before: re-quantized)."""
    if not activations:
        return set()
    primals = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    if len(primals) != n_inputs:
        log.debug("keep_codes: %d primals for %s inputs; graph inputs are not told apart", len(primals), n_inputs)
        return set()
    return {primals[i] for i in activations if 0 <= i < len(primals)}


def keep_codes(graph: fx.Graph, activations: Collection[int] = (), n_inputs: int | None = None) -> dict[str, int]:
    """Mark the region-input quantizers of insert_qdq's recompute regions ``MUST_SAVE``, in
    place (node metadata only), and the seeds drawn in them. ``activations``: positions, among
    the graph's ``n_inputs`` forward inputs, of activations of earlier graphs (their quantizers
    keep their codes like those of values computed in this graph). Returns ``{"kept": n,
    "recomputed": m, "seeds": k}``: quantizers whose codes are now saved, the other quantizers
    in those regions (recomputed), and the seeds saved."""
    q_op = torch.ops.fqt.quantize.default
    outside = _activation_placeholders(graph, activations, n_inputs)
    kept = recomputed = seeds = 0
    new_seed = torch.ops.fqt.new_seed.default
    for node in graph.nodes:
        if node.op == "call_function" and node.target is new_seed and _recomputed(node) and not _in_fqt_region(node):
            # a seed drawn in a user's torch.utils.checkpoint region (quantized attention's
            # dropout there): saved too, for the same mask in the recomputation (AOTAutograd's
            # replay of the random state does not take our op: its device is an argument)
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            seeds += 1
            continue
        if node.op != "call_function" or not _in_fqt_region(node):
            continue
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            # a seed drawn in the region (the attention dropout's, fqt::dropout): drawing it
            # again in the backward would give another mask; saved, the mask is recomputed
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            seeds += 1
            continue
        if node.target is not q_op:
            continue
        src = _source(node.args[0])
        if (not isinstance(src, fx.Node) or (src.op in ("placeholder", "get_attr") and src not in outside)
                or _recomputed(src)):
            recomputed += 1
            continue
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        # the partitioners save the getitems of a multi-output op, not the tuple
        for user in node.users:
            user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        kept += 1
    if kept or recomputed or seeds:
        log.info("keep_codes: %d region-input quantizers keep their codes, %d recomputed, %d seeds saved",
                 kept, recomputed, seeds)
    return {"kept": kept, "recomputed": recomputed, "seeds": seeds}


try:  # torch >= 2.5: inductor keys its FX graph cache on the pass's uuid()
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:  # pragma: no cover - older torch: a plain callable is what inductor takes
    _PassBase = object  # type: ignore[assignment,misc]


class KeepCodesJointPass(_PassBase):  # type: ignore[misc,valid-type]
    """:func:`keep_codes` as inductor's ``joint_custom_pre_pass``, followed by ``then`` (what was
    set there before: a pass, a list of passes, or None); ``on_result`` receives each result
    (the backend's graph record); ``example_inputs``: the compiled graph's inputs, whose
    activations of earlier graphs keep their codes (:func:`activation_inputs`)."""

    def __init__(self, then: Any = None, on_result: Callable[[dict[str, int]], None] | None = None,
                 example_inputs: Sequence[Any] | None = None) -> None:
        self.then: tuple[Callable[[fx.Graph], Any], ...] = (
            () if then is None else tuple(then) if isinstance(then, (list, tuple)) else (then,)
        )
        self.on_result = on_result
        self.activations = activation_inputs(example_inputs or ())
        self.n_inputs = None if example_inputs is None else len(example_inputs)

    def __call__(self, graph: fx.Graph) -> None:
        result = keep_codes(graph, self.activations, self.n_inputs)
        if self.on_result is not None:
            self.on_result(result)
        for p in self.then:
            p(graph)

    def uuid(self) -> Any:
        ids = [p.uuid() if callable(getattr(p, "uuid", None)) else None for p in self.then]
        if any(i is None for i in ids):
            return None  # a chained pass without an id: inductor does not cache (as without us)
        return (_SOURCE_HASH, *ids)


def activation_inputs(example_inputs: Sequence[Any]) -> tuple[int, ...]:
    """Positions of the inputs that are activations of an earlier autograd graph (tensors with
    a ``grad_fn``: what a graph break hands the next graph), as opposed to parameters, buffers
    and data, which live through the step whatever the backward saves."""
    return tuple(i for i, x in enumerate(example_inputs)
                 if isinstance(x, torch.Tensor) and getattr(x, "grad_fn", None) is not None)


def partition_keeping_codes(on_result: Callable[[dict[str, int]], None] | None = None,
                            example_inputs: Sequence[Any] | None = None) -> Callable[..., Any]:
    """AOTAutograd's default partition function (the eager inner compiler's) after
    :func:`keep_codes` on the joint graph (``example_inputs``: as for :class:`KeepCodesJointPass`)."""
    from torch._functorch.partitioners import default_partition

    activations = activation_inputs(example_inputs or ())
    n_inputs = None if example_inputs is None else len(example_inputs)

    def partition(joint_module: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        result = keep_codes(joint_module.graph, activations, n_inputs)
        if on_result is not None:
            on_result(result)
        return default_partition(joint_module, joint_inputs, **kwargs)

    return partition
