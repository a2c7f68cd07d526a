"""The MaskGIT adapter against files in the reference layout (valeoai/Maskgit-pytorch v1).

The checkpoints here are random weights written the way the reference saves them: the
transformer as {"iter", "global_epoch", "model_state_dict", "optimizer_state_dict"} with
MaskTransformer's key names, the VQGAN as a Lightning {"state_dict"} holding taming's VQModel keys
(encoder and loss included). The expected numbers come from the functional re-implementations of
the reference forwards below, written from Network/transformer.py and taming's Decoder, not from
the adapter's modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from migm.files import CheckpointError
from migm.models.maskgit import MaskGITConfig, MaskGITMIGM, MaskGITTransformer, VQGANDecoder
from migm.models.registry import load_base
from migm.sampling.loop import VanillaSource, generate

TINY = MaskGITConfig(codebook_size=16, grid_size=4, num_classes=5, width=32, depth=2, heads=4,
                     mlp_dim=64, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), resolution=8)


# --- the reference layout ---------------------------------------------------------------------
def transformer_shapes(c: MaskGITConfig) -> dict[str, tuple[int, ...]]:
    """MaskTransformer.state_dict() shapes, key by key."""
    D, L, M, rows = c.width, c.num_tokens, c.mlp_dim, c.codebook_size + 1 + c.num_classes + 1
    s = {"tok_emb.weight": (rows, D), "pos_emb": (1, L + 1, D)}
    for i in (0, 4):                                   # LayerNorms of first_layer (1, 5: dropout)
        s |= {f"first_layer.{i}.weight": (D,), f"first_layer.{i}.bias": (D,)}
    for i in (2, 6):
        s |= {f"first_layer.{i}.weight": (D, D), f"first_layer.{i}.bias": (D,)}
    for n in range(c.depth):
        p = f"transformer.layers.{n}."
        s |= {p + "0.norm.weight": (D,), p + "0.norm.bias": (D,),
              p + "0.fn.mha.in_proj_weight": (3 * D, D), p + "0.fn.mha.in_proj_bias": (3 * D,),
              p + "0.fn.mha.out_proj.weight": (D, D), p + "0.fn.mha.out_proj.bias": (D,),
              p + "1.norm.weight": (D,), p + "1.norm.bias": (D,),
              p + "1.fn.net.0.weight": (M, D), p + "1.fn.net.0.bias": (M,),
              p + "1.fn.net.3.weight": (D, M), p + "1.fn.net.3.bias": (D,)}
    s |= {"last_layer.0.weight": (D,), "last_layer.0.bias": (D,), "last_layer.2.weight": (D, D),
          "last_layer.2.bias": (D,), "last_layer.4.weight": (D,), "last_layer.4.bias": (D,),
          "bias": (L + 1, rows)}
    return s


def vqgan_shapes(c: MaskGITConfig) -> dict[str, tuple[int, ...]]:
    """taming VQModel keys used for decoding, in the Decoder's construction order."""
    s = {"quantize.embedding.weight": (c.codebook_size, c.embed_dim),
         "post_quant_conv.weight": (c.z_channels, c.embed_dim, 1, 1), "post_quant_conv.bias": (c.z_channels,)}

    def conv(name, cin, cout, k):
        s.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def norm(name, ch):
        s.update({f"{name}.weight": (ch,), f"{name}.bias": (ch,)})

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, ch):
        norm(f"{name}.norm", ch)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", ch, ch, 1)

    n = len(c.ch_mult)
    block_in, res = c.ch * c.ch_mult[-1], c.resolution // 2 ** (n - 1)
    conv("decoder.conv_in", c.z_channels, block_in, 3)
    resnet("decoder.mid.block_1", block_in, block_in), attn("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(n)):
        for b in range(c.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{b}", block_in, c.ch * c.ch_mult[level])
            block_in = c.ch * c.ch_mult[level]
            if res in c.attn_resolutions:
                attn(f"decoder.up.{level}.attn.{b}", block_in)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    return s


def random_weights(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        w = torch.randn(shape, generator=g)
        is_norm_gain = k.endswith("weight") and len(shape) == 1
        out[k] = 1 + 0.1 * w if is_norm_gain else 0.2 * w
    return out


def save_reference(tmp_path, c=TINY, seed=0, prefix="", edit=lambda t, v: None):
    t = random_weights(transformer_shapes(c), seed)
    v = random_weights(vqgan_shapes(c), seed + 1)
    edit(t, v)
    tpath, vpath = tmp_path / "MaskGIT_ImageNet_512.pth", tmp_path / "last.ckpt"
    optim = {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.96), "params": [0]}]}
    torch.save({"iter": 7, "global_epoch": 1, "optimizer_state_dict": optim,
                "model_state_dict": {prefix + k: x for k, x in t.items()}}, tpath)
    junk = {"encoder.conv_in.weight": torch.zeros(c.ch, 3, 3, 3), "quant_conv.bias": torch.zeros(8),
            "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}
    torch.save({"epoch": 3, "global_step": 10, "state_dict": v | junk}, vpath)
    return tpath, vpath, t, v


# --- functional re-implementations of the reference forwards ----------------------------------
def reference_logits(sd, tokens, y, drop_label, c=TINY):
    """MaskTransformer.forward(img_token, y, drop_label): (B, L, K + 1)."""
    K, C, L, D = c.codebook_size, c.num_classes, c.num_tokens, c.width
    cls = y.view(-1, 1) + K + 1
    cls[drop_label] = K + 1 + C
    h = F.embedding(torch.cat([tokens, cls], -1), sd["tok_emb.weight"]) + sd["pos_emb"]

    def ln(x, n, eps=1e-5):
        return F.layer_norm(x, (D,), sd[n + ".weight"], sd[n + ".bias"], eps)

    def lin(x, n):
        return F.linear(x, sd[n + ".weight"], sd[n + ".bias"])

    h = lin(ln(F.gelu(lin(ln(h, "first_layer.0", 1e-12), "first_layer.2")), "first_layer.4", 1e-12),
            "first_layer.6")
    for n in range(c.depth):
        p = f"transformer.layers.{n}."
        x = ln(h, p + "0.norm").transpose(0, 1)                  # (T, B, D) for the functional MHA
        a, _ = F.multi_head_attention_forward(
            x, x, x, D, c.heads, sd[p + "0.fn.mha.in_proj_weight"], sd[p + "0.fn.mha.in_proj_bias"],
            None, None, False, 0.0, sd[p + "0.fn.mha.out_proj.weight"], sd[p + "0.fn.mha.out_proj.bias"],
            training=False, need_weights=False)
        h = h + a.transpose(0, 1)
        h = h + lin(F.gelu(lin(ln(h, p + "1.norm"), p + "1.fn.net.0")), p + "1.fn.net.3")
    h = ln(F.gelu(lin(ln(h, "last_layer.0", 1e-12), "last_layer.2")), "last_layer.4", 1e-12)
    logit = h @ sd["tok_emb.weight"].T + sd["bias"]
    return logit[:, :L, :K + 1]


def reference_decode(sd, ids, c=TINY):
    """VQModel.decode_code: codebook rows -> post_quant_conv -> taming Decoder (bmm attention)."""
    g = c.grid_size
    z = sd["quantize.embedding.weight"][ids].view(-1, g, g, c.embed_dim).permute(0, 3, 1, 2)

    def conv(x, n, pad):
        return F.conv2d(x, sd[n + ".weight"], sd[n + ".bias"], padding=pad)

    def gn(x, n):
        return F.group_norm(x, 32, sd[n + ".weight"], sd[n + ".bias"], 1e-6)

    def resnet(x, n):
        h = conv(F.silu(gn(x, n + ".norm1")), n + ".conv1", 1)
        h = conv(F.silu(gn(h, n + ".norm2")), n + ".conv2", 1)
        return (conv(x, n + ".nin_shortcut", 0) if n + ".nin_shortcut.weight" in sd else x) + h

    def attn(x, n):
        h = gn(x, n + ".norm")
        b, ch, hh, ww = x.shape
        q, k, v = (conv(h, f"{n}.{p}", 0).reshape(b, ch, hh * ww) for p in "qkv")
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * ch**-0.5, dim=2)   # (b, q, k)
        return x + conv(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, ch, hh, ww), n + ".proj_out", 0)

    h = conv(conv(z, "post_quant_conv", 0), "decoder.conv_in", 1)
    h = resnet(attn(resnet(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for level in reversed(range(len(c.ch_mult))):
        for b in range(c.num_res_blocks + 1):
            h = resnet(h, f"decoder.up.{level}.block.{b}")
            if f"decoder.up.{level}.attn.{b}.q.weight" in sd:
                h = attn(h, f"decoder.up.{level}.attn.{b}")
        if f"decoder.up.{level}.upsample.conv.weight" in sd:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{level}.upsample.conv", 1)
    return conv(F.silu(gn(h, "decoder.norm_out")), "decoder.conv_out", 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tpath, vpath, t, v = save_reference(tmp_path_factory.mktemp("maskgit"))
    return load_base("maskgit", tpath, vpath, config=TINY), t, v


def random_inputs(B=3, seed=1, c=TINY):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, c.codebook_size, (B, c.num_tokens), generator=g)
    tokens[torch.rand(B, c.num_tokens, generator=g) < 0.5] = c.codebook_size     # mask id K
    y = torch.randint(0, c.num_classes, (B,), generator=g)
    return tokens, y


# --- tests ------------------------------------------------------------------------------------
def test_geometry_and_shapes(reference):
    model, _, _ = reference
    assert isinstance(model, MaskGITMIGM)
    assert (model.num_tokens, model.vocab_size, model.mask_id, model.feature_dim, model.num_classes) == \
        (16, 16, 16, 32, 5)
    tokens, y = random_inputs()
    f = model.features(tokens, y)
    assert f.shape == (3, 16, 32) and model.head(f).shape == (3, 16, 16)
    assert model.token_embedding().num_embeddings == 16 + 1 + 5 + 1
    assert model.position_embedding().shape == (16, 32) and len(model.layers()) == 2
    images = model.decode(tokens.clamp(max=15))
    assert images.shape == (3, 3, 8, 8) and images.abs().max() <= 1


def test_head_of_features_is_the_reference_forward_cond_and_dropped_label(reference):
    model, t, _ = reference
    tokens, y = random_inputs()
    drop = torch.tensor([False, True, False])
    expected = reference_logits(t, tokens, y, drop)                               # (B, L, K + 1)
    cond = torch.where(drop, model.null_condition(y), y)
    torch.testing.assert_close(model.head(model.features(tokens, cond)), expected[..., :16],
                               atol=1e-5, rtol=1e-4)
    # the loop scores a subset of positions: the per-position bias must follow them
    pos = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:5] for i in range(3)])
    f = model.features(tokens, cond).gather(1, pos.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(model.head(f, positions=pos),
                               expected[..., :16].gather(1, pos.unsqueeze(-1).expand(-1, -1, 16)),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="bias per position"):
        model.head(f)


def test_decode_is_the_reference_vqgan(reference):
    model, _, v = reference
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.decode(ids), reference_decode(v, ids).clamp(-1, 1),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        model.decode(torch.full((1, 16), 16))


def test_conditions(reference):
    model, _, _ = reference
    assert torch.equal(model.null_condition(torch.tensor([0, 4])), torch.tensor([5, 5]))
    model.check_condition(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class id out of range"):
        model.check_condition(torch.tensor([5]))


def test_generate_fills_the_grid_with_codes(reference):
    model, _, _ = reference
    out = generate(model, VanillaSource(model), torch.tensor([0, 3]), 4, seed=0)
    assert out.tokens.shape == (2, 16)
    assert (out.tokens >= 0).all() and (out.tokens < model.vocab_size).all()
    assert out.decode_step.min() == 1 and out.decode_step.max() == 4
    assert model.decode(out.tokens).shape == (2, 3, 8, 8)


def test_ddp_module_prefix_is_stripped(tmp_path, reference):
    model, _, _ = reference
    tpath, vpath, _, _ = save_reference(tmp_path, prefix="module.")
    again = MaskGITMIGM.from_checkpoints(tpath, vpath, TINY)
    tokens, y = random_inputs()
    assert torch.equal(again.features(tokens, y), model.features(tokens, y))


def test_missing_file_names_it_and_how_to_get_it(tmp_path):
    tpath, vpath, _, _ = save_reference(tmp_path)
    with pytest.raises(CheckpointError, match=r"nowhere\.pth.*Maskgit-pytorch"):
        load_base("maskgit", tmp_path / "nowhere.pth", vpath, config=TINY)
    with pytest.raises(CheckpointError, match=r"VQGAN checkpoint not found at .*gone\.ckpt.*Maskgit-pytorch"):
        MaskGITMIGM.from_checkpoints(tpath, tmp_path / "gone.ckpt", TINY)


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    def drop_key(t, v):
        del t["transformer.layers.1.1.fn.net.3.bias"]
        t["transformer.layers.2.0.norm.weight"] = torch.ones(32)

    tpath, vpath, _, _ = save_reference(tmp_path, edit=drop_key)
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer\.layers\.1\.1\.fn\.net\.3\.bias'\]"
                                              r".*unexpected keys \['transformer\.layers\.2\.0\.norm\.weight'\]"):
        load_base("maskgit", tpath, vpath, config=TINY)

    tpath, vpath, _, _ = save_reference(tmp_path, c=MaskGITConfig(**{**TINY.__dict__, "grid_size": 3}))
    with pytest.raises(CheckpointError, match=r"pos_emb: file \(1, 10, 32\), expected \(1, 17, 32\)"
                                              r".*MaskGITConfig\(grid_size=3\)"):
        load_base("maskgit", tpath, vpath, config=TINY)

    def small_codebook(t, v):
        v["quantize.embedding.weight"] = v["quantize.embedding.weight"][:8]

    tpath, vpath, _, _ = save_reference(tmp_path, edit=small_codebook)
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*VQGAN decoder.*quantize\.embedding\.weight: "
                                              r"file \(8, 8\), expected \(16, 8\)"):
        load_base("maskgit", tpath, vpath, config=TINY)


def test_released_configs_match_the_reference_sizes():
    """README: 174.161M transformer parameters (ImageNet-256); 512 -> 32x32 tokens, 512x512 images."""
    with torch.device("meta"):
        t256 = MaskGITTransformer(MaskGITConfig(grid_size=16))
        t512, vqgan = MaskGITTransformer(MaskGITConfig()), VQGANDecoder(MaskGITConfig())
        images = vqgan(torch.zeros(1, 1024, dtype=torch.long))
    assert sum(p.numel() for p in t256.parameters()) == 174_160_874
    assert t512.tok_emb.weight.shape == (2026, 768) and t512.bias.shape == (1025, 2026)
    assert t512.pos_emb.shape == (1, 1025, 768) and images.shape == (1, 3, 512, 512)
    assert len(transformer_shapes(MaskGITConfig())) == len(t512.state_dict())


def test_collect_records_maskgit_trajectories(tmp_path):
    """`migm collect` on the adapter: the shards carry MaskGIT's geometry, and the recorded
    features of step 1 are the base's state of the all-mask grid at its L + 1 positions (the
    shipped config records the sequence the official shortcut evolves: the grid, then the class
    slot)."""
    import dataclasses

    import h5py
    import yaml

    from migm.cli import REPO_ROOT, main
    from migm.data.trajectories import open_shard

    tpath, vpath, _, _ = save_reference(tmp_path)
    cfg = yaml.safe_load((REPO_ROOT / "configs/collect_maskgit.yaml").read_text())
    out = tmp_path / "traj"
    cfg["trainer"].update(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(out))
    cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(out), batches_per_shard=2)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(TINY).items()}
    cfg["model"]["init_args"].update(base=str(tpath), tokenizer=str(vpath), steps=4, base_config=fields)
    cfg["data"]["init_args"].update(num_trajectories=4, num_classes=TINY.num_classes, batch_size=2)
    (tmp_path / "collect.yaml").write_text(yaml.safe_dump(cfg))
    main(["collect", "--config", str(tmp_path / "collect.yaml")])

    shards = sorted(out.glob("shard-*.h5"))
    schema, n = open_shard(shards[0])
    assert n == 4 and schema.base_model.startswith("maskgit:")
    assert (schema.num_tokens, schema.feature_dim, schema.vocab_size, schema.mask_id) == (16, 32, 16, 16)
    model = MaskGITMIGM.from_checkpoints(tpath, vpath, TINY)
    with h5py.File(shards[0]) as f:
        cond, first = torch.from_numpy(f["cond"][:]).long(), torch.from_numpy(f["features"][:, 0, 0]).float()
    expected = model.sequence_features(torch.full((len(cond), 16), 16), cond)   # (B, L + 1, D)
    assert schema.sequence_length == 17 and first.shape == expected.shape == (4, 17, 32)
    torch.testing.assert_close(first, expected, atol=2e-2, rtol=1e-2)          # stored as float16


def test_extra_keys_alone_are_ignored_with_a_warning_as_the_reference_loads_strict_false(tmp_path):
    def extra(t, v):
        t["transformer.layers.0.0.fn.mha.extra_buffer"] = torch.ones(3)
        v["decoder.extra_stat"] = torch.ones(2)

    tpath, vpath, _, _ = save_reference(tmp_path, edit=extra)
    with pytest.warns(UserWarning, match=r"ignoring 1 keys .*strict=False.*extra_buffer"):
        model = load_base("maskgit", tpath, vpath, config=TINY)
    (tmp_path / "clean").mkdir()
    clean, _, _, _ = save_reference(tmp_path / "clean")
    reference = load_base("maskgit", clean, vpath, config=TINY)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b)
