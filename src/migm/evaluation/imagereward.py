"""ImageReward (Xu et al. 2023), a learned human-preference score of an image for its prompt, from
the released checkpoint on local disk, built on transformers' BLIP modules.

Why not the PyPI package `image-reward` (1.5): it requires timm==0.6.13 (which imports
torchvision), fairscale==0.4.13, diffusers, accelerate and datasets; its model module imports
torchvision itself; and loading fetches med_config.json and the BERT tokenizer from the model hub.
torchvision would have to be built for the pinned torch==2.13.0, and this project installs none,
so even `pip install --no-deps image-reward` leaves a package that cannot be imported here. The
scorer itself is small: BLIP's ViT-L/16 image encoder, a BERT-base text encoder that
cross-attends to the image, and an MLP on its [CLS] state. transformers (already a dependency)
ships both encoders, ported from the same BLIP code (BlipVisionModel, BlipTextModel), so the
released ImageReward.pt loads into them by renaming keys; tests/evaluation/test_imagereward.py
checks the result against a plain re-implementation of the reference forward.

Reference facts this relies on (PyPI image-reward 1.5 = THUDM/ImageReward: ImageReward/
ImageReward.py, ImageReward/utils.py, ImageReward/models/BLIP/{blip,blip_pretrain,vit,med}.py):
- ImageReward: blip = BLIP_Pretrain(image_size=224, vit="large"): a ViT of width 1024, depth 24,
  16 heads, patch 16, qkv bias, LayerNorm eps 1e-6, exact GELU; text_encoder =
  BertModel(med_config with encoder_width = 1024, add_pooling_layer=False) with cross-attention in
  every layer; mlp = Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
  Dropout, Linear(64, 16), Linear(16, 1) with no activation; reward = (mlp(h_cls) - 0.16717362830052426)
  / 1.0333394966054072.
- score(prompt, image): BertTokenizer("bert-base-uncased") with bos [DEC] and additional special
  token [ENC] added; the prompt padded to max_length 35 with truncation, [CLS] first (BLIP's [ENC]
  swap is not done); the image: Resize(224, bicubic) of the shorter side, CenterCrop(224), RGB,
  ToTensor, Normalize(CLIP's mean and std); h = text_encoder(ids, mask, encoder_hidden_states=
  visual_encoder(image), encoder_attention_mask=ones).last_hidden_state[:, 0].
- load(path): torch.load of the state dict, load_state_dict(strict=False): blip.vision_proj,
  blip.text_proj and text_encoder.embeddings.position_ids are in the file and unused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from migm.files import CheckpointError

log = logging.getLogger(__name__)

FILES = ("ImageReward.pt", "med_config.json", "vocab.txt")
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE, MAX_TEXT = 224, 35
VIT_HEADS = 16           # ViT-L as BLIP_Pretrain(vit="large") builds it; not recorded in the file
MLP_WIDTHS = (1024, 128, 64, 16, 1)
HOW_TO_GET = ("on a machine that can reach the model hub, download ImageReward.pt and "
              "med_config.json of THUDM/ImageReward and vocab.txt of bert-base-uncased into one "
              "directory (huggingface-cli download THUDM/ImageReward ImageReward.pt med_config.json "
              "--local-dir DIR; huggingface-cli download bert-base-uncased vocab.txt --local-dir DIR) "
              "and pass it as image_reward_path")


class ImageReward(nn.Module):
    """`score(images, prompts)` -> (B,) rewards, as the reference's `score` gives one at a time."""

    def __init__(self, vision: nn.Module, text: nn.Module, tokenizer) -> None:
        super().__init__()
        self.vision, self.text, self.tokenizer = vision, text, tokenizer
        widths = (text.config.hidden_size, *MLP_WIDTHS)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < 3:                                   # the reference's dropouts sit at 1, 3, 5
                layers.append(nn.Dropout((0.2, 0.2, 0.1)[i]))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """images: float (B, C, H, W) in [-1, 1]; prompts: B strings -> (B,) float rewards."""
        device = self.pixel_mean.device
        pixels = torch.stack([preprocess(im) for im in images.detach().float().cpu()]).to(device)
        pixels = (pixels - self.pixel_mean) / self.pixel_std                      # (B, 3, 224, 224)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state          # (B, 197, Dv)
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=MAX_TEXT, return_tensors="pt").to(device)
        hidden = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                           encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device),
                           return_dict=True).last_hidden_state                     # (B, 35, Dt)
        reward = self.mlp(hidden[:, 0].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def preprocess(image: torch.Tensor) -> torch.Tensor:
    """One image, float (C, H, W) in [-1, 1] -> float (3, 224, 224) in [0, 1]: uint8 levels, PIL
    bicubic resize of the shorter side to 224 and a centre crop, as torchvision's Resize and
    CenterCrop do on a PIL image in the reference."""
    from PIL import Image

    x = image.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if w <= h else (new_long, IMAGE_SIZE)
    pil = pil.resize(size, Image.BICUBIC)
    w, h = pil.size
    top, left = int(round((h - IMAGE_SIZE) / 2.0)), int(round((w - IMAGE_SIZE) / 2.0))
    pil = pil.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


# --- loading the released checkpoint -------------------------------------------------------------
_VISION_KEYS = [
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"blip\.text_encoder\.", "text."),
    (r"mlp\.layers\.", "mlp."),
]


def rename_key(key: str) -> str | None:
    """The module key a reference key loads into, or None for one this scorer does not use."""
    for pattern, target in _VISION_KEYS:
        new, n = re.subn(f"^{pattern}", target, key)
        if n:
            return new
    return None


def load_image_reward(path: str | Path) -> ImageReward:
    """The ImageReward scorer from a directory holding ImageReward.pt, med_config.json and the
    BERT tokenizer's vocab.txt, in eval mode."""
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"ImageReward weights at {path} are incomplete: missing "
                              f"{', '.join(missing)}; {HOW_TO_GET}")
    try:
        state = torch.load(path / "ImageReward.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path / 'ImageReward.pt'}: not a readable state dict "
                              f"({type(err).__name__}); {HOW_TO_GET}") from None
    state = state.get("state_dict", state)
    if "blip.visual_encoder.cls_token" not in state:
        raise CheckpointError(f"{path / 'ImageReward.pt'}: no blip.visual_encoder.cls_token: not an "
                              f"ImageReward checkpoint; {HOW_TO_GET}")
    med = json.loads((path / "med_config.json").read_text())
    width = state["blip.visual_encoder.cls_token"].shape[-1]
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=VIT_HEADS, patch_size=patch,
        intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=IMAGE_SIZE, hidden_act="gelu", layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True),   # is_decoder: build cross-attention
        add_pooling_layer=False)
    tokenizer = BertTokenizer(vocab_file=str(path / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    model = ImageReward(vision, text, tokenizer)

    renamed, unused = {}, []
    for key, value in state.items():
        target = rename_key(key)
        if target is None:
            unused.append(key)
        else:
            renamed[target] = value
    expected = model.state_dict()
    absent = sorted(set(expected) - set(renamed))
    if absent:
        raise CheckpointError(f"{path / 'ImageReward.pt'}: {len(absent)} weights missing, e.g. "
                              f"{', '.join(absent[:3])} (in module layout); {HOW_TO_GET}")
    extra = sorted(set(renamed) - set(expected)) + unused
    if extra:       # the reference loads with strict=False and ignores these too
        log.warning("ImageReward: %d checkpoint entries unused (as in the reference): %s",
                    len(extra), ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
    bad = [k for k in expected if renamed[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{path / 'ImageReward.pt'}: {bad[0]} has shape {tuple(renamed[bad[0]].shape)}, "
                              f"expected {tuple(expected[bad[0]].shape)} (med_config.json describes "
                              "another text encoder?)")
    model.load_state_dict({k: renamed[k] for k in expected})
    return model.eval()
