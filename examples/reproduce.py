"""Reproduce the paper's claims at small scale and write docs/results.md (+ docs/figures/).

    python examples/reproduce.py            # full: under an hour on 2 CPU cores
    python examples/reproduce.py --quick    # a few minutes, one seed, short training
    python examples/reproduce.py --workloads charlm --state /tmp/c.pkl   # one workload per process
    python examples/reproduce.py --report-only --state /tmp/d.pkl,/tmp/c.pkl  # merge, rewrite docs

Workloads (real data from packages, see workloads.py): a ResNet-style CNN on scikit-learn's
digits and a character-level GPT on the standard library's source. For each: float, QAT
(8-bit forward), FQT with PTQ/PSQ/BHQ Q_b1 at 4, 5, 6, 8 bits (Q_b2 8-bit), a few seeds; and
the gradient-variance measurements of fqt_compile.variance on a half-trained float model.
Every number in results.md is computed here; the text around them is chosen by the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from charlm import fit, train  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig  # noqa: E402
from fqt_compile.variance import BIAS_TOLERANCE, gradient_variance, variance_vs_bits  # noqa: E402

KINDS = ("ptq", "psq", "bhq")
VAR_KINDS = ("ptq", "psq", "bhq", "hadamard")
BITS = (4, 5, 6, 8)
RECIPES = ["off", "qat8"] + [f"{k}{b}" for k in KINDS for b in BITS]
SETTINGS = {
    "full": {"digits": {"steps": 400, "seeds": 3}, "charlm": {"steps": 150, "seeds": 2},
             "var_samples": 12, "var_batches": 3, "conv_samples": 32},
    "quick": {"digits": {"steps": 120, "seeds": 1}, "charlm": {"steps": 50, "seeds": 1},
              "var_samples": 8, "var_batches": 3, "conv_samples": 16},
}
PAPER = {
    "digits": "ResNet-50 on ImageNet (BHQ 5-bit within about 0.5% top-1 of QAT)",
    "charlm": "Transformer on IWSLT/WMT (BLEU)",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def measure_variance(wl, steps: int, s: dict) -> dict:
    """Variance sweep and convergence runs on a float model trained for ``steps`` steps."""
    torch.manual_seed(0)
    model = wl.make_model()
    stream = wl.train_batches(0)
    fit(wl, model, steps, stream, weight_decay=0.01)  # AdamW's default decay
    data = [next(stream) for _ in range(s["var_batches"])]
    base = FQTConfig(compiler="eager")
    sweep = variance_vs_bits(model, wl.loss_fn, data, kinds=VAR_KINDS, bits=BITS, samples=s["var_samples"],
                             batches=s["var_batches"], base=base, seed=0)
    conv = {}
    for recipe in ("ptq4", "bhq4"):
        conv[recipe] = gradient_variance(model, wl.loss_fn, data[:2], FQTConfig.recipe(recipe, compiler="eager"),
                                         samples=s["conv_samples"], batches=2, seed=1)
    return {"sweep": sweep, "convergence": conv, "checkpoint_steps": steps}


def train_all(wl, steps: int, seeds: int) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    for recipe in RECIPES:
        out[recipe] = []
        for seed in range(seeds):
            t = time.time()
            res = train(wl, recipe, steps, seed)
            res["seconds"] = time.time() - t
            out[recipe].append(res)
            _log(f"{wl.name} {recipe} seed {seed}: loss {res['loss']:.4f} acc {res['accuracy']:.4f} "
                 f"({res['seconds']:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def figures(name: str, var: dict, runs: dict, metric: str, fig_dir: str) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    made = []
    path = os.path.join(fig_dir, f"{name}_variance_vs_bits.png")
    var["sweep"].plot(path, title=f"{name}: quantization variance of the gradient")
    made.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for recipe, rep in var["convergence"].items():
        ks = [c[0] for c in rep.convergence]
        ax.loglog(ks, [c[1] for c in rep.convergence], "o-", label=f"{recipe}: |mean_K - QAT| / |QAT|")
        ax.loglog(ks, [c[2] for c in rep.convergence], "k:", lw=1)
    ax.set_xlabel("K (FQT gradients averaged)")
    ax.set_ylabel("relative error")
    ax.set_title(f"{name}: mean FQT gradient -> QAT gradient (dotted: sqrt(Var/K))", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(fig_dir, f"{name}_unbiasedness.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    key = metric
    qat = statistics.median(r[key] for r in runs["qat8"])
    for k in KINDS:
        gaps = [statistics.median(r[key] for r in runs[f"{k}{b}"]) - qat for b in BITS]
        if key == "accuracy":
            gaps = [100 * g for g in gaps]
        ax.plot(BITS, gaps, "o-", label=k.upper())
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(list(BITS))
    ax.set_xlabel("gradient bits (Q_b1)")
    ax.set_ylabel("val accuracy - QAT (points)" if key == "accuracy" else "val loss - QAT (nats/char)")
    ax.set_title(f"{name}: final validation gap to QAT (median over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.path.join(fig_dir, f"{name}_gap_vs_bits.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    made.append(path)
    return made


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _e(x: float) -> str:
    return f"{x:.2e}"


def _mean_sd(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m = statistics.mean(vals) * scale
    if len(vals) > 1:
        return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"
    return f"{m:.{digits}f}"


def section(name: str, var: dict, runs: dict, metric: str, settings: dict, figs: list[str], docs_dir: str,
            inconclusive: list[str]) -> tuple[str, list[str]]:
    """Markdown of one workload, and the list of plain statements of disagreement (statements of
    what the numbers cannot decide go to ``inconclusive``)."""
    sweep = var["sweep"]
    disagreements: list[str] = []
    L = [f"## {name}", ""]
    L.append(f"Paper counterpart: {PAPER[name]}. Training: {settings['steps']} AdamW steps, "
             f"{settings['seeds']} seed(s) per configuration. Variance measured on a float model after "
             f"{var['checkpoint_steps']} steps, {sweep.reports[(VAR_KINDS[0], BITS[0])].batches} minibatches x "
             f"{sweep.reports[(VAR_KINDS[0], BITS[0])].samples} backward passes per configuration.")
    L.append("")
    for f in figs:
        L.append(f"![{os.path.basename(f)}]({os.path.relpath(f, docs_dir)})")
    L.append("")

    # -- claim 1 ----------------------------------------------------------------------------
    L += ["### 1. Quantization variance vs bits", "",
          "Whole-gradient quantization variance (sum over elements of the per-element variance over "
          "repeated backward passes; Q_b2 is 8-bit per-tensor for PTQ, per-column otherwise):", ""]
    L.append("| Q_b1 | " + " | ".join(f"{b} bits" for b in BITS) + " | factor per bit (4→6) |")
    L.append("|---|" + "---|" * (len(BITS) + 1))
    per_bit = {}
    for k in VAR_KINDS:
        v = [sweep.value(k, b) for b in BITS]
        per_bit[k] = math.sqrt(sweep.value(k, 4) / sweep.value(k, 6))
        L.append(f"| {k.upper()} | " + " | ".join(_e(x) for x in v) + f" | {per_bit[k]:.2f} |")
    L.append("")
    order_ok = {b: sweep.value("ptq", b) > sweep.value("psq", b) > sweep.value("bhq", b) for b in BITS}
    ok_bits = [b for b in BITS if order_ok[b]]
    bad_bits = [b for b in BITS if not order_ok[b]]
    L.append(f"- PTQ > PSQ > BHQ holds at {', '.join(map(str, ok_bits)) or 'no'} bits"
             + (f" and not at {', '.join(map(str, bad_bits))} bits." if bad_bits else " (all measured)."))
    ratios = {b: (sweep.value("ptq", b) / sweep.value("psq", b), sweep.value("psq", b) / sweep.value("bhq", b))
              for b in BITS}
    L.append("- Ratios PTQ/PSQ and PSQ/BHQ per bit-width: "
             + "; ".join(f"{b} bits: {r[0]:.2f}, {r[1]:.2f}" for b, r in ratios.items()) + ".")
    L.append("- Factor per bit, 4→6 bits (paper: about 4, i.e. (2^b - 1)^-2): "
             + ", ".join(f"{k.upper()} {per_bit[k]:.2f}" for k in VAR_KINDS) + ".")
    if bad_bits:
        small = [b for b in bad_bits if ratios[b][1] <= 1.0]
        disagreements.append(
            f"{name}: PTQ > PSQ > BHQ fails at {', '.join(map(str, bad_bits))} bits"
            + (f" (BHQ is not below PSQ there: PSQ/BHQ = {', '.join(f'{ratios[b][1]:.2f}' for b in small)})" if small else "")
            + ". Likely reason: BHQ only gains when a few rows (samples/tokens) dominate the gradient's range; "
            "in this small model the per-row ranges are similar, so BHQ's mixing has little to spread, and "
            "at 8 bits the fixed 8-bit Q_b2 dominates every quantizer's total.")
    marginal = [b for b in BITS if order_ok[b] and ratios[b][1] < 1.5]
    if marginal:
        q_b2 = ("the fixed 8-bit Q_b2 (per-column, identical for PSQ and BHQ) makes up much of both totals at "
                "8 bits, so Q_b1's difference is diluted")
        rows = ("BHQ gains in proportion to how unequal the rows' ranges are (a few samples or tokens with "
                "much larger gradients); in this model the per-token gradient rows have similar ranges")
        reason = q_b2 if marginal == [8] else f"{rows}; and {q_b2}"
        disagreements.append(
            f"{name}: BHQ is below PSQ but only marginally at {', '.join(map(str, marginal))} bits (PSQ/BHQ "
            f"{', '.join(f'{ratios[b][1]:.2f}' for b in marginal)}); the paper's BHQ gains are larger. "
            f"Likely reason: {reason}.")
    low_factor = [k for k in VAR_KINDS if per_bit[k] < 3.0]
    if low_factor:
        disagreements.append(
            f"{name}: variance falls by less than 3x per bit for {', '.join(k.upper() for k in low_factor)} "
            f"({', '.join(f'{per_bit[k]:.2f}' for k in low_factor)}). Likely reason: the 8-bit Q_b2 (weight-"
            "gradient path) adds a floor that does not change with Q_b1's bits.")
    L.append("")

    # -- claim 2 ----------------------------------------------------------------------------
    L += ["### 2. Sampling vs quantization variance", "",
          f"Sampling variance of the whole QAT gradient over minibatches: {_e(sweep.sampling)}. "
          "Ratio quantization / sampling:", ""]
    L.append("| Q_b1 | " + " | ".join(f"{b} bits" for b in BITS) + " |")
    L.append("|---|" + "---|" * len(BITS))
    for k in VAR_KINDS:
        L.append(f"| {k.upper()} | " + " | ".join(f"{sweep.value(k, b, 'ratio'):.3g}" for b in BITS) + " |")
    L.append("")
    rep8, rep4 = sweep.reports[("bhq", 8)], sweep.reports[("ptq", 4)]
    L.append("Per layer (weight gradients), quantization / sampling for BHQ 8-bit and PTQ 4-bit:")
    L.append("")
    L.append("| layer | sampling | BHQ 8-bit q/s | PTQ 4-bit q/s |")
    L.append("|---|---|---|---|")
    for layer, lv in rep8.layers.items():
        L.append(f"| {layer} | {_e(lv.sampling)} | {lv.ratio:.3g} | {rep4.layers[layer].ratio:.3g} |")
    L.append("")
    r8 = max(sweep.value(k, 8, "ratio") for k in VAR_KINDS)
    r4 = max(sweep.value(k, 4, "ratio") for k in VAR_KINDS)
    L.append(f"- At 8 bits the largest ratio is {r8:.3g}; at 4 bits {r4:.3g}.")
    if r8 >= 0.1:
        disagreements.append(
            f"{name}: at 8 bits quantization variance is not small next to sampling variance (ratio up to "
            f"{r8:.3g}). Likely reason: the sampling variance of a batch of this size on a nearly fitted model "
            "is small.")
    if r4 <= r8 * 4:
        disagreements.append(f"{name}: quantization variance barely grows from 8 to 4 bits (ratio {r8:.3g} -> {r4:.3g}).")
    L.append("")

    # -- claim 3 ----------------------------------------------------------------------------
    key = metric
    unit = "accuracy (%)" if key == "accuracy" else "loss (nats/char)"
    scale = 100.0 if key == "accuracy" else 1.0
    L += ["### 3. Final validation " + unit, ""]
    L.append(f"Gaps compare medians over seeds (robust to a single collapsed run; means ± standard "
             f"deviations are shown too).")
    L.append("")
    L.append(f"| config | {unit}, per seed | mean ± sd | median | gap to QAT (median) | time/run (s) |")
    L.append("|---|---|---|---|---|---|")
    nd = 2 if key == "accuracy" else 4
    qat = statistics.median(r[key] for r in runs["qat8"])
    gaps = {}
    for recipe in RECIPES:
        vals = [r[key] for r in runs[recipe]]
        gaps[recipe] = (statistics.median(vals) - qat) * scale
        secs = statistics.mean(r["seconds"] for r in runs[recipe])
        L.append(f"| {recipe} | {', '.join(f'{v * scale:.{nd}f}' for v in vals)} | {_mean_sd(vals, scale, nd)} | "
                 f"{statistics.median(vals) * scale:.{nd}f} | {gaps[recipe]:+.{nd}f} | {secs:.0f} |")
    L.append("")
    if key == "accuracy":
        collapsed = [f"{recipe} seed {i} ({r[key] * scale:.1f})" for recipe in RECIPES
                     for i, r in enumerate(runs[recipe])
                     if (statistics.median(x[key] for x in runs[recipe]) - r[key]) * scale > 10]
        if collapsed:
            L.append(f"- Runs more than 10 points below their configuration's median: {', '.join(collapsed)}. "
                     "These are late-training spikes of this recipe (constant learning rate, the model of the "
                     "last step is evaluated), which seed-to-seed spread shows in float and QAT too.")
    # noise level: the paired (same seed: same initialization and data order) difference between the
    # 8-bit FQT runs and QAT, which the paper's claims put at ~0; root mean square over kinds and seeds
    diffs = [(r[key] - q[key]) * scale for k in KINDS for r, q in zip(runs[f"{k}8"], runs["qat8"])]
    noise = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    worse = (lambda g: g < 0) if key == "accuracy" else (lambda g: g > 0)
    badness = {k: [(-1 if key == "accuracy" else 1) * gaps[f"{k}{b}"] for b in BITS] for k in KINDS}
    L.append(f"- Noise level (root mean square of the paired, same-seed difference between the 8-bit FQT runs "
             f"and QAT): {noise:.3g}.")
    worst4 = max(KINDS, key=lambda k: badness[k][0])
    best4 = min(KINDS, key=lambda k: badness[k][0])
    if badness[worst4][0] > 0:
        L.append(f"- At 4 bits the largest degradation is {worst4.upper()} ({gaps[worst4 + '4']:+.3g}), the "
                 f"smallest {best4.upper()} ({gaps[best4 + '4']:+.3g}).")
    else:  # no 4-bit configuration is below QAT's median: there is no degradation to order
        named = ", ".join(f"{k.upper()} {gaps[f'{k}4']:+.3g}" for k in KINDS)
        L.append(f"- At 4 bits no quantizer falls behind QAT's median ({named}); the least ahead is {worst4.upper()}.")
    b5 = gaps["bhq5"]
    if key == "accuracy":
        within = abs(b5) <= 0.5 or not worse(b5)
        verdict = ("within the paper's 0.5%" if abs(b5) <= 0.5 else "ahead of QAT: no degradation, within the paper's "
                   "0.5%" if within else "outside the paper's 0.5%")
        L.append(f"- BHQ 5-bit vs QAT: {b5:+.2f} points ({verdict}"
                 + (", but the noise level is larger than that margin)." if noise > 0.5 else ")."))
        if not within and noise <= 0.5:
            disagreements.append(f"{name}: BHQ 5-bit is {b5:+.2f} points from QAT, outside the paper's 0.5%.")
    else:
        L.append(f"- BHQ 5-bit vs QAT: {b5:+.4f} nats/char.")
    resolved = badness[worst4][0] - badness[best4][0] > 2 * noise
    gaps4 = ", ".join(f"{gaps[f'{k}4']:+.3g}" for k in KINDS)
    if not resolved:
        inconclusive.append(
            f"{name}: the 4-bit gaps of PTQ, PSQ and BHQ ({gaps4}) "
            f"differ by less than twice the noise level ({noise:.3g}); the order of degradation is not resolved.")
    if key == "accuracy" and noise > 0.5:
        inconclusive.append(
            f"{name}: the noise level ({noise:.3g} points) is larger than the paper's 0.5% margin, so 'BHQ 5-bit "
            "within 0.5% of QAT' can be neither confirmed nor refuted here.")
    bhq_behind = badness["bhq"][0] - badness[best4][0]  # >= 0; 0 when BHQ is (tied) best
    if (worst4 != "ptq" and resolved) or bhq_behind > 2 * noise:
        disagreements.append(
            f"{name}: the paper's order of degradation (PTQ first, BHQ last) is not reproduced: at 4 bits "
            f"the worst is {worst4.upper()}, and BHQ is {bhq_behind:.3g} behind the best ({best4.upper()}; noise "
            f"level {noise:.3g}). Likely reason: small models trained briefly are far from the regime where "
            "gradient variance limits the final quality; the ordering of variances (section 1) is the more "
            "direct test.")
    elif best4 != "bhq":
        L.append(f"- BHQ {'ties' if bhq_behind < 1e-9 else f'is within {bhq_behind:.3g} of'} the best 4-bit "
                 f"quantizer ({best4.upper()}), less than twice the noise level: consistent with the paper's order.")
    L.append("")

    # -- claim 4 ----------------------------------------------------------------------------
    L += ["### 4. Unbiasedness", "",
          "Relative distance of the mean of K FQT gradients from the QAT gradient (same batch, same forward "
          "quantizers), whole gradient, root mean square over 2 batches; `expected` is sqrt(Var/K)/|QAT|, what "
          "an unbiased estimator gives:", ""]
    L.append("| K | " + " | ".join(f"{r} distance | {r} expected" for r in var["convergence"]) + " |")
    L.append("|---|" + "---|---|" * len(var["convergence"]))
    reps = list(var["convergence"].values())
    for i, c in enumerate(reps[0].convergence):
        L.append(f"| {c[0]} | " + " | ".join(f"{r.convergence[i][1]:.3g} | {r.convergence[i][2]:.3g}" for r in reps) + " |")
    L.append("")
    for recipe, rep in var["convergence"].items():
        first, last = rep.convergence[0], rep.convergence[-1]
        failed = [n for n, lv in rep.layers.items() if not lv.bias_ok] + ([] if rep.total.bias_ok else ["total"])
        L.append(f"- {recipe}: the distance falls {first[1] / last[1]:.2f}x from K=1 to K={last[0]} "
                 f"(1/sqrt(K): {math.sqrt(last[0]):.2f}x); bias / standard error for the whole gradient "
                 f"{rep.total.bias_ratio:.2f}, per layer {min(lv.bias_ratio for lv in rep.layers.values()):.2f}-"
                 f"{max(lv.bias_ratio for lv in rep.layers.values()):.2f} (check: <= {BIAS_TOLERANCE:g}); "
                 + (f"failing: {', '.join(failed)}." if failed else "every layer passes."))
        if failed:
            disagreements.append(f"{name}: the bias check fails for {recipe} at {', '.join(failed)}: a bias in the "
                                 "implementation (the theory says FQT is unbiased).")
    L.append("")
    return "\n".join(L), disagreements


def write_report(mode: str, results: dict, docs_dir: str, elapsed: float) -> str:
    head = [
        "# Results: the paper's claims at small scale",
        "",
        "<!-- generated by examples/reproduce.py; do not edit by hand -->",
        "",
        f"Generated by `python examples/reproduce.py{' --quick' if mode == 'quick' else ''}` "
        f"(**{mode} mode**{': one seed and short training, so accuracy differences are mostly noise' if mode == 'quick' else ''}) "
        f"in {elapsed / 60:.1f} minutes of measurement on {os.cpu_count()} CPU core(s), torch {torch.__version__}, "
        f"Python {platform.python_version()}, fqt_compile {fqt_compile.__version__}.",
        "",
        "Paper: Chen, Gai, Yao, Mahoney, Gonzalez, *A Statistical Framework for Low-bitwidth Training of Deep "
        "Neural Networks*, NeurIPS 2020. Claims checked: (1) quantization variance PTQ > PSQ > BHQ, each "
        "falling about 4x per bit; (2) at 8 bits quantization variance is small next to sampling variance and "
        "grows at 4-5 bits; (3) final quality: PTQ degrades first, BHQ last, BHQ 5-bit within about 0.5% of QAT "
        "(ResNet-50/ImageNet); (4) the FQT gradient is an unbiased estimator of the QAT gradient.",
        "",
        "Configurations: `off` float; `qat8` 8-bit forward (Q_f, Q_w per-tensor, zero-aligned), exact "
        "backward; `ptqN`/`psqN`/`bhqN` FQT with Q_b1 = PTQ/PSQ/BHQ at N bits and Q_b2 8-bit (per-tensor for "
        "PTQ, per-column otherwise). Variance sweeps add the block-Hadamard Q_b1. All variances are of the "
        "weight gradients, summed over elements (`fqt_compile.variance`).",
        "",
    ]
    body, disagreements, inconclusive = [], [], []
    for name, res in results.items():
        text, dis = section(name, res["variance"], res["runs"], res["metric"], res["settings"], res["figures"],
                            docs_dir, inconclusive)
        body.append(text)
        disagreements += dis
    summary = ["## Where our numbers disagree with the paper", ""]
    if disagreements:
        summary += [f"- {d}" for d in disagreements]
    else:
        summary.append("- Nowhere: every checked claim holds at this scale.")
    summary.append("")
    if inconclusive:
        summary += ["## What these numbers cannot decide", ""] + [f"- {d}" for d in inconclusive] + [""]
    return "\n".join(head + summary + body)


def write_json(mode: str, results: dict, fig_dir: str) -> None:
    """All measurements as plain data: docs/figures/results.json."""
    raw: dict = {"mode": mode}
    for name, res in results.items():
        var = res["variance"]
        raw[name] = {"settings": res["settings"], "variance_sweep": var["sweep"].to_dict(),
                     "convergence": {k: v.to_dict() for k, v in var["convergence"].items()}, "runs": res["runs"]}
    with open(os.path.join(fig_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, short training (a few minutes)")
    p.add_argument("--workloads", default="digits,charlm")
    p.add_argument("--docs", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state", default=None,
                   help="pickle of the measurements (default: in the temp folder); with --report-only, "
                   "rewrite results.md and the figures from it (or from several, comma-separated) "
                   "without measuring again")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    s = SETTINGS[mode]
    docs_dir = os.path.normpath(args.docs)
    fig_dir = os.path.join(docs_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    state = args.state or os.path.join(tempfile.gettempdir(), f"fqt_reproduce_{mode}.pkl")
    if args.report_only:
        # several states (workloads measured in separate processes) merge into one report
        results, elapsed, modes = {}, 0.0, set()
        for path in state.split(","):
            with open(path, "rb") as f:
                saved = pickle.load(f)
            results.update(saved["results"])
            elapsed += saved["elapsed"]
            modes.add(saved["mode"])
        if len(modes) != 1:
            raise SystemExit(f"--report-only: the states mix modes {sorted(modes)}")
        saved = {"mode": modes.pop(), "elapsed": elapsed}
        for name, res in results.items():
            res["figures"] = figures(name, res["variance"], res["runs"], res["metric"], fig_dir)
        with open(os.path.join(docs_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(write_report(saved["mode"], results, docs_dir, saved["elapsed"]))
        write_json(saved["mode"], results, fig_dir)
        _log(f"rewrote {os.path.join(docs_dir, 'results.md')} from {state}")
        return 0
    t0 = time.time()
    results = {}
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]()
        ws = s[name]
        _log(f"{name}: variance measurements")
        var = measure_variance(wl, ws["steps"] // 2, s)
        print(var["sweep"].table(), flush=True)
        _log(f"{name}: training {len(RECIPES)} configs x {ws['seeds']} seed(s), {ws['steps']} steps")
        runs = train_all(wl, ws["steps"], ws["seeds"])
        figs = figures(name, var, runs, wl.metric, fig_dir)
        results[name] = {"variance": var, "runs": runs, "metric": wl.metric, "settings": ws, "figures": figs}
    elapsed = time.time() - t0
    with open(state, "wb") as f:
        pickle.dump({"mode": mode, "elapsed": elapsed, "results": results}, f)
    with open(os.path.join(docs_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(write_report(mode, results, docs_dir, elapsed))
    write_json(mode, results, fig_dir)
    _log(f"wrote {os.path.join(docs_dir, 'results.md')} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
