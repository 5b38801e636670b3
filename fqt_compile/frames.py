"""Which module a dynamo graph was compiled for, and which instances it serves.

After a graph break inside a submodule's ``forward``, dynamo compiles the rest of that forward
as a frame of its own, whose ``self`` is the submodule: the graph's module paths are relative
to it (``b`` for ``enc.b``), and since parameters are graph inputs, not guarded by identity,
one compiled graph may run for every instance of that class (``enc`` and ``dec``). Overrides
are matched on full module paths, so the backend must know the frame's path, and where the
overrides treat the instances differently, compile one variant per group of instances that
the overrides treat alike and pick the variant at each call from the parameters passed in.

The frame's path comes from the parameters: a placeholder's dynamo source names its path from
the frame's ``self`` (``L['self']._modules['a']._parameters['weight']`` -> ``a.weight``), and
the example input is the parameter itself, whose full name the compiled model knows
(``enc.a.weight``); the difference is the prefix (``enc``).
"""

from __future__ import annotations

import logging
import re
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx
import torch.nn as nn

from .config import FQTConfig
from .passes.insert_qdq import _normalize_path, join_path, module_path_of

log = logging.getLogger(__name__)

__all__ = ["Frame", "frame_of", "instance_groups", "distinguishing_param", "InstanceDispatch"]


@dataclass(frozen=True)
class Frame:
    """The module a graph's frame belongs to: ``prefix`` its path in the compiled model ("" for
    the model itself); ``params`` the graph's parameter inputs, as (position among the graph's
    inputs, path relative to the frame's module); ``aliases`` other paths the parameters fit
    equally (parameters tied between instances, such as T5's shared embedding, cannot tell
    them apart)."""

    prefix: str
    params: tuple[tuple[int, str], ...]
    aliases: tuple[str, ...] = ()


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = getattr(source, "name", None)
    if callable(name):  # a method on older torch
        name = name()
    return name if isinstance(name, str) else None


def _relative_param_path(source: str) -> str:
    path = _normalize_path(source)
    return re.sub(r"(?:^|\.)_(?:parameters|buffers)(?=\.)", "", path).strip(".")


def _split(full: str, relative: str) -> str | None:
    """``full`` minus ``relative`` at its end (a whole path component), or None."""
    if full == relative:
        return ""
    if relative and full.endswith("." + relative):
        return full[: -len(relative) - 1]
    return None


def frame_of(gm: fx.GraphModule, example_inputs: Sequence[Any], model: nn.Module) -> Frame | None:
    """The :class:`Frame` of a dynamo graph of ``model``, or None where its parameters do not
    tell (no parameter inputs, sources that do not name a path, or no path that fits them
    all)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    fits: set[str] | None = None
    params: list[tuple[int, str]] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, nn.Parameter) or id(value) not in names:
            continue
        source = _source_name(node)
        if source is None:
            continue
        relative = _relative_param_path(source)
        found = {p for p in (_split(full, relative) for full in names[id(value)]) if p is not None}
        if not found:
            continue
        fits = found if fits is None else fits & found
        params.append((i, relative))
    if not fits:
        if fits is not None:
            log.debug("frame_of: no module path fits all the graph's parameters")
        return None
    # the model's own frame wins a tie (its paths are as written); else the first path
    ordered = sorted(fits, key=lambda p: (p != "", p))
    return Frame(ordered[0], tuple(params), tuple(ordered[1:]))


def _module_paths(gm: fx.GraphModule) -> list[str]:
    """The module paths the graph's calls name, those in the bodies of its higher-order ops
    (a checkpoint region's) included."""
    out: set[str] = set()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            out.add(module_path_of(n))
        elif n.op == "get_attr" and isinstance(body := getattr(gm, str(n.target), None), fx.GraphModule):
            out.update(_module_paths(body))
    return sorted(out)


def instance_groups(gm: fx.GraphModule, cfg: FQTConfig, model: nn.Module, frame: Frame) -> list[tuple[str, ...]]:
    """The instances of the frame's module class in ``model`` that this graph can run for
    (every module and parameter it names exists in them), grouped by the overrides that match
    their modules' paths in this graph; the frame's own group first. One group: one compiled
    graph serves them all."""
    try:
        own = model.get_submodule(frame.prefix)
    except AttributeError:
        return [(frame.prefix,)]
    relative = _module_paths(gm)
    paths = {name for name, _ in model.named_modules(remove_duplicate=False)}
    groups: dict[tuple[tuple[str, ...], ...], list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, type(own)) or not all(join_path(path, r) in paths for r in relative):
            continue
        try:
            for _, param in frame.params:
                module.get_parameter(param)
        except AttributeError:
            continue
        signature = tuple(tuple(cfg.matching_overrides(join_path(path, r))) for r in relative)
        groups.setdefault(signature, []).append(path)
    ordered = sorted(groups.values(), key=lambda g: frame.prefix not in g)
    return [tuple(g) for g in ordered] or [(frame.prefix,)]


def distinguishing_param(model: nn.Module, frame: Frame, groups: list[tuple[str, ...]]) -> tuple[int, str] | None:
    """A parameter input of the graph that no two groups of ``groups`` share (so a call tells
    which group's variant to run), or None (tied between groups)."""
    for index, param in frame.params:
        owner: dict[int, int] = {}
        try:
            for g, group in enumerate(groups):
                for path in group:
                    if owner.setdefault(id(model.get_parameter(join_path(path, param))), g) != g:
                        raise LookupError
        except (AttributeError, LookupError):
            continue
        return index, param
    return None


class InstanceDispatch:
    """The compiled function of a graph that serves several groups of instances: each call
    runs the variant compiled for the instance whose parameter ``param`` (its position among
    the graph's inputs, its path relative to the frame's module) the call passes."""

    def __init__(
        self, frame: Frame, param: tuple[int, str], model: nn.Module,
        variants: list[tuple[tuple[str, ...], Callable[..., Any]]],
    ) -> None:
        self.frame = frame
        self.arg_index, self.param = param
        self._model = weakref.ref(model)
        self._variants = variants
        self._by_param: dict[int, tuple[weakref.ref, Callable[..., Any]]] = {}
        self._warned = False
        self._index()

    def _index(self) -> None:
        model = self._model()
        if model is None:
            return
        self._by_param.clear()
        for instances, fn in self._variants:
            for path in instances:
                try:
                    p = model.get_parameter(join_path(path, self.param))
                except AttributeError:
                    continue
                self._by_param[id(p)] = (weakref.ref(p), fn)

    def _lookup(self, param: Any) -> Callable[..., Any] | None:
        hit = self._by_param.get(id(param))
        if hit is not None and hit[0]() is param:
            return hit[1]
        return None

    def __call__(self, *args: Any) -> Any:
        param = args[self.arg_index]
        fn = self._lookup(param)
        if fn is None:
            self._index()  # parameters replaced since the compile
            fn = self._lookup(param)
        if fn is None:
            fn = self._variants[0][1]
            if not self._warned:
                self._warned = True
                msg = (f"fqt_compile: a graph compiled for the frame of {self.frame.prefix!r} ran for a module "
                       "that is not one of its instances; it runs the variant of its overrides compiled for "
                       f"{list(self._variants[0][0])}")
                warnings.warn(msg, UserWarning, stacklevel=2)
                log.warning(msg)
        return fn(*args)
