"""The reference architectures at test sizes: a config's `base_config` (and network) overrides
that keep every layer type of MaskGIT-512 and Lumina-DiMOO, with few channels and tokens."""

from migm.gpu_check import SMALL

SMALL_MASKGIT = {"codebook_size": 16, "grid_size": 4, "num_classes": 5, "width": 32, "depth": 2,
                 "heads": 4, "mlp_dim": 64, "embed_dim": 8, "z_channels": 8, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "resolution": 8}
# 8x8 = 64 tokens: Table 1's and 2's step counts (up to 64) fit, every step revealing one; the
# sizes `make gpu-check --small` runs (src/migm/gpu_check.py)
MASKGIT_64 = SMALL["maskgit"]["base_config"]
SMALL_DIMOO = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 48,
               "vocab_size": 64, "mask_token_id": 40, "reference_mask_id": 40, "newline_token_id": 41,
               "boi_token_id": 42, "eoi_token_id": 43, "boa_token_id": 44, "eoa_token_id": 45,
               "image_token_offset": 48, "codebook_size": 16, "grid_height": 3, "grid_width": 4}
DIMOO_64 = SMALL["dimoo"]["base_config"]
SMALL_VQ = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16],
            "layers_per_block": 1, "latent_channels": 4, "num_vq_embeddings": 16, "norm_num_groups": 4,
            "lookup_from_codebook": True}
