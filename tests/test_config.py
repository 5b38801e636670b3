"""Tests of :mod:`fqt_compile.config`: validation messages, recipes, plain-data round trips,
per-module overrides and hashability."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fqt_compile.config import (
    MAX_BITS,
    MIN_BITS,
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

# --- validation: errors name the field, the bad value and the valid choices ----------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FQTConfig(mode="fast"), r"FQTConfig\.mode: invalid value 'fast'; valid choices: 'fqt', 'qat', 'off'"),
        (lambda: FQTConfig(sdpa="flash"), r"FQTConfig\.sdpa: invalid value 'flash'; valid choices: 'decompose', 'recompute', 'full_precision'"),
        (lambda: FQTConfig(compiler="tvm"), r"FQTConfig\.compiler: invalid value 'tvm'; valid choices: 'inductor', 'eager'"),
        (lambda: FQTConfig(ops=["linear", "lstm"]), r"FQTConfig\.ops: invalid value 'lstm'; valid choices: 'linear', 'conv', 'matmul'"),
        (lambda: GradSpec(kind="bhq2"), r"GradSpec\.kind: invalid value 'bhq2'; valid choices: 'ptq', 'psq', 'column', 'bhq', 'hadamard', 'none'"),
        (lambda: GradSpec(bits=1), r"GradSpec\.bits: bits must be an integer in \[2, 8\], got 1"),
        (lambda: GradSpec(bits=9), r"GradSpec\.bits: bits must be an integer in \[2, 8\], got 9"),
        (lambda: GradSpec(bits=4.0), r"GradSpec\.bits: bits must be an integer in \[2, 8\], got 4\.0"),
        (lambda: GradSpec(hadamard_block=12), r"GradSpec\.hadamard_block must be a power of two >= 2, got 12"),
        (lambda: ForwardSpec(bits=True), r"ForwardSpec\.bits: bits must be an integer in \[2, 8\], got True"),
        (lambda: ForwardSpec(granularity="row"), r"ForwardSpec\.granularity: invalid value 'row'; valid choices: 'tensor', 'channel'"),
        (lambda: Override("fc", mode="fast"), r"Override\.mode: invalid value 'fast'; valid choices: 'fqt', 'qat', 'off'"),
        (lambda: Override(""), r"Override\.pattern must be a non-empty glob string, got ''"),
        (lambda: FQTConfig.recipe("bhq3"), r"unknown FQT recipe 'bhq3'; valid recipes: bhq4, bhq5, .*qat8"),
    ],
)
def test_value_errors_name_field_value_and_choices(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ForwardSpec(symmetric="yes"), r"ForwardSpec\.symmetric must be a bool, got 'yes'"),
        (lambda: FQTConfig(grad_input=ForwardSpec()), r"FQTConfig\.grad_input must be a GradSpec, got ForwardSpec"),
        (lambda: FQTConfig(overrides=["fc"]), r"FQTConfig\.overrides must hold Override objects, got 'fc'"),
        (lambda: FQTConfig(lower_int_gemm=1), r"FQTConfig\.lower_int_gemm must be a bool, got 1"),
        (lambda: FQTConfig(counter_dropout="no"), r"FQTConfig\.counter_dropout must be a bool, got 'no'"),
        (lambda: FQTConfig(conv_phases="off"), r"FQTConfig\.conv_phases must be a bool, got 'off'"),
        (lambda: Override("fc", weight=GradSpec()), r"Override\.weight must be a ForwardSpec or None"),
    ],
)
def test_type_errors_name_field_and_expected_type(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_bits_bounds_are_the_documented_range():
    assert (MIN_BITS, MAX_BITS) == (2, 8)
    for b in range(MIN_BITS, MAX_BITS + 1):
        assert GradSpec(bits=b).bits == ForwardSpec(bits=b).bits == b


def test_strings_become_enums():
    c = FQTConfig(mode="qat", sdpa="full_precision", compiler="eager", ops="linear",
                  grad_input={"kind": "bhq", "bits": 5})
    assert c.mode is Mode.QAT and c.sdpa is SdpaPolicy.FULL_PRECISION and c.compiler is InnerCompiler.EAGER
    assert c.ops == frozenset({OpKind.LINEAR})
    assert c.grad_input == GradSpec(GradKind.BHQ, 5)
    assert str(GradKind.BHQ) == "bhq" and ForwardSpec(granularity="channel").granularity is Granularity.CHANNEL


# --- recipes: the paper's split ---------------------------------------------------------------


def test_recipe_names():
    expected = {"off", "qat8", "ptq8"} | {f"{k}{b}" for k in ("ptq", "psq", "bhq", "hadamard") for b in range(4, 9)}
    assert set(RECIPES) == expected


@pytest.mark.parametrize("bits", range(4, 9))
@pytest.mark.parametrize("kind", ["ptq", "psq", "bhq", "hadamard"])
def test_recipes_follow_the_papers_split(kind, bits):
    # Q_b1 (grad_input) is the quantizer the paper varies; Q_b2 (grad_weight) stays 8-bit:
    # per-tensor in PTQ runs, per-column (one range per output feature) in PSQ/BHQ runs.
    c = FQTConfig.recipe(f"{kind}{bits}")
    assert c.mode is Mode.FQT
    assert c.grad_input == GradSpec(GradKind(kind), bits)
    q_b2 = GradKind.PTQ if kind == "ptq" else GradKind.COLUMN
    assert c.grad_weight == GradSpec(q_b2, 8)
    assert c.input == ForwardSpec() and c.weight == ForwardSpec()  # 8-bit per-tensor, zero aligned


def test_off_qat_and_default():
    assert FQTConfig.recipe("off").mode is Mode.OFF and FQTConfig.recipe("off").describe() == "off"
    assert FQTConfig.recipe("qat8").mode is Mode.QAT
    assert FQTConfig.recipe("qat8").describe() == "qat in=8b/tensor w=8b/tensor"
    assert FQTConfig.recipe("ptq8").grad_input == FQTConfig.recipe("ptq8").grad_weight == GradSpec(GradKind.PTQ, 8)
    # The default is the paper's 8-bit PSQ setting.
    assert FQTConfig() == FQTConfig.recipe("psq8")
    assert FQTConfig().describe() == "fqt in=8b/tensor w=8b/tensor Q_b1=psq8 Q_b2=column8"


def test_recipe_with_changes():
    c = FQTConfig.recipe("bhq5", compiler="eager", weight=ForwardSpec(granularity="channel"))
    assert c.grad_input == GradSpec(GradKind.BHQ, 5) and c.compiler is InnerCompiler.EAGER
    assert c.weight.granularity is Granularity.CHANNEL
    assert RECIPES["bhq5"].compiler is InnerCompiler.INDUCTOR  # the registry is untouched


# --- plain data -------------------------------------------------------------------------------


def _rich_config() -> FQTConfig:
    return FQTConfig.recipe(
        "bhq6",
        ops=frozenset({OpKind.LINEAR, OpKind.MATMUL}),
        sdpa="full_precision",
        input=ForwardSpec(bits=6, symmetric=True),
        overrides=(
            Override("head", mode="off"),
            Override("layers.*.attn", grad_input=GradSpec(GradKind.PSQ, 8), weight=ForwardSpec(granularity="channel")),
        ),
    )


@pytest.mark.parametrize("name", sorted(RECIPES) + ["rich"])
def test_to_dict_from_dict_round_trip(name):
    c = _rich_config() if name == "rich" else RECIPES[name]
    data = c.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON data
    back = FQTConfig.from_dict(json.loads(json.dumps(data)))
    assert back == c and hash(back) == hash(c)


def test_from_dict_with_recipe_key():
    c = FQTConfig.from_dict({"recipe": "psq4", "compiler": "eager", "overrides": [{"pattern": "fc", "mode": "qat"}]})
    assert c.grad_input == GradSpec(GradKind.PSQ, 4) and c.compiler is InnerCompiler.EAGER
    assert c.overrides == (Override("fc", mode=Mode.QAT),)


def test_from_dict_unknown_keys_name_the_valid_fields():
    with pytest.raises(ValueError, match=r"unknown FQTConfig field\(s\) \['gradinput'\]; valid fields: \[.*'grad_input'.*'recipe'"):
        FQTConfig.from_dict({"gradinput": {"kind": "bhq"}})
    with pytest.raises(ValueError, match=r"FQTConfig\.grad_input: unknown GradSpec field\(s\) \['bitz'\]; valid fields: \['kind', 'bits', 'hadamard_block'\]"):
        FQTConfig.from_dict({"grad_input": {"kind": "psq", "bitz": 4}})
    with pytest.raises(ValueError, match=r"FQTConfig\.overrides: unknown Override field\(s\) \['modes'\]; valid fields: \['pattern', 'mode'"):
        FQTConfig.from_dict({"overrides": [{"pattern": "fc", "modes": "off"}]})
    with pytest.raises(ValueError, match=r"Override\.weight: unknown ForwardSpec field\(s\) \['sym'\]"):
        Override("fc", weight={"sym": True})


# --- per-module overrides ---------------------------------------------------------------------


def test_for_module_resolution_last_match_wins_and_glob():
    c = FQTConfig(
        overrides=(
            Override("layers.*", grad_input=GradSpec(GradKind.BHQ, 4)),
            Override("layers.1.*", grad_input=GradSpec(GradKind.PTQ, 6), mode="qat"),
            Override("*head", mode="off"),
            Override("layers.?.fc2", weight=ForwardSpec(bits=4)),
        )
    )
    base = c.for_module("embed")
    assert base is c  # nothing matched: the config itself
    l0 = c.for_module("layers.0.fc1")
    assert l0.grad_input == GradSpec(GradKind.BHQ, 4) and l0.mode is Mode.FQT and l0.overrides == ()
    l1 = c.for_module("layers.1.fc2")  # three overrides match; each field from the last setter
    assert l1.grad_input == GradSpec(GradKind.PTQ, 6) and l1.mode is Mode.QAT and l1.weight.bits == 4
    assert c.matching_overrides("layers.1.fc2") == ["layers.*", "layers.1.*", "layers.?.fc2"]
    assert c.for_module("lm_head").mode is Mode.OFF
    assert c.for_module("layers.10.fc2").weight.bits == 8  # '?' is one character
    # fnmatchcase: matching is case sensitive and the pattern covers the whole path.
    assert c.for_module("Layers.0.fc1").grad_input == c.grad_input
    assert c.for_module("lm_head.proj").mode is Mode.FQT


def test_for_module_leaves_unset_fields_alone():
    c = FQTConfig.recipe("bhq5", overrides=(Override("fc", input=ForwardSpec(bits=4)),))
    r = c.for_module("fc")
    assert r.input.bits == 4
    assert dataclasses.replace(r, input=c.input) == dataclasses.replace(c, overrides=())


# --- hashability ------------------------------------------------------------------------------


def test_configs_are_frozen_and_hashable():
    a, b = _rich_config(), _rich_config()
    assert a == b and hash(a) == hash(b)
    cache = {a: "compiled"}
    assert cache[b] == "compiled"
    assert len({*RECIPES.values()}) == len(RECIPES)  # every recipe is a distinct config
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mode = Mode.OFF  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.grad_input.bits = 2  # type: ignore[misc]
    # Lists given by a user are normalized to hashable containers.
    c = FQTConfig(ops=["linear"], overrides=[Override("fc")])
    assert isinstance(c.ops, frozenset) and isinstance(c.overrides, tuple)
    hash(c)
