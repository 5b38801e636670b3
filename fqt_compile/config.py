"""Configuration of fully quantized training: enums, frozen dataclasses and named recipes.

Vocabulary (used in every module): the three GEMMs of a layer are ``output``, ``grad_input``
and ``grad_weight``; tensor roles are ``input``, ``weight``, ``grad_output``. In the paper's
notation the forward quantizers are Q_f (``input``) and Q_w (``weight``); the gradient
quantizer feeding ``grad_input`` is Q_b1 and the one feeding ``grad_weight`` is Q_b2.

Every config is a frozen dataclass: hashable, so it is safe as a compile-cache key.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Mode",
    "Granularity",
    "GradKind",
    "OpKind",
    "InnerCompiler",
    "SdpaPolicy",
    "ForwardSpec",
    "GradSpec",
    "Override",
    "FQTConfig",
    "RECIPES",
    "MIN_BITS",
    "MAX_BITS",
]

MIN_BITS = 2
MAX_BITS = 8


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class Mode(_StrEnum):
    """``fqt``: quantized forward and stochastically quantized gradients (the paper's FQT).
    ``qat``: quantized forward, exact (straight-through) gradients: the paper's baseline.
    ``off``: full precision; the graph is left as it is."""

    FQT = "fqt"
    QAT = "qat"
    OFF = "off"


class Granularity(_StrEnum):
    """Forward-quantizer granularity: one range per tensor, or one per channel
    (output channel of a weight: dim 0)."""

    TENSOR = "tensor"
    CHANNEL = "channel"


class GradKind(_StrEnum):
    """Gradient quantizers (all stochastic and unbiased).

    ``ptq``: per-tensor (PTQ); ``psq``: per-row = per-sample (PSQ); ``column``: per-column of
    the gradient's 2-D view, the reference Q_b2 of PSQ/BHQ runs: for a linear layer or matmul,
    one range per output feature; for a convolution, whose gradient is viewed as
    (batch, C * H * W), one range per (channel, position), so its grad_weight GEMM, which
    contracts over samples and positions, stays simulated (only ``ptq`` lowers there);
    ``bhq``: block Householder (BHQ); ``hadamard``: rows mixed by a block Hadamard transform,
    then per-row; ``none``: no quantization (exact gradient on that path)."""

    PTQ = "ptq"
    PSQ = "psq"
    COLUMN = "column"
    BHQ = "bhq"
    HADAMARD = "hadamard"
    NONE = "none"


class OpKind(_StrEnum):
    """Products the pass can cover: ``linear`` (nn.Linear, F.linear, addmm with a parameter),
    ``conv`` (conv1d/2d/3d), ``matmul`` (matmul/bmm/baddbmm/@ between activations)."""

    LINEAR = "linear"
    CONV = "conv"
    MATMUL = "matmul"


class InnerCompiler(_StrEnum):
    INDUCTOR = "inductor"
    EAGER = "eager"


class SdpaPolicy(_StrEnum):
    """What to do with ``F.scaled_dot_product_attention``: ``decompose`` it into
    matmul-softmax-matmul so both products are covered; ``recompute``: the same, and the
    attention probabilities (softmax output and its int8 codes) are not kept for the backward
    but recomputed there from the saved int8 codes of q, k, v (which the backward's GEMMs read
    anyway; the forward quantizers round to nearest, so the recomputed values are the
    forward's; an attention dropout's mask is recomputed from its saved seed): less activation
    memory, one more score GEMM and softmax per step (the default since the eighteenth
    session: docs/performance.md has what it costs); or keep attention in ``full_precision``."""

    DECOMPOSE = "decompose"
    RECOMPUTE = "recompute"
    FULL_PRECISION = "full_precision"


def _enum_value(cls: type[enum.Enum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{where}: invalid value {value!r}; valid choices: {valid}") from None


def _from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` for nested plain data, with unknown keys named next to the valid ones
    (a bare ``cls(**data)`` raises a TypeError that lists neither)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; valid fields: {valid}")
    return cls(**data)


def _check_bits(bits: Any, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{where}: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}"
        )


@dataclass(frozen=True)
class ForwardSpec:
    """A forward quantizer (Q_f for inputs, Q_w for weights): deterministic round-to-nearest,
    straight-through backward.

    ``symmetric``: codes in [-(2^(b-1)-1), 2^(b-1)-1] with zero offset; otherwise affine over
    [min, max]. ``zero_aligned`` (affine only): the paper's variant, where 0.0 is exactly an
    integer level (so zero padding and ReLU zeros survive quantization). Per-channel
    symmetric weights make ``grad_input`` fold their scales into Q_b1's input
    (``Q_b1(G diag(s)) @ C``, see :func:`fqt_compile.functional.folds_weight_scale`)."""

    bits: int = 8
    granularity: Granularity = Granularity.TENSOR
    symmetric: bool = False
    zero_aligned: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits, "ForwardSpec.bits")
        object.__setattr__(
            self, "granularity", _enum_value(Granularity, self.granularity, "ForwardSpec.granularity")
        )
        for name in ("symmetric", "zero_aligned"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ForwardSpec.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def scheme(self) -> str:
        """The op-library name of this quantizer's range rule."""
        if self.symmetric:
            return "symmetric"
        return "affine_zero" if self.zero_aligned else "affine"


@dataclass(frozen=True)
class GradSpec:
    """A gradient quantizer (Q_b1 or Q_b2): stochastic rounding, exactly unbiased."""

    kind: GradKind = GradKind.PSQ
    bits: int = 8
    hadamard_block: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum_value(GradKind, self.kind, "GradSpec.kind"))
        _check_bits(self.bits, "GradSpec.bits")
        b = self.hadamard_block
        if not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ValueError(f"GradSpec.hadamard_block must be a power of two >= 2, got {b!r}")

    @property
    def enabled(self) -> bool:
        return self.kind is not GradKind.NONE


_OVERRIDE_FIELDS = ("mode", "input", "weight", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Override:
    """Per-module settings, matched by ``fnmatch`` glob on the module path (``"layers.0.*"``,
    ``"fc"``, ``"*attn*"``). Fields left ``None`` keep the base config's value. The last
    matching override wins. ``Override("conv1", mode="off")`` keeps a layer in full precision.
    """

    pattern: str
    mode: Mode | None = None
    input: ForwardSpec | None = None
    weight: ForwardSpec | None = None
    grad_input: GradSpec | None = None
    grad_weight: GradSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"Override.pattern must be a non-empty glob string, got {self.pattern!r}")
        if self.mode is not None:
            object.__setattr__(self, "mode", _enum_value(Mode, self.mode, "Override.mode"))
        for name, cls in (("input", ForwardSpec), ("weight", ForwardSpec),
                          ("grad_input", GradSpec), ("grad_weight", GradSpec)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _from_mapping(cls, value, f"Override.{name}"))
            elif value is not None and not isinstance(value, cls):
                raise TypeError(f"Override.{name} must be a {cls.__name__} or None, got {value!r}")

    def matches(self, module_path: str) -> bool:
        return fnmatch.fnmatchcase(module_path, self.pattern)


@dataclass(frozen=True)
class FQTConfig:
    """Fully quantized training configuration.

    The default is the paper's 8-bit FQT with per-sample gradients: ``input``/``weight``
    8-bit per-tensor affine (zero aligned), Q_b1 = PSQ 8-bit, Q_b2 = per-column 8-bit.
    Reasons: 8-bit gradients with PSQ train as well as QAT in the paper's experiments, and
    every one of these quantizers keeps its scales on non-contracted axes, so all three GEMMs
    of a linear layer can run as int8 integer GEMMs. Use ``FQTConfig.recipe("bhq5")`` and
    friends for lower gradient bit-widths.

    Memory: by default the backward recomputes quantized attention (``sdpa="recompute"``) and
    a quantized linear layer followed by an activation (``recompute_mlp=True``) from saved
    int8 codes instead of keeping their float outputs (identical gradients), so a transformer
    step keeps 0.2-0.4x of fp32's activation bytes instead of about as many as fp32
    or more. ``sdpa="decompose", recompute_mlp=False`` keeps them: faster (the recomputation
    cost +10-12% step time in one-block A/B runs of the GPT block on AMD CPUs, +16% for a
    Llama block, whose two MLP projections run again), with 3-4x the activation bytes.
    """

    mode: Mode = Mode.FQT
    input: ForwardSpec = field(default_factory=ForwardSpec)
    weight: ForwardSpec = field(default_factory=ForwardSpec)
    grad_input: GradSpec = field(default_factory=lambda: GradSpec(GradKind.PSQ, 8))
    grad_weight: GradSpec = field(default_factory=lambda: GradSpec(GradKind.COLUMN, 8))
    ops: frozenset[OpKind] = frozenset({OpKind.LINEAR, OpKind.CONV, OpKind.MATMUL})
    overrides: tuple[Override, ...] = ()
    sdpa: SdpaPolicy = SdpaPolicy.RECOMPUTE
    compiler: InnerCompiler = InnerCompiler.INDUCTOR
    lower_int_gemm: bool = True
    #: where the GEMMs are lowered, on a CPU whose oneDNN int8 convolution sums exactly (VNNI
    #: or AMX: ``gemm.conv_int8_available``): a convolution's output GEMM, and its grad_input
    #: at stride 1, run as that direct int8 convolution of the codes (``fqt::conv_int8``)
    #: instead of im2col + an integer GEMM; the same integer sums and epilogue. False: im2col
    #: under the measured rule (docs/performance.md, Convolutions)
    direct_conv: bool = True
    #: where the GEMMs are lowered: a strided convolution's grad_input (so also a strided
    #: transposed convolution's output) runs as one stride-1 convolution per output phase of
    #: the input (s^dims of them, on the gradient as it is), each an output GEMM under the
    #: rules above, where every phase's rule lowers it. False: the zero-dilated gradient
    #: (im2col), which the measured rule keeps float (docs/performance.md, Convolutions)
    conv_phases: bool = True
    #: recompute a quantized linear layer's output and the activation after it in the backward
    #: (from the int8 codes of the layer's input and weight) instead of saving the activation's
    #: float input: GELU, SiLU, an activation written out as elementwise ops (HF GPT-2's
    #: tanh-GELU), or a gated product of two such layers' outputs (SwiGLU: both projections);
    #: not where the activation also reads another value (a residual) or keeps no float (ReLU).
    #: Less activation memory, the layers' forward GEMMs once more; identical gradients
    #: (round-to-nearest forward). On by default (see the class docstring); False saves the
    #: activation's input.
    recompute_mlp: bool = True
    #: where the GEMMs are lowered and the CPU has AVX-512: compute an attention softmax and the
    #: quantizer of its output in one fused kernel (``fqt::softmax_quantize``), and softmax's
    #: backward with the stochastic quantizers of its result in another
    #: (``fqt::softmax_backward_sr_quantize``): same quantizers and random draws, the softmax
    #: within float rounding of the aten one (passes/fuse_softmax.py)
    fuse_softmax: bool = True
    #: where the GEMMs are lowered and the CPU has AVX-512: compute GELU's backward, the bias
    #: gradient and the stochastic quantizers of the result in one fused kernel
    #: (``fqt::gelu_backward_sr_quantize``), reading the incoming gradient as the int32 product
    #: of fc2's lowered grad_input GEMM: same quantizers and random draws, the gradient within
    #: float rounding of the aten one (passes/fuse_gelu.py)
    fuse_gelu: bool = True
    #: where the GEMMs are lowered and the CPU has AVX-512: a gradient read by two or more
    #: stochastic quantizers (a linear layer's output gradient: Q_b1 per row, Q_b2 per column)
    #: is quantized by all of them, and summed over rows for the bias gradient, in one fused
    #: kernel (``fqt::sr_quantize_multi``): same quantizers and random draws, codes bit-equal
    #: (passes/fuse_quantizers.py)
    fuse_quantizers: bool = True
    #: in training graphs, ``F.dropout`` / ``nn.Dropout`` (outside the modules whose mode is
    #: "off") drop with ``fqt::dropout``: the same values, with a mask drawn by the counter-based
    #: generator from a seed, which the backward keeps instead of the mask (the attention
    #: dropout of quantized SDPA always does). False keeps torch's dropout (its random stream;
    #: on CPU inductor draws it with a scalar Philox call per element and saves a bool mask)
    counter_dropout: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum_value(Mode, self.mode, "FQTConfig.mode"))
        object.__setattr__(self, "sdpa", _enum_value(SdpaPolicy, self.sdpa, "FQTConfig.sdpa"))
        object.__setattr__(
            self, "compiler", _enum_value(InnerCompiler, self.compiler, "FQTConfig.compiler")
        )
        for name, cls in (("input", ForwardSpec), ("weight", ForwardSpec),
                          ("grad_input", GradSpec), ("grad_weight", GradSpec)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _from_mapping(cls, value, f"FQTConfig.{name}"))
            elif not isinstance(value, cls):
                raise TypeError(f"FQTConfig.{name} must be a {cls.__name__}, got {value!r}")
        ops = self.ops
        if isinstance(ops, str):
            ops = (ops,)
        object.__setattr__(
            self, "ops", frozenset(_enum_value(OpKind, o, "FQTConfig.ops") for o in ops)
        )
        overrides = tuple(
            _from_mapping(Override, o, "FQTConfig.overrides") if isinstance(o, dict) else o
            for o in (self.overrides or ())
        )
        for o in overrides:
            if not isinstance(o, Override):
                raise TypeError(f"FQTConfig.overrides must hold Override objects, got {o!r}")
        object.__setattr__(self, "overrides", overrides)
        for name in ("lower_int_gemm", "direct_conv", "conv_phases", "recompute_mlp", "fuse_softmax", "fuse_gelu", "fuse_quantizers",
                     "counter_dropout"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FQTConfig.{name} must be a bool, got {getattr(self, name)!r}")

    # -- construction -------------------------------------------------------------------

    @classmethod
    def recipe(cls, name: str, **changes: Any) -> FQTConfig:
        """A named recipe (see :data:`RECIPES`), optionally with fields replaced."""
        try:
            base = RECIPES[name]
        except KeyError:
            raise ValueError(
                f"unknown FQT recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}"
            ) from None
        return dataclasses.replace(base, **changes) if changes else base

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FQTConfig:
        """Build from plain data (JSON/YAML). ``{"recipe": "bhq5", ...}`` starts from a recipe.
        Unknown keys are an error naming the valid ones."""
        data = dict(data)
        recipe = data.pop("recipe", None)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"unknown FQTConfig field(s) {unknown}; valid fields: {sorted(valid | {'recipe'})}"
            )
        if "ops" in data and not isinstance(data["ops"], str):
            data["ops"] = frozenset(data["ops"])
        if "overrides" in data:
            data["overrides"] = tuple(
                _from_mapping(Override, o, "FQTConfig.overrides") if isinstance(o, dict) else o
                for o in data["overrides"]
            )
        if recipe is not None:
            return cls.recipe(recipe, **data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as strings) that :meth:`from_dict` reads back."""

        def plain(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, frozenset):
                return sorted(plain(x) for x in v)
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v

        return plain(self)

    # -- queries --------------------------------------------------------------------------

    def for_module(self, module_path: str) -> FQTConfig:
        """The config that applies to the module at ``module_path`` (overrides resolved)."""
        resolved = self
        for o in self.overrides:
            if o.matches(module_path):
                changes = {n: getattr(o, n) for n in _OVERRIDE_FIELDS if getattr(o, n) is not None}
                resolved = dataclasses.replace(resolved, **changes)
        if resolved is not self:
            resolved = dataclasses.replace(resolved, overrides=())
        return resolved

    def matching_overrides(self, module_path: str) -> list[str]:
        return [o.pattern for o in self.overrides if o.matches(module_path)]

    def describe(self) -> str:
        """One line, e.g. ``fqt in=8b/tensor w=8b/tensor Q_b1=psq8 Q_b2=column8``."""
        if self.mode is Mode.OFF:
            return "off"
        s = (
            f"{self.mode.value} in={self.input.bits}b/{self.input.granularity.value} "
            f"w={self.weight.bits}b/{self.weight.granularity.value}"
        )
        if self.mode is Mode.FQT:
            s += (
                f" Q_b1={self.grad_input.kind.value}{self.grad_input.bits}"
                f" Q_b2={self.grad_weight.kind.value}{self.grad_weight.bits}"
            )
        return s


def _make_recipes() -> dict[str, FQTConfig]:
    r: dict[str, FQTConfig] = {
        "off": FQTConfig(mode=Mode.OFF),
        "qat8": FQTConfig(mode=Mode.QAT),
        # INT8 per-tensor baseline: Q_b1 and Q_b2 both per-tensor (PTQ) 8-bit.
        "ptq8": FQTConfig(grad_input=GradSpec(GradKind.PTQ, 8), grad_weight=GradSpec(GradKind.PTQ, 8)),
    }
    for b in range(4, 9):
        # The paper's split: Q_b1 varies; Q_b2 stays 8-bit, per-tensor with PTQ, per-column
        # with PSQ/BHQ.
        r[f"ptq{b}"] = FQTConfig(
            grad_input=GradSpec(GradKind.PTQ, b), grad_weight=GradSpec(GradKind.PTQ, 8)
        )
        for kind in (GradKind.PSQ, GradKind.BHQ, GradKind.HADAMARD):
            r[f"{kind.value}{b}"] = FQTConfig(
                grad_input=GradSpec(kind, b), grad_weight=GradSpec(GradKind.COLUMN, 8)
            )
    return r


RECIPES: dict[str, FQTConfig] = _make_recipes()
