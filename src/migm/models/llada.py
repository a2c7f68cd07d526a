"""The LLaDA-8B transformer of Lumina-DiMOO, re-written with the reference's parameter names, and
its reader for the released safetensors checkpoint (lazy, one tensor at a time).

Reference facts this relies on (Alpha-VLLM/Lumina-DiMOO at 81344e6: model/modeling_llada.py,
config.py):
- the network is LLaDA-8B's LLaDALlamaBlock stack: x += attn_out(SDPA(rope(q), rope(k), v)) with
  q/k/v_proj of RMSNorm(x), then x += ff_out(silu(ff_proj(h)) * up_proj(h)), h = RMSNorm(x);
  RMSNorm has a weight only and normalises in fp32 before casting back; RoPE rotates halves, in
  fp32, positions 0..T-1; attention is bidirectional and the wrapper's padding mask never reaches
  SDPA (t2i runs one prompt at a time); then ln_f and ff_out (wte when weight_tying) give logits;
- keys: model.transformer.{wte,ln_f,ff_out}.weight and model.transformer.blocks.{i}.{attn_norm,
  ff_norm,q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out}.weight (LLaDAModelLM keeps
  LLaDAModel as `model`), in HF safetensors shards named by model.safetensors.index.json;
- one vocabulary: image code k is token id 126356 + k (K = 8192); mask 126336, newline 126084,
  <boi>/<eoi> 126349/126350, answer start/end 126354/126355 (config.py, not config.json);
- the official generators hard-code the mask id: Lumina-DiMOO generators/
  image_generation_generator.py l.20 and MIGM-Shortcut's copy l.23 (`mask_token_id: int =
  126336`), so a config.json naming another one would make this adapter and the reference mask
  different tokens: `from_json` stops on it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from migm.files import CheckpointError
from migm.models.safetensors_files import load_checked, shard_map


# config.json options whose other values change the network; only the LLaDA-8B ones are written
_SUPPORTED = {"block_type": {"llama"}, "activation_type": {"silu"}, "layer_norm_type": {"rms"},
              "rope": {True}, "alibi": {False}, "attention_layer_norm": {False},
              "input_emb_norm": {False}, "scale_logits": {False}, "block_group_size": {1},
              "layer_norm_with_affine": {True}, "include_bias": {False},
              "include_qkv_bias": {False, None}, "bias_for_layer_norm": {False, None},
              "multi_query_attention": {False, None}}


@dataclass
class DiMOOConfig:
    """LLaDA fields named as in config.json, then the DiMOO token layout (config.py), then the grid.

    `from_json` reads every field the file has; a real config.json lacks the layout and grid
    fields, which keep the reference's values.
    """

    d_model: int = 4096            # D
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    vocab_size: int = 134548       # 126356 text ids + 8192 codes, as generate_image infers it
    embedding_size: int | None = None   # rows of wte / ff_out when set (padded vocabularies)
    weight_tying: bool = False
    mask_token_id: int = 126336
    reference_mask_id: int = 126336  # the id the official generators hard-code; config.json's
                                     # mask_token_id must equal it (a tiny test layout sets both)
    newline_token_id: int = 126084
    boi_token_id: int = 126349
    eoi_token_id: int = 126350
    boa_token_id: int = 126354
    eoa_token_id: int = 126355
    image_token_offset: int = 126356
    codebook_size: int = 8192      # K
    grid_height: int = 64          # 1024 px / 16
    grid_width: int = 64
    system_prompt: str = "Generate an image according to the text prompt."

    def __post_init__(self) -> None:
        need = self.image_token_offset + self.codebook_size
        if self.rows < need:
            raise ValueError(f"{self.rows} vocabulary rows cannot hold the image codes "
                             f"{self.image_token_offset} + [0, {self.codebook_size})")
        if self.rows != need:       # the reference slices image logits at rows - K
            warnings.warn(f"{self.rows} vocabulary rows != image offset + K = {need}")

    @property
    def rows(self) -> int:
        return self.embedding_size or self.vocab_size

    @property
    def num_tokens(self) -> int:
        return self.grid_height * self.grid_width

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> DiMOOConfig:
        raw = json.loads(Path(path).read_text())
        bad = {k: raw[k] for k, ok in _SUPPORTED.items() if k in raw and raw[k] not in ok}
        if bad:
            raise CheckpointError(f"{path}: unsupported LLaDA options {bad}: this adapter implements "
                                  f"the LLaDA-8B block only, {_SUPPORTED}")
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw} | overrides)
        if config.mask_token_id != config.reference_mask_id:
            raise CheckpointError(f"{path}: mask_token_id is {config.mask_token_id}, but the official "
                                  f"DiMOO generator hard-codes {config.reference_mask_id}")
        return config


# --- the LLaDA transformer (model/modeling_llada.py: LLaDAModel with LLaDALlamaBlock) -----------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(T: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(2, T, head_dim) fp32 cos and sin of positions 0..T-1, frequencies repeated over halves."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float), inv).repeat(1, 2)
    return torch.stack([freqs.cos(), freqs.sin()])


def rope_at(rows: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(2, B, 1, M, head_dim) cos and sin at sequence rows (B, M): `rope_tables` gathered at any
    rows (the same fp32 products), shaped to broadcast over heads."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=rows.device, dtype=torch.float) / head_dim)
    freqs = (rows.float()[..., None] * inv).repeat(1, 1, 2)                         # (B, M, d)
    return torch.stack([freqs.cos(), freqs.sin()]).unsqueeze(2)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, d): RoPE in fp32 over (first half, second half) pairs, back in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos_sin[0] + torch.cat([-x2, x1], -1) * cos_sin[1]).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, c: DiMOOConfig) -> None:
        super().__init__()
        D, M = c.d_model, c.mlp_hidden_size
        self.heads, self.kv_heads = c.n_heads, c.n_kv_heads or c.n_heads
        kv = D // c.n_heads * self.kv_heads
        self.attn_norm, self.ff_norm = RMSNorm(D, c.rms_norm_eps), RMSNorm(D, c.rms_norm_eps)
        self.q_proj, self.k_proj = nn.Linear(D, D, bias=False), nn.Linear(D, kv, bias=False)
        self.v_proj, self.attn_out = nn.Linear(D, kv, bias=False), nn.Linear(D, D, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(D, M, bias=False), nn.Linear(D, M, bias=False)
        self.ff_out = nn.Linear(M, D, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D), cos_sin (2, T, d), mask (B, 1, 1, T) bool (True: a real key) or None."""
        h = self.attn_norm(x)
        q = rearrange(self.q_proj(h), "b t (h d) -> b h t d", h=self.heads)
        k, v = (rearrange(p(h), "b t (h d) -> b h t d", h=self.kv_heads)
                for p in (self.k_proj, self.v_proj))
        if self.kv_heads != self.heads:     # grouped-query: kv head j serves q heads j*r .. j*r + r-1
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(rotate(q, cos_sin), rotate(k, cos_sin), v, attn_mask=mask)
        x = x + self.attn_out(rearrange(a, "b h t d -> b t (h d)"))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    # --- per-layer access (models/layers.py: LayerAccess); forward above is these in order ---
    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_norm(h)

    def project(self, x: torch.Tensor, pe: torch.Tensor, which: str = "qkv") -> tuple[torch.Tensor, ...]:
        """x (B, M, D), pe (2, B, 1, M, d) from `rope_at` -> q (B, H, M, d) and k (B, Hkv, M, d)
        rotated at their rows, v (B, Hkv, M, d); k and v keep the kv heads (cache them small)."""
        maps = {"q": (self.q_proj, self.heads), "k": (self.k_proj, self.kv_heads),
                "v": (self.v_proj, self.kv_heads)}
        out = []
        for part in which:
            proj, heads = maps[part]
            y = rearrange(proj(x), "b t (h d) -> b h t d", h=heads)
            out.append(y if part == "v" else rotate(y, pe))
        return tuple(out)

    def project_attn(self, a: torch.Tensor) -> torch.Tensor:
        return self.attn_out(a)

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ff_norm(h)
        return self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    """State-dict keys are the checkpoint's without its leading "model."."""

    def __init__(self, c: DiMOOConfig) -> None:
        super().__init__()
        self.config = c
        parts = {"wte": nn.Embedding(c.rows, c.d_model), "ln_f": RMSNorm(c.d_model, c.rms_norm_eps),
                 "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers))}
        if not c.weight_tying:
            parts["ff_out"] = nn.Linear(c.d_model, c.rows, bias=False)
        self.transformer = nn.ModuleDict(parts)

    def output_weight(self) -> torch.Tensor:
        t = self.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight

    def hidden(self, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """ids (B, T), valid (B, T) bool or None (all real) -> last block's output (B, T, D)."""
        c, x = self.config, self.transformer.wte(ids)
        cos_sin = rope_tables(ids.shape[1], c.d_model // c.n_heads, c.rope_theta, ids.device)
        mask = None if valid is None else valid[:, None, None, :]
        for block in self.transformer.blocks:
            x = block(x, cos_sin, mask)
        return x


def load_llada(path: str | Path, c: DiMOOConfig, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu") -> LLaDA:
    with torch.device("meta"):
        model = LLaDA(c)
    files = {k.removeprefix("model."): (f, k) for k, f in shard_map(Path(path)).items()}
    summary = (f"D={c.d_model}, {c.n_layers} layers, {c.n_heads} heads, MLP {c.mlp_hidden_size}, "
               f"{c.rows} vocabulary rows, weight_tying={c.weight_tying}")
    return load_checked(model, files, Path(path), "LLaDA transformer", summary, dtype, device)
