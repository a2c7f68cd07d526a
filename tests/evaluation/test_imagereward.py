"""ImageReward from a checkpoint in the released key layout (small random weights), against a plain
re-implementation of the reference's score(): BLIP ViT, BERT with cross-attention, MLP, the
PIL/torchvision preprocessing, all written here from the reference's arithmetic."""

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from migm.evaluation.imagereward import load_image_reward
from migm.files import CheckpointError

WORDS = ["a", "red", "cat", "blue", "dog", "on", "the", "mat", "old", "lighthouse", "at", "night", "##s"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
V_W, V_DEPTH, V_HEADS, V_MLP = 32, 2, 16, 48            # ViT (16 heads: the reference's ViT-L count)
T_W, T_LAYERS, T_HEADS, T_FF = 24, 2, 4, 40
MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": T_W, "initializer_range": 0.02, "intermediate_size": T_FF,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
       "num_attention_heads": T_HEADS, "num_hidden_layers": T_LAYERS, "pad_token_id": 0,
       "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2, "encoder_width": 768, "add_cross_attention": True}


def _reference_state(seed=0):
    """Random weights under ImageReward.pt's key names (blip.visual_encoder / text_encoder, mlp)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s
    sd = {}
    v = "blip.visual_encoder."
    sd[v + "cls_token"], sd[v + "pos_embed"] = r(1, 1, V_W), r(1, 197, V_W)
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = r(V_W, 3, 16, 16, s=0.05), r(V_W)
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = 1 + r(V_W), r(V_W)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = r(3 * V_W, V_W), r(3 * V_W)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r(V_W, V_W), r(V_W)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = r(V_MLP, V_W), r(V_MLP)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = r(V_W, V_MLP), r(V_W)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = 1 + r(V_W), r(V_W)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = r(MED["vocab_size"], T_W, s=1.0)
    sd[t + "embeddings.position_embeddings.weight"] = r(40, T_W)
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = 1 + r(T_W), r(T_W)
    sd[t + "embeddings.position_ids"] = torch.arange(40)[None]             # a buffer the file carries
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", T_W), ("crossattention", V_W)):
            sd[f"{b}{att}.self.query.weight"], sd[f"{b}{att}.self.query.bias"] = r(T_W, T_W), r(T_W)
            for n in ("key", "value"):
                sd[f"{b}{att}.self.{n}.weight"], sd[f"{b}{att}.self.{n}.bias"] = r(T_W, kv), r(T_W)
            sd[f"{b}{att}.output.dense.weight"], sd[f"{b}{att}.output.dense.bias"] = r(T_W, T_W), r(T_W)
            sd[f"{b}{att}.output.LayerNorm.weight"], sd[f"{b}{att}.output.LayerNorm.bias"] = 1 + r(T_W), r(T_W)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = r(T_FF, T_W), r(T_FF)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = r(T_W, T_FF), r(T_W)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + r(T_W), r(T_W)
    sd["blip.vision_proj.weight"], sd["blip.text_proj.weight"] = r(256, V_W), r(256, T_W)   # unused by score
    widths = [T_W, 1024, 128, 64, 16, 1]
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"] = r(b, a, s=1 / math.sqrt(a)), r(b)
    return sd


def save_image_reward(d):
    """A small random ImageReward directory in the released layout in `d`; also used by
    tests/test_real_models.py."""
    torch.save(_reference_state(), d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps(MED))
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return d


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return save_image_reward(tmp_path_factory.mktemp("imagereward"))


# --- the reference, as plain functions --------------------------------------------------------------
def _ref_pixels(image):
    """[-1, 1] -> uint8 PIL -> Resize(224, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize."""
    x = image.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(x)
    w, h = pil.size
    if w <= h:
        pil = pil.resize((224, int(224 * h / w)), Image.BICUBIC)
    else:
        pil = pil.resize((int(224 * w / h), 224), Image.BICUBIC)
    w, h = pil.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    arr = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(((arr - mean) / std).astype(np.float32)).permute(2, 0, 1)


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return x @ sd[p + ".weight"].t() + sd[p + ".bias"]


def _heads(x, h):
    B, N, D = x.shape
    return x.view(B, N, h, D // h).transpose(1, 2)


def _ref_vit(sd, pixels):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[v + "pos_embed"]
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        B, N, D = x.shape
        qkv = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").view(B, N, 3, V_HEADS, D // V_HEADS)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (D // V_HEADS) ** -0.5).softmax(-1)
        x = x + _lin((att @ val).transpose(1, 2).reshape(B, N, D), sd, b + "attn.proj")
        h = _ln(x, sd, b + "norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def _ref_attention(sd, p, x, ctx, mask_add):
    q, k, v = (_heads(_lin(src, sd, f"{p}.self.{n}"), T_HEADS) for src, n in ((x, "query"), (ctx, "key"), (ctx, "value")))
    scores = q @ k.transpose(-1, -2) / math.sqrt(T_W // T_HEADS) + mask_add
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return _ln(_lin(out, sd, f"{p}.output.dense") + x, sd, f"{p}.output.LayerNorm", 1e-12)


def _ref_score(sd, images, prompts, tokenizer):
    pixels = torch.stack([_ref_pixels(im) for im in images])
    image_embeds = _ref_vit(sd, pixels)
    tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    t = "blip.text_encoder."
    ids, L = tok.input_ids, tok.input_ids.shape[1]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    mask_add = (1.0 - tok.attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        x = _ref_attention(sd, b + "attention", x, x, mask_add)
        x = _ref_attention(sd, b + "crossattention", x, image_embeds, 0.0)
        x = _ln(_lin(F.gelu(_lin(x, sd, b + "intermediate.dense")), sd, b + "output.dense") + x,
                sd, b + "output.LayerNorm", 1e-12)
    h = x[:, 0]
    for idx in (0, 2, 4, 6, 7):
        h = _lin(h, sd, f"mlp.layers.{idx}")
    return (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _tokenizer(d):
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab_file=str(d / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


PROMPTS = ["a red cat on the mat", "a blue dog at night", "the old lighthouse"]


@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (3, 3, 48, 64), (3, 1, 28, 28)])
def test_scores_equal_the_reference_forward(reward_dir, shape, caplog):
    with caplog.at_level(logging.WARNING):
        model = load_image_reward(reward_dir)
    assert "blip.vision_proj.weight" in caplog.text and "position_ids" in caplog.text   # named, tolerated
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = model.score(images, PROMPTS)
    expected = _ref_score(_reference_state(), images.expand(-1, 3, -1, -1), PROMPTS, _tokenizer(reward_dir))
    assert got.shape == (3,) and got.std() > 1e-3                      # prompts and images matter
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_image_reward_is_a_metric_of_the_text_to_image_evaluator(reward_dir, tmp_path):
    from types import SimpleNamespace

    from migm.evaluation.setup import MetricsConfig, build_metrics
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = MetricsConfig(fid="none", classifier=None, image_reward_path=str(reward_dir),
                           prompts=str(tmp_path / "prompts.txt"))
    metrics = build_metrics(config, SimpleNamespace(num_classes=3), base_kind="dimoo")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    metrics.add_fake(images[:2], torch.tensor([2, 0]))
    metrics.add_fake(images[2:], torch.tensor([1]))
    expected = _ref_score(_reference_state(), images, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], _tokenizer(reward_dir))
    got = metrics.compute()
    assert set(got) == {"image_reward", "num_samples"}
    assert got["image_reward"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_missing_files_and_weights_are_one_line_errors(reward_dir, tmp_path):
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    with pytest.raises(CheckpointError, match=r"missing ImageReward\.pt, vocab\.txt; on a machine .*THUDM/ImageReward") as err:
        load_image_reward(tmp_path)
    assert "\n" not in str(err.value)
    state = _reference_state()
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    with pytest.raises(CheckpointError, match=r"1 weights missing, e.g. text\.encoder\.layer\.1\.crossattention\.self\.key\.weight"):
        load_image_reward(tmp_path)
