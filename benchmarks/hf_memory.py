"""Activation memory of Hugging Face models under FQT: the bytes autograd keeps for the backward.

    python benchmarks/hf_memory.py --out benchmarks/results/hf_memory.json
    python benchmarks/hf_memory.py --models llama --d-model 512 --layers 4

For GPT-2 (its tanh-GELU written out as elementwise ops), Llama (SwiGLU, grouped-query
attention) and BERT (GELU), built from a config with random weights (``transformers``, nothing
downloaded), with SDPA attention: one training step's saved bytes (``bench_training.saved_bytes``:
tensors on a parameter's storage excluded) for fp32 eager, the default ``fqt`` config (attention
and the MLP's activation recomputed in the backward from saved int8 codes) and
``FQTConfig(sdpa="decompose", recompute_mlp=False)``, which keeps them. The eager inner
compiler (the saved tensors are the partitioner's choice, the same under inductor; compiling is
seconds instead of minutes). A memory measurement, so no timing and no ``--malloc``. Writes JSON
(``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_training import _param_keys, saved_bytes  # noqa: E402

CONFIGS: dict[str, FQTConfig | None] = {
    "fp32_eager": None,
    "fqt_default": FQTConfig(compiler="eager"),
    "fqt_save": FQTConfig(compiler="eager", sdpa="decompose", recompute_mlp=False),
}


def _models(d: int, layers: int, seq: int, vocab: int) -> dict[str, Callable[[], nn.Module]]:
    import transformers

    heads = max(1, d // 64)

    def gpt2() -> nn.Module:
        c = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=seq,
                                    bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel._from_config(c, attn_implementation="sdpa")

    def llama() -> nn.Module:
        c = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                                     num_key_value_heads=max(1, heads // 2), intermediate_size=4 * d, vocab_size=vocab,
                                     max_position_embeddings=seq, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM._from_config(c, attn_implementation="sdpa")

    def bert() -> nn.Module:
        c = transformers.BertConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                                    intermediate_size=4 * d, vocab_size=vocab, max_position_embeddings=seq,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForMaskedLM._from_config(c, attn_implementation="sdpa")

    return {"gpt2": gpt2, "llama": llama, "bert": bert}


def measure(make: Callable[[], nn.Module], cfg: FQTConfig | None, batch: int, seq: int, vocab: int) -> dict[str, int]:
    torch.manual_seed(0)
    model = make()
    if cfg is not None:
        fqt_compile.compile(model, cfg)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    params: set[int] = set()
    for p in model.parameters():
        params |= _param_keys(p)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    return saved_bytes(step, params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,llama,bert")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = _models(args.d_model, args.layers, args.seq, args.vocab)
    unknown = sorted(set(args.models.split(",")) - set(models))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(models)}")
    results: dict[str, Any] = {}
    print(f"{'model':8s} {'config':12s} {'saved MB':>9s} {'vs fp32':>8s}  by dtype (MB)")
    for name in args.models.split(","):
        rows: dict[str, Any] = {}
        for label, cfg in CONFIGS.items():
            by_dtype = measure(models[name], cfg, args.batch, args.seq, args.vocab)
            total = sum(by_dtype.values())
            rows[label] = {"saved_bytes": total, "by_dtype": by_dtype}
            ratio = total / rows["fp32_eager"]["saved_bytes"]
            rows[label]["vs_fp32"] = round(ratio, 3)
            mb = {k: round(v / 2**20, 1) for k, v in by_dtype.items() if v}
            print(f"{name:8s} {label:12s} {total / 2**20:9.1f} {ratio:8.2f}  {mb}", flush=True)
        results[name] = rows
    if args.out:
        import transformers

        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
                       "results": results}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
