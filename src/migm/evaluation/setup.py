"""Builds the quality evaluator of the embedded default: feature network + cached reference."""

from __future__ import annotations

from pathlib import Path

import torch

from migm.evaluation.quality import QualityMetrics


def quality_metrics(features: str = "classifier", classifier: str = "classifier.pt",
                    reference_samples: int = 10000, device: torch.device | str = "cpu",
                    inception_path: Path | None = None, cache_dir: Path = Path("runs/cache"),
                    clip_path: Path | None = None) -> QualityMetrics:
    """FID against the first `reference_samples` test images (statistics cached on disk, keyed by
    extractor and count), class accuracy from the shipped classifier, and CLIPScore against the
    class names when `clip_path` (a local CLIP directory) is given."""
    from migm.data.images import load_fashion_mnist, to_model_range
    from migm.evaluation.clip import class_prompts, load_clip
    from migm.evaluation.features import ClassifierFeatures, InceptionFeatures, load_classifier

    net = load_classifier(classifier)
    feature = ClassifierFeatures(net) if features == "classifier" else InceptionFeatures(inception_path)
    clip = load_clip(clip_path) if clip_path is not None else None
    metrics = QualityMetrics(feature, net, clip, class_prompts() if clip else None)
    cache = Path(cache_dir) / f"{feature.name}_test{reference_samples}.pt"
    if cache.exists():
        metrics.load_reference(cache)
    else:
        images, _ = load_fashion_mnist("test")
        metrics.add_real(to_model_range(images[:reference_samples]))
        metrics.save_reference(cache)
    return metrics.to(device)
