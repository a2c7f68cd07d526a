"""The embedded base MIGM: a class-conditional, MaskGIT-style bidirectional transformer.

Reads like nanoGPT's model.py: a config dataclass, a pre-norm block, the model. The model exposes
the pieces the generation loop and the accelerators need (`features`, `head`, `embed`, `blocks`)
instead of only `forward`, because the shortcut replaces `features` at most steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    vocab_size: int = 256       # K codebook entries; the mask token is id K
    num_tokens: int = 49        # L = 7x7 grid
    num_classes: int = 10       # the null class for classifier-free guidance is id num_classes
    width: int = 192            # D
    depth: int = 10
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.1

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class Block(nn.Module):
    """Pre-norm transformer block with full (bidirectional) attention."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.norm2 = nn.LayerNorm(c.width)
        hidden = int(c.width * c.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c.width, hidden), nn.GELU(), nn.Linear(hidden, c.width))
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h + self.dropout(self.proj(a.transpose(1, 2).reshape(B, T, D)))   # (B, T, D)
        return h + self.dropout(self.mlp(self.norm2(h)))

    # --- per-layer access (models/layers.py: LayerAccess); forward above is these in order ---
    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm1(h)

    def project(self, x: torch.Tensor, pe: None = None, which: str = "qkv") -> tuple[torch.Tensor, ...]:
        """x (B, M, D) -> the named of q, k, v, each (B, H, M, d); positions were added at embedding."""
        B, M, D = x.shape
        if which == "qkv":                                   # the packed map, as forward runs it
            return tuple(t.transpose(1, 2) for t in
                         self.qkv(x).view(B, M, 3, self.heads, D // self.heads).unbind(2))
        out = []
        for part in which:
            i = "qkv".index(part)
            y = F.linear(x, self.qkv.weight[i * D:(i + 1) * D], self.qkv.bias[i * D:(i + 1) * D])
            out.append(y.view(B, M, self.heads, D // self.heads).transpose(1, 2))
        return tuple(out)

    def project_attn(self, a: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(a))

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.norm2(h)))


class MaskedTransformer(nn.Module):
    def __init__(self, config: TransformerConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or TransformerConfig()
        self.tok_emb = nn.Embedding(c.vocab_size + 1, c.width)          # + mask token
        self.pos_emb = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        self.cls_emb = nn.Embedding(c.num_classes + 1, c.width)         # + null class
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.lm_head = nn.Linear(c.width, c.vocab_size)                 # never predicts the mask
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with mask id, labels (B,) with null id -> input hidden state (B, L, D).

        The class is added to every position rather than prepended, so positions map 1:1 to
        tokens and features stay (B, L, D).
        """
        return self.tok_emb(tokens) + self.pos_emb + self.cls_emb(labels).unsqueeze(1)

    def features(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last-layer features after the final norm, (B, L, D): the state the shortcut evolves."""
        h = self.embed(tokens, labels)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> logits (B, L, K)."""
        return self.lm_head(features)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens, labels))
