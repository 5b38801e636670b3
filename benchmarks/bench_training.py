"""Training-step benchmark: FQT variants side by side with float baselines, in one process.

    python benchmarks/bench_training.py                 # GPT stack (d 1024, 4 blocks, 8 x 512) + CNN
    python benchmarks/bench_training.py --quick         # small shapes, for a smoke run
    python benchmarks/bench_training.py --models gpt --variants fp32_eager,fqt_lowered_inductor

Variants: fp32 eager; bf16 autocast eager; torch.compile (inductor) fp32; fqt simulated (lowering
off, inductor); fqt lowered with the eager inner compiler; fqt lowered with inductor; torchao's
int8 mixed-precision training (when torchao imports). Each variant trains a copy of the same
initial model with AdamW; after warm-up steps (compilation included there), ``--steps`` steps are
timed and the median is reported, with tokens (or images) per second and the ratios to fp32
eager and bf16 autocast from the same run. ``--malloc keep`` (the default) applies
``fqt_compile.cpu.keep_freed_memory()`` to the whole process first, so every variant's large
tensors reuse freed memory instead of page-faulting fresh memory each step; ``--malloc
default`` measures glibc's default behaviour. "saved MB" is the size of the tensors autograd keeps
for the backward (tensors on a parameter's storage excluded), measured with saved_tensors_hooks on one step: the
activation memory of the step. "peak MB" is the peak of torch's CPU allocations during one step
above what the step started with (profiler memory events; ``resident_MB`` in the JSON is that
start: parameters, gradients, optimizer state). "GEMM %" is the share of profiled CPU time spent in matrix
products (aten mm/addmm/bmm/_int_mm/convolution and fqt::int_mm calls; inductor's own GEMM
templates count when their kernel names say so). Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig, GradSpec  # noqa: E402
from fqt_compile.models import GPT, SmallCNN  # noqa: E402
from malloc_option import add_malloc_argument, apply_malloc  # noqa: E402

GEMM_KEYS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "aten::convolution", "fqt::int_mm",
             "aten::mkldnn_convolution", "aten::convolution_backward", "aten::linear", "aten::matmul", "gemm")
INT_MM_PATCHES = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------


def make_gpt(quick: bool):
    if quick:
        d, heads, layers, ff, batch, seq = 256, 4, 2, 1024, 4, 128
    else:
        d, heads, layers, ff, batch, seq = 1024, 16, 4, 4096, 8, 512
    model = GPT(vocab=256, d_model=d, n_heads=heads, n_layers=layers, max_len=seq, d_ff=ff)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, seq), generator=g)
    y = torch.randint(0, 256, (batch, seq), generator=g)
    return model, (x, y), batch * seq, f"GPT d={d} heads={heads} layers={layers} ff={ff} batch={batch}x{seq}"


def make_cnn(quick: bool):
    width, batch, side = (16, 32, 16) if quick else (32, 128, 28)
    model = SmallCNN(in_ch=1, width=width, n_classes=10, blocks=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, side, side, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, (x, y), batch, f"SmallCNN width={width} blocks=2 batch={batch} 1x{side}x{side}"


MODELS = {"gpt": make_gpt, "cnn": make_cnn}


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


# --------------------------------------------------------------------------------------------
# variants: (prepare model) -> (model, autocast context factory)
# --------------------------------------------------------------------------------------------


def _none() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _fqt(cfg: FQTConfig, patches: dict | None = None):
    def prep(m: nn.Module):
        fqt_compile.compile(m, cfg)
        if patches:
            fqt_compile.frontend._BACKENDS[m].inductor_config_patches.update(patches)
        return m

    return prep


def _torchao(m: nn.Module):
    from torchao.prototype.quantized_training import int8_mixed_precision_training
    from torchao.quantization import quantize_

    quantize_(m, int8_mixed_precision_training())
    return torch.compile(m)


#: the config that saves what the recompute options recompute (the default until the eighteenth
#: session)
SAVE = FQTConfig(sdpa="decompose", recompute_mlp=False)

VARIANTS: dict[str, tuple[Callable[[nn.Module], nn.Module], Callable[[], Any]]] = {
    "fp32_eager": (lambda m: m, _none),
    "bf16_autocast_eager": (lambda m: m, _bf16),
    "inductor_fp32": (lambda m: torch.compile(m), _none),
    "fqt_simulated_inductor": (_fqt(FQTConfig(lower_int_gemm=False)), _none),
    "fqt_lowered_eager": (_fqt(FQTConfig(compiler="eager")), _none),
    # the default config: since the eighteenth session it recomputes attention and the MLP's
    # first linear layer + GELU in the backward (sdpa="recompute", recompute_mlp=True)
    "fqt_lowered_inductor": (_fqt(FQTConfig()), _none),
    # the default before the eighteenth session: attention probabilities and GELU's float
    # input saved for the backward (faster, 1.19x fp32's activation bytes on the GPT stack)
    "fqt_lowered_inductor_save": (_fqt(SAVE), _none),
    # Q_b2 per tensor (PTQ) instead of per column: a convolution's grad_weight contracts over
    # samples and positions, so only a per-tensor Q_b2 lets it run as an integer GEMM
    "fqt_lowered_inductor_qb2_ptq": (_fqt(FQTConfig(grad_weight=GradSpec("ptq", 8))), _none),
    # inductor's channels-last layout optimization for conv nets, which the fqt backend turns
    # off by default (fqt_compile.backend.DEFAULT_INDUCTOR_PATCHES)
    "fqt_lowered_inductor_channels_last": (_fqt(FQTConfig(), {"layout_optimization": True}), _none),
    # attention (scaled_dot_product_attention) left in full precision: its (B, H, L, L) operands
    # are the largest tensors the quantizers see
    # (the MLP saved, as in the rows of earlier sessions)
    "fqt_lowered_inductor_sdpa_fp": (_fqt(dataclasses.replace(SAVE, sdpa="full_precision")), _none),
    # attention quantized, its probabilities recomputed in the backward instead of saved; the
    # MLP saved
    "fqt_lowered_inductor_sdpa_recompute": (_fqt(dataclasses.replace(SAVE, sdpa="recompute")), _none),
    # and the MLP's first linear layer + GELU recomputed too (the default config, spelled out)
    "fqt_lowered_inductor_recompute_all": (_fqt(FQTConfig(sdpa="recompute", recompute_mlp=True)), _none),
    # the same with inductor's max-autotune GEMM search (CPP int8 template vs aten._int_mm)
    "fqt_lowered_inductor_autotune": (_fqt(FQTConfig(), INT_MM_PATCHES), _none),
    "torchao_int8_mp": (_torchao, _none),
}


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of a tensor's storage; a wrapper subclass without one (torchao's weights)
    is keyed by its id and counted at its own size."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def _param_keys(p: torch.Tensor) -> set[int]:
    """Storage keys of a parameter; a wrapper subclass contributes its inner tensors' storages
    (a compiled graph saves those plain tensors), and its own id."""
    keys = {_storage(p)[0]}
    if hasattr(p, "__tensor_flatten__"):
        names, _ = p.__tensor_flatten__()
        for name in names:
            keys |= _param_keys(getattr(p, name))
    return keys


def saved_bytes(step: Callable[[], float], param_storages: set[int]) -> dict[str, int]:
    """Bytes autograd keeps for the backward, by dtype (one count per storage). Tensors on a
    parameter's storage (the parameter, or a view of it such as the ``weight.t()`` that
    eager ``addmm`` saves) are not activation memory and are not counted."""
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor):
        key, nbytes = _storage(t) if t.device.type != "meta" else (None, 0)
        if key is not None and key not in param_storages:
            seen[key] = (nbytes, str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return by_dtype


def peak_step_bytes(step: Callable[[], float]) -> int:
    """Peak of torch's CPU allocations during one step, above what was allocated when it
    began (parameters, their gradients from the step before, optimizer state, inputs): the
    profiler's memory events (every allocation and free through c10's CPU allocator, eager
    ops and inductor's buffers alike), summed in time order. glibc's own caching (see
    ``--malloc``) is not in it: this is what the step asks for, not the process's RSS."""
    import itertools

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    return max(itertools.accumulate((n for _, n in events), initial=0))


def resident_bytes(opt: torch.optim.Optimizer) -> int:
    """Parameters, their gradients and the optimizer's state: what a step starts from."""
    params = [p for g in opt.param_groups for p in g["params"]]
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(dict(_storage(t) for t in tensors).values())


def gemm_share(step: Callable[[], float]) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = gemm = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        # (not the compiled graph's own call event: its hash-like name can contain "gemm")
        if not ev.key.startswith("## Call CompiledFxGraph") and any(k in ev.key for k in GEMM_KEYS):
            gemm += t
    return gemm / total if total else float("nan")


def run_variant(name: str, make, quick: bool, steps: int, warmup: int, profile: bool) -> dict[str, Any]:
    prep, ctx = VARIANTS[name]
    torch.manual_seed(0)
    base, (x, y), units, desc = make(quick)
    model = prep(copy.deepcopy(base))
    opt = torch.optim.AdamW(base.parameters() if model is None else model.parameters(), lr=1e-4)

    def step() -> float:
        with ctx():
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    times, losses = [], []
    for i in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
        log(f"  {name}: step {i + 1}/{steps} {times[-1]:.3f} s")
    params = set().union(*(_param_keys(p) for g in opt.param_groups for p in g["params"]))
    res = {
        "variant": name,
        "model": desc,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "warmup_s": warm,
        "units_per_s": units / statistics.median(times),
        "saved_MB_by_dtype": {k: v / 2**20 for k, v in saved_bytes(step, params).items()},
        "loss_last": losses[-1],
    }
    res["saved_MB"] = sum(res["saved_MB_by_dtype"].values())
    res["peak_step_MB"] = peak_step_bytes(step) / 2**20
    res["resident_MB"] = resident_bytes(opt) / 2**20
    if profile:
        res["gemm_share"] = gemm_share(step)
    recs = fqt_compile.frontend._BACKENDS.get(model) if isinstance(model, nn.Module) else None
    if recs is not None:
        low = [r for rec in recs.records for k in ("forward", "backward") for n, r in rec.aten_passes.get(k, []) if n == "lower_int_gemm"]
        res["gemms_lowered"] = sum(len(r.lowered) for r in low)
        res["gemms_total"] = sum(len(r.decisions) for r in low)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt,cnn")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="skip the GEMM-share profile step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "training.json"))
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    args.malloc = apply_malloc(args.malloc)
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), **fqt_compile.cpu.describe(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "args": vars(args),
        "models": {},
    }
    for mname in args.models.split(","):
        rows = []
        for v in args.variants.split(","):
            log(f"[{mname}] {v}")
            try:
                rows.append(run_variant(v, MODELS[mname], args.quick, args.steps, args.warmup, not args.no_profile))
            except Exception as e:  # a peer that does not run here is reported, not fatal
                log(f"  {v} failed: {type(e).__name__}: {e}")
                rows.append({"variant": v, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        ok = {r["variant"]: r for r in rows if "error" not in r}
        for r in rows:
            if "error" in r:
                continue
            for ref in ("fp32_eager", "bf16_autocast_eager"):
                if ref in ok:
                    r[f"time_vs_{ref}"] = r["step_s_median"] / ok[ref]["step_s_median"]
                    r[f"saved_vs_{ref}"] = r["saved_MB"] / ok[ref]["saved_MB"] if ok[ref]["saved_MB"] else None
                    r[f"peak_vs_{ref}"] = r["peak_step_MB"] / ok[ref]["peak_step_MB"] if ok[ref]["peak_step_MB"] else None
        results["models"][mname] = rows
        print(f"\n{mname}: {rows[0].get('model', '')}")
        print(f"{'variant':26s} {'step s':>8s} {'units/s':>9s} {'vs fp32':>8s} {'vs bf16':>8s} {'saved MB':>9s} {'vs fp32':>8s} {'peak MB':>8s} {'GEMM %':>7s} {'lowered':>8s}")
        for r in rows:
            if "error" in r:
                print(f"{r['variant']:26s} error: {r['error'][:80]}")
                continue
            low = f"{r['gemms_lowered']}/{r['gemms_total']}" if "gemms_total" in r else "-"
            print(
                f"{r['variant']:26s} {r['step_s_median']:8.3f} {r['units_per_s']:9.0f} "
                f"{r.get('time_vs_fp32_eager', float('nan')):8.2f} {r.get('time_vs_bf16_autocast_eager', float('nan')):8.2f} "
                f"{r['saved_MB']:9.1f} {r.get('saved_vs_fp32_eager') or float('nan'):8.2f} {r['peak_step_MB']:8.0f} "
                f"{100 * r.get('gemm_share', float('nan')):7.1f} {low:>8s}"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
