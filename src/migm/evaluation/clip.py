"""CLIPScore of generated images against their prompts, from CLIP weights on local disk.

torchmetrics' CLIPScore resolves hub names only, but it also accepts a loader callable, so the
weights are read from a directory (nothing is downloaded at run time) and one loaded CLIP is
shared by every configuration of a grid instead of being copied per accumulator.

Conditions are integer ids everywhere in the framework; `prompts[id]` is the text each id stands
for: class names for the embedded default ("a photo of a sandal"), the prompt file's lines for
text-to-image models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics.multimodal.clip_score import CLIPScore

from migm.data.images import FASHION_CLASSES
from migm.files import CheckpointError

CLIP_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def class_prompts(names: Sequence[str] = FASHION_CLASSES) -> list[str]:
    return [f"a photo of a {name.lower()}" for name in names]


def load_clip(path: str | Path):
    """(CLIPModel, CLIPProcessor) from a directory in the transformers layout, in eval mode."""
    path = Path(path)
    missing = [f for f in CLIP_FILES if not (path / f).exists()]
    if not any((path / w).exists() for w in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise CheckpointError(
            f"CLIP weights at {path} are incomplete: missing {', '.join(missing)}. On a machine "
            "that can reach the model hub run `huggingface-cli download "
            f"openai/clip-vit-base-patch16 --local-dir {path}` (or save any CLIP with "
            "`save_pretrained`), copy the directory here and pass it as clip_path.")
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as err:      # a dependency of migm, so only a broken environment gets here
        raise ImportError("CLIPScore needs the PyPI package transformers (>=4.40,<5): "
                          "reinstall migm with `make setup`") from err
    # the fast image processor needs torchvision, which this project must not install
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path, use_fast=False)


def clip_score_metric(model, processor) -> CLIPScore:
    """A fresh CLIPScore accumulator over an already loaded (shared) CLIP."""
    return CLIPScore(model_name_or_path=lambda: (model, processor))


def to_clip_images(images: torch.Tensor) -> torch.Tensor:
    """Generated images, float (B, C, H, W) in [-1, 1] -> uint8 RGB, as CLIP's processor expects."""
    x = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
