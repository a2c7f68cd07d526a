"""The per-layer protocol (models/layers.py) on every adapter: hooks reproduce `features()`.

Each adapter runs with small random weights (MaskGIT and Lumina-DiMOO built from their adapters'
classes at toy sizes, as tests/models/test_maskgit.py and test_dimoo.py size them). The FLOP
formulas are checked against torch's FlopCounterMode on a real base call.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from migm.models.dimoo import DiMOOConfig, DiMOOMIGM, LLaDA
from migm.models.layers import attend, full_layer, gather_rows, layered_features, put_rows
from migm.models.maskgit import MaskGITConfig, MaskGITMIGM, MaskGITTransformer, VQGANDecoder

MASKGIT = MaskGITConfig(codebook_size=16, grid_size=4, num_classes=5, width=32, depth=2, heads=4,
                        mlp_dim=64, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), resolution=8)
DIMOO = DiMOOConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                    rope_theta=10000.0, vocab_size=64, mask_token_id=40, newline_token_id=41,
                    boi_token_id=42, eoi_token_id=43, boa_token_id=44, eoa_token_id=45,
                    image_token_offset=48, codebook_size=16, grid_height=3, grid_width=4)
DIMOO_VQ = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, num_vq_embeddings=16,
                norm_num_groups=4, mid_block_add_attention=True, lookup_from_codebook=True)  # VQModel


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm gains near 1, biases and tables nonzero), so no term hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            w = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * w if ("norm" in name or name.endswith(("0.weight", "4.weight"))) and p.dim() == 1
                    else 0.3 * w)


def small_maskgit(seed: int = 0) -> MaskGITMIGM:
    t = MaskGITTransformer(MASKGIT)
    randomise(t, seed)
    return MaskGITMIGM(t.eval(), VQGANDecoder(MASKGIT).eval())


def small_dimoo(seed: int = 0) -> DiMOOMIGM:
    llm = LLaDA(DIMOO)
    randomise(llm, seed)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]       # 2 prompts + unconditional
    from diffusers import VQModel

    return DiMOOMIGM(llm.eval(), VQModel(**DIMOO_VQ).eval(), prompts)


def random_grid(model, B: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.vocab_size, (B, model.num_tokens), generator=g)
    tokens[torch.rand(B, model.num_tokens, generator=g) < 0.5] = model.mask_id
    cond = torch.randint(0, model.num_classes + 1, (B,), generator=g)          # null class too
    return tokens, cond


@pytest.fixture(params=["tiny", "maskgit", "dimoo"])
def base(request, small_migm):
    return {"tiny": lambda: small_migm, "maskgit": small_maskgit, "dimoo": small_dimoo}[request.param]()


@torch.no_grad()
def test_every_layer_through_the_hooks_equals_features(base):
    tokens, cond = random_grid(base, 5)
    assert torch.equal(layered_features(base, tokens, cond), base.features(tokens, cond))


@torch.no_grad()
def test_stream_partitions_the_sequence_and_names_the_grid(base):
    tokens, cond = random_grid(base, 4)
    s = base.embed_sequence(tokens, cond)
    B, T, _ = s.hidden.shape
    both = torch.cat([s.generated, s.context], 1).sort(1).values
    assert torch.equal(both, torch.arange(T).expand(B, T))                   # a partition of rows
    assert all(set(s.grid[b].tolist()) <= set(s.generated[b].tolist()) for b in range(B))
    if s.key_mask is not None:                                                # padding is context
        assert not s.key_mask.gather(1, s.generated).logical_not().any()


@torch.no_grad()
def test_a_subset_of_queries_over_cached_keys_equals_those_rows_of_the_full_layer(base):
    """What every cache relies on: rows computed alone, attending over the full K/V at their
    positions (absolute or rotary), are those rows of the full layer."""
    tokens, cond = random_grid(base, 3)
    s = base.embed_sequence(tokens, cond)
    layer = base.layers()[0]
    full = full_layer(layer, s.hidden, base.position_encoding(s.rows), s.key_mask)
    rows = torch.stack([torch.randperm(s.hidden.shape[1], generator=torch.Generator().manual_seed(b))[:5]
                        for b in range(3)])                                   # (B, 5), differ per row
    h = gather_rows(s.hidden, rows)
    q, k, v = layer.project(layer.attn_input(h), base.position_encoding(rows))
    assert torch.allclose(k, gather_rows(full.k, rows, dim=2), atol=1e-6)
    keys = put_rows(full.k.clone(), rows, k, dim=2)
    h = h + layer.project_attn(attend(q, keys, full.v, s.key_mask))
    h = h + layer.mlp_branch(h)
    assert torch.allclose(h, gather_rows(full.hidden, rows), atol=1e-5)
    # the named projections alone are the packed ones
    x = layer.attn_input(gather_rows(s.hidden, rows))
    v_only, = layer.project(x, base.position_encoding(rows), "v")
    assert torch.allclose(v_only, v, atol=1e-6)


@torch.no_grad()
def test_row_logits_at_the_grid_are_the_heads(base):
    tokens, cond = random_grid(base, 3)
    s = base.embed_sequence(tokens, cond)
    f = base.features(tokens, cond)
    grid = torch.arange(base.num_tokens).expand(3, -1)
    feats = base.final(gather_rows(layered_hidden(base, s), s.grid))
    assert torch.allclose(base.row_logits(feats, s.grid), base.head(f, positions=grid), atol=1e-5)


def layered_hidden(base, s):
    h, pe = s.hidden, base.position_encoding(s.rows)
    for layer in base.layers():
        h = full_layer(layer, h, pe, s.key_mask).hidden
    return h


class AttentionFlops(TorchDispatchMode):
    """CPU flash attention is not in FlopCounterMode's table: count 4 B H M N d from the shapes
    each SDPA call is made with."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            q, k = args[0], args[1]
            self.flops += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return func(*args, **(kwargs or {}))


def counted_flops(fn) -> int:
    """Matmul FLOPs by torch's FlopCounterMode plus attention by shape, independent of LayerShape."""
    with FlopCounterMode(display=False) as linear, AttentionFlops() as attention:
        fn()
    return linear.get_total_flops() + attention.flops


@torch.no_grad()
def test_layer_shape_predicts_a_base_call(base):
    tokens, cond = random_grid(base, 3)
    s = base.embed_sequence(tokens, cond)
    B, T = s.hidden.shape[:2]
    predicted = base.layer_shape().call(B, T, base.num_tokens)
    measured = counted_flops(lambda: base.features(tokens, cond))
    extra = base.layer_shape().final_row * B * (T - base.num_tokens)          # MaskGIT: class row
    assert measured == predicted + extra
