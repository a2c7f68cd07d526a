"""The shortcut S: f_{i+1} = f_i + S(f_i, tokens decoded at step i, t_i)  (paper Sec. 3.3).

Between two steps the base model's last-layer features move little, and what moves them is the
handful of tokens the sampler just placed. So S reads the previous features, lets every position
cross-attend to the newly decoded tokens (embedded with their positions), mixes the result with
one self-attention, and writes a residual. It works inside a bottleneck (D -> D/R) because the
change is driven by a few tokens and is therefore low-rank, and is told the time t through a
sinusoidal embedding and adaptive layer norm, because the dynamics differ early and late.

The up-projection starts at zero, so an untrained shortcut is the identity f_{i+1} = f_i: training
starts from "features do not change" and only has to learn the correction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from migm.models.assets import load_module


@dataclass
class NetworkConfig:
    """Base of every shortcut architecture's config, chosen in YAML by `class_path`: ours
    (ShortcutConfig), the official MaskGIT one (shortcut/maskgit_official.py), the official
    DiMOO one (shortcut/dimoo_official.py). ShortcutModule trains and tests whichever is given."""

    feature_dim: int = 192        # D of the base model's last-layer features

    def build(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} names no network: use a subclass")

    def load_weights(self, path: str, base) -> dict[str, torch.Tensor]:
        """Weights for `test` from a file in this architecture's released format, as our
        state_dict; `base` is the frozen base model (some formats lean on its tables)."""
        raise NotImplementedError(f"{type(self).__name__} has no weight format")


def time_input(net: nn.Module, t: torch.Tensor, mask_ratio: torch.Tensor) -> torch.Tensor:
    """What a network is told about time: ours takes t = (i-1)/N of the grid its output
    describes; the official ones take that grid's mask ratio (`time_input = "mask_ratio"`)."""
    return mask_ratio if getattr(net, "time_input", "t") == "mask_ratio" else t


@dataclass
class ShortcutConfig(NetworkConfig):
    vocab_size: int = 256         # ids of decodable tokens (the mask id is never a new token)
    num_tokens: int = 49          # L: positions in the token grid
    ratio: int = 2                # bottleneck R: the shortcut works at width D / R
    blocks: int = 1               # (cross-attention + MLP, self-attention + MLP) pairs
    heads: int = 2                # 2 heads of 48 at R=2: 11% cheaper per call than 4 of 24 here
    mlp_ratio: float = 2.0
    cross_attention: bool = True  # False: the ablation whose first attention is self-attention
    grid_tokens: bool = False     # also add an embedding of every position's current token
    gelu: str = "none"            # "tanh": the approximation (the shipped shortcut was trained with it)
    time_frequencies: int = 128   # size of the sinusoidal time embedding

    def __post_init__(self) -> None:
        if self.ratio < 1 or self.feature_dim % self.ratio:
            raise ValueError(f"ratio must divide feature_dim ({self.feature_dim}), got {self.ratio}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide the bottleneck width {self.width}")
        if self.gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {self.gelu!r}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")

    @property
    def width(self) -> int:
        return self.feature_dim // self.ratio

    def build(self) -> ShortcutNetwork:
        return ShortcutNetwork(self)

    def load_weights(self, path: str, base) -> dict[str, torch.Tensor]:
        """An exported shortcut asset (`python -m migm export shortcut`), by name or path."""
        return shipped_weights(path, self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """t (B,) in [0, 1] -> (B, dim) sinusoids; t is scaled by 1000 so its frequencies spread."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def grid_sinusoids(num_tokens: int, dim: int) -> torch.Tensor:
    """(L, dim) sin/cos of a square grid's row (first half of dim) and column (second half), as
    MAE and DiT tabulate 2D positions; a non-square L is treated as one row."""
    side = math.isqrt(num_tokens)
    rows, cols = (side, side) if side * side == num_tokens else (1, num_tokens)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")

    def axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        freqs = 1.0 / 10_000 ** (torch.arange(d // 2) / max(d // 2, 1))
        angles = pos.flatten().float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], -1)                          # (L, d)

    half = dim // 2
    return torch.cat([axis(r, half), axis(c, dim - half)], -1)[:, :dim]


def pack_new_tokens(tokens: torch.Tensor, new: torch.Tensor,
                    count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather each row's newly decoded tokens to the front, padded to the row maximum.

    tokens (B, L), new (B, L) bool -> ids (B, K), positions (B, K), valid (B, K) bool, where K is
    the largest number of new tokens in any row. During generation every row reveals the same
    count, known from the schedule (`count`), so nothing is padded and K is not read back from
    the device; in training, rows from different steps differ.
    """
    count_ = new.sum(1)
    K = count if count is not None else (max(int(count_.max()), 1) if len(count_) else 1)
    K = max(K, 1)
    count = count_
    positions = new.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]   # (B, K)
    ids = tokens.gather(1, positions)
    valid = torch.arange(K, device=tokens.device)[None] < count[:, None]
    return ids.masked_fill(~valid, 0), positions, valid


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, d) * (1 + scale) + shift, per sample: one fused kernel (runs at every step)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d) attends to context (B, K, d); valid (B, K) masks padded keys."""
        q = rearrange(self.q(x), "b l (h e) -> b h l e", h=self.heads)
        k, v = rearrange(self.kv(context), "b k (two h e) -> two b h k e", two=2, h=self.heads)
        mask = None if valid is None else valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(y, "b h l e -> b l (h e)"))


class MLP(nn.Sequential):
    # Exact (erf) GELU: on a CPU without AVX-512 the tanh approximation took 2.6x as long and 13% of
    # a shortcut call; the base model uses the exact one too.
    def __init__(self, width: int, ratio: float, gelu: str = "none") -> None:
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate=gelu), nn.Linear(hidden, width))


class ShortcutBlock(nn.Module):
    """Attention to the new tokens (or self-attention in the ablation), MLP, self-attention, MLP;
    each sub-layer pre-normed with adaLN (shift, scale from t) and gated (adaLN-Zero, as in DiT)."""

    def __init__(self, config: ShortcutConfig) -> None:
        super().__init__()
        d = config.width
        self.cross_attention = config.cross_attention
        self.norms = nn.ModuleList(nn.LayerNorm(d, elementwise_affine=False, eps=1e-6) for _ in range(4))
        self.context_norm = nn.LayerNorm(d, eps=1e-6)
        self.attn1, self.attn2 = Attention(d, config.heads), Attention(d, config.heads)
        self.mlp1, self.mlp2 = (MLP(d, config.mlp_ratio, config.gelu) for _ in range(2))
        self.modulation = nn.Linear(d, 12 * d)          # (shift, scale, gate) for 4 sub-layers
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, context: torch.Tensor, valid: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        mods = rearrange(self.modulation(F.silu(c)), "b (n three d) -> n three b d", n=4, three=3)
        for k, layer in enumerate((self.attn1, self.mlp1, self.attn2, self.mlp2)):
            shift, scale, gate = mods[k]
            x = modulate(self.norms[k](h), shift, scale)
            if layer is self.attn1 and self.cross_attention:
                # a row with no new token (the loop always reveals >= 1) attends to padding, then
                # is zeroed: an all-masked softmax row would be NaN
                has_new = valid.any(1, keepdim=True)                               # (B, 1)
                y = layer(x, self.context_norm(context), valid | ~has_new) * has_new[:, :, None]
            elif isinstance(layer, Attention):
                y = layer(x, x)
            else:
                y = layer(x)
            h = torch.addcmul(h, gate[:, None], y)
        return h


class ShortcutNetwork(nn.Module):
    def __init__(self, config: ShortcutConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ShortcutConfig()
        d = c.width
        self.down = nn.Linear(c.feature_dim, d)
        # New tokens are embedded at the base width D, so the tables can start as the base
        # model's own token and position embeddings (init_from_base), then projected down.
        self.token_embed = nn.Embedding(c.vocab_size, c.feature_dim)
        self.pos_embed = nn.Parameter(torch.randn(c.num_tokens, c.feature_dim) * 0.02)
        self.context_down = nn.Linear(c.feature_dim, d)
        # Beyond the paper: the whole grid x_i (mask included, id vocab_size) at the bottleneck
        # width. The paper feeds only the new tokens, trusting f_i to summarise the rest; a small
        # base's features may not (see the README's ablation).
        self.grid_embed = nn.Embedding(c.vocab_size + 1, d) if c.grid_tokens else None
        if self.grid_embed is not None:
            nn.init.normal_(self.grid_embed.weight, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(c.time_frequencies, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(ShortcutBlock(c) for _ in range(c.blocks))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(d, 2 * d)
        self.up = nn.Linear(d, c.feature_dim)
        for layer in (self.final_modulation, self.up):   # zero init: S = 0, the identity map
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def init_from_base(self, token_embedding: torch.Tensor, position_embedding: torch.Tensor | None = None) -> None:
        """Copy the base model's (V', D) token and (L, D) position tables (extra rows, such as the
        mask or null tokens, are ignored). A base without a table (Lumina-DiMOO: RoPE in every
        layer) gets fixed 2D sinusoids of (row, column) at the table's scale instead of noise, so
        the new tokens' positions mean something from the first step."""
        self.token_embed.weight.copy_(token_embedding[: self.config.vocab_size])
        if position_embedding is not None:
            self.pos_embed.copy_(position_embedding.reshape(self.config.num_tokens, -1))
        else:
            table = grid_sinusoids(self.config.num_tokens, self.config.feature_dim)
            self.pos_embed.copy_(table * token_embedding[: self.config.vocab_size].float().std())

    def delta(self, features: torch.Tensor, tokens: torch.Tensor, new: torch.Tensor,
              t: torch.Tensor, new_count: int | None = None) -> torch.Tensor:
        """S(f_i, new tokens, t_i): features (B, L, D), tokens (B, L) (the grid x_i), new (B, L)
        bool (positions decoded at step i), t (B,) -> (B, L, D); `new_count`: the tokens every
        row decoded at step i, where the schedule says (generation)."""
        ids, positions, valid = pack_new_tokens(tokens, new, new_count)               # (B, K) each
        context = self.context_down(self.token_embed(ids) + self.pos_embed[positions])  # (B, K, d)
        c = self.time_mlp(timestep_embedding(t, self.config.time_frequencies))       # (B, d)
        h = self.down(features.to(self.down.weight.dtype))                           # (B, L, d)
        if self.grid_embed is not None:
            h = h + self.grid_embed(tokens.clamp(max=self.config.vocab_size))        # mask -> V
        for block in self.blocks:
            h = block(h, context, valid, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        return self.up(modulate(self.final_norm(h), shift, scale))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, new: torch.Tensor,
                t: torch.Tensor, new_count: int | None = None) -> torch.Tensor:
        """f_hat_{i+1} = f_i + S(f_i, new tokens, t_i), (B, L, D)."""
        return features + self.delta(features, tokens, new, t, new_count).to(features.dtype)


# --- the shipped weights --------------------------------------------------------------------------
def load_shortcut(name_or_path: str | Path) -> ShortcutNetwork:
    """An exported shortcut asset (`migm export shortcut`), checked against its manifest."""
    # assets exported before `gelu` was a field were trained with the tanh approximation
    return load_module(name_or_path, "shortcut",
                       lambda c: ShortcutNetwork(ShortcutConfig(**{"gelu": "tanh", **c})))


def shipped_weights(name_or_path: str | Path, config: ShortcutConfig) -> dict[str, torch.Tensor]:
    """The weights of a shipped shortcut, checked against the network `config` describes.

    The GELU form changes no parameter, so it stays the configuration's choice: the shipped
    weights, trained with the tanh form, score the same FID with the exact one (README)."""
    shipped = load_shortcut(name_or_path)
    if dataclasses.replace(shipped.config, gelu=config.gelu) != config:
        raise ValueError(f"{name_or_path}: shortcut config {shipped.config} differs "
                         f"from the configured network {config}")
    return shipped.state_dict()
