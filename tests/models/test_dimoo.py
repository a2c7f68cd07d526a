"""The Lumina-DiMOO adapter against a checkpoint directory in the reference layout.

The directory here is tiny random weights written the way the HF checkpoint is laid out:
config.json (LLaDA fields; the tiny token layout added), model.safetensors.index.json and two
shards with LLaDAModelLM's key names, a text tokenizer saved by transformers, and vqvae/ (a
diffusers VQModel folder, encoder included). The expected numbers come from the functional
re-implementations below, written from model/modeling_llada.py, inference/inference_t2i.py and
diffusers' VQModel decoder, not from the adapter's modules (the adapter decodes with diffusers'
VQModel itself, so the plain decoder here is what pins its arithmetic). The grid is 3 x 4 so that
rows and columns cannot be swapped unnoticed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from migm.files import CheckpointError
from migm.models.dimoo import DiMOOConfig, DiMOOMIGM, LLaDA, load_vq_decoder
from migm.models.registry import load_base
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig

# text ids 0..39, specials 40..45, image codes 48..63 (K = 16); 4 heads sharing 2 kv heads
TINY = DiMOOConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                   rope_theta=10000.0, vocab_size=64, mask_token_id=40, reference_mask_id=40,
                   newline_token_id=41,
                   boi_token_id=42, eoi_token_id=43, boa_token_id=44, eoa_token_id=45,
                   image_token_offset=48, codebook_size=16, grid_height=3, grid_width=4)


def vq_config(block_out_channels: tuple[int, ...], **changes) -> dict:
    """A vqvae/config.json (diffusers VQModel fields); defaults: aMUSEd's VQ-GAN as diffusers'
    scripts/convert_amused.py make_vqvae builds it (16x down, 64 latent channels, 8192 codes)."""
    n = len(block_out_channels)
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(block_out_channels),
            "layers_per_block": 2, "act_fn": "silu", "latent_channels": 64, "sample_size": 32,
            "num_vq_embeddings": 8192, "norm_num_groups": 32, "vq_embed_dim": None,
            "scaling_factor": 0.18215, "norm_type": "group", "mid_block_add_attention": False,
            "lookup_from_codebook": True, "force_upcast": False} | changes


AMUSED_VQ = vq_config((128, 256, 256, 512, 768))
# toy sizes with the mid-block attention on (aMUSEd turns it off), so that its arithmetic is pinned
TINY_VQ = vq_config((8, 16), layers_per_block=1, latent_channels=4, num_vq_embeddings=16,
                    norm_num_groups=4, mid_block_add_attention=True)
# aMUSEd's shape at toy widths: five levels (16x), two layers per block, no mid-block attention
AMUSED_SHAPED_VQ = vq_config((8, 16, 16, 32, 48), latent_channels=8, num_vq_embeddings=16,
                             norm_num_groups=4)
PROMPTS = ["a red cat", "a big blue dog on the grass"]           # different lengths
WORDS = ["Generate", "an", "image", "according", "to", "the", "text", "prompt", ".", "a", "red", "cat",
         "big", "blue", "dog", "on", "grass"]


# --- the reference layout ---------------------------------------------------------------------
def llada_shapes(c: DiMOOConfig) -> dict[str, tuple[int, ...]]:
    """LLaDAModelLM.state_dict() shapes for block_type llama, rms norms, no biases, untied."""
    D, M, V = c.d_model, c.mlp_hidden_size, c.vocab_size
    kv = D // c.n_heads * (c.n_kv_heads or c.n_heads)
    s = {"model.transformer.wte.weight": (V, D), "model.transformer.ln_f.weight": (D,),
         "model.transformer.ff_out.weight": (V, D)}
    for i in range(c.n_layers):
        p = f"model.transformer.blocks.{i}."
        s |= {p + "attn_norm.weight": (D,), p + "ff_norm.weight": (D,), p + "q_proj.weight": (D, D),
              p + "k_proj.weight": (kv, D), p + "v_proj.weight": (kv, D), p + "attn_out.weight": (D, D),
              p + "ff_proj.weight": (M, D), p + "up_proj.weight": (M, D), p + "ff_out.weight": (D, M)}
    return s


def vq_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """diffusers VQModel decoding keys (Decoder + post_quant_conv + quantize), written out by hand
    so that a renamed or reshaped key in diffusers fails test_vq_layout_is_diffusers_vqmodel."""
    embed, latent = c["vq_embed_dim"] or c["latent_channels"], c["latent_channels"]
    s = {"quantize.embedding.weight": (c["num_vq_embeddings"], embed)}

    def conv(n, cin, cout, k):
        s.update({f"{n}.weight": (cout, cin, k, k), f"{n}.bias": (cout,)})

    def vec(n, ch):
        s.update({f"{n}.weight": (ch,), f"{n}.bias": (ch,)})

    def resnet(n, cin, cout):
        vec(f"{n}.norm1", cin), conv(f"{n}.conv1", cin, cout, 3)
        vec(f"{n}.norm2", cout), conv(f"{n}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{n}.conv_shortcut", cin, cout, 1)

    conv("post_quant_conv", embed, latent, 1)
    rev = list(reversed(c["block_out_channels"]))
    conv("decoder.conv_in", latent, rev[0], 3)
    resnet("decoder.mid_block.resnets.0", rev[0], rev[0])
    if c["mid_block_add_attention"]:
        vec("decoder.mid_block.attentions.0.group_norm", rev[0])
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            s.update({f"decoder.mid_block.attentions.0.{part}.weight": (rev[0], rev[0]),
                      f"decoder.mid_block.attentions.0.{part}.bias": (rev[0],)})
    resnet("decoder.mid_block.resnets.1", rev[0], rev[0])
    prev = rev[0]
    for i, ch in enumerate(rev):
        for j in range(c["layers_per_block"] + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else ch, ch)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", ch, ch, 3)
        prev = ch
    vec("decoder.conv_norm_out", rev[-1]), conv("decoder.conv_out", rev[-1], 3, 3)
    return s


def released_vq_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the released vqvae/ file (encoder, quant_conv and decoding half): diffusers'
    VQModel state_dict, built on the meta device."""
    from diffusers import VQModel

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VQModel(**c).state_dict().items()}


def random_weights(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        w = torch.randn(shape, generator=g)
        is_gain = len(shape) == 1 and "norm" in k and k.endswith("weight")
        out[k] = 1 + 0.1 * w if is_gain else 0.3 * w
    return out


def save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<system>", "</system>", "<user>", "</user>", "<uncondition>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>").save_pretrained(path)


def save_reference(path, c=TINY, vc=TINY_VQ, seed=0, edit=lambda t, v: None, raw_edit=lambda r: None):
    t, v = random_weights(llada_shapes(c), seed), random_weights(released_vq_shapes(vc), seed + 1)
    edit(t, v)
    path.mkdir(parents=True, exist_ok=True)
    raw = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
           "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
           "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
           "max_sequence_length": 4096, "mlp_ratio": 4} | asdict(c)
    raw_edit(raw)
    (path / "config.json").write_text(json.dumps(raw))
    keys = sorted(t)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: t[k] for k in ks}, path / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "vqvae").mkdir(exist_ok=True)
    (path / "vqvae" / "config.json").write_text(json.dumps(
        {"_class_name": "VQModel", "_diffusers_version": "0.39.0"} | vc))
    save_file(v, path / "vqvae" / "diffusion_pytorch_model.safetensors")
    save_tokenizer(path)
    return t, v


# --- functional re-implementations of the reference ---------------------------------------------
def reference_forward(sd, ids: list[int], c=TINY):
    """LLaDAModel.forward on one sequence (B = 1, no mask): (ln_f hidden (T, D), logits (T, V))."""
    def rms(x, n):
        xf = x.float()
        return sd[n] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).to(x.dtype)

    def rotate_half(x):
        B, nh, T, hs = x.size()
        x1, x2 = x.view(B, nh, T, 2, hs // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    hd, T = c.d_model // c.n_heads, len(ids)
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
    pos = torch.cat((freqs, freqs), dim=-1)
    sin, cos = pos.sin()[None, None], pos.cos()[None, None]
    x = F.embedding(torch.tensor([ids]), sd["model.transformer.wte.weight"])
    for i in range(c.n_layers):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, p + "attn_norm.weight")
        q, k, v = (F.linear(h, sd[p + n + "_proj.weight"]) for n in "qkv")
        q = q.view(1, T, c.n_heads, hd).transpose(1, 2)
        k = k.view(1, T, c.n_kv_heads, hd).transpose(1, 2)
        v = v.view(1, T, c.n_kv_heads, hd).transpose(1, 2)
        q, k = (((t.float() * cos) + (rotate_half(t.float()) * sin)).to(t.dtype) for t in (q, k))
        r = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False)
        x = x + F.linear(a.transpose(1, 2).reshape(1, T, c.d_model), sd[p + "attn_out.weight"])
        h = rms(x, p + "ff_norm.weight")
        h = F.silu(F.linear(h, sd[p + "ff_proj.weight"])) * F.linear(h, sd[p + "up_proj.weight"])
        x = x + F.linear(h, sd[p + "ff_out.weight"])
    x = rms(x, "model.transformer.ln_f.weight")
    return x[0], F.linear(x, sd["model.transformer.ff_out.weight"])[0]


def reference_sequences(tokenizer, grid: torch.Tensor, prompt: str | None, c=TINY):
    """inference_t2i.py's cond ids (or, prompt None, the CFG branch's uncond ids) for one grid
    (L,) with mask id K, and the positions of the grid's tokens in it."""
    system = "<system>" + c.system_prompt + "</system>"
    con = tokenizer(system + "<user>" + (prompt or "") + "</user>")["input_ids"]
    codes = [c.mask_token_id if t == c.codebook_size else t + c.image_token_offset for t in grid.tolist()]
    image = []
    for r in range(c.grid_height):                                  # add_break_line
        image += codes[r * c.grid_width:(r + 1) * c.grid_width] + [c.newline_token_id]
    x = con + [c.boa_token_id, c.boi_token_id] + image + [c.eoi_token_id, c.eoa_token_id]
    code_start = len(con) + 2
    if prompt is None:                                              # uncon_ids + x[code_start-2:]
        uncon = tokenizer(system + "<user><uncondition></user>")["input_ids"]
        x, code_start = uncon + x[code_start - 2:], len(uncon) + 2
    where = [i for i in range(code_start, len(x) - 2) if x[i] != c.newline_token_id]
    return x, where


def reference_decode(sd, ids, c=TINY_VQ, grid=(3, 4), clip=True):
    """VQModel.decode(ids, force_not_quantize=True, shape=...) with lookup_from_codebook, then
    .sample.clip(0, 1) as utils/image_utils.py decode_vq_to_image does (clip=False: before it)."""
    groups, embed = c["norm_num_groups"], c["vq_embed_dim"] or c["latent_channels"]
    def conv(x, n, pad):
        return F.conv2d(x, sd[n + ".weight"], sd[n + ".bias"], padding=pad)

    def gn(x, n):
        return F.group_norm(x, groups, sd[n + ".weight"], sd[n + ".bias"], 1e-6)

    def resnet(x, n):
        h = conv(F.silu(gn(conv(F.silu(gn(x, n + ".norm1")), n + ".conv1", 1), n + ".norm2")), n + ".conv2", 1)
        return (conv(x, n + ".conv_shortcut", 0) if n + ".conv_shortcut.weight" in sd else x) + h

    def attention(x, n):                       # AttnProcessor: heads 1, residual, scale ch ** -0.5
        b, ch, hh, ww = x.shape
        h = gn(x, n + ".group_norm").view(b, ch, hh * ww).transpose(1, 2)
        q, k, v = (F.linear(h, sd[f"{n}.{p}.weight"], sd[f"{n}.{p}.bias"]) for p in ("to_q", "to_k", "to_v"))
        a = torch.softmax(q @ k.transpose(1, 2) * ch**-0.5, -1) @ v
        a = F.linear(a, sd[n + ".to_out.0.weight"], sd[n + ".to_out.0.bias"])
        return a.transpose(1, 2).reshape(b, ch, hh, ww) + x

    z = sd["quantize.embedding.weight"][ids].view(-1, *grid, embed).permute(0, 3, 1, 2)
    h = conv(conv(z, "post_quant_conv", 0), "decoder.conv_in", 1)
    h = resnet(h, "decoder.mid_block.resnets.0")
    if c["mid_block_add_attention"]:
        h = attention(h, "decoder.mid_block.attentions.0")
    h = resnet(h, "decoder.mid_block.resnets.1")
    for i in range(len(c["block_out_channels"])):
        for j in range(c["layers_per_block"] + 1):
            h = resnet(h, f"decoder.up_blocks.{i}.resnets.{j}")
        if f"decoder.up_blocks.{i}.upsamplers.0.conv.weight" in sd:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up_blocks.{i}.upsamplers.0.conv", 1)
    out = conv(F.silu(gn(h, "decoder.conv_norm_out")), "decoder.conv_out", 1)
    return out.clip(0, 1) if clip else out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("dimoo") / "Lumina-DiMOO"
    t, v = save_reference(path)
    model = load_base("dimoo", path, "", prompts=PROMPTS, dtype=torch.float32)
    return model, t, v, AutoTokenizer.from_pretrained(str(path)), path


def random_inputs(B=3, seed=1, c=TINY):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, c.codebook_size, (B, c.num_tokens), generator=g)
    tokens[torch.rand(B, c.num_tokens, generator=g) < 0.5] = c.codebook_size     # mask id K
    return tokens


# --- tests ------------------------------------------------------------------------------------
def test_geometry_and_shapes(reference):
    model, t, _, _, _ = reference
    assert isinstance(model, DiMOOMIGM)
    assert (model.num_tokens, model.vocab_size, model.mask_id, model.feature_dim, model.num_classes) == \
        (12, 16, 16, 32, 2)
    tokens, cond = random_inputs(), torch.tensor([0, 1, 2])
    f = model.features(tokens, cond)
    assert f.shape == (3, 12, 32) and model.head(f).shape == (3, 12, 16)
    emb = model.token_embedding()
    assert emb.num_embeddings == 16 and torch.equal(emb.weight, t["model.transformer.wte.weight"][48:64])
    assert model.position_embedding() is None and len(model.layers()) == 2
    images = model.decode(tokens.clamp(max=15))
    assert images.shape == (3, 3, 6, 8) and images.min() >= -1 and images.max() <= 1


def test_features_and_head_are_the_reference_forward_cond_and_uncond(reference):
    """One batch mixing two prompt lengths and the unconditional prompt (padded internally)
    against the reference run one sequence at a time, as inference_t2i.py does."""
    model, t, _, tok, _ = reference
    tokens = random_inputs()
    cond = torch.tensor([1, 0, 2])                                  # 2 = the null condition
    assert torch.equal(model.null_condition(cond[:1]), torch.tensor([2]))
    feats = model.features(tokens, cond)
    for b, prompt in enumerate([PROMPTS[1], PROMPTS[0], None]):
        ids, where = reference_sequences(tok, tokens[b], prompt)
        hidden, logits = reference_forward(t, ids)
        torch.testing.assert_close(feats[b], hidden[where], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.head(feats[b:b + 1])[0], logits[where, 48:64], atol=1e-5, rtol=1e-4)


def test_head_at_gathered_positions_is_the_full_grid_logits(reference):
    model, _, _, _, _ = reference
    tokens, cond = random_inputs(), torch.tensor([0, 1, 1])
    f = model.features(tokens, cond)
    full = model.head(f)                                            # (B, L, K)
    pos = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(i))[:5] for i in range(3)])
    part = model.head(f.gather(1, pos[..., None].expand(-1, -1, 32)), positions=pos)
    torch.testing.assert_close(part, full.gather(1, pos[..., None].expand(-1, -1, 16)))


@pytest.mark.parametrize("vc", [TINY_VQ, AMUSED_SHAPED_VQ], ids=["mid-attention", "amused-shaped"])
def test_decode_is_the_reference_vq_decoder(tmp_path, vc):
    """The adapter's decode (diffusers' VQModel) against the plain decoder above, clip included:
    with these weights much of the raw output lies outside [0, 1], so a missing clip shows."""
    _, v = save_reference(tmp_path / "ckpt", vc=vc)
    model = load_base("dimoo", tmp_path / "ckpt", "", prompts=PROMPTS, dtype=torch.float32)
    ids = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(2))
    raw = reference_decode(v, ids, vc, clip=False)
    assert ((raw < 0) | (raw > 1)).float().mean() > 0.3
    images = model.decode(ids)
    scale = 2 ** (len(vc["block_out_channels"]) - 1)
    assert images.shape == (2, 3, 3 * scale, 4 * scale)
    # float32 through two conv stacks: kernels differ by CPU (2e-5 seen on AMD EPYC); a wrong
    # layer or a missing clip is off by far more than 1e-4
    torch.testing.assert_close(images, raw.clip(0, 1) * 2 - 1, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        model.decode(torch.full((1, 12), 16))


@pytest.mark.parametrize("vc", [TINY_VQ, AMUSED_SHAPED_VQ, AMUSED_VQ], ids=["tiny", "amused-shaped", "amused"])
def test_vq_layout_is_diffusers_vqmodel(vc):
    """The decoding keys the plain decoder reads are exactly diffusers' VQModel's; the rest of
    the file is the encoder side (encoder., quant_conv.), which decoding never touches."""
    full = released_vq_shapes(vc)
    decoding = {k: s for k, s in full.items() if k.startswith(("quantize.", "post_quant_conv.", "decoder."))}
    assert decoding == vq_shapes(vc)
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in full.keys() - decoding.keys())


def test_vq_folder_is_checked_before_diffusers_loads_it(tmp_path):
    """diffusers would fill a missing weight with random numbers and only log it."""
    save_reference(tmp_path / "a", edit=lambda t, v: v.pop("decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: does not fit the VQ "
                                              r"tokenizer .*missing keys \['decoder\.conv_out\.bias'\]"):
        load_vq_decoder(tmp_path / "a" / "vqvae")
    save_reference(tmp_path / "b", edit=lambda t, v: v.update({"decoder.extra.weight": torch.zeros(2)}))
    with pytest.warns(UserWarning, match=r"1 keys that diffusers' VQModel does not have are ignored: "
                                         r"\['decoder\.extra\.weight'\]"):
        vq = load_vq_decoder(tmp_path / "b" / "vqvae")
    assert vq.quantize.embedding.weight.dtype == torch.float32 and not vq.training
    save_reference(tmp_path / "c", vc=TINY_VQ | {"lookup_from_codebook": False})
    with pytest.raises(CheckpointError, match=r"vqvae/config\.json: lookup_from_codebook is false"):
        load_vq_decoder(tmp_path / "c" / "vqvae")


def test_without_diffusers_the_vq_says_what_to_install(tmp_path, monkeypatch):
    save_reference(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)            # `import diffusers` fails
    with pytest.raises(ImportError, match=r"diffusers is missing: pip install 'diffusers>=0\.39,<0\.40'"):
        load_vq_decoder(tmp_path / "vqvae")


def test_conditions(reference):
    model, _, _, _, _ = reference
    assert torch.equal(model.null_condition(torch.tensor([0, 1])), torch.tensor([2, 2]))
    model.check_condition(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"prompt index out of range.*\[0, 2\)"):
        model.check_condition(torch.tensor([2]))
    with pytest.raises(ValueError, match="int64 prompt indices"):
        model.check_condition(torch.tensor([0.0]))


def test_generate_fills_the_grid_with_codes(reference):
    model, _, _, _, _ = reference
    out = generate(model, VanillaSource(model), torch.tensor([0, 1]), 4, seed=0,
                   sampler=SamplerConfig(cfg_weight=4.0))
    assert out.tokens.shape == (2, 12)
    assert (out.tokens >= 0).all() and (out.tokens < model.vocab_size).all()
    assert out.decode_step.min() == 1 and out.decode_step.max() == 4
    assert model.decode(out.tokens).shape == (2, 3, 6, 8)


def test_bf16_loading_and_prompt_file(reference, tmp_path):
    model, _, _, _, path = reference
    (tmp_path / "prompts.txt").write_text("a red cat\n\n a big blue dog on the grass \n")
    half = load_base("dimoo", path, str(path / "vqvae"), prompts=tmp_path / "prompts.txt",
                     dtype=torch.bfloat16)
    assert half.llm.transformer.wte.weight.dtype == torch.bfloat16
    assert half.vq.quantize.embedding.weight.dtype == torch.float32 and half.num_classes == 2
    tokens, cond = random_inputs(), torch.tensor([0, 1, 2])
    torch.testing.assert_close(half.head(half.features(tokens, cond)), model.head(model.features(tokens, cond)),
                               atol=0.15, rtol=0.05)


def test_missing_files_name_them_and_how_to_get_them(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.*Alpha-VLLM/Lumina-DiMOO"):
        load_base("dimoo", tmp_path / "nowhere", "")
    path = tmp_path / "ckpt"
    save_reference(path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard listed in model\.safetensors\.index\.json not found "
                                              r"at .*model-00002-of-00002\.safetensors.*Alpha-VLLM"):
        load_base("dimoo", path, "", prompts=PROMPTS)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found at .*ckpt/config\.json"):
        load_base("dimoo", path, "", prompts=PROMPTS)
    save_reference(path)
    (path / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"VQ tokenizer weights not found at .*vqvae/diffusion_pytorch"):
        load_base("dimoo", path, "", prompts=PROMPTS)


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    def drop_key(t, v):
        del t["model.transformer.blocks.1.up_proj.weight"]
        t["model.transformer.blocks.2.attn_norm.weight"] = torch.ones(32)

    save_reference(tmp_path / "a", edit=drop_key)
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer\.blocks\.1\.up_proj\.weight'\]"
                                              r".*unexpected keys \['transformer\.blocks\.2\.attn_norm\.weight'\]"):
        load_base("dimoo", tmp_path / "a", "", prompts=PROMPTS)

    save_reference(tmp_path / "b", raw_edit=lambda r: r.update(mlp_hidden_size=40))
    with pytest.raises(CheckpointError, match=r"MLP 40.*transformer\.blocks\.0\.ff_proj\.weight: "
                                              r"file \(48, 32\), expected \(40, 32\)"):
        load_base("dimoo", tmp_path / "b", "", prompts=PROMPTS)

    save_reference(tmp_path / "c", raw_edit=lambda r: r.update(block_type="sequential"))
    with pytest.raises(CheckpointError, match=r"unsupported LLaDA options \{'block_type': 'sequential'\}"):
        load_base("dimoo", tmp_path / "c", "", prompts=PROMPTS)

    save_reference(tmp_path / "d", vc=TINY_VQ | {"num_vq_embeddings": 8})
    with pytest.raises(CheckpointError, match=r"VQ tokenizer has 8 codes.*K = 16"):
        load_base("dimoo", tmp_path / "d", "", prompts=PROMPTS)


def test_released_config_matches_the_reference_sizes():
    """LLaDA-8B with the 8,192 image codes appended; 64x64 tokens decode to 1024x1024 (aMUSEd VQ)."""
    from diffusers import VQModel

    c = DiMOOConfig()
    with torch.device("meta"):
        llm, vq = LLaDA(c), VQModel(**AMUSED_VQ)
        ids = torch.zeros(1, c.grid_height, c.grid_width, dtype=torch.long)
        images = vq.decode(ids, force_not_quantize=True, shape=(*ids.shape, 64)).sample
    n = sum(p.numel() for p in llm.parameters())
    assert 8.0e9 < n < 8.2e9, n
    assert (c.d_model, c.num_tokens, c.image_token_offset + c.codebook_size) == (4096, 4096, c.vocab_size)
    assert images.shape == (1, 3, 1024, 1024)
    assert len(llada_shapes(c)) == len(llm.state_dict())
