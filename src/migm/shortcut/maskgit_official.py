"""The official MaskGIT shortcut (MIGM-Shortcut's MaskGIT-Shortcut) as a selectable network.

It differs from our ShortcutNetwork (shortcut/network.py, still the default) in what it reads and
how it is wired, and the released `maskgit-shortcut.pth` only means something in that wiring:
- it evolves the base's state at ALL L + 1 positions, the class slot included (a sequence
  shortcut: `positions = "sequence"`, run by accel/sequence.py), because the next step's
  attention reads the class slot too;
- new tokens enter as the base's own frozen token + position rows (wte[id] + wpe[pos]), projected
  to the bottleneck width, and are attended to without a norm; in both attentions only the query
  is pre-normed (self-attention's keys and values are the raw stream);
- after the blocks one LN-Linear-GELU-LN layer, then ONE time modulation x (1 + scale) + shift
  (scale first, no gate, no SiLU on the time vector), then the up-projection added to f;
- time is the mask ratio of the grid the output describes, x 1000, in 256 sinusoid frequencies;
- PyTorch's default init: an untrained official shortcut is not the identity (ours is).

Reference facts this relies on (Kaiwen-Zhu/MIGM-Shortcut@93349c4, MaskGIT-Shortcut/; details
and line numbers in the project notes, maskgit_shortcut_reference.md):
- Network/shortcut_model.py: MaskGITShortcut (width round(D / R); proj_in/proj_out/
  new_token_proj_in are Identity, without keys, at R = 1), ShortcutAttnBlock, TimestepEmbedder
  (hidden round(sqrt(d * 256))); wte/wpe are non-persistent copies of the base's tok_emb/pos_emb;
  the weights load with strict load_state_dict;
- Network/transformer.py: PreNorm (LayerNorm eps 1e-5 on the first argument only), FeedForward
  (Linear, GELU, Dropout, Linear: keys net.0 / net.3), Attention (nn.MultiheadAttention's packed
  in_proj rows q, k, v, applied by hand, no attention mask);
- Trainer/vit.py sample_shortcut: one call for both CFG branches on the previous step's full
  (2B, 1025, D) feature, the same new tokens in both, mask ratio of the grid after the previous
  step's reveal; main.py/eval.sh: 768 wide, 16 heads, 1 block, R = 2 (the released setting);
- train_shortcut.py: the file is the unwrapped module's state_dict (flat, no prefix); the loss
  covers the grid positions still masked after the step (never the class slot).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from migm.files import CheckpointError
from migm.shortcut.network import NetworkConfig, pack_new_tokens, timestep_embedding

if TYPE_CHECKING:
    from migm.shortcut.sequence import SequenceStep


@dataclass
class MaskGITShortcutConfig(NetworkConfig):
    """Defaults: the released maskgit-shortcut.pth over MaskGIT ImageNet-512 (eval.sh)."""

    feature_dim: int = 768        # D of the base's last-layer features
    vocab_size: int = 1024        # K: the codes; rows of the frozen token table
    num_tokens: int = 1024        # L grid positions; the state has L + 1 (the class slot last)
    ratio: float = 2.0            # bottleneck R: width round(D / R); 1 = no projections (no keys)
    blocks: int = 1               # (cross-attention, FF, self-attention, FF) blocks
    heads: int = 16
    mlp_ratio: int = 4            # FF hidden = 4 x width in the reference
    time: bool = True             # False: the reference's --no_embed_t (no time modulation)
    time_frequencies: int = 256   # sinusoids of (mask ratio x 1000)

    def __post_init__(self) -> None:
        for name in ("feature_dim", "vocab_size", "num_tokens", "blocks", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"MaskGITShortcutConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.ratio <= 0 or self.width < 1:
            raise ValueError(f"MaskGITShortcutConfig.ratio must be > 0 and leave a width >= 1, got {self.ratio}")
        if self.width % self.heads:
            raise ValueError(f"MaskGITShortcutConfig.heads ({self.heads}) must divide the width "
                             f"round(feature_dim / ratio) = {self.width}")
        if self.time_frequencies < 2 or self.time_frequencies % 2:
            raise ValueError(f"MaskGITShortcutConfig.time_frequencies must be even and >= 2, "
                             f"got {self.time_frequencies}")

    @property
    def width(self) -> int:
        return round(self.feature_dim / self.ratio)

    @property
    def time_hidden(self) -> int:
        """The time MLP's hidden size: round(sqrt(width * frequencies)), 314 when released."""
        return round(math.sqrt(self.width * self.time_frequencies))

    def build(self) -> MaskGITShortcutNetwork:
        return MaskGITShortcutNetwork(self)

    def load_weights(self, path: str, base) -> dict[str, torch.Tensor]:
        """The released maskgit-shortcut.pth (or any file in its layout) over `base`'s tables."""
        net = load_official_maskgit_shortcut(path, self, base.token_embedding().weight,
                                             base.position_embedding())
        return net.state_dict()


# --- the network -----------------------------------------------------------------------------------
class QueryNormAttention(nn.Module):
    """Multi-head attention whose query alone is layer-normed; q, k, v rows packed in one matrix
    (nn.MultiheadAttention's in_proj layout, so the reference's weights map one to one)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = 0.0          # on the attention weights, in eval mode too (set_test_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) attends to context (B, K, d) (not normed); valid (B, K) masks padded keys."""
        w, b, d = self.qkv.weight, self.qkv.bias, self.width
        q = F.linear(self.norm(x), w[:d], b[:d])
        k, v = F.linear(context, w[d:], b[d:]).chunk(2, dim=-1)
        q, k, v = (rearrange(z, "b t (h e) -> b h t e", h=self.heads) for z in (q, k, v))
        mask = None if valid is None else valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        return self.out(rearrange(y, "b h t e -> b t (h e)"))


class NormedMLP(nn.Module):
    """LayerNorm, then Linear-GELU(exact)-Linear."""

    def __init__(self, width: int, ratio: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, ratio * width), nn.Linear(ratio * width, width)
        self.dropout = 0.0          # after the GELU and after fc2, in eval mode too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout
        h = F.dropout(F.gelu(self.fc1(self.norm(x))), p, training=p > 0)
        return F.dropout(self.fc2(h), p, training=p > 0)


def set_test_dropout(network: nn.Module, p: float) -> int:
    """Turn on the reference's dropout at inference: the released eval.sh built the shortcut with
    dropout 0.1 (main.py) and never called eval(), so its Table 1 samples were drawn with dropout
    active in the FeedForward (after GELU and after the second Linear) and on the attention
    weights of both attentions, never in the last layer. Returns how many sites were set (0: the
    network has none of the reference's sites)."""
    sites = [m for m in network.modules() if isinstance(m, (QueryNormAttention, NormedMLP))]
    for module in sites:
        module.dropout = float(p)
    return len(sites)


class OfficialBlock(nn.Module):
    """Cross-attention to the new tokens, FF, self-attention, FF; plain residuals, no time input."""

    def __init__(self, c: MaskGITShortcutConfig) -> None:
        super().__init__()
        d = c.width
        self.cross_attn, self.self_attn = QueryNormAttention(d, c.heads), QueryNormAttention(d, c.heads)
        self.cross_mlp, self.self_mlp = NormedMLP(d, c.mlp_ratio), NormedMLP(d, c.mlp_ratio)

    def forward(self, h: torch.Tensor, context: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # a row without new tokens (never in generation; possible in a padded training batch)
        # would softmax over padding only: it attends to the padding and the result is zeroed
        has_new = valid.any(1, keepdim=True)                                       # (B, 1)
        h = h + self.cross_attn(h, context, valid | ~has_new) * has_new[:, :, None]
        h = h + self.cross_mlp(h)
        h = h + self.self_attn(h, h)
        return h + self.self_mlp(h)


class MaskGITShortcutNetwork(nn.Module):
    """f_{i} = f_{i-1} + S(f_{i-1}, new tokens, mask ratio) over the base's L + 1 positions."""

    positions: ClassVar[str] = "sequence"        # evolves the whole sequence (accel/sequence.py)
    time_input: ClassVar[str] = "mask_ratio"     # told the mask ratio of x_{i-1}, not t

    def __init__(self, config: MaskGITShortcutConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or MaskGITShortcutConfig()
        D, d = c.feature_dim, c.width
        project = (lambda i, o: nn.Linear(i, o)) if c.ratio != 1 else (lambda i, o: nn.Identity())
        self.down, self.up, self.context_down = project(D, d), project(d, D), project(D, d)
        # the base's frozen token and position rows (filled by init_from_base); buffers, so our
        # own checkpoints carry them while the official file (which never did) does not need to
        self.register_buffer("token_table", torch.zeros(c.vocab_size, D))
        self.register_buffer("position_table", torch.zeros(c.num_tokens, D))
        self.blocks = nn.ModuleList(OfficialBlock(c) for _ in range(c.blocks))
        self.out_mlp = nn.Sequential(nn.LayerNorm(d, eps=1e-12), nn.Linear(d, d), nn.GELU(),
                                     nn.LayerNorm(d, eps=1e-12))
        if c.time:
            self.time_mlp = nn.Sequential(nn.Linear(c.time_frequencies, c.time_hidden), nn.SiLU(),
                                          nn.Linear(c.time_hidden, d))
            self.modulation = nn.Linear(d, 2 * d)              # (scale, shift), in that order

    @torch.no_grad()
    def init_from_base(self, token_embedding: torch.Tensor, position_embedding: torch.Tensor) -> None:
        """Copy the base's (V', D) token rows and (L or L + 1, D) position rows (a (1, L + 1, D)
        table too); rows past the K codes and the L grid positions are never read."""
        c = self.config
        self.token_table.copy_(token_embedding[: c.vocab_size])
        self.position_table.copy_(position_embedding.reshape(-1, c.feature_dim)[: c.num_tokens])

    def delta(self, features: torch.Tensor, tokens: torch.Tensor, new: torch.Tensor,
              mask_ratio: torch.Tensor, new_count: int | None = None) -> torch.Tensor:
        """S: features (B, T, D), T = L + 1 (grid, then the class slot); tokens and new (B, T) or
        (B, L) (grid only): the ids of x_{i-1} and the positions decoded at step i-1; mask_ratio
        (B,) of x_{i-1} in [0, 1] -> (B, T, D)."""
        B, T, _ = features.shape
        if new.shape[1] < T:                                   # the class slot is never new
            new = torch.cat([new, new.new_zeros(B, T - new.shape[1])], 1)
            tokens = torch.cat([tokens, tokens.new_zeros(B, T - tokens.shape[1])], 1)
        ids, positions, valid = pack_new_tokens(tokens, new, new_count)           # (B, K) each
        # padded entries (valid False) may point at the class slot: clamp them into the table
        positions = positions.clamp(max=self.config.num_tokens - 1)
        dtype = self.token_table.dtype
        context = self.context_down(self.token_table[ids] + self.position_table[positions])  # (B, K, d)
        h = self.down(features.to(dtype))                                          # (B, T, d)
        for block in self.blocks:
            h = block(h, context, valid)
        h = self.out_mlp(h)
        if self.config.time:
            t = timestep_embedding(mask_ratio.to(dtype), self.config.time_frequencies)  # x 1000 inside
            scale, shift = self.modulation(self.time_mlp(t)).chunk(2, dim=-1)        # (B, d) each
            h = h * (1 + scale[:, None]) + shift[:, None]
        return self.up(h)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, new: torch.Tensor,
                mask_ratio: torch.Tensor, new_count: int | None = None) -> torch.Tensor:
        """f_{i-1} + S(...): (B, T, D), every position (the class slot's state moves too)."""
        return features + self.delta(features, tokens, new, mask_ratio, new_count).to(features.dtype)

    def step(self, s: SequenceStep) -> torch.Tensor:
        """The sequence-source entry point: MaskGIT's sequence is the grid then the class slot."""
        return self(s.states, s.ids, s.new, s.mask_ratio, s.new_count)


# --- importing the official file --------------------------------------------------------------------
# the reference's names (Network/shortcut_model.py, Network/transformer.py) -> ours
_RENAMES = [("proj_in.", "down."), ("proj_out.", "up."), ("new_token_proj_in.", "context_down."),
            ("last_layer.", "out_mlp."), ("time_embedder.mlp.", "time_mlp."),
            ("adaLN_modulation.", "modulation.")]
_BLOCK = {"cross_attn": "cross_attn", "cross_attn_ff": "cross_mlp", "self_attn": "self_attn",
          "self_attn_ff": "self_mlp"}
_INSIDE = {"norm.": "norm.", "fn.mha.in_proj_weight": "qkv.weight", "fn.mha.in_proj_bias": "qkv.bias",
           "fn.mha.out_proj.": "out.", "fn.net.0.": "fc1.", "fn.net.3.": "fc2."}
# Names the reference module defines but never reads from the file: its wte/wpe are
# non-persistent copies of the base's tables, taken from the base at construction.
_IGNORED = ("wte", "wpe")
_TABLES = ("token_table", "position_table")


def official_key(ours: str) -> str:
    """Our parameter name -> the reference's state_dict key."""
    for ref, mine in _RENAMES:
        if ours.startswith(mine):
            return ref + ours[len(mine):]
    m = re.match(r"blocks\.(\d+)\.([a-z_]+)\.(.*)$", ours)
    if m:
        block = {v: k for k, v in _BLOCK.items()}[m.group(2)]
        for ref, mine in _INSIDE.items():
            if m.group(3).startswith(mine):
                return f"blocks.{m.group(1)}.{block}.{ref}{m.group(3)[len(mine):]}"
    raise KeyError(ours)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"official MaskGIT shortcut weights not found at {path}: get "
                              f"MaskGIT-Shortcut/maskgit-shortcut.pth (Kaiwen-Zhu/MIGM-Shortcut on "
                              f"the model hub) and pass its local path")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a torch file of plain tensors ({err})") from err
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"{path}: expected the official shortcut's flat state_dict "
                              f"(keys like proj_in.weight), got {type(blob).__name__}"
                              f"{' with keys ' + str(list(blob)[:4]) if isinstance(blob, dict) else ''}")
    return blob


def load_official_maskgit_shortcut(path: str | Path, config: MaskGITShortcutConfig,
                                   token_embedding: torch.Tensor,
                                   position_embedding: torch.Tensor) -> MaskGITShortcutNetwork:
    """The released (or any reference-trained) shortcut from its key layout, as our network.

    The file holds no token/position tables (the reference takes them from the base), so the
    base's are passed: its token embedding weight (V', D) and position table ((L, D) or
    (1, L + 1, D)). Missing keys and shape mismatches raise CheckpointError naming the first few;
    so do unexpected keys, as the reference's own strict load does, except the names of the
    reference's base-table buffers (wte, wpe), which it never reads from a file: those are named
    in a warning and ignored.
    """
    path, net = Path(path), MaskGITShortcutNetwork(config)
    found = _read(path)
    expected = {official_key(k): (k, v.shape) for k, v in net.state_dict().items() if k not in _TABLES}
    ignored = [k for k in found if k in _IGNORED]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in _IGNORED]
    shapes = [f"{k}: file {tuple(found[k].shape)}, expected {tuple(s)}"
              for k, (_, s) in expected.items() if k in found and found[k].shape != s]
    problems = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}"
                for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        c = config
        raise CheckpointError(f"{path}: does not fit the official MaskGIT shortcut of this config "
                              f"(D={c.feature_dim}, ratio {c.ratio} -> width {c.width}, {c.blocks} "
                              f"block(s), time={c.time}): " + "; ".join(problems))
    if ignored:
        warnings.warn(f"{path}: ignoring {ignored}: the reference takes these tables from the base, "
                      f"never from the shortcut file", stacklevel=2)
    result = net.load_state_dict({mine: found[ref].float() for ref, (mine, _) in expected.items()},
                                 strict=False)
    assert sorted(result.missing_keys) == sorted(_TABLES) and not result.unexpected_keys, result
    net.init_from_base(token_embedding, position_embedding)
    return net.eval().requires_grad_(False)
