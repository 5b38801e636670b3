"""The ``fqt`` torch.compile backend.

For each graph TorchDynamo captures:

1. ``passes.insert_qdq`` replaces every covered product by its FQT form (torch level);
2. AOTAutograd traces forward and backward: the autograd formulas of the FQT products expand
   into the backward graph, so the gradient quantizers (``fqt::sr_quantize`` ...) are nodes
   there;
3. the aten forward/backward graphs are recorded (for tests and ``inspect``), the aten-level
   passes run, and the inner compiler (inductor, or eager) compiles them.

Registered as ``fqt`` and ``fqt_eager`` (eager inner compiler), also through the
``torch_dynamo_backends`` entry point so ``torch.compile(m, backend="fqt")`` works without
importing this package first. Options: ``torch.compile(m, backend="fqt",
options={"config": cfg})`` where ``cfg`` is an :class:`FQTConfig`, a recipe name, or a dict
for :meth:`FQTConfig.from_dict`.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import functools
import inspect
import logging
import re
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .config import FQTConfig, InnerCompiler, Mode
from .frames import InstanceDispatch, distinguishing_param, frame_of, instance_groups
from .passes.insert_qdq import InsertResult, insert_qdq
from .passes.keep_codes import KeepCodesJointPass, partition_keeping_codes
from .passes.decompose_fqt import decompose_fqt
from .passes.fuse_gelu import fuse_gelu
from .passes.fuse_quantizers import fuse_quantizers
from .passes.fuse_softmax import fuse_softmax
from .passes.lower_int_gemm import lower_int_gemm
from .passes.split_seeds import split_seeds

__all__ = ["FQTBackend", "GraphRecord", "fqt_backend", "fqt_eager_backend", "resolve_config"]

log = logging.getLogger(__name__)

#: The oldest torch whose inductor computes the counter-based generator as the reference does
#: (the test suite passes on 2.11, 2.13, 2.14, 2.15). On 2.5 inductor writes the tail of a row
#: that is not a multiple of the vector width as a scalar loop, where the generator's wrapping
#: int32 multiplies become signed C++ multiplies whose overflow is undefined: gcc folded them
#: differently, and some stochastic roundings came out different from the reference (the same
#: kernels with -fwrapv matched). Below this version the backend uses the eager inner compiler
#: instead (with a warning); 2.6-2.10 were not tried.
MIN_INDUCTOR_TORCH = (2, 11)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _inductor_fallback(cfg: FQTConfig) -> FQTConfig:
    if cfg.compiler is not InnerCompiler.INDUCTOR or torch_version() >= MIN_INDUCTOR_TORCH:
        return cfg
    log.warning(
        "fqt backend: torch %s's inductor does not compute the stochastic rounding's generator "
        "as the reference does (signed int32 overflow in scalar loops); compiling with the eager "
        "inner compiler instead (needs torch >= %s for inductor)",
        torch.__version__, ".".join(map(str, MIN_INDUCTOR_TORCH)),
    )
    return dataclasses.replace(cfg, compiler=InnerCompiler.EAGER)


@dataclass
class GraphRecord:
    """Everything the backend did with one dynamo graph."""

    config: FQTConfig
    torch_graph: fx.GraphModule  # after insert_qdq
    insert: InsertResult
    forward: fx.GraphModule | None = None  # aten forward graph (training)
    backward: fx.GraphModule | None = None  # aten backward graph
    inference: fx.GraphModule | None = None  # aten graph under no_grad / eval
    aten_passes: dict[str, list[Any]] = field(default_factory=dict)  # graph kind -> pass results
    #: the path of the submodule whose frame dynamo compiled this graph for (after a graph break
    #: inside its forward), None for the model's own frames (:mod:`fqt_compile.frames`)
    frame: str | None = None
    #: where ``frame`` is set: the instances of its class whose overrides this graph's decisions
    #: hold for (one variant of the graph is compiled per group of instances)
    instances: tuple[str, ...] = ()


def resolve_config(config: Any) -> FQTConfig:
    """An :class:`FQTConfig` from a config, a recipe name, a dict, or None (defaults)."""
    if config is None:
        return FQTConfig()
    if isinstance(config, FQTConfig):
        return config
    if isinstance(config, str):
        return FQTConfig.recipe(config)
    if isinstance(config, dict):
        return FQTConfig.from_dict(config)
    raise TypeError(
        f"fqt backend: config must be an FQTConfig, a recipe name or a dict, got {type(config).__name__}"
    )


def _config_from_options(options: dict[str, Any] | None, default: FQTConfig) -> FQTConfig:
    if not options:
        return default
    options = dict(options)
    unknown = sorted(set(options) - {"config", "recipe", "compiler"})
    if unknown:
        raise ValueError(f"fqt backend: unknown option(s) {unknown}; valid options: ['compiler', 'config', 'recipe']")
    cfg = resolve_config(options.get("config", options.get("recipe", default)))
    if "compiler" in options:
        cfg = dataclasses.replace(cfg, compiler=options["compiler"])
    return cfg


AtenPass = Callable[[fx.GraphModule, FQTConfig, str], Any]


#: Inductor settings the fqt backend compiles with unless told otherwise.
#: ``layout_optimization`` off: for graphs with convolutions inductor would switch activations to
#: channels-last, where the gradient quantizers' per-sample / per-column ranges (over the
#: (batch, C*H*W) view) become strided scalar gathers fused into the batch-norm kernels.
#: Measured on the SmallCNN training step (``benchmarks/bench_training.py --models cnn``,
#: variants fqt_lowered_inductor vs fqt_lowered_inductor_channels_last): 0.38 s vs 0.49 s,
#: twice. No effect on graphs without convolutions.
DEFAULT_INDUCTOR_PATCHES: dict[str, Any] = {"layout_optimization": False}

#: aten ops that inductor decomposes but that the backend leaves to their ATen kernels on CPU
#: (inductor then calls them as fallback kernels). ``embedding_dense_backward``: inductor's
#: decomposition scatters with an atomic add per element; a GPT's token embedding gradient
#: (8 x 512 tokens, d 1024, 256 rows) took 11.5 ms compiled against 1.25 ms in ATen.
CPU_ATEN_KERNELS: tuple[Any, ...] = (torch.ops.aten.embedding_dense_backward.default,)


def _threshold_backward_int8_mask(grad_output: torch.Tensor, self: torch.Tensor, threshold: Any) -> torch.Tensor:
    """``threshold_backward`` (ReLU's backward) through a 0/1 int8 mask instead of a bool one.

    Under FQT the partitioner saves the int8 codes of a ReLU's output, not the float output,
    so for the ReLU's backward it saves the 1-byte mask ``self <= threshold`` computed in the
    forward. Inductor's CPU code stores and loads a bool tensor through a generic 64-lane
    ``Vectorized<bool>``, one element at a time: writing the mask of a 128 x 32 x 28 x 28
    activation took 15 ms where the fused ReLU took 0.3 ms, reading it back 6 ms (torch 2.13,
    AMD Zen 5; docs/performance.md, Training step: CNN). Here the mask is a float select cast
    to int8 (0.3 ms with the ReLU) and the backward keeps the gradient's bits where it is 1 (a
    bitwise and: 0.4-0.5 ms); the partitioner saves it as before (1 byte an element; a bool
    compare of it in the backward would be saved instead). ATen's values bit for bit: the
    gradient where ``self > threshold`` or ``self`` is NaN, else +0, also for NaN/Inf
    gradients."""
    bits = _SAME_SIZE_INT.get(grad_output.dtype)
    if bits is None:
        return torch.where(self <= threshold, 0.0, grad_output)
    keep = torch.where(self <= threshold, 0.0, 1.0).to(torch.int8)
    return (grad_output.view(bits) & -keep.to(bits)).view(grad_output.dtype)


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


#: decompositions the fqt backend gives inductor for CPU graphs in place of inductor's own
CPU_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten.threshold_backward.default: _threshold_backward_int8_mask,
}


def _inductor_decompositions(example_inputs: Sequence[Any]) -> dict[Any, Any] | None:
    """For a graph on CPU: inductor's decomposition table with :data:`CPU_DECOMPOSITIONS`, and
    without :data:`CPU_ATEN_KERNELS` where their fallback lowerings are registered
    (:func:`_register_cpu_fallbacks`). None, inductor's own table, otherwise."""
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if devices != {"cpu"}:
        return None
    from torch._inductor.decomposition import select_decomp_table

    skip = CPU_ATEN_KERNELS if _register_cpu_fallbacks() else ()
    return {**{op: fn for op, fn in select_decomp_table().items() if op not in skip}, **CPU_DECOMPOSITIONS}


@functools.lru_cache(maxsize=None)
def _register_cpu_fallbacks() -> bool:
    """Register inductor's ATen-fallback lowering for each of :data:`CPU_ATEN_KERNELS`, once per
    process, as inductor's ``make_fallback`` does for its own fallbacks (``override_decomp``:
    the op keeps its decomposition in inductor's global table, so every other compile still
    decomposes it and never reaches this lowering; the layout constraint of inductor's implicit
    fallbacks in a backward). Without it inductor makes an implicit fallback, which asserts
    when the environment sets ``CI`` ("a decomposition exists") and, on torch 2.11, always.
    False where this torch's ``make_fallback`` cannot override a decomposition."""
    from torch._inductor import lowering

    if "override_decomp" not in inspect.signature(lowering.make_fallback).parameters:
        return False
    for op in CPU_ATEN_KERNELS:
        if op not in lowering.lowerings:
            lowering.make_fallback(op, layout_constraint=lowering.require_contiguous, warn=False, override_decomp=True)
    return True


class FQTBackend:
    """A torch.compile backend applying FQT with a fixed config.

    ``records`` lists a :class:`GraphRecord` per compiled dynamo graph (graph breaks and
    recompiles each add one), newest last, at most ``max_records``.
    """

    #: aten-level passes run on each forward/backward/inference graph before the inner
    #: compiler, as ``fn(gm, cfg, kind) -> result`` (kind: "forward", "backward", "inference").
    #: ``split_seeds`` first: AOTAutograd's CSE merges the quantizers' seed draws into one.
    #: ``fuse_softmax`` and ``fuse_gelu`` after the lowering (they only run where the GEMMs are
    #: lowered, and read the lowered GEMMs' int32 products); ``fuse_quantizers`` last, for the
    #: gradients whose quantizers those two did not take.
    aten_passes: list[tuple[str, AtenPass]] = [
        ("split_seeds", split_seeds), ("lower_int_gemm", lower_int_gemm), ("fuse_softmax", fuse_softmax),
        ("fuse_gelu", fuse_gelu), ("fuse_quantizers", fuse_quantizers),
    ]

    def __init__(
        self,
        config: FQTConfig | str | dict | None = None,
        *,
        max_records: int = 64,
        inductor_config_patches: dict[str, Any] | None = None,
    ) -> None:
        self.config = resolve_config(config)
        #: ``torch._inductor.config`` settings for this backend's compiles: DEFAULT_INDUCTOR_PATCHES
        #: updated with ``inductor_config_patches``
        self.inductor_config_patches = {**DEFAULT_INDUCTOR_PATCHES, **(inductor_config_patches or {})}
        self.records: list[GraphRecord] = []
        self.max_records = max_records
        self._lock = threading.Lock()
        #: the module paths of the model ``fqt_compile.compile`` compiled with this backend
        #: (``named_modules``, set by :meth:`bind`), to check the paths the graphs' decisions
        #: carry; None otherwise
        self.module_paths: frozenset[str] | None = None
        self._model: weakref.ref[nn.Module] | None = None
        _watch_recompile_limit()

    def __repr__(self) -> str:
        return f"FQTBackend({self.config.describe()}, compiler={self.config.compiler.value})"

    def bind(self, model: nn.Module) -> None:
        """Tell the backend which model it compiles (``fqt_compile.compile`` does): to name the
        module paths of a graph that dynamo compiled for a submodule's frame in full, and to
        compile a variant per group of that submodule's instances where the overrides treat
        them differently (:mod:`fqt_compile.frames`)."""
        self.module_paths = frozenset(name for name, _ in model.named_modules(remove_duplicate=False))
        self._model = weakref.ref(model)

    # torch.compile calls backend(gm, example_inputs, **kwargs) with mode=/options= if given
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
        cfg = _inductor_fallback(_config_from_options(kwargs.get("options"), self.config))
        model = self._model() if self._model is not None else None
        frame = frame_of(gm, example_inputs, model) if model is not None and cfg.mode is not Mode.OFF else None
        if frame is None or not frame.prefix:
            return self._compile_one(gm, example_inputs, cfg)
        groups = instance_groups(gm, cfg, model, frame)
        param = distinguishing_param(model, frame, groups) if len(groups) > 1 else None
        if param is None:
            if len(groups) > 1:
                msg = (f"fqt_compile: the overrides treat the instances {[list(g) for g in groups]} differently, "
                       "but the graph dynamo compiled for their class's frame reads only parameters tied between "
                       f"them, so a call cannot tell them apart: it runs as compiled for {list(groups[0])}")
                warnings.warn(msg, UserWarning, stacklevel=2)
                log.warning(msg)
            return self._compile_one(gm, example_inputs, cfg, frame.prefix, groups[0])
        # the overrides treat this submodule's instances differently, and dynamo may run this
        # graph for any of them: a variant per group, each from an unchanged copy of the graph
        copies = [_copy_graph_module(gm) for _ in groups[1:]]
        variants = [(groups[0], self._compile_one(gm, example_inputs, cfg, groups[0][0], groups[0]))]
        for group, copy in zip(groups[1:], copies):
            variants.append((group, self._compile_one(copy, example_inputs, cfg, group[0], group)))
        log.info("fqt backend: graph of the frame of %r compiled in %d variants for its instances %s",
                 frame.prefix, len(variants), [list(g) for g in groups])
        return InstanceDispatch(frame, param, model, variants)

    def _compile_one(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], cfg: FQTConfig, prefix: str = "",
        instances: tuple[str, ...] = (),
    ) -> Callable[..., Any]:
        insert = insert_qdq(gm, cfg, path_prefix=prefix) if cfg.mode is not Mode.OFF else InsertResult()
        self._check_paths(cfg, insert)
        record = GraphRecord(cfg, gm, insert, frame=prefix or None, instances=instances)
        with self._lock:
            self.records.append(record)
            del self.records[: -self.max_records]
        try:
            if cfg.compiler is InnerCompiler.INDUCTOR:
                return self._compile_inductor(gm, example_inputs, record)
            return self._compile_eager(gm, example_inputs, record)
        except BaseException:
            # no compiled graph: an error, or dynamo restarting its analysis (e.g. torch's
            # TensorifyScalarRestartAnalysis when a float such as a dropout p became symbolic on
            # a recompile), after which it calls the backend again with the graph it keeps
            with self._lock:
                if any(r is record for r in self.records):
                    self.records.remove(record)
            raise

    def _check_paths(self, cfg: FQTConfig, insert: InsertResult) -> None:
        """Warn where overrides were matched against module paths that are not the compiled
        model's: a graph that dynamo compiled for a submodule's frame (after a graph break
        inside its ``forward``) has paths relative to that submodule (``b`` for ``enc.b``);
        :mod:`fqt_compile.frames` names them in full where the graph's parameters tell the
        frame, and this catches the graphs where they do not (docs/usage.md, Overrides)."""
        if not cfg.overrides or self.module_paths is None:
            return
        foreign = sorted({d.module for d in insert.decisions if d.module and d.module not in self.module_paths})
        if foreign:
            msg = (
                f"fqt_compile: a compiled graph names modules {foreign[:4]} that are not module paths of the "
                "compiled model (a graph break inside a submodule's forward compiles the rest as that "
                "submodule's own frame, with paths relative to it); the config's overrides were matched "
                "against these paths and may not apply as intended: check fqt_compile.records(model), or "
                "compile with fullgraph=True to find the graph break"
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)

    def _run_aten_passes(self, gm: fx.GraphModule, record: GraphRecord, kind: str) -> None:
        setattr(record, kind, gm)
        results = record.aten_passes.setdefault(kind, [])
        for name, fn in self.aten_passes:
            try:
                results.append((name, fn(gm, record.config, kind)))
            except Exception as e:
                raise RuntimeError(f"fqt backend: aten pass {name!r} failed on the {kind} graph: {e}") from e

    @staticmethod
    def _joint_result(record: GraphRecord) -> Callable[[dict[str, int]], None]:
        """Where the joint-graph pass (``passes.keep_codes``, before the partition) records its
        result: ``record.aten_passes["joint"]``."""
        return lambda result: record.aten_passes.setdefault("joint", []).append(("keep_codes", result))

    def _compile_inductor(self, gm: fx.GraphModule, example_inputs: Sequence[Any], record: GraphRecord):
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner_compile(agm: fx.GraphModule, inputs: Sequence[Any], *args: Any, **kw: Any):
            if kw.get("is_backward", False):
                kind = "backward"
            elif kw.get("is_inference", False):
                kind = "inference"
            else:
                kind = "forward"
            self._run_aten_passes(agm, record, kind)
            # inductor gets a copy with the quantizer ops inlined, so they fuse; the record
            # keeps the readable fqt:: form
            fused, counts = decompose_fqt(agm)
            record.aten_passes[kind].append(("decompose_fqt", counts))
            return compile_fx_inner(fused, inputs, *args, **kw)

        # AOTAutograd's cache keys a compiled artifact on the dynamo graph, not on what the
        # inner compiler does with it: on a hit our aten passes would not run (no graphs in the
        # record, no decisions) and an artifact compiled by another config (lower_int_gemm,
        # recompute tags) or another version of these passes would run instead. Inductor's own
        # FX graph cache, keyed on the graph compile_fx_inner receives, stays on.
        # the joint pass runs before a joint_custom_pre_pass set in these patches or globally
        patches = dict(self.inductor_config_patches)
        then = patches.get("joint_custom_pre_pass", inductor_config.joint_custom_pre_pass)
        patches["joint_custom_pre_pass"] = KeepCodesJointPass(then, self._joint_result(record), example_inputs)
        with _autograd_cache_off():
            return compile_fx(
                gm, example_inputs, inner_compile=inner_compile, config_patches=patches,
                decompositions=_inductor_decompositions(example_inputs),
            )

    def _compile_eager(self, gm: fx.GraphModule, example_inputs: Sequence[Any], record: GraphRecord):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        def compiler(kind: str):
            def compile_graph(agm: fx.GraphModule, inputs: Sequence[Any]):
                self._run_aten_passes(agm, record, kind)
                return make_boxed_func(agm.forward)

            return compile_graph

        return aot_autograd(
            fw_compiler=compiler("forward"),
            bw_compiler=compiler("backward"),
            inference_compiler=compiler("inference"),
            partition_fn=partition_keeping_codes(self._joint_result(record), example_inputs),
        )(gm, example_inputs)


_RECOMPILE_LIMIT = re.compile(r"hit config\.(recompile_limit|cache_size_limit)")


class _RecompileLimitWarning(logging.Filter):
    """Turns TorchDynamo's log line about a frame that hit its recompile limit into a
    ``UserWarning`` that says what it means here: dynamo runs that frame eagerly from then on,
    so the products in it are not quantized. It happens where a graph break leaves a frame
    whose code many compiled models share (transformers' ``deprecate_kwarg`` wrapper around
    the forward of T5's stacks on torch 2.11: the ninth model class through it ran in float)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is dynamo's business
            return True
        if _RECOMPILE_LIMIT.search(text):
            first = " ".join(line.strip() for line in text.splitlines()[:2])
            msg = (f"fqt_compile: {first}. TorchDynamo now runs that frame eagerly, so where it belongs to a model "
                   "compiled with the fqt backend its matrix products run in float, unquantized. Raise "
                   "torch._dynamo.config.recompile_limit, or call torch._dynamo.reset() between models")
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)
        return True


@functools.cache
def _watch_recompile_limit() -> None:
    logging.getLogger("torch._dynamo.convert_frame").addFilter(_RecompileLimitWarning())


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a dynamo graph that passes can change apart from ``gm`` (the nodes' meta dicts
    are copied, their values, such as fake tensors, shared)."""
    copy = fx.GraphModule(gm, copy_module.deepcopy(gm.graph), class_name=type(gm).__name__)
    copy.meta = dict(getattr(gm, "meta", {}))
    for name, child in list(copy.named_children()):  # a checkpoint region's body: rewritten per variant
        if isinstance(child, fx.GraphModule):
            setattr(copy, name, _copy_graph_module(child))
    return copy


def _autograd_cache_off() -> contextlib.AbstractContextManager:
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        return functorch_config.patch(enable_autograd_cache=False)
    return contextlib.nullcontext()


_DEFAULT = FQTBackend()
_DEFAULT_EAGER = FQTBackend(FQTConfig(compiler=InnerCompiler.EAGER))


def fqt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``backend="fqt"``: default config (or ``options={"config": ...}``), inductor."""
    return _DEFAULT(gm, example_inputs, **kwargs)


def fqt_eager_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``backend="fqt_eager"``: as ``fqt`` with the eager inner compiler."""
    options = dict(kwargs.pop("options", None) or {})
    options.setdefault("compiler", "eager")
    return _DEFAULT_EAGER(gm, example_inputs, options=options, **kwargs)


def default_records(eager: bool = False) -> list[GraphRecord]:
    """Records of the string-registered backends (``fqt`` / ``fqt_eager``)."""
    return (_DEFAULT_EAGER if eager else _DEFAULT).records


def _register() -> None:
    from torch._dynamo.backends import registry

    for name, fn in (("fqt", fqt_backend), ("fqt_eager", fqt_eager_backend)):
        # When torch found our entry point, it registers the backend itself after loading it.
        if name not in registry._COMPILER_FNS and registry._BACKENDS.get(name) is None:
            registry.register_backend(compiler_fn=fn, name=name)


_register()
