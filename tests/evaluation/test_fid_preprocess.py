"""FID preprocessing as MIGM-Shortcut's MaskGIT evaluation does it, on both sides of FID.

`remap` below is written from MaskGIT-Shortcut/Metrics/sample_and_eval.py l.10-15
(remap_image_torch); the real-side input it gets there is ToTensor's u / 255.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import warnings
from PIL import Image

from migm.evaluation.features import InceptionFeatures
from migm.evaluation.quality import PreprocessedFeatures, QualityMetrics, fid_preprocess, minmax_uint8
from migm.evaluation.reference import ReferenceStats, folder_stats, read_stats
from migm.evaluation.setup import MetricsConfig, build_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import StandIn, inception_path  # noqa: E402,F401  (the TorchScript stand-in)


def remap(image):
    """remap_image_torch: per image, (x - min) / (max - min) * 255 over (C, H, W), clipped to
    [0, 255], cast to uint8 (truncating)."""
    flat = image.flatten(1)
    lo, hi = (v.view(-1, 1, 1, 1) for v in (flat.min(1).values, flat.max(1).values))
    return ((image - lo) / (hi - lo) * 255).clamp(0, 255).to(torch.uint8)


def standard(images):
    """The standard mapping (Inception's own): clamp, (x + 1) 127.5 rounded."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def test_minmax_is_the_references_remap_on_raw_decoder_output():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 3, 16, 16, generator=g) * 0.5 + torch.tensor([0.0, 0.3, -0.2, 0.0]).view(4, 1, 1, 1)
    raw[3] *= 3                                               # overshoots [-1, 1]: unclamped VQGAN
    ours, ref = minmax_uint8(raw), remap(raw)
    assert (ours.int() - ref.int()).abs().max() <= 1          # the 1e-4 tolerance only
    assert float((ours != ref).float().mean()) < 1e-3
    assert not torch.equal(ours, standard(raw))               # another number than standard's
    assert (ours.amin((1, 2, 3)) == 0).all() and (ours.amax((1, 2, 3)) == 255).all()


def test_real_images_keep_their_levels_as_the_references_to_tensor_input_does():
    u = torch.arange(256, dtype=torch.float32).repeat(3, 1).view(1, 3, 16, 16)     # spans 0..255
    assert torch.equal(remap(u / 255).float(), u)             # the reference's real-side input
    ours = minmax_uint8(u / 127.5 - 1)                        # ours: read from files into [-1, 1]
    assert torch.equal(ours.float(), u)
    # an image already spanning [-1, 1] on uint8 levels: the two preprocessings agree exactly
    assert torch.equal(ours, standard(u / 127.5 - 1))
    x = fid_preprocess(u / 127.5 - 1, "reference_minmax")
    assert torch.equal(x, u / 127.5 - 1) and torch.equal(fid_preprocess(x, "standard"), x)


def test_a_narrow_image_is_stretched_and_a_constant_one_is_zero():
    u = torch.arange(100, 164, dtype=torch.float32).repeat(3, 1).view(1, 3, 8, 8)
    narrow = minmax_uint8(u / 127.5 - 1)
    assert int(narrow.min()) == 0 and int(narrow.max()) == 255          # standard keeps 100..163
    assert int(standard(u / 127.5 - 1).min()) == 100
    assert (minmax_uint8(torch.full((1, 3, 4, 4), 0.3)) == 0).all()


def _write_narrow_pngs(root: Path, n=6) -> None:
    g = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(g.integers(60, 180, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")


def test_the_real_side_of_a_folder_goes_through_the_same_preprocessing(inception_path, tmp_path):
    _write_narrow_pngs(tmp_path / "ref")
    inception = InceptionFeatures(inception_path)
    plain = folder_stats(inception, tmp_path / "ref", cache_dir=tmp_path / "cache")
    minmax = PreprocessedFeatures(inception, "reference_minmax")
    stretched = folder_stats(minmax, tmp_path / "ref", cache_dir=tmp_path / "cache")
    assert not torch.allclose(plain.mu, stretched.mu)
    assert (plain.preprocess, stretched.preprocess) == ("standard", "reference_minmax")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2          # cached apart, per mode
    again = folder_stats(minmax, tmp_path / "ref", cache_dir=tmp_path / "cache")
    assert again.preprocess == "reference_minmax" and torch.equal(again.mu, stretched.mu)
    # the same images fed as generated samples: FID ~ 0 only when both sides share the mode
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in sorted((tmp_path / "ref").glob("*.png"))])
    same = QualityMetrics(minmax, stretched)
    same.add_fake(images)
    assert same.compute()["fid_inception"] == pytest.approx(0, abs=1e-6)


def test_config_sets_the_mode_and_refuses_mixed_statistics(inception_path, tmp_path):
    with pytest.raises(ValueError, match="fid_preprocess"):
        MetricsConfig(fid_preprocess="minmax")
    _write_narrow_pngs(tmp_path / "ref")
    config = MetricsConfig(fid="inception", inception_path=str(inception_path), reference=str(tmp_path / "ref"),
                           reference_samples=0, classifier=None, cache_dir=str(tmp_path / "cache"),
                           fid_preprocess="reference_minmax")
    model = SimpleNamespace(num_classes=10, clamp_decoded=True)
    metrics = build_metrics(config, model, base_kind="maskgit")
    assert model.clamp_decoded is False                 # the generated side is the raw decode
    assert metrics.fid.inception.preprocess == "reference_minmax"
    # statistics written under one mode, read under the other: an error naming both
    stats = ReferenceStats(torch.zeros(8), torch.eye(8), 10, "ref.npz", "standard")
    with pytest.raises(ValueError, match="standard.*reference_minmax"):
        QualityMetrics(metrics.fid.inception, stats)
    # another tool's file (no record): used, with a warning that it cannot be re-preprocessed
    np.savez(tmp_path / "foreign.npz", mu=np.zeros(8), sigma=np.eye(8))
    with pytest.warns(UserWarning, match="cannot be re-preprocessed"):
        QualityMetrics(metrics.fid.inception, read_stats(tmp_path / "foreign.npz"))
    inception = InceptionFeatures(inception_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # standard with a foreign file: silent
        QualityMetrics(inception, read_stats(tmp_path / "foreign.npz"))


def test_fashion_reference_is_preprocessed_and_cached_per_mode(tmp_path):
    """The embedded default's real side (the Fashion test split) under both modes."""
    base = MetricsConfig(reference_samples=200, cache_dir=str(tmp_path))
    standard_metrics = build_metrics(base)
    minmax_metrics = build_metrics(MetricsConfig(reference_samples=200, cache_dir=str(tmp_path),
                                                 fid_preprocess="reference_minmax"))
    a, b = standard_metrics.fid.reference, minmax_metrics.fid.reference
    assert (a.preprocess, b.preprocess) == ("standard", "reference_minmax")
    assert not torch.allclose(a.mu, b.mu)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "fid_classifier_reference_minmax_test200.pt", "fid_classifier_test200.pt"]
    assert read_stats(tmp_path / "fid_classifier_reference_minmax_test200.pt").preprocess == "reference_minmax"
