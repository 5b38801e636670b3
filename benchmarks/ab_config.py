"""Same-process A/B of two fqt configs on the GPT of ``profile_step.py`` (or the CNN of
``bench_training.py``): interleaved steps.

    python benchmarks/ab_config.py --a 'FQTConfig(fuse_quantizers=False)' --b 'FQTConfig()'
    python benchmarks/ab_config.py --a 'FQTConfig(fuse_gelu=False)' --layers 2 --steps 8
    python benchmarks/ab_config.py --model cnn --a None --b 'FQTConfig()' --steps 20
    python benchmarks/ab_config.py --model llama --a 'FQTConfig(sdpa="decompose", recompute_mlp=False)'
    python benchmarks/ab_config.py --dropout-b 0.1      # the cost of attention dropout
    python benchmarks/ab_config.py --resid-dropout 0.1 --a 'FQTConfig(counter_dropout=False)'
    python benchmarks/ab_config.py --model encoder --scaled-softmax-unmatched a
    python benchmarks/ab_config.py --model encoder --a 'FQTConfig(sdpa="decompose")' --memory

Builds two GPTs (d 1024, 16 heads, MLP 4096, ``--layers`` blocks, same initial weights),
compiles one with each config (inductor inner compiler unless the config says otherwise),
runs 2 warm-up steps of each (compilation), then ``--steps`` timed steps of A and B
alternately on the same batch (8 x 512 tokens), and prints the median step times and their
ratio B / A. ``None`` as a config is the model uncompiled (fp32 eager). ``--model cnn``:
``SmallCNN`` width 32, 2 residual blocks, batch 128 of 1 x 28 x 28 (``--layers`` unused).
``--model llama``: Hugging Face Llama blocks (d 1024, 16 heads, 8 key/value heads, SwiGLU
MLP 2816; ``transformers``, random weights) on the same batch. ``--model encoder``: an
unmasked ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` (d 1024, 16 heads, GELU
MLP 4096, pre-norm, dropout 0) between a token embedding and a per-token classifier, on the
same batch. ``--model decoder``: a convolutional decoder with two stride-2
``nn.ConvTranspose2d`` (:func:`_decoder`), batch 128, mean squared error to a random target.
``--model resnet``: ResNet-18's 64 -> 128 and 128 -> 256 downsampling blocks on (32, 64, 56, 56)
features that require grad (as an earlier layer's output would), a pooled 10-way classifier
(:func:`_resnet`).
``--scaled-softmax-unmatched a`` (or ``b``): that variant compiles with
``passes.fuse_softmax`` blind to inductor's rewrite of a scaled softmax, as it was before it
learned that form (an unmasked attention's forward softmax then stays unfused under
inductor). On this shared 2-core machine whole runs drift by 10% and more from one run to the
next; steps interleaved in one process see the same drift, so the ratio is what to compare.
``fqt_compile.keep_freed_memory()`` is applied first (as in the other benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig, GradSpec  # noqa: E402,F401  (for the config expressions)
from fqt_compile.models import GPT, SmallCNN  # noqa: E402


def _llama(layers: int) -> torch.nn.Module:
    """Hugging Face Llama from a config with random weights: d 1024, 16 heads (8 key/value
    heads), SwiGLU MLP 2816, SDPA attention, vocabulary 256."""
    import transformers

    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=2816, vocab_size=256, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def _encoder(layers: int) -> torch.nn.Module:
    """Token embedding (256 x 1024), ``layers`` unmasked pre-norm nn.TransformerEncoderLayers
    (16 heads, GELU MLP 4096, no dropout), per-token classifier over 256 classes."""
    layer = torch.nn.TransformerEncoderLayer(1024, 16, 4096, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True)
    return torch.nn.Sequential(torch.nn.Embedding(256, 1024),
                               torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
                               torch.nn.Linear(1024, 256))


def _decoder() -> torch.nn.Module:
    """A convolutional decoder (an autoencoder's or DCGAN's, at MNIST size): (B, 64, 7, 7)
    latents, two stride-2 nn.ConvTranspose2d (kernel 4, padding 1: 64 -> 32 -> 16 channels,
    7 -> 14 -> 28) with batch norm and ReLU, and a 3 x 3 convolution to one channel."""
    nn = torch.nn
    return nn.Sequential(nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 1, 3, padding=1))


class _DownBlock(torch.nn.Module):
    """A ResNet basic block that halves the resolution: a 3 x 3 stride-2 convolution, batch norm,
    ReLU, a 3 x 3 convolution, batch norm, plus a 1 x 1 stride-2 shortcut with batch norm."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.short, self.bn_s = nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.bn_s(self.short(x)))


def _resnet() -> torch.nn.Module:
    """ResNet-18's two middle stage transitions at batch 32: (32, 64, 56, 56) features through
    a 64 -> 128 and a 128 -> 256 downsampling block (:class:`_DownBlock`), then global average
    pooling and a 10-way classifier."""
    nn = torch.nn
    return nn.Sequential(_DownBlock(64, 128), _DownBlock(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, 10))


@contextlib.contextmanager
def _scaled_softmax_unmatched(on: bool) -> Iterator[None]:
    """While ``on``: fuse_softmax matches a softmax only in the forms it knew before it matched
    inductor's rewrite of ``softmax(s * scale)`` (its exp reading ``sub(x, amax(x))`` itself)."""
    from fqt_compile.passes import fuse_softmax

    if not on:
        yield
        return
    current = fuse_softmax._softmax_input

    def earlier(p: torch.fx.Node) -> object:
        got = current(p)
        if p.target is torch.ops.aten.div.Tensor and not (p.args[0].args[0].target is torch.ops.aten.sub.Tensor):
            return None
        return got

    fuse_softmax._softmax_input = earlier
    try:
        yield
    finally:
        fuse_softmax._softmax_input = current


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="FQTConfig()", help="FQTConfig expression of variant A")
    ap.add_argument("--b", default="FQTConfig()", help="FQTConfig expression of variant B")
    ap.add_argument("--model", choices=("gpt", "cnn", "llama", "encoder", "decoder", "resnet"), default="gpt")
    ap.add_argument("--layers", type=int, default=1, help="GPT or Llama blocks")
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each variant")
    ap.add_argument("--dropout-a", type=float, default=0.0, help="GPT attention dropout of variant A")
    ap.add_argument("--dropout-b", type=float, default=0.0, help="GPT attention dropout of variant B")
    ap.add_argument("--resid-dropout", type=float, default=0.0,
                    help="GPT residual dropout (GPT-2's places) of both variants")
    ap.add_argument("--scaled-softmax-unmatched", choices=("a", "b"), default=None,
                    help="compile this variant with fuse_softmax blind to inductor's scaled-softmax rewrite")
    ap.add_argument("--memory", action="store_true",
                    help="after the timed steps, one step of each measuring the bytes saved for the backward "
                         "(bench_training.saved_bytes)")
    ap.add_argument("--out", default=None, help="write the step times as JSON here")
    args = ap.parse_args(argv)
    fqt_compile.keep_freed_memory()
    configs = {"a": eval(args.a), "b": eval(args.b)}  # noqa: S307 - command-line config expressions
    g = torch.Generator().manual_seed(0)
    if args.model in ("gpt", "llama", "encoder"):
        x, y = torch.randint(0, 256, (8, 512), generator=g), torch.randint(0, 256, (8, 512), generator=g)
    elif args.model == "decoder":  # latents -> images, a regression target
        x, y = torch.randn(128, 64, 7, 7, generator=g), torch.randn(128, 1, 28, 28, generator=g)
    elif args.model == "resnet":  # stage-1 features -> classes
        x, y = torch.randn(32, 64, 56, 56, generator=g), torch.randint(0, 10, (32,), generator=g)
        x.requires_grad_(True)  # features of earlier layers: the first block's grad_input GEMMs run
    else:
        x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    runs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        if args.model == "gpt":
            model = GPT(vocab=256, d_model=1024, n_heads=16, n_layers=args.layers, max_len=512, d_ff=4096)
            for block in model.blocks:
                block.dropout = getattr(args, f"dropout_{name}")
                block.resid_dropout = args.resid_dropout
        elif args.model == "llama":
            model = _llama(args.layers)
        elif args.model == "encoder":
            model = _encoder(args.layers)
        elif args.model == "decoder":
            model = _decoder()
        elif args.model == "resnet":
            model = _resnet()
        else:
            model = SmallCNN(in_ch=1, width=32, n_classes=10, blocks=2)
        if cfg is not None:
            fqt_compile.compile(model, cfg)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(name: str) -> float:
        model, opt = runs[name]
        t0 = time.perf_counter()
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        if args.model == "decoder":
            F.mse_loss(out, y).backward()
        else:
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    for name in runs:
        with _scaled_softmax_unmatched(args.scaled_softmax_unmatched == name):  # compiles in the warm-up
            for _ in range(2):
                step(name)
    # per variant: the softmaxes fuse_softmax fused (forward-style ones: the forward graphs' and
    # those the backward recomputes; softmax backwards)
    fused = {name: {key: sum(dict(rs).get("fuse_softmax", {}).get(key, 0) for r in fqt_compile.records(model)
                             for rs in r.aten_passes.values())
                    for key in ("fused", "fused_backward")}
             for name, (model, _) in runs.items() if configs[name] is not None}
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(args.steps):
        for name in ("a", "b"):
            times[name].append(step(name))
        print(f"step {i + 1}/{args.steps}: A {times['a'][-1]:.3f} s, B {times['b'][-1]:.3f} s", file=sys.stderr)
    saved: dict[str, float] = {}
    if args.memory:
        from bench_training import _param_keys, saved_bytes

        for name, (model, _) in runs.items():
            params = set().union(*(_param_keys(p) for p in model.parameters()))
            saved[name] = sum(saved_bytes(lambda: step(name), params).values()) / 2**20
        print(f"saved for the backward: A {saved['a']:.1f} MB, B {saved['b']:.1f} MB", file=sys.stderr)
    ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
    drop = f"  dropout A {args.dropout_a} B {args.dropout_b}" if args.dropout_a or args.dropout_b else ""
    drop += f"  residual dropout {args.resid_dropout}" if args.resid_dropout else ""
    drop += f"  scaled softmax unmatched in {args.scaled_softmax_unmatched.upper()}" if args.scaled_softmax_unmatched else ""
    print(f"{args.model} layers={args.layers}{drop}  A {args.a}: {ma:.3f} s  B {args.b}: {mb:.3f} s  B/A {mb / ma:.3f}"
          f"  (fused softmaxes A {fused.get('a', '-')}, B {fused.get('b', '-')})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"a": args.a, "b": args.b, "model": args.model, "layers": args.layers,
                       "dropout_a": args.dropout_a, "dropout_b": args.dropout_b, "resid_dropout": args.resid_dropout,
                       "scaled_softmax_unmatched": args.scaled_softmax_unmatched, "fused_softmax": fused,
                       "saved_mb": saved,
                       "times": times, "median_a": ma,
                       "median_b": mb, "torch": torch.__version__, "cpu": fqt_compile.cpu.describe()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
