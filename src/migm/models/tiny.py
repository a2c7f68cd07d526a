"""The embedded default MIGM: VQ tokenizer + masked transformer, behind the base-model protocol.

This adapter is what the generation loop, the trajectory recorder and the accelerators see; the
two networks it wraps know nothing of each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from migm.models.assets import ASSET_DIR, load_module
from migm.models.conditions import IdConditions
from migm.models.layers import LayerShape, Stream
from migm.models.tokenizer import TokenizerConfig, VQTokenizer
from migm.models.transformer import MaskedTransformer, TransformerConfig


def load_tokenizer(name_or_path: str | Path = "tokenizer.pt", asset_dir: Path = ASSET_DIR) -> VQTokenizer:
    return load_module(name_or_path, "tokenizer", lambda c: VQTokenizer(TokenizerConfig(**c)), asset_dir)


def load_transformer(name_or_path: str | Path = "base.pt", asset_dir: Path = ASSET_DIR) -> MaskedTransformer:
    return load_module(name_or_path, "base", lambda c: MaskedTransformer(TransformerConfig(**c)), asset_dir)


class TinyMIGM(IdConditions, nn.Module):
    """Class-conditional MIGM over 7x7 VQ tokens of 28x28 Fashion-MNIST images."""

    def __init__(self, transformer: MaskedTransformer, tokenizer: VQTokenizer) -> None:
        super().__init__()
        if transformer.config.vocab_size != tokenizer.config.codebook_size:
            raise ValueError(f"transformer vocab_size {transformer.config.vocab_size} != tokenizer "
                             f"codebook_size {tokenizer.config.codebook_size}")
        if transformer.config.num_tokens != tokenizer.num_tokens:
            raise ValueError(f"transformer num_tokens {transformer.config.num_tokens} != tokenizer "
                             f"grid {tokenizer.num_tokens}")
        self.transformer = transformer
        self.tokenizer = tokenizer

    @classmethod
    def from_assets(cls, base: str | Path = "base.pt", tokenizer: str | Path = "tokenizer.pt",
                    asset_dir: str | Path = ASSET_DIR) -> TinyMIGM:
        return cls(load_transformer(base, Path(asset_dir)), load_tokenizer(tokenizer, Path(asset_dir)))

    # --- geometry -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.transformer.config.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.transformer.config.vocab_size

    @property
    def mask_id(self) -> int:
        return self.transformer.config.mask_id

    @property
    def feature_dim(self) -> int:
        return self.transformer.config.width

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    def config_dict(self) -> dict:
        """JSON-able settings that, with (tokens, cond), fix the features: a collection hashes
        them into its schema (base_config_hash), so shards of different networks never mix."""
        from dataclasses import asdict
        return asdict(self.transformer.config)

    # --- conditions -----------------------------------------------------------------------------
    # --- the protocol the loop and the accelerators use -----------------------------------------
    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with mask ids, cond (B,) -> last-layer features (B, L, D)."""
        return self.transformer.features(tokens, cond)

    def head(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, M, D) at grid positions (B, M) -> logits (B, M, K).

        positions None means the whole grid in order (M = L). This head is the same linear map at
        every position, so it ignores them; a base whose head has per-position terms (MaskGIT's
        output bias) needs them when the loop scores only the still-masked positions.
        """
        return self.transformer.head(features)

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.tok_emb

    def position_embedding(self) -> torch.Tensor:
        """(L, D) learned position table."""
        return self.transformer.pos_emb[0]

    def layers(self) -> nn.ModuleList:
        return self.transformer.blocks

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> images (B, 1, 28, 28) in [-1, 1]."""
        return self.tokenizer.decode(tokens)

    # --- per-layer access (models/layers.py: LayeredBase) ----------------------------------------
    def embed_sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> Stream:
        """The sequence is the grid itself: the class is added to every row, not a row of its own."""
        B, L = tokens.shape
        grid = torch.arange(L, device=tokens.device).expand(B, L)
        return Stream(self.transformer.embed(tokens, cond), grid, grid,
                      grid.new_zeros((B, 0)), None)

    def position_encoding(self, rows: torch.Tensor) -> None:
        """None: learned absolute positions are added at embedding time."""

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.transformer.norm(h)

    def row_logits(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.transformer.head(features)

    def layer_shape(self) -> LayerShape:
        c = self.transformer.config
        return LayerShape(width=c.width, kv_width=c.width, mlp_hidden=int(c.width * c.mlp_ratio),
                          mlp_matrices=2, depth=c.depth, vocab=c.vocab_size)
