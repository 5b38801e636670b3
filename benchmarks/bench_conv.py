"""Where do the integer lowerings of the FQT convolutions beat the float convolution?

For each conv shape and each of its three GEMMs (``output``, ``grad_input``, ``grad_weight``),
builds the aten graph of that one ``fqt::qconv*`` op on int8 codes and compiles it with
inductor as the ``fqt`` backend does, in up to three variants:

- ``float``: left simulated, i.e. dequantize + the float convolution (oneDNN);
- ``im2col``: ``passes.lower_int_gemm`` with ``direct_conv=False`` -> channels-last im2col of
  the int8 codes, one ``torch._int_mm``, the float epilogue (scales, zero-point and padding
  corrections) and, for ``grad_input``, the col2im sum back to the input layout;
- ``direct``: the default lowering where it applies (``output`` and ``grad_input``, on a CPU
  where ``gemm.conv_int8_available``): oneDNN's int8 convolution of the codes
  (``fqt::conv_int8``) and the same epilogue.

A strided ``grad_input`` runs, in both lowered variants, as one stride-1 convolution per
output phase (``lower_int_gemm._split_phases``), each an ``output`` GEMM lowered by its rule;
the phases' size threshold (``_PHASE_MIN_MACS``) is read off those rows (``--strided``) and
the training-step A/Bs of ``ab_config.py`` (docs/performance.md, Strided grad_input).

All start from the same codes and give the same result (checked); the timings include
everything each variant does. The rules in ``passes/lower_int_gemm.py`` are read off this
table: ``_conv_rule`` off the ``im2col`` columns, ``_direct_rule`` off the ``direct`` ones.
The last column is what the default lowering picks (rules on): ``direct``, ``im2col`` or
``float``. Quantizers: 8-bit per-tensor affine (zero aligned)
input and weight, Q_b1 = PSQ (per-sample scales), Q_b2 = PTQ (per-tensor; the per-column Q_b2
of the default config puts a scale on grad_weight's contracted axis, which stays simulated).

The variants' calls are interleaved (medians of ``--reps`` rounds), with
``fqt_compile.keep_freed_memory()`` applied as in the training benchmarks.

    python benchmarks/bench_conv.py [--reps 9] [--strided] [--gemms grad_input] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile  # noqa: F401  (registers the fqt ops)
from fqt_compile import FQTConfig
from fqt_compile.passes.decompose_fqt import decompose_fqt
from fqt_compile.passes import lower_int_gemm as lower_mod
from fqt_compile.passes.lower_int_gemm import lower_int_gemm

SHAPES = [  # (batch, in_ch, out_ch, side, kernel, stride, padding)
    (128, 1, 32, 28, 3, 1, 1),    # SmallCNN stem (bench_training --models cnn): K = 9
    (128, 32, 32, 28, 3, 1, 1),   # SmallCNN width 32, residual block
    (128, 32, 64, 28, 3, 2, 1),   # SmallCNN downsampling conv
    (128, 8, 8, 28, 3, 1, 1),     # a narrow conv: K = 72, O = 8
    (128, 16, 16, 28, 3, 1, 1),   # K = 144, O = 16
    (32, 64, 64, 56, 3, 1, 1),    # a ResNet stage-1 conv
    (32, 256, 256, 14, 3, 1, 1),  # a ResNet stage-3 conv
    (32, 256, 1024, 14, 1, 1, 0), # a 1x1 bottleneck conv
    (32, 64, 128, 56, 3, 2, 1),   # a ResNet downsampling conv (stage 1 -> 2)
    (32, 256, 512, 28, 1, 2, 0),  # a ResNet 1x1 stride-2 shortcut
    (128, 32, 64, 14, 4, 2, 1),   # ab_config --model decoder's first ConvTranspose2d, as the conv it transposes
]


def bench(fns: dict, reps: int) -> dict:
    """Median seconds per call of each function, the calls interleaved (one of each in turn,
    ``reps`` rounds after one warm-up call each): drift on a shared machine hits all alike."""
    ts: dict = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def _compiled(fn, args, lower: bool, direct: bool = False):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    res = lower_int_gemm(gm, FQTConfig(lower_int_gemm=lower, direct_conv=direct), "bench")
    gm2, _ = decompose_fqt(gm)
    return torch.compile(gm2, backend="inductor", dynamic=False), res


def _default_kernel(fn, args, direct: bool = True) -> str:
    """The kernel the default lowering (rules on, direct convolution allowed unless
    ``direct`` is False) picks."""
    lower_mod.CONV_RULE = True
    try:
        gm = make_fx(fn, tracing_mode="fake")(*args)
        return lower_int_gemm(gm, FQTConfig(direct_conv=direct), "bench").decisions[0].kernel
    finally:
        lower_mod.CONV_RULE = False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conv.json"))
    ap.add_argument("--strided", action="store_true", help="only the shapes with stride > 1")
    ap.add_argument("--gemms", default="output,grad_input,grad_weight", help="comma-separated subset")
    args = ap.parse_args(argv)
    unknown = set(args.gemms.split(",")) - {"output", "grad_input", "grad_weight"}
    if unknown:
        ap.error(f"--gemms: unknown GEMM(s) {sorted(unknown)}; choose from output, grad_input, grad_weight")
    warnings.filterwarnings("ignore")
    fqt_compile.keep_freed_memory()  # as the training benchmarks: no page faults on each fresh output
    lower_mod.CONV_RULE = False  # time the lowering on every shape; the rule is what this measures
    fqt = torch.ops.fqt
    rows = []
    print(f"{'B x C -> O, side, k, s':26s} {'gemm':12s} {'M x K x N':>20s} {'float ms':>9s} {'im2col ms':>10s} "
          f"{'ratio':>6s}  {'rule':5s} {'direct ms':>10s} {'ratio':>6s}  default")
    for b, c, o, side, k, s, p in SHAPES:
        if args.strided and s == 1:
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, c, side, side, generator=g)
        w = torch.randn(o, c, k, k, generator=g) * 0.1
        xq = torch.ops.fqt.quantize(x, 8, "affine_zero", "tensor", 0)
        wq = torch.ops.fqt.quantize(w, 8, "affine_zero", "tensor", 0)
        conv = dict(stride=[s, s], padding=[p, p], dilation=[1, 1], groups=1)
        out_side = (side + 2 * p - k) // s + 1
        gy = torch.randn(b, o, out_side, out_side, generator=g)
        seed = torch.tensor(7)
        g_rows = torch.ops.fqt.sr_quantize(gy.reshape(b, -1), seed, 8, "row")  # PSQ
        g_tens = torch.ops.fqt.sr_quantize(gy.reshape(b, -1), seed, 8, "tensor")  # PTQ
        gr = (g_rows[0].reshape(gy.shape), g_rows[1].reshape(b, 1, 1, 1), g_rows[2].reshape(b, 1, 1, 1))
        gt = (g_tens[0].reshape(gy.shape), g_tens[1], g_tens[2])
        a = list(conv.values())
        cases = {
            "output": (lambda *t: fqt.qconv(*t, 8, 8, *a, "bench:output"), (*xq, *wq)),
            "grad_input": (lambda *t: fqt.qconv_grad_input(*t, 8, 8, list(x.shape), *a, "bench:grad_input"), (*gr, *wq)),
            "grad_weight": (lambda *t: fqt.qconv_grad_weight(*t, 8, 8, list(w.shape), *a, "bench:grad_weight"), (*gt, *xq)),
        }
        for gemm, (fn, inputs) in cases.items():
            if gemm not in args.gemms.split(","):
                continue
            torch._dynamo.reset()
            f_float, _ = _compiled(fn, inputs, lower=False)
            f_low, res = _compiled(fn, inputs, lower=True)
            f_dir, res_d = _compiled(fn, inputs, lower=True, direct=True)
            d = res.decisions[0]
            if "fqt.conv_int8" not in res_d.decisions[0].kernel:
                f_dir = None  # not applicable here (grad_weight, no VNNI)
            ref = f_float(*inputs)
            err = {}
            for name, f in (("im2col", f_low), ("direct", f_dir)):
                if f is not None:
                    err[name] = float((f(*inputs) - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
            fns = {"float": lambda: f_float(*inputs), "im2col": lambda: f_low(*inputs)}
            if f_dir is not None:
                fns["direct"] = lambda: f_dir(*inputs)
            t = bench(fns, args.reps)
            t_f, t_l, t_d = t["float"], t["im2col"], t.get("direct")
            row = dict(batch=b, in_ch=c, out_ch=o, side=side, kernel=k, stride=s, padding=p, gemm=gemm,
                       mkn=list(d.mkn), float_s=t_f, lowered_s=t_l, ratio=t_l / t_f, max_rel_err=err["im2col"],
                       kernel_used=d.kernel, lowering_reason=d.reason, direct_s=t_d,
                       direct_ratio=None if t_d is None else t_d / t_f,
                       direct_max_rel_err=err.get("direct"))  # fmt: skip
            rows.append(row)
            label = f"{b}x{c}->{o}, {side}, {k}, {s}"
            mkn = " x ".join(map(str, d.mkn))
            # a strided grad_input runs as its phases' stride-1 output GEMMs, each by its rule
            rule = None if _default_kernel(fn, inputs, direct=False) != "simulated" else "float"
            row["rule_lowers"] = rule is None
            kernel = _default_kernel(fn, inputs)
            if t_d is not None:
                row["direct_rule_lowers"] = "fqt.conv_int8" in kernel
            row["default_kernel"] = kernel
            phases = kernel.startswith("phases+")
            default = {"fqt.conv_int8": "direct", "simulated": "float"}.get(kernel.removeprefix("phases+"), "im2col")
            default += " (phases)" if phases else ""
            direct = f"{t_d * 1e3:10.2f} {t_d / t_f:6.2f}" if t_d is not None else f"{'':10s} {'':6s}"
            print(f"{label:26s} {gemm:12s} {mkn:>20s} {t_f * 1e3:9.2f} {t_l * 1e3:10.2f} {t_l / t_f:6.2f}  "
                  f"{'lower' if rule is None else 'float':5s} {direct}  {default}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cpu": fqt_compile.cpu.describe(), "threads": torch.get_num_threads(),
                   "reps": args.reps, "rows": rows},
                  f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
