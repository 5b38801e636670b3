"""Entry points: :func:`compile` (TorchDynamo capture) and :func:`prepare` (symbolic trace).

``compile`` keeps the module itself (``nn.Module.compile``), so ``state_dict()`` keys are the
original ones and checkpoints load either way. ``prepare`` returns an ``fx.GraphModule`` with
the FQT products in it, which trains in eager mode (no compiler needed).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import warnings
import weakref
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .backend import FQTBackend, GraphRecord, resolve_config
from .config import FQTConfig, Mode
from .passes.insert_qdq import InsertResult, insert_qdq

__all__ = ["compile", "prepare", "records", "FQTTraceError", "check_overrides"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Callable[..., Any])


class FQTTraceError(TypeError):
    """``prepare`` could not trace the model with ``torch.fx.symbolic_trace``."""


def check_overrides(model: nn.Module, cfg: FQTConfig) -> list[str]:
    """Warn about override patterns that match no module path of ``model``; returns them."""
    paths = [name for name, _ in model.named_modules(remove_duplicate=False)]  # a module under two names: both
    unmatched = [o.pattern for o in cfg.overrides if not any(o.matches(p) for p in paths)]
    for pattern in unmatched:
        msg = (
            f"fqt_compile: override pattern {pattern!r} matches no module of "
            f"{type(model).__name__} (module paths look like {paths[1:4]})"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)
    return unmatched


_ENTRY_COUNTER = itertools.count()
# compiled model -> its backend. Kept outside the module so that copies (deepcopy, pickle;
# nn.Module drops _compiled_call_impl there) are plain uncompiled modules, not aliases.
_BACKENDS: weakref.WeakKeyDictionary[Any, FQTBackend] = weakref.WeakKeyDictionary()


def untraced_modules(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(path, class name, reason)`` of the submodules that dynamo runs outside the compiled
    graphs, so that their products stay float whatever the config: recurrent layers
    (``nn.LSTM``/``GRU``/``RNN``), unless ``torch._dynamo.config.allow_rnn`` is set (then they
    are one ``torch.lstm``/... call in the graph, which insert_qdq lists in full precision)."""
    if getattr(torch._dynamo.config, "allow_rnn", False):
        return []
    return [(name, type(m).__name__, "recurrent layer: dynamo runs it outside the graphs, in float (a graph "
             "break; torch._dynamo.config.allow_rnn is False)")
            for name, m in model.named_modules() if isinstance(m, nn.RNNBase)]


def _warn_untraced(model: nn.Module) -> None:
    found = untraced_modules(model)
    if found:
        msg = ("fqt_compile: " + ", ".join(f"{path or '<root>'} ({cls})" for path, cls, _ in found)
               + " run in float, unquantized: dynamo does not trace recurrent layers (a graph break "
               "around each call; torch._dynamo.config.allow_rnn is False), and where it cannot resume after "
               "the break it runs the whole frame around them eagerly, its other products unquantized too. "
               "Set torch._dynamo.config.allow_rnn = True to compile the rest: the recurrent layers are then "
               "one call each in the graph, kept in full precision and listed in the records")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)


def _warn_if_nothing_compiled(compiled: Callable[..., Any], backend: FQTBackend, name: str) -> Callable[..., Any]:
    """``compiled``, which after its first call warns if dynamo handed the backend no graph at
    all: then the model ran eagerly, every product in float (dynamo skips a frame it cannot
    resume after a graph break, as around an RNN module on torch 2.11 and 2.13, or dynamo is
    disabled). One flag test per call after that."""
    checked = False

    def fqt_call(*args: Any, **kwargs: Any) -> Any:
        nonlocal checked
        out = compiled(*args, **kwargs)
        if not checked:
            checked = True
            if not backend.records and backend.config.mode is not Mode.OFF:
                msg = (f"fqt_compile: dynamo compiled no graph for {name} on its first call, so the model ran "
                       "eagerly: every product in float, unquantized. Dynamo runs a frame eagerly where it cannot "
                       "resume after a graph break (run with TORCH_LOGS=graph_breaks to see them), or when it "
                       "is disabled")
                warnings.warn(msg, UserWarning, stacklevel=2)
                log.warning(msg)
        return out

    return fqt_call


def _entry_frame(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A wrapper of ``fn`` with a code object of its own (so its own dynamo cache)."""

    def fqt_entry(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    tag = re.sub(r"\W", "_", name)
    fqt_entry.__code__ = fqt_entry.__code__.replace(co_name=f"fqt_entry_{tag}_{next(_ENTRY_COUNTER)}")
    return functools.wraps(fn)(fqt_entry)


def compile(
    model: M,
    config: FQTConfig | str | dict | None = None,
    *,
    dynamic: bool | None = None,
    fullgraph: bool = False,
) -> M:
    """Compile ``model`` with the ``fqt`` backend and ``config`` (an :class:`FQTConfig`, a
    recipe name such as ``"bhq5"``, or a dict). An ``nn.Module`` is compiled in place and
    returned (same object, same ``state_dict``); a function is wrapped with ``torch.compile``.
    What was compiled is available through :func:`records`."""
    cfg = resolve_config(config)
    backend = FQTBackend(cfg)
    if isinstance(model, nn.Module):
        check_overrides(model, cfg)
        _warn_untraced(model)
        # Like nn.Module.compile (the module stays the same object, so state_dict keys are
        # unchanged), but through an entry frame of our own: torch 2.13 skips a bare
        # _call_impl frame, and a shared wrapper (dynamo's wrap_inline) would put every
        # compiled model in one code object's cache, whose recompile limit (8) silently sends
        # the ninth model to eager, unquantized.
        compiled = torch.compile(
            _entry_frame(model._call_impl, type(model).__name__), backend=backend, dynamic=dynamic, fullgraph=fullgraph
        )
        model._compiled_call_impl = _warn_if_nothing_compiled(compiled, backend, type(model).__name__)
        backend.bind(model)
        _BACKENDS[model] = backend
        return model
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    _BACKENDS[compiled] = backend
    return compiled  # type: ignore[return-value]


def records(compiled: Any) -> list[GraphRecord]:
    """The :class:`GraphRecord` of each graph compiled for a model from :func:`compile`."""
    try:
        backend = _BACKENDS.get(compiled)
    except TypeError:  # unhashable / not weak-referenceable
        backend = None
    if backend is None:
        raise ValueError("records(): the object was not compiled by fqt_compile.compile")
    return backend.records


def prepare(
    model: nn.Module,
    config: FQTConfig | str | dict | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx.symbolic_trace`` and insert FQT products.

    The result is an ``nn.Module`` (``fx.GraphModule``) that trains in eager mode.
    ``example_inputs`` (optional) propagate shapes so the decisions record shapes and FLOPs.
    The pass result is at ``gm.meta["fqt_insert"]``.
    Raises :class:`FQTTraceError` naming the cause when the model cannot be traced (e.g.
    data-dependent control flow); :func:`compile` captures such models with TorchDynamo.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() takes an nn.Module, got {type(model).__name__}")
    cfg = resolve_config(config)
    check_overrides(model, cfg)
    try:
        gm = fx.symbolic_trace(model, concrete_args=concrete_args)
    except Exception as e:  # TraceError, TypeError from Proxy.__bool__/__iter__, ...
        raise FQTTraceError(
            f"fqt_compile.prepare: torch.fx.symbolic_trace cannot trace {type(model).__name__}: "
            f"{type(e).__name__}: {e}. Models symbolic tracing cannot handle (data-dependent "
            "control flow, forwards wrapped by decorators that take *args/**kwargs, in-place "
            "item assignment on tensors) need TorchDynamo capture: use "
            "fqt_compile.compile(model, config) or torch.compile(model, backend='fqt')."
        ) from e
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    result: InsertResult = insert_qdq(gm, cfg)
    gm.meta["fqt_insert"] = result
    gm.meta["fqt_config"] = cfg
    return gm
