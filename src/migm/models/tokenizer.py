"""A small VQ autoencoder that turns a 28x28 image into a 7x7 grid of discrete tokens and back.

The codebook is learned by exponential moving averages of the encoder outputs assigned to each
code (k-means in the loop, as in VQ-VAE-2), with dead codes restarted from random encoder outputs,
so every one of the K codes stays in use and the base transformer sees a well-spread vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class TokenizerConfig:
    channels: int = 32          # width of the first conv stage; doubled after each downsample
    code_dim: int = 32          # dimension of a codebook vector
    codebook_size: int = 256    # K, the vocabulary of the base model
    ema_decay: float = 0.99
    commitment: float = 0.25    # weight of ||z_e - sg(z_q)||^2
    image_size: int = 28
    downsample: int = 4         # 28 / 4 = 7, so L = 49 tokens


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VectorQuantizer(nn.Module):
    """EMA codebook. Buffers only: the codebook is not touched by the optimiser."""

    def __init__(self, size: int, dim: int, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("codebook", torch.randn(size, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (n, dim) -> code ids (n,)."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return dist.argmin(1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        if not self.initialised:  # start the codes on real encoder outputs, not on noise
            pick = torch.randperm(z.shape[0], device=z.device)[: self.codebook.shape[0]]
            self.codebook.copy_(z[pick])
            self.embed_sum.copy_(z[pick])
            self.initialised.fill_(True)
            return
        onehot = F.one_hot(ids, self.codebook.shape[0]).type_as(z)  # (n, K)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + self.codebook.shape[0] * 1e-5) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        dead = self.cluster_size < 0.5
        if dead.any():  # restart codes unused for ~70 steps on random encoder outputs of this batch
            pick = torch.randint(0, z.shape[0], (int(dead.sum()),), device=z.device)
            self.codebook[dead] = z[pick]
            self.embed_sum[dead] = z[pick]
            self.cluster_size[dead] = 1.0


class VQTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or TokenizerConfig()
        if c.image_size % c.downsample:
            raise ValueError(f"image_size {c.image_size} is not divisible by downsample {c.downsample}")
        stages = {2: 1, 4: 2}.get(c.downsample)
        if stages is None:
            raise ValueError(f"downsample must be 2 or 4, got {c.downsample}")
        ch = [c.channels * 2**k for k in range(stages + 1)]
        enc: list[nn.Module] = [nn.Conv2d(1, ch[0], 3, padding=1), ResBlock(ch[0])]
        for k in range(stages):
            enc += [nn.Conv2d(ch[k], ch[k + 1], 4, stride=2, padding=1), ResBlock(ch[k + 1])]
        enc += [nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], c.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.code_dim, ch[-1], 3, padding=1), ResBlock(ch[-1])]
        for k in reversed(range(stages)):
            dec += [nn.ConvTranspose2d(ch[k + 1], ch[k], 4, stride=2, padding=1), ResBlock(ch[k])]
        dec += [nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 1, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, c.ema_decay)

    @property
    def grid_size(self) -> int:
        return self.config.image_size // self.config.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 1, H, W) in [-1, 1] -> (reconstruction, commitment loss, ids (B, L))."""
        z = self.encoder(images)                                    # (B, d, h, w)
        flat = rearrange(z, "b d h w -> (b h w) d")
        ids = self.quantizer.nearest(flat)
        if self.training:
            self.quantizer.update(flat.detach().float(), ids)
        zq = self.quantizer.codebook[ids]
        commit = F.mse_loss(flat, zq.detach())
        zq = flat + (zq - flat).detach()                            # straight-through
        zq = rearrange(zq, "(b h w) d -> b d h w", b=z.shape[0], h=z.shape[2])
        recon = self.decoder(zq)
        return recon, commit, ids.view(z.shape[0], -1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1, H, W) in [-1, 1] -> token ids (B, L), row-major over the 7x7 grid."""
        z = self.encoder(images)
        ids = self.quantizer.nearest(rearrange(z, "b d h w -> (b h w) d"))
        return ids.view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids (B, L) -> images (B, 1, H, W) in [-1, 1]."""
        if ids.min() < 0 or ids.max() >= self.config.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.config.codebook_size}), "
                             f"got [{int(ids.min())}, {int(ids.max())}]")
        zq = self.quantizer.codebook[ids]                           # (B, L, d)
        zq = rearrange(zq, "b (h w) d -> b d h w", h=self.grid_size)
        return self.decoder(zq).clamp(-1, 1)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
