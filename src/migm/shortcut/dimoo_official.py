"""The official DiMOO shortcut (DiMOO-Shortcut, ~220M parameters) and its checkpoint importer.

The released `dimoo-shortcut.pth` was trained on Lumina-DiMOO's final-norm features over the WHOLE
t2i sequence (prompt template, <answer><boi>, grid, newlines, <eoi><eoa>) and reads the newly
decoded tokens embedded by the base's own token table at their sequence positions, so it cannot
be our grid-only ShortcutNetwork with other weights: it is LLaDA blocks at half the base width.
The network is re-written here with the official parameter names so that the release loads
unchanged; the LLaDA block, RMSNorm and RoPE are the DiMOO adapter's (models/dimoo.py), so both
networks share one implementation of that arithmetic.

How it is fed (prompt tokens on the conditional branch, image tokens only on the unconditional
one) is the feature source's business (accel/sequence.py); this module only maps
(features, embedded new tokens, their positions, mask ratio) -> next features.

Reference facts this relies on (Kaiwen-Zhu/MIGM-Shortcut@93349c4 DiMOO-Shortcut/; details with
line numbers in the project notes, dimoo_shortcut_reference.md):
- infer.py l.49-56: cfg = AutoConfig.from_pretrained(checkpoint) (the base's config.json), then
  MDMShortcut(cfg, ...); model/shortcut_model.py MDMShortcut copies cfg and sets d_model only, so
  heads, kv heads, MLP width and RoPE theta are the base's config.json values;
- model/shortcut_model.py MDMShortcut: proj_in (D -> round(D / ratio)), `blocks` of (cross_attn,
  self_attn) LLaDA llama blocks at that width with the base's heads, MLP width (12288, not scaled)
  and RoPE theta, then ln_f (RMSNorm), then ONE adaLN: (scale, shift) = adaLN_modulation(
  time_embedder(1000 * mask_ratio)) with no SiLU in between, x * (1 + scale) + shift; proj_out;
  output prev_feat + that (residual). ratio 1: the three projections are identities;
- TimestepEmbedder: 256 sinusoid frequencies (cos then sin, max period 1e4) -> Linear(256, m) ->
  SiLU -> Linear(m, width), m = round(sqrt(width * 256)) (724 at width 2048);
- ShortcutCrossAttention: queries from attn_norm(x) at positions 0..T-1, keys and values from
  attn_norm(new tokens) (the same norm weight) rotated at each new token's sequence position; the
  attention output and the SwiGLU MLP are added residually as in the LLaDA block; no_ca replaces
  it with a self-attention LLaDA block (new tokens unused);
- the checkpoint is torch.save(MDMShortcut.state_dict()) loaded with strict=True (no key may be
  missing or extra), fp32; new tokens are embedded by the base's wte (inference:
  model.model.transformer.wte; training: a frozen copy, prepare_weights.py);
- the official code runs one sequence at a time (its key RoPE indexes positions flattened over the
  batch, right only for B = 1); here rows may be batched with padding masks, which gives each row
  exactly its B = 1 result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from migm.files import CheckpointError
from migm.models.llada import DiMOOConfig, LLaDABlock, RMSNorm, rope_tables, rotate
from migm.models.safetensors_files import check_fit
from migm.shortcut.network import NetworkConfig, modulate, timestep_embedding
from migm.shortcut.sequence import SequenceStep

HOW_TO_GET = ("download DiMOO-Shortcut/dimoo-shortcut.pth from the Kaiwen-Zhu/MIGM-Shortcut "
              "repository on the model hub (its DiMOO-Shortcut README) and pass its local path")


# the fields MDMShortcut copies from the base's config (shortcut_model.py l.227-245 changes only
# d_model): ours -> DiMOOConfig's, i.e. config.json's names
BASE_FIELDS = {"heads": "n_heads", "kv_heads": "n_kv_heads", "mlp_hidden": "mlp_hidden_size",
               "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps"}


@dataclass
class DiMOOShortcutConfig(NetworkConfig):
    """Defaults: the released DiMOO-Shortcut (n_block 1, bottleneck_ratio 2, embed_t, with cross
    attention). Its heads, kv heads, MLP width, RoPE theta and norm eps are the base's (the
    reference builds it from the base's AutoConfig and changes d_model only): read from
    `base_config` (the base's config.json or checkpoint directory) when given, else the
    DiMOOConfig defaults (Lumina-DiMOO's LLaDA-8B); a value set here that disagrees with
    `base_config` is an error, and `load_weights` checks them against the loaded base."""

    feature_dim: int = 4096         # D: the base's d_model (its features' width)
    ratio: float = 2.0              # bottleneck_ratio: the blocks run at round(D / ratio)
    blocks: int = 1                 # n_block: (cross-attention, self-attention) block pairs
    heads: int | None = None        # the base's n_heads, kept at the bottleneck (head dim 64)
    kv_heads: int | None = None     # the base's n_kv_heads (None in config.json: heads)
    mlp_hidden: int | None = None   # the base's mlp_hidden_size, NOT scaled by the ratio
    rope_theta: float | None = None  # the base's rope_theta
    rms_norm_eps: float | None = None  # the base's rms_norm_eps
    base_config: str | None = None  # the base's config.json (or its directory): the fields above
    time_frequencies: int = 256     # sinusoid size of the mask-ratio embedding
    embed_t: bool = True            # False: no time embedding and no adaLN (the ablation)
    cross_attention: bool = True    # False: no_ca, the first block of a pair is self-attention
    feed_prompt: bool = True        # False: no_prompt, the conditional rows get the new image
                                    # tokens only, like the unconditional ones (train and run alike)

    def __post_init__(self) -> None:
        self._fill_from_base()
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1 (the blocks run at round(D / ratio)), "
                             f"got {self.ratio}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide the block width round("
                             f"{self.feature_dim} / {self.ratio}) = {self.width}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"the head dim {self.width // self.heads} must be even for RoPE")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.time_frequencies < 2 or self.time_frequencies % 2:
            raise ValueError(f"time_frequencies must be even and >= 2, got {self.time_frequencies}")

    def _fill_from_base(self) -> None:
        """Unset base fields from `base_config` (else DiMOOConfig's defaults); set ones checked."""
        if self.base_config is None:
            base, where = DiMOOConfig(), None
        else:
            path = Path(self.base_config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise CheckpointError(f"DiMOO shortcut base_config: {path} not found (the base "
                                      "checkpoint's config.json)")
            base, where = DiMOOConfig.from_json(path), str(path)
            if self.feature_dim != base.d_model:
                raise ValueError(f"feature_dim {self.feature_dim} != d_model {base.d_model} of {where}")
        if self.heads is None:
            self.heads = base.n_heads
        for ours, theirs in BASE_FIELDS.items():
            if ours == "kv_heads" and self.kv_heads is None and where is None:
                continue                      # None: as many as heads (LLaDA's n_kv_heads None)
            if getattr(self, ours) is None:
                setattr(self, ours, getattr(base, theirs))
        if where is not None:
            self.check_base(base, where, ValueError)

    def check_base(self, base: DiMOOConfig, where: str = "the base",
                   error: type[Exception] = CheckpointError) -> None:
        """Raise naming the first field that differs from the base's (the shortcut's blocks are the
        base's at a narrower width: trained on one config, they are wrong on another)."""
        for ours, theirs in BASE_FIELDS.items():
            mine, value = getattr(self, ours), getattr(base, theirs)
            if ours == "kv_heads":                    # None means as many as the query heads
                mine, value = mine or self.heads, value or base.n_heads
            if mine != value:
                raise error(f"DiMOO shortcut {ours} {mine} != {theirs} {value} of {where}: the "
                            "official shortcut takes it from the base (set base_config to the "
                            "base's config.json, or leave the field unset)")

    @property
    def width(self) -> int:
        return round(self.feature_dim / self.ratio)

    def block_config(self) -> DiMOOConfig:
        """The LLaDA block settings at the bottleneck width (MDMShortcut's copied config)."""
        return DiMOOConfig(d_model=self.width, n_heads=self.heads, n_kv_heads=self.kv_heads,
                           n_layers=self.blocks, mlp_hidden_size=self.mlp_hidden,
                           rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps)

    def build(self) -> DiMOOShortcut:
        return DiMOOShortcut(self)

    def load_weights(self, path: str, base) -> dict[str, torch.Tensor]:
        """The released dimoo-shortcut.pth (or any file in its layout), after checking that the
        base's config is the one this config's blocks were taken from."""
        if isinstance(getattr(base, "config", None), DiMOOConfig):
            self.check_base(base.config, "the loaded DiMOO base")
        return load_official_dimoo_shortcut(path, self).state_dict()


class CrossBlock(LLaDABlock):
    """A LLaDA block whose keys and values come from the new tokens (same parameter names)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, q_rope: torch.Tensor,
                k_rope: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d), context (B, K, d), q_rope (2, T, e), k_rope (2, B, 1, K, e), key_valid
        (B, K) bool or None (all real) -> (B, T, d)."""
        q = rearrange(self.q_proj(self.attn_norm(x)), "b t (h e) -> b h t e", h=self.heads)
        c = self.attn_norm(context)
        k, v = (rearrange(p(c), "b k (h e) -> b h k e", h=self.kv_heads)
                for p in (self.k_proj, self.v_proj))
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        if key_valid is None:
            a = F.scaled_dot_product_attention(rotate(q, q_rope), rotate(k, k_rope), v)
        else:
            # a row with no fed token (never in the official loop) attends to its padding, then its
            # attention term is zeroed: an all-masked softmax row would be NaN
            has = key_valid.any(1)[:, None, None, None]                              # (B, 1, 1, 1)
            mask = (key_valid[:, None, None, :] | ~has)                              # (B, 1, 1, K)
            a = F.scaled_dot_product_attention(rotate(q, q_rope), rotate(k, k_rope), v,
                                               attn_mask=mask)
            a = a * has
        x = x + self.attn_out(rearrange(a, "b h t e -> b t (h e)"))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class PairBlock(nn.Module):
    """ShortcutAttnBlock: cross-attention to the new tokens (or self-attention), self-attention."""

    def __init__(self, c: DiMOOShortcutConfig) -> None:
        super().__init__()
        block = c.block_config()
        self.cross_attn = CrossBlock(block) if c.cross_attention else LLaDABlock(block)
        self.self_attn = LLaDABlock(block)


class TimeEmbedder(nn.Module):
    """The mask ratio's embedding: sinusoids of 1000 * ratio, then a two-layer SiLU MLP."""

    def __init__(self, width: int, frequencies: int) -> None:
        super().__init__()
        mid = round(math.sqrt(width * frequencies))
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, mid), nn.SiLU(), nn.Linear(mid, width))

    def forward(self, mask_ratio: torch.Tensor) -> torch.Tensor:
        """mask_ratio (B,) in [0, 1] -> (B, width); timestep_embedding scales by 1000 itself."""
        emb = timestep_embedding(mask_ratio, self.frequencies)                       # (B, F)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class DiMOOShortcut(nn.Module):
    """f_next = f + S(f, new tokens, mask ratio) over the base's whole sequence (B, T, D)."""

    positions = "sequence"          # evolves the whole-sequence state (accel/sequence.py)
    time_input = "mask_ratio"       # told the mask ratio of the grid its output describes

    def __init__(self, config: DiMOOShortcutConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DiMOOShortcutConfig()
        D, d = c.feature_dim, c.width
        bottleneck = c.ratio != 1
        self.proj_in = nn.Linear(D, d) if bottleneck else nn.Identity()
        self.proj_out = nn.Linear(d, D) if bottleneck else nn.Identity()
        fed = bottleneck and c.cross_attention
        self.new_token_proj_in = nn.Linear(D, d) if fed else nn.Identity()
        self.blocks = nn.ModuleList(PairBlock(c) for _ in range(c.blocks))
        self.ln_f = RMSNorm(d, c.rms_norm_eps)
        self.time_embedder = TimeEmbedder(d, c.time_frequencies) if c.embed_t else None
        self.adaLN_modulation = nn.Linear(d, 2 * d) if c.embed_t else None
        self._init_blocks()

    @torch.no_grad()
    def _init_blocks(self) -> None:
        """The official from-scratch init of the blocks (LLaDA's init_weights, "mitchell", no layer
        id): truncated normal, std 1/sqrt(fan in), cut at 3 std. The projections, time MLP and
        adaLN keep PyTorch's Linear init, as there; nothing starts at zero, so an untrained
        official shortcut is not the identity (unlike ours)."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                std = m.in_features ** -0.5
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, features: torch.Tensor, new_tokens: torch.Tensor, new_positions: torch.Tensor,
                mask_ratio: torch.Tensor, valid: torch.Tensor | None = None,
                new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, T, D): the base's final-norm output over the whole sequence (or the previous
        shortcut output); new_tokens (B, K, D): the fed tokens embedded by the base's token table;
        new_positions (B, K): their indices in the sequence; mask_ratio (B,): the masked fraction of
        the grid the result describes; valid (B, T) / new_valid (B, K) bool: real (not padding)
        positions / tokens, None meaning all. -> (B, T, D), padded rows carry no meaning."""
        c, dtype = self.config, self.ln_f.weight.dtype
        T = features.shape[1]
        rope = rope_tables(T, c.width // c.heads, c.rope_theta, features.device)        # (2, T, e)
        key_rope = rope[:, new_positions].unsqueeze(2)                          # (2, B, 1, K, e)
        self_mask = None if valid is None else valid[:, None, None, :]                # (B, 1, 1, T)
        context = self.new_token_proj_in(new_tokens.to(dtype))                        # (B, K, d)
        x = self.proj_in(features.to(dtype))                                          # (B, T, d)
        for pair in self.blocks:
            if c.cross_attention:
                x = pair.cross_attn(x, context, rope, key_rope, new_valid)
            else:
                x = pair.cross_attn(x, rope, self_mask)
            x = pair.self_attn(x, rope, self_mask)
        x = self.ln_f(x)
        if self.time_embedder is not None:
            c_t = self.time_embedder(mask_ratio)                                      # (B, d)
            scale, shift = self.adaLN_modulation(c_t).chunk(2, dim=-1)   # scale first, no SiLU
            x = modulate(x, shift, scale)
        return features + self.proj_out(x).to(features.dtype)


    def fed(self, s: SequenceStep) -> torch.Tensor:
        """(R, T) bool: the positions whose tokens the step feeds, as generate_image_shortcut
        does: the grid positions decoded at the previous step and, in conditional rows, every
        prompt-template token (the sequence before <answer><boi>, which precede the first grid
        cell); the unconditional rows get the image tokens only. Markers and newlines never."""
        fed = s.new.clone()
        if self.config.feed_prompt:
            T = s.ids.shape[1]
            prompt = torch.arange(T, device=s.ids.device) < (s.grid[:, :1] - 2)          # (R, T)
            fed |= prompt & ~s.uncond[:, None]
        return fed & s.valid if s.valid is not None else fed

    def step(self, s: SequenceStep) -> torch.Tensor:
        """The sequence source's call: the next state (R, T, D) from the previous one."""
        if s.embed is None:
            raise ValueError("the DiMOO shortcut embeds its tokens with the base's input table: "
                             "the base must provide input_embedding() (models/dimoo.py does)")
        fed = self.fed(s)                                                               # (R, T)
        count = fed.sum(1)
        K = max(int(count.max()), 1)
        order = fed.to(torch.int8).argsort(dim=1, descending=True, stable=True)
        positions = order[:, :K]                              # (R, K): sequence order kept
        new_valid = torch.arange(K, device=fed.device) < count[:, None]                 # (R, K)
        ids = s.ids.gather(1, positions).masked_fill(~new_valid, 0)
        tokens = s.embed(ids)                                                           # (R, K, D)
        all_valid = bool(new_valid.all())
        return self(s.states, tokens, positions, s.mask_ratio, s.valid,
                    None if all_valid else new_valid)


# --- the released checkpoint --------------------------------------------------------------------


def load_official_dimoo_shortcut(path: str | Path, config: DiMOOShortcutConfig | None = None,
                                 dtype: torch.dtype = torch.float32,
                                 device: str | torch.device = "cpu") -> DiMOOShortcut:
    """`dimoo-shortcut.pth` (a torch.save'd MDMShortcut state dict) -> DiMOOShortcut in eval mode.

    Strict like the reference's load_state_dict: a missing, unexpected or mis-shaped key is a
    CheckpointError naming it (the reference tolerates no extra key either).
    """
    config = config or DiMOOShortcutConfig()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DiMOO shortcut weights not found at {path}: {HOW_TO_GET}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable torch state dict ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (torch.save(MDMShortcut"
                              f".state_dict())), got {type(state).__name__}")
    with torch.device("meta"):
        net = config.build()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    c = config
    summary = (f"D={c.feature_dim}, width {c.width}, {c.blocks} block pair(s), {c.heads} heads, "
               f"MLP {c.mlp_hidden}, embed_t={c.embed_t}, cross_attention={c.cross_attention}")
    check_fit(path, "DiMOO shortcut", {k: v.shape for k, v in state.items()}, expected, summary)
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                        assign=True)
    return net.eval()
