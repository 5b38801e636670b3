"""One random seed per stochastic quantizer: undo AOTAutograd's merging of seed draws.

Every gradient quantizer draws its own seed (``fqt::new_seed``, one call per quantizer in the
autograd formulas of ``fqt_compile.functional``), so that the quantizers of one backward are
independent: DESIGN.md section 3 requires Q_b1(G) and Q_b2(G) to be independent, and the
quantizers of consecutive layers must be too, or the rounding of a layer's gradient reuses the
uniform draws that produced its input (stochastic rounding is unbiased only for a draw
independent of the value it rounds).

The min-cut partitioner of AOTAutograd (the one inductor uses; the eager inner compiler's
default partitioner does not) runs common-subexpression elimination on the joint graph
(``torch._functorch.compile_utils.fx_graph_cse``), which spares only a fixed list of aten random
ops; it does not read the ``nondeterministic_seeded`` tag of ``fqt::new_seed``. So the backward
that inductor received held *one* ``new_seed(device)`` node feeding every quantizer: every
stochastic rounding of the step used the same seed and, as the draws are keyed by element
index, the same uniform number at the same index. ``fqt_compile.rng`` now exempts the op from
that CSE where torch keeps its list of random ops (``rng.CSE_EXEMPT``); this pass does not
depend on it. It runs first among the backend's aten passes and gives every consumer after the
first a new ``new_seed`` node of its own, inserted right before it (so the draw order follows
the graph order, and runs stay reproducible under ``torch.manual_seed``). A seed that the
forward also hands to the backward (the seed of ``fqt::dropout``, whose backward recomputes
the same mask) is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from ..rng import new_seed  # noqa: F401  (registers fqt::new_seed)

__all__ = ["split_seeds"]

log = logging.getLogger(__name__)


def _is_seed(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.fqt.new_seed.default


def split_seeds(gm: fx.GraphModule, cfg: Any = None, kind: str | None = None) -> dict[str, int]:
    """Give each consumer of a ``fqt::new_seed`` node a seed node of its own, in place.

    Returns ``{"seeds": n, "added": k}``: the seed nodes in the graph afterwards and how many
    of them this pass added (``cfg`` and ``kind`` are unused: the signature of an aten pass)."""
    graph = gm.graph
    added = 0
    for node in [n for n in graph.nodes if _is_seed(n)]:
        users = list(node.users)
        if any(u.op == "output" for u in users):
            # a forward seed saved for the backward (``fqt::dropout`` recomputes its mask there
            # from it): the forward's consumers must read the very seed the backward gets
            if sum(u.op != "output" for u in users) > 1:
                log.warning("split_seeds: %d ops share seed %s, which the backward reads too; left shared",
                            sum(u.op != "output" for u in users), node.name)
            continue
        for user in users[1:]:
            with graph.inserting_before(user):
                fresh = graph.call_function(node.target, node.args, node.kwargs)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                # a fake tensor of its own (no two nodes share one value object)
                fresh.meta["val"] = torch.empty_like(val)
            user.replace_input_with(node, fresh)
            added += 1
    if added:
        graph.lint()
        gm.recompile()
    return {"seeds": sum(1 for n in graph.nodes if _is_seed(n)), "added": added}
