"""The statistical framework as a tool: measured gradient variance and bias of FQT.

Chen et al. (NeurIPS 2020): for a minibatch B, the FQT gradient is an unbiased estimator of
the QAT gradient (same forward quantizers Q_f, Q_w; exact backward), and
its variance splits into two parts::

    Var[FQT grad]  =  Var_B[ QAT grad(B) ]  +  E_B[ Var[ FQT grad(B) | B ] ]
                      sampling variance        quantization variance

The sampling variance comes from drawing the minibatch; the quantization variance is what the
stochastic gradient quantizers Q_b1, Q_b2 add on top of it, measured by repeating the backward
pass on the same batch with fresh rounding. Every variance here is of a **weight gradient
summed over its elements** (the trace of the covariance), per layer and for the whole
parameter vector, as in the paper's decomposition.

Unbiasedness is checked by the distance between the mean of K FQT gradients and the QAT
gradient: if FQT is unbiased, its expected square is ``Var[FQT | B] / K``, so the distance is
reported next to that standard error, ``sqrt(quantization / K)``; a bias b pins the distance
at ``|b|`` while the standard error keeps falling as 1/sqrt(K).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .config import FQTConfig, GradKind, GradSpec, InnerCompiler, Mode
from .backend import resolve_config

__all__ = [
    "gradient_variance",
    "variance_vs_bits",
    "VarianceReport",
    "LayerVariance",
    "BitsSweep",
    "BIAS_TOLERANCE",
    "add_variance_arguments",
    "run_variance_command",
]

log = logging.getLogger(__name__)

#: The bias check passes when ``bias <= BIAS_TOLERANCE * bias_se`` (plus float rounding).
#: Under unbiasedness ``(bias / bias_se)^2`` is a normalized sum of squared Gaussian-like
#: errors: about 1 when many elements contribute, and even with a single dominant direction
#: (chi-square with 1 degree of freedom, or F(1, K-1) with the variance estimated from K
#: samples) it exceeds 3^2 with probability 0.3% (K large) to 2% (K = 8).
BIAS_TOLERANCE = 3.0

LossFn = Callable[[Any, Any], torch.Tensor]
Progress = Callable[[int, int], None]

_SEED_STRIDE = 1_000_003


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerVariance:
    """Variance terms of one weight gradient (or of the whole gradient), summed over elements.

    ``sampling``: Var_B of the QAT gradient over minibatches. ``quantization``: E_B of the
    variance of the FQT gradient over repeated backward passes on one batch. ``bias``: root
    mean square over batches of |mean of K FQT gradients - QAT gradient|; ``bias_se``: its
    expected value if FQT is unbiased, ``sqrt(quantization / K)``. ``grad_norm``: root mean
    square of |QAT gradient| over batches (the scale to compare all of these with).
    """

    numel: int
    sampling: float
    quantization: float
    bias: float
    bias_se: float
    grad_norm: float

    @property
    def ratio(self) -> float:
        """quantization / sampling variance (the paper: small at 8 bits)."""
        return self.quantization / self.sampling if self.sampling > 0 else math.inf

    @property
    def bias_ratio(self) -> float:
        """bias / bias_se: about 1 for an unbiased estimator, growing as sqrt(K) with a bias."""
        if self.bias_se > 0:
            return self.bias / self.bias_se
        return 0.0 if self.bias <= self._atol else math.inf

    @property
    def _atol(self) -> float:
        # float32 rounding of the backward (the FQT graph computes the same products in
        # another order than the QAT graph).
        return 1e-5 * self.grad_norm + 1e-12

    @property
    def bias_ok(self) -> bool:
        """The mean FQT gradient agrees with the QAT gradient within its standard error."""
        return self.bias <= BIAS_TOLERANCE * self.bias_se + self._atol

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(ratio=self.ratio, bias_ratio=self.bias_ratio, bias_ok=self.bias_ok)
        return d


@dataclass(frozen=True)
class VarianceReport:
    """What :func:`gradient_variance` measured for one config.

    ``layers``: per module path (every ``nn.Linear``/``nn.Conv*`` with a trainable weight), the
    terms of its weight gradient. ``total``: the same for the whole gradient (every trainable
    parameter, biases, norms and embeddings included). ``convergence``: for K = 1, 2, 4, ...,
    ``(K, |mean of K FQT gradients - QAT gradient| / |QAT gradient|, sqrt(quantization / K) /
    |QAT gradient|)`` on the whole gradient, root mean square over batches.
    """

    config: str
    samples: int
    batches: int
    layers: dict[str, LayerVariance]
    total: LayerVariance
    convergence: tuple[tuple[int, float, float], ...] = ()

    def table(self) -> str:
        """A plain-text table, one row per layer and a total row."""
        head = (
            f"{'layer':<24} {'numel':>8} {'sampling':>10} {'quant':>10} {'q/s':>8} "
            f"{'bias':>10} {'bias_se':>10} {'bias/se':>7}  ok"
        )
        lines = [f"# {self.config}  (samples={self.samples}, batches={self.batches})", head]
        for name, lv in [*self.layers.items(), ("total", self.total)]:
            lines.append(
                f"{name:<24} {lv.numel:>8} {lv.sampling:>10.3e} {lv.quantization:>10.3e} "
                f"{lv.ratio:>8.3g} {lv.bias:>10.3e} {lv.bias_se:>10.3e} {lv.bias_ratio:>7.2f}  "
                f"{'yes' if lv.bias_ok else 'NO'}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "samples": self.samples,
            "batches": self.batches,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "total": self.total.to_dict(),
            "convergence": [list(c) for c in self.convergence],
        }


@dataclass(frozen=True)
class BitsSweep:
    """What :func:`variance_vs_bits` measured: a :class:`VarianceReport` per (kind, bits)."""

    kinds: tuple[str, ...]
    bits: tuple[int, ...]
    reports: dict[tuple[str, int], VarianceReport] = field(default_factory=dict)

    def value(self, kind: str, bits: int, term: str = "quantization", layer: str | None = None) -> float:
        r = self.reports[(kind, bits)]
        lv = r.total if layer is None else r.layers[layer]
        return float(getattr(lv, term))

    @property
    def sampling(self) -> float:
        """Sampling variance of the whole gradient (the same QAT reference for every entry)."""
        return next(iter(self.reports.values())).total.sampling

    def table(self, term: str = "quantization", layer: str | None = None) -> str:
        """Rows: quantizers; columns: bit-widths; cells: ``term`` of ``layer`` (default total)."""
        where = "whole gradient" if layer is None else f"{layer} weight gradient"
        what = "quantization / sampling variance" if term == "ratio" else f"{term} variance"
        lines = [
            f"# {what} of the {where} (sampling variance: "
            f"{self.sampling if layer is None else self._sampling(layer):.3e})",
            f"{'quantizer':<10}" + "".join(f"{f'{b} bits':>12}" for b in self.bits),
        ]
        for k in self.kinds:
            lines.append(f"{k:<10}" + "".join(f"{self.value(k, b, term, layer):>12.3e}" for b in self.bits))
        return "\n".join(lines)

    def _sampling(self, layer: str) -> float:
        return next(iter(self.reports.values())).layers[layer].sampling

    def plot(self, path: str | os.PathLike[str], *, layer: str | None = None, title: str | None = None) -> None:
        """Quantization variance vs bits per quantizer, log scale, with the sampling variance as
        a horizontal line. Needs matplotlib (``pip install fqt_compile[plots]``)."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for k in self.kinds:
            ax.semilogy(self.bits, [self.value(k, b, layer=layer) for b in self.bits], "o-", label=k.upper())
        s = self.sampling if layer is None else self._sampling(layer)
        ax.axhline(s, color="k", ls="--", lw=1, label="sampling")
        ax.set_xlabel("gradient bits (Q_b1)")
        ax.set_ylabel("variance (sum over elements)")
        ax.set_xticks(list(self.bits))
        ax.set_title(title or f"quantization variance, {'whole gradient' if layer is None else layer}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinds": list(self.kinds),
            "bits": list(self.bits),
            "reports": {f"{k}{b}": r.to_dict() for (k, b), r in self.reports.items()},
        }


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'fqt_compile[plots]' (or pip install matplotlib)"
        ) from None
    return plt


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _layer_slices(model: nn.Module) -> tuple[list[nn.Parameter], dict[str, slice]]:
    """Trainable parameters in order, and the flat slice of each Linear/Conv weight."""
    offsets: dict[str, slice] = {}
    params: list[nn.Parameter] = []
    start = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params.append(p)
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    layers = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and f"{path}.weight" in offsets:
            layers[path] = offsets[f"{path}.weight"]
    return params, layers


def _flat_grad(model: nn.Module, params: Sequence[nn.Parameter], loss_fn: LossFn, batch: Any) -> torch.Tensor:
    x, y = batch
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params]
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    x, y = batch
    mv = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return mv(x), mv(y)


def _qat_of(cfg: FQTConfig) -> FQTConfig:
    """The QAT reference of ``cfg``: same forward quantizers, exact backward."""
    overrides = tuple(
        dataclasses.replace(o, mode=Mode.QAT) if o.mode is Mode.FQT else o for o in cfg.overrides
    )
    return dataclasses.replace(cfg, mode=Mode.QAT, overrides=overrides)


def _compiled_copy(model: nn.Module, cfg: FQTConfig) -> nn.Module:
    from .frontend import compile as fqt_compile

    m = copy.deepcopy(model)
    fqt_compile(m, cfg)
    return m


@dataclass
class _Reference:
    """QAT gradients of each batch and their sampling variance (per element)."""

    grads: list[torch.Tensor]
    sampling: torch.Tensor  # (P,) float64
    params: list[nn.Parameter]
    layers: dict[str, slice]


def _mask_seed(seed: int, batch: int) -> int:
    """The global generator's seed for every pass on batch ``batch``: dropout masks (torch's
    and the counter-based ones) are a function of it, the same in the QAT pass and the FQT
    samples of that batch."""
    return (seed * _SEED_STRIDE + batch * 7919 + 104729) % (2**63)


def _pass_on(batch_index: int, seed: int, model, params, loss_fn, batch, rounding_seed: int | None = None):
    """One forward-backward on a batch with its dropout masks fixed (:func:`_mask_seed`); the
    stochastic rounding draws from a generator of its own (``rounding_seed``)."""
    from .rng import rounding_generator

    torch.manual_seed(_mask_seed(seed, batch_index))
    gen = torch.Generator().manual_seed(seed if rounding_seed is None else rounding_seed)
    with rounding_generator(gen):
        return _flat_grad(model, params, loss_fn, batch)


def _reference(model, cfg, loss_fn, batches, seed, progress) -> _Reference:
    qat = _compiled_copy(model, _qat_of(cfg))
    params, layers = _layer_slices(qat)
    grads = []
    for i, b in enumerate(batches):
        grads.append(_pass_on(i, seed, qat, params, loss_fn, b))
        progress(1)
    g = torch.stack(grads)
    sampling = g.var(dim=0, correction=1) if len(grads) > 1 else torch.zeros_like(grads[0])
    return _Reference(grads, sampling, params, layers)


def _measure(model, cfg, loss_fn, batches, ref: _Reference, samples: int, seed: int, progress) -> VarianceReport:
    fqt = _compiled_copy(model, cfg)
    params, _ = _layer_slices(fqt)
    n_p = ref.sampling.numel()
    quant = torch.zeros(n_p, dtype=torch.float64)  # sum over batches of per-element variance
    dist2 = torch.zeros(n_p, dtype=torch.float64)  # sum over batches of (mean - QAT)^2
    checkpoints = [k for k in (2**i for i in range(31)) if k <= samples]
    conv_err = {k: 0.0 for k in checkpoints}
    for bi, (batch, g_qat) in enumerate(zip(batches, ref.grads)):
        # Deviations from the QAT gradient: the mean of e is ~0, so the one-pass variance
        # sum(e^2) - sum(e)^2 / K has no cancellation, and is exactly 0 for a deterministic path.
        s1 = torch.zeros(n_p, dtype=torch.float64)
        s2 = torch.zeros(n_p, dtype=torch.float64)
        for k in range(1, samples + 1):
            e = _pass_on(bi, seed, fqt, params, loss_fn, batch, seed * _SEED_STRIDE + bi * 7919 + k) - g_qat
            s1 += e
            s2 += e * e
            progress(1)
            if k in conv_err:
                conv_err[k] += float(((s1 / k) ** 2).sum())
        var = (s2 - s1 * s1 / samples).clamp_(min=0) / max(samples - 1, 1)
        quant += var
        dist2 += (s1 / samples) ** 2
    nb = len(ref.grads)
    quant /= nb
    dist2 /= nb
    qat_sq = torch.stack(ref.grads).pow(2).mean(0)  # (P,) mean over batches of g^2

    def terms(sl: slice) -> LayerVariance:
        q = float(quant[sl].sum())
        return LayerVariance(
            numel=sl.stop - sl.start,
            sampling=float(ref.sampling[sl].sum()),
            quantization=q,
            bias=math.sqrt(float(dist2[sl].sum())),
            bias_se=math.sqrt(q / samples),
            grad_norm=math.sqrt(float(qat_sq[sl].sum())),
        )

    total = terms(slice(0, n_p))
    norm = total.grad_norm or 1.0
    convergence = tuple(
        (k, math.sqrt(conv_err[k] / nb) / norm, math.sqrt(total.quantization / k) / norm) for k in checkpoints
    )
    layers = {name: terms(sl) for name, sl in ref.layers.items()}
    return VarianceReport(cfg.describe(), samples, nb, layers, total, convergence)


def _prepare_batches(model: nn.Module, data: Iterable[Any], batches: int) -> list[Any]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for b in data:
        if len(out) == batches:
            break
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise TypeError(
                f"gradient_variance: data must yield (input, target) pairs, got {type(b).__name__}"
            )
        out.append(_to_device(b, device))
    if len(out) < 2:
        raise ValueError(
            f"gradient_variance: the sampling variance needs at least 2 batches; data gave {len(out)} "
            f"(batches={batches})"
        )
    return out


def _check_counts(samples: int, batches: int) -> None:
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"gradient_variance: samples must be an int >= 2, got {samples!r}")
    if not isinstance(batches, int) or batches < 2:
        raise ValueError(f"gradient_variance: batches must be an int >= 2, got {batches!r}")


class _Counter:
    def __init__(self, total: int, callback: Progress | None) -> None:
        self.done, self.total, self.callback = 0, total, callback

    def __call__(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


def gradient_variance(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    config: FQTConfig | str | dict | None = None,
    *,
    samples: int = 16,
    batches: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> VarianceReport:
    """Measure the paper's variance decomposition of the FQT gradient of ``model``.

    ``data`` yields ``(input, target)`` minibatches (the first ``batches`` are used);
    ``loss_fn(model(input), target)`` is the scalar loss. ``config`` (an :class:`FQTConfig`, a
    recipe name or a dict) is the FQT setting; the reference is its QAT twin (same forward
    quantizers Q_f, Q_w; exact straight-through backward). ``model`` itself is not modified:
    two deep copies are compiled, one per config.

    Returned per layer (module path of each ``nn.Linear``/``nn.Conv*``; the variance of its
    **weight gradient, summed over elements**) and in total (all trainable parameters):

    * ``sampling``: variance of the QAT gradient over the minibatches (ddof 1);
    * ``quantization``: variance of the FQT gradient over ``samples`` backward passes on the
      same batch with fresh stochastic rounding, averaged over the batches;
    * ``ratio`` = quantization / sampling;
    * ``bias``, ``bias_se``, ``bias_ok``: the distance between the mean of the ``samples`` FQT
      gradients and the QAT gradient, its standard error if FQT is unbiased, and whether the
      first is within :data:`BIAS_TOLERANCE` of the second.

    Dropout in training mode: every pass on one batch (the QAT reference and the FQT samples)
    draws the same dropout masks, so dropout's noise counts as sampling variance (it changes
    from batch to batch) and not as quantization variance, and the bias check compares
    gradients of the same masks. The global generator is reseeded per batch for that, and the
    stochastic rounding draws its seeds from a generator of its own
    (:func:`fqt_compile.rng.rounding_generator`). Holds for torch's dropout and for the
    counter-based one, as long as the QAT and the FQT graph draw the same random numbers in
    the same order apart from the rounding seeds (they come from the same traced model).

    Cost: ``batches * (1 + samples)`` forward-backward passes plus two compilations.
    Reproducible: the draws are reseeded from ``seed`` (the global torch generator is changed).
    ``progress(done, total)`` is called after every pass.
    """
    _check_counts(samples, batches)
    cfg = resolve_config(config)
    if cfg.mode is Mode.OFF:
        raise ValueError("gradient_variance: config mode 'off' has no quantizers; use mode 'fqt' or 'qat'")
    batch_list = _prepare_batches(model, data, batches)
    count = _Counter(len(batch_list) * (1 + samples), progress)
    ref = _reference(model, cfg, loss_fn, batch_list, seed, count)
    return _measure(model, cfg, loss_fn, batch_list, ref, samples, seed, count)


def _sweep_config(base: FQTConfig, kind: str, bits: int, grad_weight: GradSpec | None) -> FQTConfig:
    # The paper's split: Q_b1 varies; Q_b2 is 8-bit, per-tensor in PTQ runs and per-column in
    # the others (FQTConfig recipes ptqN / psqN / bhqN / hadamardN).
    gw = grad_weight or GradSpec(GradKind.PTQ if kind == "ptq" else GradKind.COLUMN, 8)
    return dataclasses.replace(base, mode=Mode.FQT, grad_input=GradSpec(kind, bits), grad_weight=gw)


def variance_vs_bits(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    kinds: Sequence[str] = ("ptq", "psq", "bhq", "hadamard"),
    bits: Sequence[int] = (4, 5, 6, 8),
    samples: int = 16,
    batches: int = 4,
    base: FQTConfig | str | dict | None = None,
    grad_weight: GradSpec | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> BitsSweep:
    """:func:`gradient_variance` for each gradient quantizer in ``kinds`` (Q_b1: PTQ ``ptq``,
    PSQ ``psq``, BHQ ``bhq``, ``hadamard``) at each of ``bits``.

    ``base`` supplies everything else (forward quantizers, covered ops; default: the default
    :class:`FQTConfig` with the eager inner compiler, which changes no statistic and compiles
    in a fraction of inductor's time). Q_b2 is 8-bit per-tensor for ``ptq`` and per-column
    otherwise, as in the paper's runs; ``grad_weight=GradSpec("none")`` leaves the weight-
    gradient path exact to isolate Q_b1. The QAT reference is computed once. The result
    prints as a table (:meth:`BitsSweep.table`) and plots with matplotlib
    (:meth:`BitsSweep.plot`).
    """
    _check_counts(samples, batches)
    base_cfg = FQTConfig(compiler=InnerCompiler.EAGER) if base is None else resolve_config(base)
    kinds = tuple(GradKind(k).value for k in kinds)
    bad = [k for k in kinds if k in ("none", "column")]
    if bad:
        raise ValueError(f"variance_vs_bits: kinds {bad} are not Q_b1 quantizers; use ptq, psq, bhq or hadamard")
    configs = {(k, b): _sweep_config(base_cfg, k, b, grad_weight) for k in kinds for b in bits}
    batch_list = _prepare_batches(model, data, batches)
    count = _Counter(len(batch_list) * (1 + samples * len(configs)), progress)
    ref = _reference(model, base_cfg, loss_fn, batch_list, seed, count)
    sweep = BitsSweep(kinds, tuple(bits))
    for key, cfg in configs.items():
        sweep.reports[key] = _measure(model, cfg, loss_fn, batch_list, ref, samples, seed, count)
        log.info("variance %s: quantization %.3e", cfg.describe(), sweep.reports[key].total.quantization)
    return sweep


# ---------------------------------------------------------------------------------------------
# Command line: python -m fqt_compile variance ...
# ---------------------------------------------------------------------------------------------


def add_variance_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m fqt_compile variance``."""
    parser.add_argument("--model", choices=("mlp", "cnn", "gpt"), default="cnn",
                        help="built-in workload: mlp/cnn on scikit-learn digits, gpt on characters of "
                        "the Python standard library's source (default: cnn)")
    parser.add_argument("--recipe", default=None,
                        help="measure one config (a recipe such as bhq5, or a JSON config file); "
                        "default: sweep --kinds x --bits")
    parser.add_argument("--kinds", default="ptq,psq,bhq,hadamard", help="Q_b1 quantizers of the sweep")
    parser.add_argument("--bits", default="4,5,6,8", help="bit-widths of the sweep (2..8)")
    parser.add_argument("--samples", type=int, default=16, help="FQT backward passes per batch")
    parser.add_argument("--batches", type=int, default=4, help="minibatches")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per minibatch (mlp/cnn); gpt uses batch-size/4 sequences of 64 characters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                        help="inner compiler (eager: same statistics, much faster to compile)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="variance-vs-bits plot (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got {text!r}") from None


def _progress_bar(enabled: bool) -> tuple[Progress | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=0, unit="pass", file=sys.stderr)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return update, bar.close
    start = time.monotonic()
    last = [0.0]

    def line(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.2:
            return
        last[0] = now
        width = 30
        fill = int(width * done / max(total, 1))
        rate = done / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} passes  eta {eta:4.0f}s")
        sys.stderr.flush()

    return line, lambda: sys.stderr.write("\n")


def _workload(name: str, batch_size: int, batches: int, seed: int):
    """(model, loss_fn, batches) of a built-in workload on real data that ships with packages."""
    import torch.nn.functional as F

    from .models import GPT, MLP, SmallCNN

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name in ("mlp", "cnn"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("--model mlp/cnn use scikit-learn's digits: pip install scikit-learn") from None
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        x = x.reshape(-1, 1, 8, 8) if name == "cnn" else x
        perm = torch.randperm(len(y), generator=g)
        data = [(x[i], y[i]) for i in perm[: batch_size * batches].split(batch_size)]
        model = SmallCNN(width=16) if name == "cnn" else MLP(64, 128, 10)
        return model, F.cross_entropy, data
    # gpt: characters of the standard library's own source, as bytes clipped to 7 bits
    root = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))[:40]
    text = "".join(open(os.path.join(root, f), encoding="utf-8", errors="replace").read() for f in files)
    codes = torch.tensor([min(ord(c), 127) for c in text[:2_000_000]], dtype=torch.int64)
    seq = 64
    starts = torch.randint(0, len(codes) - seq - 1, (batches, max(batch_size // 4, 1)), generator=g)
    data = [
        (torch.stack([codes[s:s + seq] for s in row]), torch.stack([codes[s + 1:s + seq + 1] for s in row]))
        for row in starts.tolist()
    ]
    model = GPT(vocab=128, d_model=64, n_heads=4, n_layers=2, max_len=seq)

    def lm_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    return model, lm_loss, data


def run_variance_command(args: argparse.Namespace) -> int:
    """``python -m fqt_compile variance``: measure, print a table, optionally write JSON/plot."""
    model, loss_fn, data = _workload(args.model, args.batch_size, args.batches, args.seed)
    update, close = _progress_bar(not args.no_progress)
    out: dict[str, Any]
    try:
        if args.recipe:
            if os.path.isfile(args.recipe):
                with open(args.recipe, encoding="utf-8") as f:
                    cfg = FQTConfig.from_dict(json.load(f))
            else:
                cfg = FQTConfig.recipe(args.recipe)
            cfg = dataclasses.replace(cfg, compiler=args.compiler)
            report = gradient_variance(model, loss_fn, data, cfg, samples=args.samples, batches=args.batches,
                                       seed=args.seed, progress=update)
            close()
            print(report.table())
            out = report.to_dict()
            if args.plot:
                print("--plot draws a variance-vs-bits sweep; it is ignored with --recipe", file=sys.stderr)
        else:
            base = FQTConfig(compiler=InnerCompiler(args.compiler))
            sweep = variance_vs_bits(model, loss_fn, data, kinds=args.kinds.split(","),
                                     bits=_parse_ints(args.bits, "bits"), samples=args.samples,
                                     batches=args.batches, base=base, seed=args.seed, progress=update)
            close()
            print(sweep.table())
            print()
            print(sweep.table("ratio"))
            out = sweep.to_dict()
            if args.plot:
                sweep.plot(args.plot, title=f"{args.model}: quantization variance vs bits")
                print(f"wrote {args.plot}")
    except BaseException:
        close()
        raise
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0
