"""MaskGIT (Besnier & Chen 2023, valeoai/Maskgit-pytorch v1) behind the base-model protocol.

The accelerators need the base split at the point where only a per-position linear map remains,
and the released weights have to load unchanged, so the networks are re-written here with the
reference's parameter shapes instead of importing its code (its VQGAN is a Lightning 1.x module
from taming-transformers). Inference only: the decoder half of the VQGAN, no encoder, no losses.

Reference facts this relies on (commit 674ef1d, "v1 archive"; the repo's main is now v2, another
architecture, whose checkpoints this does not read):
- the transformer file is {"iter", "global_epoch", "model_state_dict", "optimizer_state_dict"},
  saved from the unwrapped model (no "module." prefix; one is stripped anyway);
- the class token is appended after the L image tokens with id K + 1 + class; CFG's unconditional
  branch (drop_label) uses id K + 1 + C; the mask token is id K (= 1024);
- logits = last_layer(...) @ tok_emb.weight.T + bias, bias being (L + 1, K + 1 + C + 1): a learned
  bias per position, which is why `head` takes the positions it scores;
- the VQGAN is taming's vqgan_imagenet_f16_1024, a Lightning 1.x `last.ckpt` (Trainer/vit.py
  l.85-93: torch.load(...)["state_dict"], load_state_dict(strict=False)): besides state_dict it
  holds epoch, global_step, pytorch-lightning_version, optimizer_states, lr_schedulers, and
  `callbacks` keyed by the callback's class (PL 1.0's Trainer.on_save_checkpoint:
  callback_states[type(callback)] = state), i.e. ModelCheckpoint's class object (`_read`);
- the decoded images are unclamped in the reference's FID evaluation (MIGM-Shortcut
  Metrics/sample_and_eval.py l.137-140 stretches the raw decode_code output per image).
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from migm.files import CheckpointError
from migm.models.conditions import IdConditions
from migm.models.layers import LayerShape, Stream
from migm.models.checkpoints import HOW_TO_GET


@dataclass
class MaskGITConfig:
    """Defaults: the released ImageNet-512 model (vit_size "base") and its VQGAN."""

    codebook_size: int = 1024      # K; the mask token is id K
    grid_size: int = 32            # 512 / 16: L = 1024 tokens (the ImageNet-256 model has 16)
    num_classes: int = 1000        # C; the null class of CFG is id C
    width: int = 768               # D
    depth: int = 24
    heads: int = 16                # not in the weights: Trainer/vit.py builds "base" with 16
    mlp_dim: int = 3072
    dropout: float = 0.1
    embed_dim: int = 256           # VQGAN codebook vector size
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256          # the VQGAN's training size: only fixes where attention sits

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


# --- the masked transformer (Network/transformer.py: MaskTransformer) ----------------------------
class Block(nn.Module):
    """Pre-norm block; attention weights in nn.MultiheadAttention's packed layout."""

    def __init__(self, c: MaskGITConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * c.width, c.width))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * c.width))
        self.attn.out_proj = nn.Linear(c.width, c.width)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        self.norm2 = nn.LayerNorm(c.width)
        self.mlp = nn.Sequential(nn.Linear(c.width, c.mlp_dim), nn.GELU(), nn.Linear(c.mlp_dim, c.width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(self.norm1(h), self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.heads)
        a = rearrange(F.scaled_dot_product_attention(q, k, v), "b h t d -> b t (h d)")
        h = h + self.attn.out_proj(a)                                           # (B, T, D)
        return h + self.mlp(self.norm2(h))

    # --- per-layer access (models/layers.py: LayerAccess); forward above is these in order ---
    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm1(h)

    def project(self, x: torch.Tensor, pe: None = None, which: str = "qkv") -> tuple[torch.Tensor, ...]:
        """x (B, M, D) -> the named of q, k, v, each (B, H, M, d); positions were added at embedding."""
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        if which == "qkv":                                   # the packed map, as forward runs it
            return tuple(rearrange(F.linear(x, w, b), "b t (three h d) -> three b h t d",
                                   three=3, h=self.heads))
        D = x.shape[-1]
        return tuple(rearrange(F.linear(x, w[i * D:(i + 1) * D], b[i * D:(i + 1) * D]),
                               "b t (h d) -> b h t d", h=self.heads)
                     for i in ("qkv".index(part) for part in which))

    def project_attn(self, a: torch.Tensor) -> torch.Tensor:
        return self.attn.out_proj(a)

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(h))


class MaskGITTransformer(nn.Module):
    def __init__(self, c: MaskGITConfig) -> None:
        super().__init__()
        self.config = c
        L, D, rows = c.num_tokens, c.width, c.codebook_size + 1 + c.num_classes + 1
        self.tok_emb = nn.Embedding(rows, D)             # codes, mask, classes, null class
        self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, L + 1, D), 0.0, 0.02))
        ln = lambda: nn.LayerNorm(D, eps=1e-12)
        drop = lambda: nn.Dropout(c.dropout)             # kept: it fixes the Sequential indices
        self.first_layer = nn.Sequential(ln(), drop(), nn.Linear(D, D), nn.GELU(), ln(), drop(),
                                         nn.Linear(D, D))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.last_layer = nn.Sequential(ln(), drop(), nn.Linear(D, D), nn.GELU(), ln())
        self.bias = nn.Parameter(torch.zeros(L + 1, rows))

    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with mask id K, cond (B,) in [0, C] -> (B, L, D); C is the null class."""
        cls = cond + self.config.codebook_size + 1
        h = self.tok_emb(torch.cat([tokens, cls[:, None]], 1)) + self.pos_emb   # (B, L+1, D)
        h = self.first_layer(h)
        for block in self.blocks:
            h = block(h)
        return self.last_layer(h)[:, :-1]                # the class token's output is never read

    def sequence_features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """features() before the class slot is dropped: (B, L + 1, D), grid then class token
        (the reference's ret_last_feat, which its official shortcut evolves)."""
        cls = cond + self.config.codebook_size + 1
        h = self.tok_emb(torch.cat([tokens, cls[:, None]], 1)) + self.pos_emb   # (B, L+1, D)
        h = self.first_layer(h)
        for block in self.blocks:
            h = block(h)
        return self.last_layer(h)

    def head(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, M, D) at grid positions (B, M) -> logits over the K codes (B, M, K)."""
        K, L = self.config.codebook_size, self.config.num_tokens
        if positions is None:
            if features.shape[-2] != L:
                raise ValueError(f"MaskGIT's head has a bias per position: pass `positions` for "
                                 f"features of {features.shape[-2]} positions (the grid has {L})")
            bias = self.bias[:L, :K]                                            # (L, K)
        else:
            bias = self.bias[positions, :K]                                     # (B, M, K)
        return features @ self.tok_emb.weight[:K].t() + bias


# --- the VQGAN decoder (taming modules/diffusionmodules/model.py: Decoder) ------------------------
def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w pixels."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        a = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(a)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, 3, h * 2^(levels-1), ...). `up[0]` is the finest level."""

    def __init__(self, c: MaskGITConfig) -> None:
        super().__init__()
        levels = len(c.ch_mult)
        ch = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(ch, ch), AttnBlock(ch)
        self.mid.block_2 = ResnetBlock(ch, ch)
        up = []
        for level in reversed(range(levels)):
            stage, out = nn.Module(), c.ch * c.ch_mult[level]
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(ResnetBlock(ch, out))
                ch = out
                if res in c.attn_resolutions:
                    stage.attn.append(AttnBlock(ch))
            if level != 0:
                stage.upsample, res = Upsample(ch), res * 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = _norm(ch), nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """Code ids -> images: codebook lookup, post_quant_conv, decoder (keys as in taming's VQModel)."""

    def __init__(self, c: MaskGITConfig) -> None:
        super().__init__()
        self.grid_size = c.grid_size
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(c.codebook_size, c.embed_dim)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.decoder = Decoder(c)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = rearrange(self.quantize.embedding(ids), "b (h w) c -> b c h w", h=self.grid_size)
        return self.decoder(self.post_quant_conv(z))


# --- loading the reference files ------------------------------------------------------------------
# the reference's block layout ModuleList([PreNorm(Attention), PreNorm(FeedForward)]) -> ours
_RENAMES = [("transformer.layers.{i}.0.norm.", "blocks.{i}.norm1."),
            ("transformer.layers.{i}.0.fn.mha.", "blocks.{i}.attn."),
            ("transformer.layers.{i}.1.norm.", "blocks.{i}.norm2."),
            ("transformer.layers.{i}.1.fn.net.0.", "blocks.{i}.mlp.0."),
            ("transformer.layers.{i}.1.fn.net.3.", "blocks.{i}.mlp.2.")]


def _rename(key: str, to_ours: bool) -> str:
    for ref, ours in _RENAMES:
        src, dst = (ref, ours) if to_ours else (ours, ref)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        if m := re.match(pattern, key):
            return dst.format(i=m.group(1)) + key[m.end():]
    return key


class _CallbackClassKey:
    """Stands in for the callback class a Lightning 1.x checkpoint uses as a dict key.

    Such a checkpoint's `callbacks` is {ModelCheckpoint: {best_model_score, best_model_path, ...}}:
    the key is the class object itself, which pickles as GLOBAL
    pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint and which torch.load's
    weights-only unpickler refuses ("Unsupported global"). Allow-listing that one name, mapped to
    this class, lets the file load without importing Lightning 1.x: the class is only ever a key
    there. Building it (a pickle that calls or reconstructs it) is refused, so nothing but a name
    is let through; every other global stays refused as weights_only refuses it.
    """

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("a Lightning callback class may only appear as a dict key "
                                     "in a checkpoint, not be built")


# Exactly what the released VQGAN's last.ckpt needs beyond tensors, containers, strings and numbers.
_LIGHTNING_1X_GLOBALS = [(_CallbackClassKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def _read(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"MaskGIT {what} checkpoint not found at {path}. {HOW_TO_GET['maskgit']}.")
    try:
        with torch.serialization.safe_globals(_LIGHTNING_1X_GLOBALS):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot be read as plain tensors ({err}); migm loads weights only, never pickled "
            f"objects: expected the released MaskGIT checkpoint (a dict with model_state_dict)") from err
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(blob).__name__}")
    for field in ("model_state_dict", "state_dict"):
        if isinstance(blob.get(field), dict):
            blob = blob[field]
            break
    return {k.removeprefix("module."): v for k, v in blob.items() if isinstance(v, torch.Tensor)}


def _check_fit(path: Path, what: str, found: dict, expected: dict, c: MaskGITConfig) -> dict:
    """The file's tensors the network expects; raise naming the first keys that are missing or of
    the wrong shape (with the unexpected ones beside them, often the same keys renamed). Extra
    keys alone only warn: the reference loads its checkpoints with strict=False."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file {tuple(found[k].shape)}, expected {tuple(s)}"
              for k, s in expected.items() if k in found and found[k].shape != s]
    problems = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}"
                for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if not missing and not shapes:
        if unexpected:
            warnings.warn(f"{path}: ignoring {len(unexpected)} keys the MaskGIT {what} does not use "
                          f"(the reference loads with strict=False): {unexpected[:4]}")
        return {k: v for k, v in found.items() if k in expected}
    hint, pos = "", found.get("pos_emb")
    if pos is not None and pos.ndim == 3 and "pos_emb" in expected and pos.shape != expected["pos_emb"]:
        n = round((pos.shape[1] - 1) ** 0.5)          # e.g. 16 for the ImageNet-256 checkpoint
        hint = f" The file's pos_emb is a {n}x{n} grid: pass MaskGITConfig(grid_size={n})."
    raise CheckpointError(f"{path}: does not fit the MaskGIT {what} of this config (K={c.codebook_size}"
                          f", grid {c.grid_size}x{c.grid_size}, C={c.num_classes}, D={c.width}, depth "
                          f"{c.depth}): " + "; ".join(problems) + "." + hint)


def load_maskgit_transformer(path: str | Path, config: MaskGITConfig) -> MaskGITTransformer:
    path, model = Path(path), MaskGITTransformer(config)
    found = _read(path, "transformer")
    expected = {_rename(k, to_ours=False): v.shape for k, v in model.state_dict().items()}
    found = _check_fit(path, "transformer", found, expected, config)
    model.load_state_dict({_rename(k, to_ours=True): v.float() for k, v in found.items()})
    return model.eval().requires_grad_(False)


def load_vqgan_decoder(path: str | Path, config: MaskGITConfig) -> VQGANDecoder:
    """The encoder, quant_conv and loss (discriminator, LPIPS) weights in the file are ignored."""
    path, model = Path(path), VQGANDecoder(config)
    kept = ("quantize.", "post_quant_conv.", "decoder.")
    found = {k: v for k, v in _read(path, "VQGAN").items() if k.startswith(kept)}
    found = _check_fit(path, "VQGAN decoder", found, {k: v.shape for k, v in model.state_dict().items()}, config)
    model.load_state_dict({k: v.float() for k, v in found.items()})
    return model.eval().requires_grad_(False)


# --- the adapter ------------------------------------------------------------------------------------
class MaskGITMIGM(IdConditions, nn.Module):
    """Class-conditional MaskGIT over 32x32 VQGAN tokens of 512x512 ImageNet images."""

    def __init__(self, transformer: MaskGITTransformer, vqgan: VQGANDecoder) -> None:
        super().__init__()
        self.transformer, self.vqgan = transformer, vqgan
        self.config = transformer.config
        # False: `decode` returns the raw VQGAN output, for the reference's per-image min-max FID
        # preprocessing (MetricsConfig.fid_preprocess sets it); every other consumer clamps itself
        self.clamp_decoded = True

    @classmethod
    def from_checkpoints(cls, transformer_path: str | Path, vqgan_path: str | Path,
                         config: MaskGITConfig | None = None) -> MaskGITMIGM:
        config = config or MaskGITConfig()
        return cls(load_maskgit_transformer(transformer_path, config),
                   load_vqgan_decoder(vqgan_path, config))

    # --- geometry -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def mask_id(self) -> int:
        return self.config.codebook_size

    @property
    def feature_dim(self) -> int:
        return self.config.width

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def config_dict(self) -> dict:
        """JSON-able settings that, with (tokens, cond), fix the features (see TinyMIGM)."""
        from dataclasses import asdict
        return asdict(self.config)

    # --- conditions -----------------------------------------------------------------------------
    # --- the protocol the loop and the accelerators use -----------------------------------------
    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with mask ids, cond (B,) -> last hidden state before the head (B, L, D)."""
        return self.transformer.features(tokens, cond)

    def head(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, M, D) at grid positions (B, M), None = the whole grid -> logits (B, M, K)."""
        return self.transformer.head(features, positions)

    # --- the whole input sequence (accel/sequence.py's contract) ---------------------------------
    def sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        """tokens (B, L), cond (B,) -> the input ids (B, L + 1) (grid, then class id K + 1 + cond),
        no padding (None), grid positions (B, L) = 0..L-1: the class slot sits last."""
        ids = torch.cat([tokens, (cond + self.config.codebook_size + 1)[:, None]], 1)
        grid = torch.arange(self.num_tokens, device=tokens.device).expand(len(tokens), -1)
        return ids, None, grid

    def sequence_features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The last-layer state at all L + 1 positions (B, L + 1, D); [:, :L] is `features`."""
        return self.transformer.sequence_features(tokens, cond)

    def token_embedding(self) -> nn.Embedding:
        """Rows [0, K) are the codes, K the mask, then the C classes and the null class."""
        return self.transformer.tok_emb

    def position_embedding(self) -> torch.Tensor:
        """(L, D): the image positions of the learned table (its last row is the class token's)."""
        return self.transformer.pos_emb[0, : self.num_tokens]

    def layers(self) -> nn.ModuleList:
        """Blocks acting on (B, L + 1, D): the class token rides along as the last position."""
        return self.transformer.blocks

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> images (B, 3, H, W) in [-1, 1] (unclamped when `clamp_decoded` is
        False); 512x512 for the released model."""
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")
        images = self.vqgan(tokens)
        return images.clamp(-1, 1) if self.clamp_decoded else images

    # --- per-layer access (models/layers.py: LayeredBase) ----------------------------------------
    def embed_sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> Stream:
        """Rows 0..L-1 are the grid, row L the class token; first_layer is part of the embedding."""
        t, (B, L) = self.transformer, tokens.shape
        cls = cond + self.config.codebook_size + 1
        h = t.first_layer(t.tok_emb(torch.cat([tokens, cls[:, None]], 1)) + t.pos_emb)  # (B, L+1, D)
        grid = torch.arange(L, device=tokens.device).expand(B, L)
        return Stream(h, grid, grid, grid.new_full((B, 1), L), None)

    def position_encoding(self, rows: torch.Tensor) -> None:
        """None: learned absolute positions are added at embedding time."""

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """last_layer (LN, Linear, GELU, LN): a per-row map, so any subset of rows."""
        return self.transformer.last_layer(h)

    def row_logits(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The bias table has a row per sequence row, the class slot's (row L) included."""
        K = self.config.codebook_size
        return features @ self.transformer.tok_emb.weight[:K].t() + self.transformer.bias[rows, :K]

    def layer_shape(self) -> LayerShape:
        c = self.config
        return LayerShape(width=c.width, kv_width=c.width, mlp_hidden=c.mlp_dim, mlp_matrices=2,
                          depth=c.depth, vocab=c.codebook_size,
                          embed_row=4 * c.width**2, final_row=2 * c.width**2)
