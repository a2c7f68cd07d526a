"""The image half of Lumina-DiMOO's tokenizer: code ids -> pixels, in diffusers' VQModel layout.

Lumina-DiMOO uses the aMUSEd VQ-GAN (technical report, Sec. 3; the inference scripts load it with
`diffusers.VQModel.from_pretrained(checkpoint, subfolder="vqvae")`). Only decoding is needed, and
diffusers must not be a dependency, so the decoder is re-written here with diffusers' parameter
names so that `vqvae/diffusion_pytorch_model.safetensors` loads unchanged.

Reference facts this relies on (diffusers models/autoencoders/vq_model.py, vae.py, unet_2d_blocks,
resnet.py, attention_processor.py; aMUSEd's config from diffusers scripts/convert_amused.py):
- decode(ids, force_not_quantize=True) with lookup_from_codebook: codebook rows (B, h, w, C) ->
  NCHW -> post_quant_conv -> Decoder; the spatial-norm variant is not used (norm_type "group");
- Decoder: conv_in, mid_block (resnet, [attention], resnet), up_blocks in reversed channel order,
  each layers_per_block + 1 resnets then a nearest x2 upsample + conv (not after the last block),
  then GroupNorm, SiLU, conv_out; GroupNorms use eps 1e-6;
- the mid-block attention is single-head over the h*w pixels with Linear q/k/v/out (to_q, to_k,
  to_v, to_out.0) after a GroupNorm, plus the residual; aMUSEd turns it off;
- aMUSEd: block_out_channels (128, 256, 256, 512, 768) (16x down), latent_channels 64, 8192 codes,
  layers_per_block 2, norm_num_groups 32, mid_block_add_attention false;
- the pipeline clips the decoder output to [0, 1] (VaeImageProcessor with do_normalize=False).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class VQConfig:
    """Field names as in diffusers' vqvae/config.json; defaults: aMUSEd's VQ-GAN."""

    block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 768)
    layers_per_block: int = 2
    latent_channels: int = 64
    vq_embed_dim: int | None = None        # None: latent_channels
    num_vq_embeddings: int = 8192
    norm_num_groups: int = 32
    mid_block_add_attention: bool = False
    out_channels: int = 3
    act_fn: str = "silu"
    norm_type: str = "group"
    lookup_from_codebook: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        unsupported = {k: v for k, v in (("act_fn", self.act_fn), ("norm_type", self.norm_type))
                       if v != {"act_fn": "silu", "norm_type": "group"}[k]}
        if unsupported:
            raise ValueError(f"VQ decoder: unsupported config {unsupported} (only silu / group norm, "
                             "the aMUSEd VQ-GAN's, are implemented)")

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    @property
    def scale(self) -> int:
        """Pixels per token side: 16 for aMUSEd."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, path: str | Path) -> VQConfig:
        """Known fields from a diffusers config.json; the encoder's and bookkeeping keys are ignored."""
        raw = json.loads(Path(path).read_text())
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels (diffusers Attention, heads = 1)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        a = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + rearrange(self.to_out[0](a), "b (h w) c -> b c h w", h=x.shape[2])


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, groups), ResnetBlock2D(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if len(self.upsamplers) else x


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> image (B, 3, h * scale, w * scale), roughly in [0, 1]."""

    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        chans, g = list(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(chans[max(i - 1, 0)], chans[i], c.layers_per_block + 1, g,
                             upsample=i < len(chans) - 1) for i in range(len(chans)))
        self.conv_norm_out = nn.GroupNorm(g, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VQDecoder(nn.Module):
    """Code ids (B, h*w) on an h x w grid -> images (B, 3, H, W) in [0, 1], as the pipeline clips."""

    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        self.config = c
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(c.num_vq_embeddings, c.embed_dim)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.latent_channels, 1)
        self.decoder = Decoder(c)

    def forward(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        z = rearrange(self.quantize.embedding(ids), "b (h w) c -> b c h w", h=grid[0], w=grid[1])
        return self.decoder(self.post_quant_conv(z)).clamp(0, 1)
