"""The official MaskGIT shortcut against files in its own key layout (MIGM-Shortcut, MaskGIT-Shortcut).

Random weights are saved the way the reference saves them (the unwrapped module's flat
state_dict, train_shortcut.py) under the reference's key names; the expected numbers come from
`reference_forward`, a plain re-implementation of MaskGITShortcut.forward written from
Network/shortcut_model.py and Network/transformer.py, not from the module under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from migm.accel.refresh import RefreshPlan
from migm.accel.sequence import SequenceShortcutSource
from migm.accel.shortcut import shortcut_source
from migm.accel.shortcut import ShortcutSource
from migm.files import CheckpointError
from migm.models.maskgit import MaskGITConfig, MaskGITMIGM, MaskGITTransformer, VQGANDecoder
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.maskgit_official import (MaskGITShortcutConfig, load_official_maskgit_shortcut,
                                            official_key, set_test_dropout)
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork

# D = 32, K = 16 codes, L = 16 (a 4x4 grid): the sequence has 17 positions, the class slot last
SMALL = MaskGITShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=16, ratio=2, blocks=2,
                              heads=4, time_frequencies=16)
ROWS = 16 + 1 + 5 + 1                     # the base's tok_emb rows: codes, mask, 5 classes, null


# --- the reference layout ---------------------------------------------------------------------
def official_shapes(D: int, ratio: float, blocks: int, time: bool = True,
                    freqs: int = 256) -> dict[str, tuple[int, ...]]:
    """MaskGITShortcut.state_dict() shapes, from its __init__ (wte/wpe are non-persistent)."""
    d = round(D / ratio)
    s = {}
    if ratio != 1:
        s |= {"proj_in.weight": (d, D), "proj_in.bias": (d,), "proj_out.weight": (D, d),
              "proj_out.bias": (D,), "new_token_proj_in.weight": (d, D), "new_token_proj_in.bias": (d,)}
    for n in range(blocks):
        for attn in ("cross_attn", "self_attn"):
            p = f"blocks.{n}.{attn}."
            s |= {p + "norm.weight": (d,), p + "norm.bias": (d,),
                  p + "fn.mha.in_proj_weight": (3 * d, d), p + "fn.mha.in_proj_bias": (3 * d,),
                  p + "fn.mha.out_proj.weight": (d, d), p + "fn.mha.out_proj.bias": (d,)}
            p = f"blocks.{n}.{attn}_ff."
            s |= {p + "norm.weight": (d,), p + "norm.bias": (d,), p + "fn.net.0.weight": (4 * d, d),
                  p + "fn.net.0.bias": (4 * d,), p + "fn.net.3.weight": (d, 4 * d), p + "fn.net.3.bias": (d,)}
    for i in (0, 1, 3):
        s |= {f"last_layer.{i}.weight": (d, d) if i == 1 else (d,), f"last_layer.{i}.bias": (d,)}
    if time:
        mid = round(math.sqrt(d * freqs))
        s |= {"time_embedder.mlp.0.weight": (mid, freqs), "time_embedder.mlp.0.bias": (mid,),
              "time_embedder.mlp.2.weight": (d, mid), "time_embedder.mlp.2.bias": (d,),
              "adaLN_modulation.weight": (2 * d, d), "adaLN_modulation.bias": (2 * d,)}
    return s


def random_weights(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        w = torch.randn(shape, generator=g)
        out[k] = 1 + 0.1 * w if (k.endswith("weight") and len(shape) == 1) else 0.3 * w
    return out


def base_tables(seed: int = 5, D: int = 32, L: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for the base's tok_emb.weight (rows, D) and pos_emb (1, L + 1, D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, D, generator=g), 0.5 * torch.randn(1, L + 1, D, generator=g)


def save_official(tmp_path, c: MaskGITShortcutConfig = SMALL, seed: int = 0, edit=lambda sd: None):
    sd = random_weights(official_shapes(c.feature_dim, c.ratio, c.blocks, time=c.time,
                                        freqs=c.time_frequencies), seed)
    edit(sd)
    path = tmp_path / "maskgit-shortcut.pth"
    torch.save(sd, path)
    return path, sd


# --- a plain re-implementation of MaskGITShortcut.forward ---------------------------------------
def reference_forward(sd, wte, wpe, prev_feat, new_ids, new_map, mask_ratio, heads, freqs=16,
                      dropout=0.0):
    """prev_feat (B, T, D), new_ids (B, K), new_map (B, T) bool, mask_ratio (B,) -> (B, T, D).
    `dropout`: the module left in training mode, as eval.sh runs it (FeedForward's two Dropouts,
    scaled_dot_product_attention's dropout_p; never in the last layer)."""
    B, T, D = prev_feat.shape

    def lin(x, n):
        return F.linear(x, sd[n + ".weight"], sd[n + ".bias"]) if n + ".weight" in sd else x

    def ln(x, n, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], eps)

    def attention(prefix, q_in, kv_in):
        w, b = sd[prefix + "fn.mha.in_proj_weight"], sd[prefix + "fn.mha.in_proj_bias"]
        d = w.shape[1]
        q = F.linear(ln(q_in, prefix + "norm"), w[:d], b[:d])                   # query pre-normed only
        k, v = F.linear(kv_in, w[d:2 * d], b[d:2 * d]), F.linear(kv_in, w[2 * d:], b[2 * d:])
        split = lambda z: z.view(B, z.shape[1], heads, d // heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        if dropout:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, -1, d)
        return F.linear(a, sd[prefix + "fn.mha.out_proj.weight"], sd[prefix + "fn.mha.out_proj.bias"])

    def ff(prefix, x):
        drop = lambda z: F.dropout(z, dropout, training=True) if dropout else z
        return drop(lin(drop(F.gelu(lin(ln(x, prefix + "norm"), prefix + "fn.net.0"))), prefix + "fn.net.3"))

    new = F.embedding(new_ids, wte) + wpe.expand(B, -1, -1)[new_map].reshape(B, new_ids.shape[1], D)
    new = lin(new, "new_token_proj_in")
    x = lin(prev_feat, "proj_in")
    n = 0
    while f"blocks.{n}.cross_attn.norm.weight" in sd:
        p = f"blocks.{n}."
        x = x + attention(p + "cross_attn.", x, new)
        x = x + ff(p + "cross_attn_ff.", x)
        x = x + attention(p + "self_attn.", x, x)
        x = x + ff(p + "self_attn_ff.", x)
        n += 1
    x = ln(F.gelu(lin(ln(x, "last_layer.0", 1e-12), "last_layer.1")), "last_layer.3", 1e-12)
    if "adaLN_modulation.weight" in sd:
        t = mask_ratio * 1000
        half = freqs // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        emb = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], -1)
        c = lin(F.silu(lin(emb, "time_embedder.mlp.0")), "time_embedder.mlp.2")
        scale, shift = lin(c, "adaLN_modulation")[:, None].chunk(2, dim=-1)    # scale first
        x = x * (1 + scale) + shift
    return lin(x, "proj_out") + prev_feat


def random_step(B=3, K=4, T=17, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(B, T, D, generator=g)
    new_map = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        new_map[b, torch.randperm(T - 1, generator=g)[:K]] = True               # never the class slot
    tokens = torch.randint(0, 16, (B, T), generator=g)
    ids = tokens[new_map].view(B, K)
    ratio = torch.rand(B, generator=g)
    return prev, tokens, new_map, ids, ratio


# --- fidelity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    SMALL,
    MaskGITShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=16, ratio=1, blocks=1, heads=2,
                          time_frequencies=16),                                   # no projections
    MaskGITShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=16, ratio=2, blocks=1, heads=4,
                          time=False, time_frequencies=16),                       # --no_embed_t
], ids=["R2-2blocks", "R1", "no-time"])
def test_imported_network_is_the_reference_forward(tmp_path, config):
    path, sd = save_official(tmp_path, config)
    wte, wpe = base_tables()
    net = load_official_maskgit_shortcut(path, config, wte, wpe)
    prev, tokens, new_map, ids, ratio = random_step()
    expected = reference_forward(sd, wte, wpe, prev, ids, new_map, ratio, config.heads)
    torch.testing.assert_close(net(prev, tokens, new_map, ratio), expected, atol=1e-5, rtol=1e-5)
    # the grid-only form (new over L positions, the class slot implied) is the same call
    torch.testing.assert_close(net(prev, tokens[:, :16], new_map[:, :16], ratio), expected,
                               atol=1e-5, rtol=1e-5)


def test_dropout_at_test_is_the_reference_left_in_training_mode(tmp_path):
    """eval.sh's shortcut samples with its dropout 0.1 active: the same sites, the same draws."""
    path, sd = save_official(tmp_path, SMALL)
    wte, wpe = base_tables()
    net = load_official_maskgit_shortcut(path, SMALL, wte, wpe).eval()
    prev, tokens, new_map, ids, ratio = random_step()
    plain = net(prev, tokens, new_map, ratio)
    assert set_test_dropout(net, 0.1) == 4 * SMALL.blocks        # 2 attentions + 2 FFs a block
    torch.manual_seed(7)
    ours = net(prev, tokens, new_map, ratio)
    torch.manual_seed(7)
    expected = reference_forward(sd, wte, wpe, prev, ids, new_map, ratio, SMALL.heads, dropout=0.1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)
    assert set_test_dropout(ShortcutNetwork(ShortcutConfig()), 0.1) == 0     # ours has no such sites


def test_released_size_is_the_reference_forward(tmp_path):
    """768 wide, R 2, 16 heads of 24, 1,025 positions, 109 new tokens (step 15 of N = 15)."""
    c = MaskGITShortcutConfig()
    sd = random_weights(official_shapes(768, 2, 1), seed=2)
    sd = {k: v * (0.05 if v.ndim == 2 else 1) for k, v in sd.items()}           # keep the stream O(1)
    torch.save(sd, tmp_path / "released.pth")
    g = torch.Generator().manual_seed(4)
    wte, wpe = torch.randn(2026, 768, generator=g) * 0.02, torch.randn(1, 1025, 768, generator=g) * 0.02
    net = load_official_maskgit_shortcut(tmp_path / "released.pth", c, wte, wpe)
    prev = torch.randn(2, 1025, 768, generator=g)
    new_map = torch.zeros(2, 1025, dtype=torch.bool)
    new_map[:, torch.randperm(1024, generator=g)[:109]] = True
    tokens = torch.randint(0, 1024, (2, 1025), generator=g)
    ratio = torch.tensor([109 / 1024, 109 / 1024])
    expected = reference_forward(sd, wte, wpe, prev, tokens[new_map].view(2, 109), new_map, ratio,
                                 16, freqs=256)
    torch.testing.assert_close(net(prev, tokens, new_map, ratio), expected, atol=1e-5, rtol=1e-5)


def test_padded_rows_of_a_training_batch_match_their_unpadded_forward(tmp_path):
    """Rows with different new-token counts are padded; each equals the reference on its own."""
    path, sd = save_official(tmp_path)
    wte, wpe = base_tables()
    net = load_official_maskgit_shortcut(path, SMALL, wte, wpe)
    prev, tokens, new_map, _, ratio = random_step(B=2, K=5)
    new_map[1, new_map[1].nonzero()[:3, 0]] = False                              # row 1: 2 new tokens
    out = net(prev, tokens, new_map, ratio)
    for b in range(2):
        ids = tokens[b:b + 1][new_map[b:b + 1]].view(1, -1)
        expected = reference_forward(sd, wte, wpe, prev[b:b + 1], ids, new_map[b:b + 1], ratio[b:b + 1], 4)
        # float32, batched vs one row: matmul kernels differ by CPU and batch (3e-5 seen on AMD
        # EPYC); a padded key leaking into attention moves the output by far more than 1e-4
        torch.testing.assert_close(out[b:b + 1], expected, atol=1e-4, rtol=1e-4)


def test_released_setting_has_the_reference_key_layout():
    """eval.sh / main.py: D 768, R 2 (width 384), 1 block, 16 heads, 256 time frequencies."""
    c = MaskGITShortcutConfig()
    assert (c.width, c.heads, c.blocks, c.time_hidden) == (384, 16, 1, 314)
    with torch.device("meta"):
        net = c.build()
    ours = {official_key(k): tuple(v.shape) for k, v in net.state_dict().items()
            if k not in ("token_table", "position_table")}
    assert ours == official_shapes(768, 2, 1)
    assert ours["proj_in.weight"] == (384, 768) and ours["time_embedder.mlp.0.weight"] == (314, 256)
    assert ours["blocks.0.self_attn_ff.fn.net.0.weight"] == (1536, 384)
    assert net.positions == "sequence"


# --- strictness -------------------------------------------------------------------------------
def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    wte, wpe = base_tables()

    def drop(sd):
        del sd["blocks.1.self_attn_ff.fn.net.3.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.1\.self_attn_ff\.fn\.net\.3\.bias'\]"):
        load_official_maskgit_shortcut(save_official(tmp_path, edit=drop)[0], SMALL, wte, wpe)

    def extra(sd):
        sd["module.proj_in.weight"] = sd["proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected keys \['module\.proj_in\.weight'\]"):
        load_official_maskgit_shortcut(save_official(tmp_path, edit=extra)[0], SMALL, wte, wpe)

    # a file trained with another bottleneck: the first mismatched shapes are named
    path, _ = save_official(tmp_path, MaskGITShortcutConfig(**{**SMALL.__dict__, "ratio": 4, "heads": 2}))
    with pytest.raises(CheckpointError, match=r"shape mismatches \['proj_in\.weight: file \(8, 32\), "
                                              r"expected \(16, 32\)'"):
        load_official_maskgit_shortcut(path, SMALL, wte, wpe)

    # trained with --no_embed_t but loaded as timed
    path, _ = save_official(tmp_path, MaskGITShortcutConfig(**{**SMALL.__dict__, "time": False}))
    with pytest.raises(CheckpointError, match=r"missing keys \['time_embedder\.mlp\.0\.weight'"):
        load_official_maskgit_shortcut(path, SMALL, wte, wpe)


def test_the_base_table_names_are_ignored_with_a_warning(tmp_path):
    """The reference's wte/wpe come from the base, never from the file: tolerated and named."""
    wte, wpe = base_tables()

    def tables(sd):
        sd["wte"], sd["wpe"] = torch.zeros(ROWS, 32), torch.zeros(1, 17, 32)
    path, sd = save_official(tmp_path, edit=tables)
    with pytest.warns(UserWarning, match=r"ignoring \['wte', 'wpe'\]"):
        net = load_official_maskgit_shortcut(path, SMALL, wte, wpe)
    assert torch.equal(net.token_table, wte[:16]) and torch.equal(net.position_table, wpe[0, :16])
    prev, tokens, new_map, ids, ratio = random_step()
    torch.testing.assert_close(net(prev, tokens, new_map, ratio),
                               reference_forward(sd, wte, wpe, prev, ids, new_map, ratio, 4), atol=1e-5, rtol=1e-5)


def test_missing_or_unreadable_file_is_one_clear_line(tmp_path):
    wte, wpe = base_tables()
    with pytest.raises(CheckpointError, match=r"not found at .*nowhere\.pth.*maskgit-shortcut\.pth"):
        load_official_maskgit_shortcut(tmp_path / "nowhere.pth", SMALL, wte, wpe)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pth: cannot be read"):
        load_official_maskgit_shortcut(tmp_path / "junk.pth", SMALL, wte, wpe)
    torch.save({"model": {"proj_in.weight": torch.zeros(1)}}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match=r"wrapped\.pth: expected the official shortcut's flat state_dict"):
        load_official_maskgit_shortcut(tmp_path / "wrapped.pth", SMALL, wte, wpe)


@pytest.mark.parametrize("field,value,match", [
    ("heads", 5, r"heads \(5\) must divide the width round\(feature_dim / ratio\) = 16"),
    ("ratio", 0, r"ratio must be > 0"),
    ("blocks", 0, r"blocks must be >= 1"),
    ("time_frequencies", 15, r"time_frequencies must be even"),
])
def test_config_is_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        MaskGITShortcutConfig(**{**SMALL.__dict__, field: value})


# --- in the loop, on a small random MaskGIT -----------------------------------------------------
BASE = MaskGITConfig(codebook_size=16, grid_size=4, num_classes=5, width=32, depth=2, heads=4,
                     mlp_dim=64, dropout=0.0, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 2),
                     num_res_blocks=1, attn_resolutions=(4,), resolution=8)


@pytest.fixture(scope="module")
def maskgit():
    torch.manual_seed(0)
    transformer = MaskGITTransformer(BASE)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return MaskGITMIGM(transformer.eval(), VQGANDecoder(BASE).eval())


def test_sequence_features_hold_the_grid_features_then_the_class_slot(maskgit):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 17, (4, 16), generator=g)
    cond = torch.tensor([0, 4, 5, 2])                                            # 5: the null class
    ids, valid, grid = maskgit.sequence(tokens, cond)
    assert valid is None and torch.equal(grid, torch.arange(16).expand(4, -1))
    assert torch.equal(ids[:, :16], tokens) and torch.equal(ids[:, 16], cond + 17)
    states = maskgit.sequence_features(tokens, cond)
    assert states.shape == (4, 17, 32)
    torch.testing.assert_close(states[:, :16], maskgit.features(tokens, cond), atol=0, rtol=0)


class _Record:
    def __init__(self, source):
        self.source, self.steps = source, []

    def on_step(self, ctx, features, new_tokens, revealed):
        self.steps.append((ctx, features.clone(), self.source.states.clone()))


def test_generate_runs_the_imported_shortcut_on_the_full_state(tmp_path, maskgit):
    """generate() end to end at a plan: the base at its steps (state = sequence_features), the
    reference forward on the stored (2B, L + 1, D) state at the others, with the mask ratio of
    x_{i-1} and the step i-1 tokens in both CFG branches; the loop sees the state's grid rows."""
    path, sd = save_official(tmp_path)
    wte, wpe = maskgit.token_embedding().weight.detach(), maskgit.transformer.pos_emb.detach()
    net = load_official_maskgit_shortcut(path, SMALL, wte, maskgit.position_embedding())
    plan = RefreshPlan.explicit(6, [1, 4])
    source = SequenceShortcutSource(maskgit, net, plan)
    record = _Record(source)
    cond = torch.tensor([0, 3, 4])
    out = generate(maskgit, source, cond, 6, sampler=SamplerConfig(cfg_weight=2.0), seed=0,
                   observers=[record])
    assert out.counts == {"base_calls": 2, "shortcut_calls": 4, "base_flops_fraction": 2 / 6}
    assert (out.tokens < 16).all() and out.decode_step.min() == 1 and out.decode_step.max() == 6
    for i, (ctx, seen, state) in enumerate(record.steps, start=1):
        assert state.shape == (6, 17, 32) and torch.equal(seen, state[:, :16])
        if plan.uses_base(i):
            torch.testing.assert_close(state, maskgit.sequence_features(ctx.tokens, ctx.cond), atol=1e-6, rtol=0)
            continue
        prev_state = record.steps[i - 2][2]
        new_map = torch.cat([ctx.revealed, torch.zeros(6, 1, dtype=torch.bool)], 1)   # (2B, L + 1)
        ids = ctx.tokens[ctx.revealed].view(6, -1)
        ratio = (ctx.tokens == maskgit.mask_id).float().mean(1)                 # of x_{i-1}
        assert torch.allclose(ratio, torch.full((6,), ctx.mask_ratio))
        expected = reference_forward(sd, wte, wpe, prev_state, ids, new_map, ratio, SMALL.heads)
        torch.testing.assert_close(state, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(state[:, 16], prev_state[:, 16])              # the class slot moves
    vanilla = generate(maskgit, VanillaSource(maskgit), cond, 6, sampler=SamplerConfig(cfg_weight=2.0), seed=0)
    full = generate(maskgit, SequenceShortcutSource(maskgit, net, RefreshPlan.uniform(6, 6)), cond, 6,
                    sampler=SamplerConfig(cfg_weight=2.0), seed=0)
    assert torch.equal(vanilla.tokens, full.tokens)                             # B = N is vanilla


def test_the_source_is_chosen_by_the_network_kind(maskgit, small_migm):
    net = SMALL.build()
    plan = RefreshPlan.uniform(6, 2)
    assert isinstance(shortcut_source(maskgit, net, plan), SequenceShortcutSource)
    grid_net = ShortcutNetwork(ShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=16))
    assert isinstance(shortcut_source(maskgit, grid_net, plan), ShortcutSource)
    with pytest.raises(ValueError, match="maps grid features"):
        SequenceShortcutSource(maskgit, grid_net, plan)
    with pytest.raises(ValueError, match=r"lacks \['sequence', 'sequence_features'\]"):
        SequenceShortcutSource(small_migm, net, plan)
