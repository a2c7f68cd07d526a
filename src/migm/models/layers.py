"""Per-layer access to a base MIGM: what the caches that recompute part of a step need.

`features(tokens, cond)` is enough for methods that only touch the last layer (the shortcut,
reuse, TaylorSeer on features). ReCAP, dLLM-Cache, ML-Cache and per-layer TaylorSeer recompute
some rows of some layers and reuse the rest, so they need the transformer opened up: the input
sequence, and per layer the normalised input, the q/k/v projections (position encoding applied),
attention of any subset of queries over any keys, the attention output projection and the MLP
branch. Every adapter implements the same small surface, so each method is written once:

    stream = model.embed_sequence(tokens, cond)          # hidden (B, T, D) + where the grid is
    pe = model.position_encoding(rows)                   # for the rows (B, M) being computed
    for layer in model.layers():
        q, k, v = layer.project(layer.attn_input(h), pe)   # (B, H, M, d), (B, Hkv, M, d) x 2
        h = h + layer.project_attn(attend(q, K, V, stream.key_mask))
        h = h + layer.mlp_branch(h)
    features = model.final(gather_rows(h, stream.grid))

Rows are sequence rows: T = L grid cells plus whatever else the base feeds its transformer (the
class token of MaskGIT, the prompt and layout tokens of Lumina-DiMOO). `layered_features` runs
every layer this way over all rows and equals `features()` exactly (tests/models/test_layers.py).

`LayerShape` counts the FLOPs of each part (multiply-adds counted as 2, as torch's FlopCounterMode
does), so a method can report the base FLOPs it predicts beside the latency it measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass
class Stream:
    """The base's input sequence for a batch of grids, before the first layer."""

    hidden: torch.Tensor              # (B, T, D) input of the first layer
    grid: torch.Tensor                # (B, L) long: the sequence row of each grid cell
    generated: torch.Tensor           # (B, G) long: rows of the segment being generated (G >= L)
    context: torch.Tensor             # (B, P) long: the other rows (condition, prompt, padding)
    key_mask: torch.Tensor | None     # (B, T) bool, True = a real key; None = every row is real

    @property
    def rows(self) -> torch.Tensor:
        """(B, T) long: every row, in order."""
        B, T = self.hidden.shape[:2]
        return torch.arange(T, device=self.hidden.device).expand(B, T)


class LayerAccess(Protocol):
    """One transformer block, as `model.layers()` returns it (pre-norm, residual branches)."""

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        """(B, M, D) residual rows -> the normalised input of attention (B, M, D)."""

    def project(self, x: torch.Tensor, pe: Any, which: str = "qkv") -> tuple[torch.Tensor, ...]:
        """Normalised rows (B, M, D) -> the projections named by `which` ("qkv", "v", "qk", ...):
        q (B, H, M, d), k and v (B, Hkv, M, d), with the position encoding `pe` of these rows
        (from `model.position_encoding`) applied to q and k."""

    def project_attn(self, a: torch.Tensor) -> torch.Tensor:
        """Merged attention heads (B, M, D) -> the attention branch's output (B, M, D)."""

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        """(B, M, D) residual rows -> the MLP branch's output, its norm included (B, M, D)."""


class LayeredBase(Protocol):
    """The adapter-level half of the per-layer protocol (next to the base-model protocol)."""

    def embed_sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> Stream: ...

    def position_encoding(self, rows: torch.Tensor) -> Any:
        """Sequence rows (B, M) -> what `project` needs to encode them (None: positions were
        added at embedding time)."""

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """(B, M, D) last-layer rows -> features (B, M, D): the map after the last block."""

    def row_logits(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Features (B, M, D) at sequence rows (B, M) -> logits over the K codes (B, M, K), at
        any row (ML-Cache ranks every row of the sequence by its largest logit)."""

    def layers(self) -> Sequence[LayerAccess]: ...

    def layer_shape(self) -> LayerShape: ...


# --- shared helpers -----------------------------------------------------------------------------
def gather_rows(x: torch.Tensor, rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows (B, M) of x along `dim` (x (B, T, D) with dim 1, or (B, H, T, d) with dim 2)."""
    shape = list(x.shape)
    shape[dim] = rows.shape[1]
    index = rows.view(rows.shape[0], *([1] * (dim - 1)), rows.shape[1], *([1] * (x.dim() - dim - 1)))
    return x.gather(dim, index.expand(shape))


def put_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Write `values` into rows (B, M) of x along `dim`, in place; returns x."""
    index = rows.view(rows.shape[0], *([1] * (dim - 1)), rows.shape[1], *([1] * (x.dim() - dim - 1)))
    return x.scatter_(dim, index.expand(values.shape), values.to(x.dtype))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Queries (B, H, M, d) over keys/values (B, Hkv, N, d) -> merged heads (B, M, H d).

    Bidirectional (no causal mask); `key_mask` (B, N) bool drops padding keys. Grouped-query
    heads: kv head j serves query heads j*r .. j*r + r-1.
    """
    if k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                  # (B, H, M, d)
    return a.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@dataclass
class LayerOutputs:
    """Everything one full layer computes, for the methods that cache parts of it."""

    hidden: torch.Tensor   # (B, T, D) the layer's output
    k: torch.Tensor        # (B, Hkv, T, d) keys, position-encoded
    v: torch.Tensor        # (B, Hkv, T, d)
    attn: torch.Tensor     # (B, T, D) the attention branch's output (after its projection)
    mlp: torch.Tensor      # (B, T, D) the MLP branch's output


def full_layer(layer: LayerAccess, h: torch.Tensor, pe: Any,
               key_mask: torch.Tensor | None) -> LayerOutputs:
    """One layer over every row, keeping its intermediates: the exact block forward."""
    q, k, v = layer.project(layer.attn_input(h), pe)
    attn = layer.project_attn(attend(q, k, v, key_mask))
    h = h + attn
    mlp = layer.mlp_branch(h)
    return LayerOutputs(h + mlp, k, v, attn, mlp)


def cached_forward(model: LayeredBase, s: Stream,
                   keep: Sequence[str] = ("k", "v")) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Every layer over every row (the exact block forward), keeping per layer the outputs named
    in `keep` (of LayerOutputs: k, v, attn, mlp) for a cache. Returns the last layer's rows
    (B, T, D) and one dict per layer. Only what is kept is held: at 4,096 tokens each kept
    tensor is a few hundred MiB per layer."""
    pe, h, kept = model.position_encoding(s.rows), s.hidden, []
    for layer in model.layers():
        out = full_layer(layer, h, pe, s.key_mask)
        kept.append({name: getattr(out, name) for name in keep})
        h = out.hidden
    return h, kept


def rows_forward(model: LayeredBase, s: Stream, rows: torch.Tensor,
                 cache: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Only `rows` (B, R) through every layer, their queries over the cached keys and values of
    every row: their fresh k and v overwrite the cache's rows in place first (the caches'
    partial step: ML-Cache's least-confident rows, ReCAP's group). Returns the last layer's
    rows (B, R, D)."""
    pe, h = model.position_encoding(rows), gather_rows(s.hidden, rows)
    for layer, c in zip(model.layers(), cache):
        q, k, v = layer.project(layer.attn_input(h), pe)
        put_rows(c["k"], rows, k, dim=2), put_rows(c["v"], rows, v, dim=2)
        h = h + layer.project_attn(attend(q, c["k"], c["v"], s.key_mask))
        h = h + layer.mlp_branch(h)
    return h


def layered_features(model: LayeredBase, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """`features(tokens, cond)` computed through the per-layer protocol (B, L, D)."""
    s = model.embed_sequence(tokens, cond)
    h, _ = cached_forward(model, s, keep=())
    return model.final(gather_rows(h, s.grid))


# --- FLOPs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """Sizes that fix a base's FLOPs; every count is for `rows` rows of one batch in total.

    A linear map of n rows from a to b features costs 2 n a b; attention of m query rows over
    n key rows costs 4 m n D (scores and the weighted sum, D = heads x head size).
    """

    width: int                 # D
    kv_width: int              # Hkv x d: the size of k and v (D unless grouped-query)
    mlp_hidden: int
    mlp_matrices: int          # 2 (up, down) or 3 (gate, up, down)
    depth: int
    vocab: int                 # K codes of the head
    embed_row: int = 0         # FLOPs per row of the embedding (MaskGIT's first_layer)
    final_row: int = 0         # FLOPs per row of `final` (MaskGIT's last_layer)

    def q(self, rows: int) -> int:
        return 2 * rows * self.width * self.width

    def k(self, rows: int) -> int:
        return 2 * rows * self.width * self.kv_width

    v = k

    def attention(self, queries: int, keys: int) -> int:
        return 4 * queries * keys * self.width

    def out(self, rows: int) -> int:
        return 2 * rows * self.width * self.width

    def mlp(self, rows: int) -> int:
        return 2 * rows * self.width * self.mlp_hidden * self.mlp_matrices

    def layer(self, queries: int, keys: int) -> int:
        """One layer computing q/k/v, attention, projection and MLP for `queries` rows that
        attend over `keys` rows."""
        return (self.q(queries) + 2 * self.k(queries) + self.attention(queries, keys)
                + self.out(queries) + self.mlp(queries))

    def head(self, rows: int) -> int:
        return 2 * rows * self.width * self.vocab

    def call(self, batch: int, seq: int, grid: int) -> int:
        """One full base call, `features()`: embedding, every layer over all rows, final map."""
        return batch * (seq * self.embed_row + self.depth * self.layer(seq, seq) + grid * self.final_row)


def flop_share(shape: LayerShape, stream: Stream, spent: float) -> float:
    """`spent` base FLOPs of one step over those of a full base call on the same batch."""
    B, T = stream.hidden.shape[:2]
    total = shape.call(B, T, stream.grid.shape[1])
    return spent / total if total else 0.0      # a base cut to no layers (speed's depth 0)
