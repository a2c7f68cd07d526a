"""The official DiMOO shortcut against a plain-function re-implementation of MDMShortcut.

The expected numbers come from functions written below from the reference's arithmetic
(Kaiwen-Zhu/MIGM-Shortcut@93349c4 DiMOO-Shortcut/model/shortcut_model.py, model/modeling_llada.py,
generators/image_generation_generator.py), one sequence at a time (B = 1) as the official code
runs, on random weights saved in the official key layout as a .pth file; they never call our
modules. The loop tests run a small random Lumina-DiMOO checkpoint in the released layout, written
by tests/models/test_dimoo.py's helpers.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from migm.accel.refresh import RefreshPlan
from migm.accel.sequence import SequenceShortcutSource
from migm.accel.shortcut import shortcut_source
from migm.files import CheckpointError
from migm.models.registry import load_base
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.dimoo_official import DiMOOShortcutConfig, load_official_dimoo_shortcut

_spec = importlib.util.spec_from_file_location(
    "dimoo_released_layout", Path(__file__).resolve().parents[1] / "models" / "test_dimoo.py")
layout = importlib.util.module_from_spec(_spec)       # its writer for the released layout
_spec.loader.exec_module(layout)

# a shortcut for the tiny DiMOO of test_dimoo.py (D = 32): width 16, 4 heads of 4 sharing 2 kv
# heads, two (cross, self) pairs, MLP 48 (the base's, not scaled), theta 1e4
SMALL = dict(feature_dim=32, ratio=2.0, blocks=2, heads=4, kv_heads=2, mlp_hidden=48, rope_theta=10000.0)


# --- the official layout --------------------------------------------------------------------------
def official_shapes(D, R=2.0, n_block=1, heads=32, kv=None, M=12288, embed_t=True, ca=True, freq=256):
    """MDMShortcut.state_dict() shapes: shortcut_model.py with the LLaDA llama block, no biases."""
    d = round(D / R)
    kv_dim = d // heads * (kv or heads)
    s = {}
    if R != 1:
        s |= {"proj_in.weight": (d, D), "proj_in.bias": (d,), "proj_out.weight": (D, d), "proj_out.bias": (D,)}
        if ca:
            s |= {"new_token_proj_in.weight": (d, D), "new_token_proj_in.bias": (d,)}
    for i in range(n_block):
        for part in ("cross_attn", "self_attn"):
            p = f"blocks.{i}.{part}."
            s |= {p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,), p + "q_proj.weight": (d, d),
                  p + "k_proj.weight": (kv_dim, d), p + "v_proj.weight": (kv_dim, d),
                  p + "attn_out.weight": (d, d), p + "ff_proj.weight": (M, d),
                  p + "up_proj.weight": (M, d), p + "ff_out.weight": (d, M)}
    s["ln_f.weight"] = (d,)
    if embed_t:
        mid = round(math.sqrt(d * freq))
        s |= {"time_embedder.mlp.0.weight": (mid, freq), "time_embedder.mlp.0.bias": (mid,),
              "time_embedder.mlp.2.weight": (d, mid), "time_embedder.mlp.2.bias": (d,),
              "adaLN_modulation.weight": (2 * d, d), "adaLN_modulation.bias": (2 * d,)}
    return s


def small_shapes(**over):
    c = SMALL | over
    return official_shapes(c["feature_dim"], c["ratio"], c["blocks"], c["heads"], c["kv_heads"], c["mlp_hidden"],
                           c.get("embed_t", True), c.get("cross_attention", True))


def save_official(path, shapes, seed=0):
    sd = layout.random_weights(shapes, seed)
    torch.save(sd, path)
    return sd


# --- the reference forward, one sequence (B = 1) ----------------------------------------------------
def ref_rms(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_rope(T, dim, theta):
    """RotaryEmbedding.get_rotary_embedding: (sin, cos), each (1, 1, T, dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
    pos = torch.cat((freqs, freqs), dim=-1)
    return pos.sin()[None, None], pos.cos()[None, None]


def ref_apply_rope(sin, cos, t):
    B, nh, T, hs = t.size()
    x1, x2 = t.view(B, nh, T, 2, hs // 2).unbind(dim=-2)
    return ((t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)).to(t.dtype)


def ref_attention(sd, p, q, k, v, q_pos, k_pos, c):
    """LLaDABlock.attention / ShortcutCrossAttention.attention: heads, RoPE at the given positions
    (fp32), SDPA (kv heads repeated), attn_out."""
    B, T, C = q.size()
    nh, nkv = c["heads"], c["kv_heads"] or c["heads"]
    q = q.view(B, T, nh, C // nh).transpose(1, 2)
    k = k.view(B, k.size(1), nkv, C // nh).transpose(1, 2)
    v = v.view(B, v.size(1), nkv, C // nh).transpose(1, 2)
    sin, cos = ref_rope(T, C // nh, c["rope_theta"])
    q = ref_apply_rope(sin[:, :, q_pos], cos[:, :, q_pos], q.float()).type_as(q)
    k = ref_apply_rope(sin[:, :, k_pos], cos[:, :, k_pos], k.float()).type_as(k)
    k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return F.linear(att.transpose(1, 2).contiguous().view(B, T, C), sd[p + "attn_out.weight"])


def ref_mlp(sd, p, x):
    h = ref_rms(x, sd[p + "ff_norm.weight"])
    h = F.silu(F.linear(h, sd[p + "ff_proj.weight"])) * F.linear(h, sd[p + "up_proj.weight"])
    return x + F.linear(h, sd[p + "ff_out.weight"])


def ref_self_block(sd, p, x, c):
    """LLaDALlamaBlock.forward: positions 0..T-1 for queries and keys."""
    h = ref_rms(x, sd[p + "attn_norm.weight"])
    q, k, v = (F.linear(h, sd[p + n + "_proj.weight"]) for n in "qkv")
    T = x.shape[1]
    return ref_mlp(sd, p, x + ref_attention(sd, p, q, k, v, torch.arange(T), torch.arange(T), c))


def ref_cross_block(sd, p, prev, new, new_map, c):
    """ShortcutCrossAttention.forward: keys from attn_norm(new tokens), rotated at
    new_token_map.nonzero(as_tuple=True)[1] (their sequence indices)."""
    q = F.linear(ref_rms(prev, sd[p + "attn_norm.weight"]), sd[p + "q_proj.weight"])
    n = ref_rms(new, sd[p + "attn_norm.weight"])
    k, v = F.linear(n, sd[p + "k_proj.weight"]), F.linear(n, sd[p + "v_proj.weight"])
    new_idx = new_map.nonzero(as_tuple=True)[1]
    return ref_mlp(sd, p, prev + ref_attention(sd, p, q, k, v, torch.arange(prev.shape[1]), new_idx, c))


def ref_forward(sd, prev, new_token, new_map, mask_ratio, c=SMALL, embed_t=True, ca=True):
    """MDMShortcut.forward(prev_feat (1, T, D), new_token (1, K, D), new_token_map (1, T), ratio (1,))."""
    lin = lambda x, n: F.linear(x, sd[n + ".weight"], sd[n + ".bias"]) if n + ".weight" in sd else x
    assert new_map.sum() == new_token.shape[1]
    new = lin(new_token, "new_token_proj_in")
    x = lin(prev, "proj_in")
    for i in range(c["blocks"]):
        if ca:
            x = ref_cross_block(sd, f"blocks.{i}.cross_attn.", x, new, new_map, c)
        else:
            x = ref_self_block(sd, f"blocks.{i}.cross_attn.", x, c)
        x = ref_self_block(sd, f"blocks.{i}.self_attn.", x, c)
    x = ref_rms(x, sd["ln_f.weight"])
    if embed_t:
        t = mask_ratio * 1000
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        temb = lin(F.silu(lin(emb, "time_embedder.mlp.0")), "time_embedder.mlp.2")
        scale, shift = lin(temb, "adaLN_modulation").unsqueeze(1).chunk(2, dim=-1)
        x = x * (1 + scale) + shift
    return lin(x, "proj_out") + prev


def random_case(T, positions, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(1, T, D, generator=g)
    new_map = torch.zeros(1, T, dtype=torch.bool)
    new_map[0, positions] = True
    return prev, torch.randn(1, len(positions), D, generator=g), new_map


# --- the network ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"kv_heads": None, "blocks": 1}, {"cross_attention": False},
                                     {"embed_t": False}, {"ratio": 1.0, "blocks": 1}])
def test_forward_is_the_reference_forward(tmp_path, variant):
    sd = save_official(tmp_path / "dimoo-shortcut.pth", small_shapes(**variant))
    net = load_official_dimoo_shortcut(tmp_path / "dimoo-shortcut.pth", DiMOOShortcutConfig(**SMALL | variant))
    c = SMALL | variant
    prev, new, new_map = random_case(11, [0, 1, 2, 5, 9])
    ratio = torch.tensor([0.4375])
    want = ref_forward(sd, prev, new, new_map, ratio, c, c.get("embed_t", True), c.get("cross_attention", True))
    got = net(prev, new, new_map.nonzero()[:, 1][None], ratio)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, prev, atol=1e-3)          # the weights do act


def test_batched_padded_rows_are_each_row_alone(tmp_path):
    """Rows of different lengths and token counts, right-padded with masks, as the sequence source
    batches the two CFG branches: each row equals the reference run on it alone."""
    sd = save_official(tmp_path / "s.pth", small_shapes())
    net = load_official_dimoo_shortcut(tmp_path / "s.pth", DiMOOShortcutConfig(**SMALL))
    cases = [random_case(13, [0, 1, 2, 3, 7, 12], seed=1), random_case(9, [4, 6], seed=2)]
    ratios = torch.tensor([0.25, 0.75])
    T, K = 13, 6
    feats, toks = torch.zeros(2, T, 32), torch.zeros(2, K, 32)
    pos, valid, new_valid = torch.zeros(2, K, dtype=torch.long), torch.zeros(2, T, dtype=torch.bool), \
        torch.zeros(2, K, dtype=torch.bool)
    for b, (prev, new, new_map) in enumerate(cases):
        t, k = prev.shape[1], new.shape[1]
        feats[b, :t], toks[b, :k], pos[b, :k] = prev[0], new[0], new_map.nonzero()[:, 1]
        valid[b, :t], new_valid[b, :k] = True, True
    feats[1, 9:] = 7.0                                        # padding must not leak
    got = net(feats, toks, pos, ratios, valid, new_valid)
    for b, (prev, new, new_map) in enumerate(cases):
        want = ref_forward(sd, prev, new, new_map, ratios[b:b + 1])
        torch.testing.assert_close(got[b:b + 1, :prev.shape[1]], want, atol=1e-5, rtol=1e-5)


def test_paper_size_is_220m_parameters_in_the_official_layout():
    """Sec. 4.2: "220M parameters"; at D = 4096: width 2048, 32 heads, MLP 12288, time MLP 724."""
    c = DiMOOShortcutConfig()
    with torch.device("meta"):
        net = c.build()
    n = sum(p.numel() for p in net.parameters())
    assert n == 219_797_204
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == official_shapes(4096)
    assert (c.width, net.time_embedder.mlp[0].out_features) == (2048, 724)


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match=r"heads \(5\) must divide the block width"):
        DiMOOShortcutConfig(heads=5)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        DiMOOShortcutConfig(ratio=0.5)
    with pytest.raises(ValueError, match=r"kv_heads \(3\) must divide heads \(32\)"):
        DiMOOShortcutConfig(kv_heads=3)


# --- the importer ---------------------------------------------------------------------------------
def test_importer_is_strict_and_names_the_keys(tmp_path):
    c = DiMOOShortcutConfig(**SMALL)
    sd = layout.random_weights(small_shapes(), 0)
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.self_attn.up_proj.weight"}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.1\.self_attn\.up_proj\.weight'\]"):
        load_official_dimoo_shortcut(tmp_path / "a.pth", c)
    torch.save(sd | {"blocks.2.cross_attn.q_proj.weight": torch.zeros(16, 16)}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.2\.cross_attn\.q_proj\.weight'\]"):
        load_official_dimoo_shortcut(tmp_path / "b.pth", c)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"MLP 40.*blocks\.0\.cross_attn\.ff_proj\.weight: "
                                              r"file \(48, 16\), expected \(40, 16\)"):
        load_official_dimoo_shortcut(tmp_path / "c.pth", DiMOOShortcutConfig(**SMALL | {"mlp_hidden": 40}))


def test_importer_errors_for_missing_or_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found at .*nowhere\.pth: download DiMOO-Shortcut/"
                                              r"dimoo-shortcut\.pth from the Kaiwen-Zhu/MIGM-Shortcut"):
        load_official_dimoo_shortcut(tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable torch state dict") as err:
        load_official_dimoo_shortcut(tmp_path / "junk.pth")
    assert "\n" not in str(err.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state dict of tensors.*got list"):
        load_official_dimoo_shortcut(tmp_path / "list.pth")


# --- in the loop, on a small Lumina-DiMOO in the released layout ------------------------------------
@pytest.fixture(scope="module")
def dimoo(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("dimoo") / "Lumina-DiMOO"
    t, _ = layout.save_reference(path)
    model = load_base("dimoo", path, "", prompts=layout.PROMPTS, dtype=torch.float32)
    sd = save_official(path.parent / "dimoo-shortcut.pth", small_shapes(), seed=3)
    net = load_official_dimoo_shortcut(path.parent / "dimoo-shortcut.pth", DiMOOShortcutConfig(**SMALL))
    return model, t, AutoTokenizer.from_pretrained(str(path)), net, sd


def test_sequence_features_are_the_reference_final_norm_over_the_whole_sequence(dimoo):
    model, t, tok, _, _ = dimoo
    tokens, cond = layout.random_inputs(), torch.tensor([1, 0, 2])
    states = model.sequence_features(tokens, cond)
    ids, valid, grid = model.sequence(tokens, cond)
    assert states.shape[:2] == ids.shape and valid is not None
    for b, prompt in enumerate([layout.PROMPTS[1], layout.PROMPTS[0], None]):
        ref_ids, _ = layout.reference_sequences(tok, tokens[b], prompt)
        assert ids[b, :len(ref_ids)].tolist() == ref_ids and int(valid[b].sum()) == len(ref_ids)
        hidden, _ = layout.reference_forward(t, ref_ids)
        torch.testing.assert_close(states[b, :len(ref_ids)], hidden, atol=1e-5, rtol=1e-4)
    gathered = states.gather(1, grid[..., None].expand(-1, -1, states.shape[-1]))
    torch.testing.assert_close(gathered, model.features(tokens, cond), atol=1e-6, rtol=1e-6)
    assert torch.equal(model.input_embedding().weight, t["model.transformer.wte.weight"])


class Trace:
    """Observer: x_i and the positions revealed at each step (the conditional batch)."""

    def __init__(self) -> None:
        self.tokens, self.revealed = {}, {}

    def on_step(self, ctx, features, tokens, revealed) -> None:
        self.tokens[ctx.step], self.revealed[ctx.step] = tokens.clone(), revealed.clone()


def test_generate_feeds_each_branch_as_generate_image_shortcut(dimoo):
    """N = 6, B = 2, CFG on, two prompts of different lengths: every shortcut call, row by row,
    is the reference MDMShortcut call of generate_image_shortcut: the cond row fed all prompt-
    template tokens plus the new image tokens, the uncond row only the new image tokens, each
    embedded by the base's wte and rotated at its own sequence's positions, from the previous
    full-sequence state (the base's final norm over the whole sequence after a base step)."""
    model, t, tok, net, sd = dimoo
    c, L, N = model.config, model.num_tokens, 6
    calls, step_fn = [], net.step

    def recording(s):
        out = step_fn(s)
        calls.append((s, out))
        return out

    net.step = recording
    try:
        source = shortcut_source(model, net, RefreshPlan.uniform(N, 2))
        assert isinstance(source, SequenceShortcutSource)
        trace = Trace()
        out = generate(model, source, torch.tensor([0, 1]), N, seed=0,
                       sampler=SamplerConfig(cfg_weight=4.0), observers=[trace])
    finally:
        del net.step
    assert out.counts == {"base_calls": 2, "shortcut_calls": 4, "base_flops_fraction": 2 / 6} and len(calls) == 4
    assert (out.tokens >= 0).all() and (out.tokens < model.vocab_size).all()
    mask = torch.full((2, L), model.mask_id)
    wte = t["model.transformer.wte.weight"]
    shortcut_steps = [i for i in range(1, N + 1) if not source.plan.uses_base(i)]     # [2, 3, 5, 6]
    for n, ((s, got), i) in enumerate(zip(calls, shortcut_steps)):
        x_prev, x_before = trace.tokens[i - 1], trace.tokens.get(i - 2, mask)
        for r, (b, prompt) in enumerate([(0, layout.PROMPTS[0]), (1, layout.PROMPTS[1]), (0, None), (1, None)]):
            ids, where = layout.reference_sequences(tok, x_prev[b], prompt)
            T, code_start = len(ids), ids.index(c.boa_token_id) + 2
            image = [where[j] for j in trace.revealed[i - 1][b].nonzero().flatten().tolist()]
            fed = (list(range(code_start - 2)) if prompt is not None else []) + image
            assert net.fed(s)[r].nonzero().flatten().tolist() == fed
            if source.plan.uses_base(i - 1):           # the state is the base's, over the sequence
                before, _ = layout.reference_sequences(tok, x_before[b], prompt)
                torch.testing.assert_close(s.states[r, :T], layout.reference_forward(t, before)[0],
                                           atol=1e-5, rtol=1e-4)
            else:                                      # the previous shortcut output, kept whole
                assert torch.equal(s.states[r, :T], calls[n - 1][1][r, :T])
            new_map = torch.zeros(1, T, dtype=torch.bool)
            new_map[0, fed] = True
            ratio = (x_prev[b] == model.mask_id).float().mean()[None]
            want = ref_forward(sd, s.states[r:r + 1, :T], wte[torch.tensor(ids)[fed]][None], new_map, ratio)
            torch.testing.assert_close(got[r:r + 1, :T], want, atol=1e-5, rtol=1e-4)


def test_fed_positions_follow_no_prompt_and_a_missing_table_is_named():
    """Rows [cond (prompt of 3, T 9); uncond (prompt of 2, T 8, one padding)], grid from index
    prompt + 2 (<answer><boi>): no_prompt feeds the new image tokens only, in both rows."""
    from migm.shortcut.sequence import SequenceStep

    new = torch.zeros(2, 9, dtype=torch.bool)
    new[0, 6], new[1, 5] = True, True
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 8] = False
    s = SequenceStep(states=torch.zeros(2, 9, 32), ids=torch.zeros(2, 9, dtype=torch.long), new=new,
                     grid=torch.tensor([[5, 6], [4, 5]]), valid=valid, cond=torch.tensor([0, 2]),
                     uncond=torch.tensor([False, True]), mask_ratio=torch.tensor([0.5, 0.5]),
                     t=torch.zeros(2))
    rows = lambda fed: [r.nonzero().flatten().tolist() for r in fed]
    assert rows(DiMOOShortcutConfig(**SMALL).build().fed(s)) == [[0, 1, 2, 6], [5]]
    assert rows(DiMOOShortcutConfig(**SMALL | {"feed_prompt": False}).build().fed(s)) == [[6], [5]]
    with pytest.raises(ValueError, match=r"base's input table: the base must provide input_embedding"):
        DiMOOShortcutConfig(**SMALL).build().step(s)


# --- the base's config.json fixes the blocks' heads, MLP and RoPE --------------------------------
def test_heads_mlp_and_rope_theta_come_from_the_base_config_json(tmp_path):
    """infer.py builds MDMShortcut from AutoConfig.from_pretrained(checkpoint): only d_model is
    changed, so a base with other heads, MLP width or theta gives a shortcut with those."""
    layout.save_reference(tmp_path)                    # config.json of the tiny DiMOO layout
    c = DiMOOShortcutConfig(feature_dim=32, ratio=2.0, blocks=2, base_config=str(tmp_path / "config.json"))
    tiny = layout.TINY
    assert (c.heads, c.kv_heads, c.mlp_hidden, c.rope_theta, c.rms_norm_eps) == \
        (tiny.n_heads, tiny.n_kv_heads, tiny.mlp_hidden_size, tiny.rope_theta, tiny.rms_norm_eps)
    assert DiMOOShortcutConfig(feature_dim=32, base_config=str(tmp_path)).mlp_hidden == 48   # a directory
    with pytest.raises(ValueError, match=r"mlp_hidden 12288 != mlp_hidden_size 48 of .*config\.json"):
        DiMOOShortcutConfig(feature_dim=32, mlp_hidden=12288, base_config=str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match=r"feature_dim 4096 != d_model 32"):
        DiMOOShortcutConfig(base_config=str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=r"base_config: .*nowhere\.json not found"):
        DiMOOShortcutConfig(base_config=str(tmp_path / "nowhere.json"))
    # without a config.json: LLaDA-8B's, as DiMOOConfig states them
    d = DiMOOShortcutConfig()
    assert (d.heads, d.kv_heads, d.mlp_hidden, d.rope_theta) == (32, None, 12288, 500000.0)


def test_released_weights_are_checked_against_the_loaded_bases_config(dimoo, tmp_path):
    model = dimoo[0]
    sd = save_official(tmp_path / "s.pth", small_shapes(), seed=1)
    fits = DiMOOShortcutConfig(**SMALL)
    assert set(fits.load_weights(str(tmp_path / "s.pth"), model)) == set(sd)
    other = DiMOOShortcutConfig(**SMALL | {"rope_theta": 500000.0})
    with pytest.raises(CheckpointError, match=r"rope_theta 500000\.0 != rope_theta 10000\.0 of the loaded"):
        other.load_weights(str(tmp_path / "s.pth"), model)
