"""Small reference models used by the tests, examples, benchmarks and the CLI.

``MLP``, ``SmallCNN`` (conv, batchnorm, residual add, pooling) and ``TransformerBlock``
(attention through ``F.scaled_dot_product_attention``, MLP, layernorm), plus ``GPT`` (a
stack of blocks with token/position embeddings) for language-model examples.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "SmallCNN", "TransformerBlock", "GPT"]


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, d_hidden: int = 128, d_out: int = 10, depth: int = 2) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class SmallCNN(nn.Module):
    """A ResNet-style CNN for 1-channel images (8x8 digits by default)."""

    def __init__(self, in_ch: int = 1, width: int = 16, n_classes: int = 10, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)])
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = F.relu(self.down(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention (SDPA) + GELU MLP. ``dropout``: on the
    attention probabilities; ``resid_dropout``: on the attention and MLP outputs before each
    residual add (GPT-2's places)."""

    def __init__(self, d_model: int = 64, n_heads: int = 4, d_ff: int | None = None, dropout: float = 0.0,
                 resid_dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff or 4 * d_model)
        self.fc2 = nn.Linear(d_ff or 4 * d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = resid_dropout

    def _resid(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.resid_dropout, self.training) if self.resid_dropout else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self._resid(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self._resid(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, ``n_layers`` blocks, tied-free LM head."""

    def __init__(self, vocab: int = 128, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 max_len: int = 256, d_ff: int | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))
