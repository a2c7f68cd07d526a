"""Sample quality: FID against fixed reference statistics in a pluggable feature space, class
accuracy (where the base has a classifier), and, with local weights, CLIPScore and ImageReward of
each image against its condition's prompt.

torchmetrics' FrechetInceptionDistance accumulates the generated side (and synchronises it over
DDP ranks); the reference side is a fixed (mu, sigma) (evaluation/reference.py) that every rank
holds whole, so it is never summed over ranks and a statistics file works as well as images.
One evaluator is cloned per grid point: the networks and the reference are shared.

FID preprocessing (`MetricsConfig.fid_preprocess`) is part of the metric: the same samples give
another number under another pixel mapping, so the real and the generated side must go through
the same one. `standard` is each extractor's own input mapping (Inception: clamp to [-1, 1], then
(x + 1) 127.5 rounded to uint8 levels). `reference_minmax` is MIGM-Shortcut's MaskGIT evaluation
(MaskGIT-Shortcut/Metrics/sample_and_eval.py l.10-15 remap_image_torch, applied to the real
ImageNet images (l.57-59) and to the unclamped VQGAN output (l.137-140)): each image is stretched
by its own minimum and maximum over (C, H, W) to [0, 255] and truncated to uint8.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

from migm.evaluation.clip import clip_score_metric, to_clip_images
from migm.evaluation.reference import ReferenceStats


FID_PREPROCESS = ("standard", "reference_minmax")


MINMAX_TOLERANCE = 1e-4   # of a uint8 level, added before the truncation (see minmax_uint8)


def minmax_uint8(images: torch.Tensor) -> torch.Tensor:
    """remap_image_torch: float (B, C, H, W) of any range -> uint8 (B, C, H, W), each image
    stretched by its own min and max to [0, 255] in fp32, clipped, truncated (`.to(uint8)`).

    One departure: MINMAX_TOLERANCE is added before truncating. The reference's real images are
    ToTensor's u / 255, which fp32 stretches back to exactly u; ours arrive as u / 127.5 - 1, and
    without it fp32 rounding would put 63 of the 256 levels a hair below themselves and truncate
    them one level down. It moves a generated value only when it lies within 1e-4 of a level
    below it (fp32's own rounding of the stretch is ~1.5e-5 of a level). A constant image (0/0,
    NaN, in the reference, whose uint8 cast is undefined) gives 0.
    """
    x = images.float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)                                     # (B, 1, 1, 1)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    y = ((x - lo) / (hi - lo)) * 255 + MINMAX_TOLERANCE
    return torch.nan_to_num(y, nan=0.0).clip(0, 255).to(torch.uint8)


def fid_preprocess(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Images as the FID extractor is to see them, float (B, C, H, W) in [-1, 1]: `standard`
    returns them as given (the extractor maps them itself); `reference_minmax` returns the uint8
    levels of `minmax_uint8` as u / 127.5 - 1, which Inception's (x + 1) 127.5 maps back to u."""
    if mode == "standard":
        return images
    if mode == "reference_minmax":
        return minmax_uint8(images).float() / 127.5 - 1.0
    raise ValueError(f"metrics.fid_preprocess: expected one of {list(FID_PREPROCESS)}, got {mode!r}")


class PreprocessedFeatures(nn.Module):
    """A FID extractor behind `fid_preprocess`, so that every image it sees, real (a folder, the
    Fashion test split) or generated, gets the same mapping. Reports under the extractor's own
    name; caches of reference statistics are keyed by `cache_name`, which names the mode."""

    def __init__(self, feature: nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in FID_PREPROCESS:
            raise ValueError(f"metrics.fid_preprocess: expected one of {list(FID_PREPROCESS)}, got {mode!r}")
        self.feature, self.preprocess = feature, mode
        self.name = getattr(feature, "name", "features")
        self.cache_name = self.name if mode == "standard" else f"{self.name}_{mode}"
        self.num_features = feature.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature(fid_preprocess(images, self.preprocess))


def check_preprocess(feature: nn.Module, reference: ReferenceStats) -> None:
    """Statistics record the preprocessing they were computed under when migm wrote them: a
    mismatch is an error; statistics of unknown provenance (a pytorch-fid or clean-fid file)
    cannot be checked nor re-preprocessed, which only matters when the mode is not `standard`
    (those tools' own mapping is close to standard): then a warning says so."""
    mode = getattr(feature, "preprocess", "standard")
    source = reference.source or "reference statistics"
    if reference.preprocess is not None and reference.preprocess != mode:
        raise ValueError(f"{source}: computed under fid_preprocess {reference.preprocess}, the "
                         f"samples are scored under {mode}: FID compares like with like only; "
                         f"set metrics.fid_preprocess: {reference.preprocess} or recompute the "
                         "statistics from the images")
    if reference.preprocess is None and mode != "standard":
        warnings.warn(f"{source}: precomputed statistics of unknown preprocessing; they cannot be "
                      f"re-preprocessed, so FID under fid_preprocess {mode} is only right if they "
                      f"were computed with it (give the folder of reference images to have them "
                      f"computed so)", stacklevel=2)


class ReferenceFID(FrechetInceptionDistance):
    """FID of the generated images fed to `update(images, real=False)` against `reference`.

    Only `compute` differs from torchmetrics: the real-side mean and covariance are the given
    statistics instead of torchmetrics' own real-image sums; the generated side and the distance
    (`_compute_fid`, reference first as torchmetrics orders it) are torchmetrics' arithmetic.
    """

    def __init__(self, feature: nn.Module, reference: ReferenceStats) -> None:
        super().__init__(feature=feature, reset_real_features=False, normalize=True)
        if reference.dim != self.fake_features_sum.numel():
            raise ValueError(f"{reference.source or 'reference statistics'}: features have dimension "
                             f"{reference.dim}, this extractor ({getattr(feature, 'name', 'features')}) "
                             f"has {self.fake_features_sum.numel()}: statistics only compare within "
                             "one feature network")
        check_preprocess(feature, reference)
        self.reference = reference
        self.register_buffer("reference_mu", reference.mu, persistent=False)          # (F,)
        self.register_buffer("reference_sigma", reference.sigma, persistent=False)    # (F, F)

    def compute(self) -> torch.Tensor:
        n = self.fake_features_num_samples
        if n < 2:
            raise RuntimeError("FID needs at least 2 generated images")
        mean = (self.fake_features_sum / n).unsqueeze(0)                                # (1, F)
        cov = (self.fake_features_cov_sum - n * mean.t().mm(mean)) / (n - 1)           # (F, F)
        return _compute_fid(self.reference_mu, self.reference_sigma, mean.squeeze(0), cov).to(self.orig_dtype)


class QualityMetrics(nn.Module):
    def __init__(self, feature: nn.Module | None = None, reference: ReferenceStats | None = None,
                 classifier: nn.Module | None = None, clip: tuple | None = None,
                 prompts: Sequence[str] | None = None, image_reward: nn.Module | None = None) -> None:
        """
        Args:
            feature: FID feature extractor (images in [-1, 1] -> (B, F)); None: no FID.
            reference: the real side of FID, in `feature`'s space.
            classifier: scores class accuracy (samples' agreement with the requested label).
            clip: a loaded (CLIPModel, CLIPProcessor) pair (`evaluation.clip.load_clip`), shared
                by every clone; with it, `compute` adds `clip_score`.
            prompts: the text of each condition id, for CLIPScore and ImageReward.
            image_reward: a loaded ImageReward scorer (`evaluation.imagereward`): adds `image_reward`.
        """
        super().__init__()
        if (feature is None) != (reference is None):
            raise ValueError("FID needs both a feature network and reference statistics in its space")
        if (clip is not None or image_reward is not None) and prompts is None:
            raise ValueError("CLIPScore and ImageReward need prompts: the text each condition id stands for")
        self.feature_name = getattr(feature, "name", "fid") if feature is not None else None
        self.fid = ReferenceFID(feature, reference) if feature is not None else None
        self.classifier = classifier
        self.accuracy = MeanMetric()      # torchmetrics states: summed over DDP ranks on compute
        self.count = SumMetric()
        self.clip_pair, self.prompts = clip, list(prompts) if prompts is not None else None
        self.clip = clip_score_metric(*clip) if clip is not None else None
        self.image_reward_model = image_reward
        self.image_reward = MeanMetric() if image_reward is not None else None

    def clone(self) -> QualityMetrics:
        """An empty accumulator with the same reference, sharing the networks."""
        other = QualityMetrics(self.fid.inception if self.fid is not None else None,
                               self.fid.reference if self.fid is not None else None,
                               self.classifier, self.clip_pair, self.prompts, self.image_reward_model)
        return other.to(self.count.device)

    @torch.no_grad()
    def add_fake(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Generated images, float (B, C, H, W) in [-1, 1], and the condition id of each."""
        if self.fid is not None:
            self.fid.update(images, real=False)
        self.count.update(len(images))
        if self.classifier is not None and labels is not None:
            self.accuracy.update((self.classifier(images).argmax(-1) == labels).float())
        texts = [self.prompts[int(c)] for c in labels] if self.prompts is not None and labels is not None else None
        if self.clip is not None and texts is not None:
            self.clip.update(to_clip_images(images), texts)
        if self.image_reward is not None and texts is not None:
            self.image_reward.update(self.image_reward_model.score(images, texts))

    def compute(self) -> dict[str, float]:
        out = {} if self.fid is None else {self.feature_name: float(self.fid.compute())}
        out["num_samples"] = int(self.count.compute())
        if self.classifier is not None:
            out["class_accuracy"] = float(self.accuracy.compute())
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
        if self.image_reward is not None:
            out["image_reward"] = float(self.image_reward.compute())
        return out

    def reset(self) -> None:
        """Forget generated samples; keep the reference."""
        for metric in (self.fid, self.accuracy, self.count, self.clip, self.image_reward):
            if metric is not None:
                metric.reset()
