"""FID references from files and folders, with a small TorchScript stand-in for InceptionV3 loaded
through the real path (InceptionFeatures): the file formats, the resizing and the Frechet
arithmetic are real, only the feature network is small."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from migm.evaluation.features import InceptionFeatures
from migm.evaluation.quality import QualityMetrics
from migm.evaluation.reference import folder_stats, read_stats, stats_from_images
from migm.evaluation.setup import MetricsConfig, build_metrics
from migm.files import CheckpointError


class StandIn(torch.nn.Module):
    """Accepts only what TF-FID InceptionV3 accepts: (B, 3, 299, 299)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299, "expects (B, 3, 299, 299)")
        return torch.tanh(self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1)) * 4)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "standin.pt"
    torch.jit.save(torch.jit.script(StandIn()), str(path))
    return path


def _images(n, seed, size=32, channels=3, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * 2 - 1 + shift).clamp(-1, 1)


def _scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """The TTUR / pytorch-fid formula, computed with scipy from the features themselves."""
    from scipy import linalg
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_inception_path_resizes_to_299_and_takes_gray_or_rgb(inception_path):
    net = InceptionFeatures(inception_path)
    assert net.num_features == 8                               # read from the network
    rgb = _images(2, 0, size=512)                              # MaskGIT's 3x512x512
    x = rgb.add(1).mul(127.5).round().clamp(0, 255) / 128.0 - 1.0
    expected = torch.jit.load(str(inception_path))(F.interpolate(x, size=(299, 299), mode="bilinear"))
    assert torch.allclose(net(rgb), expected, atol=1e-6)
    gray = _images(2, 1, size=28, channels=1)                  # the embedded default's 1x28x28
    assert torch.allclose(net(gray), net(gray.expand(-1, 3, -1, -1)), atol=1e-6)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        net(_images(1, 2, channels=2))


def test_fid_from_a_pytorch_fid_npz_equals_an_independent_scipy_computation(inception_path, tmp_path):
    feature = InceptionFeatures(inception_path)
    real, fake = _images(80, 1, size=64), _images(50, 2, size=64, shift=0.3)
    fr, ff = feature(real).double().numpy(), feature(fake).double().numpy()
    np.savez_compressed(tmp_path / "ref.npz", mu=fr.mean(0), sigma=np.cov(fr, rowvar=False))  # pytorch-fid's layout
    config = MetricsConfig(fid="inception", inception_path=str(inception_path),
                           reference=str(tmp_path / "ref.npz"), classifier=None)
    metrics = build_metrics(config, SimpleNamespace(num_classes=1000), base_kind="maskgit")
    metrics.add_fake(fake[:30])
    metrics.add_fake(fake[30:])                                 # accumulated over batches
    got = metrics.compute()
    assert set(got) == {"fid_inception", "num_samples"}        # no class accuracy without a classifier
    assert got["fid_inception"] == pytest.approx(_scipy_fid(fr, ff), rel=1e-5)


def test_every_statistics_format_gives_the_same_reference(inception_path, tmp_path):
    feats = InceptionFeatures(inception_path)(_images(60, 3)).double()
    mu, sigma = feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    np.savez_compressed(tmp_path / "clean_fid_kid.npz", feats=feats.float().numpy())        # features only
    torch.save({"mu": mu.astype(np.float32), "sigma": sigma}, tmp_path / "cifar-inception-stat-fid-2048.pt")
    torch.save({"real_features_sum": feats.sum(0), "real_features_cov_sum": feats.t() @ feats,
                "real_features_num_samples": torch.tensor(60)}, tmp_path / "torchmetrics_states.pt")
    for name in ("clean_fid_kid.npz", "cifar-inception-stat-fid-2048.pt", "torchmetrics_states.pt"):
        stats = read_stats(tmp_path / name)
        assert torch.allclose(stats.mu, torch.from_numpy(mu), atol=1e-6), name
        assert torch.allclose(stats.sigma, torch.from_numpy(sigma), atol=1e-6), name
    assert read_stats(tmp_path / "pytorch_fid.npz").count is None        # the file does not say


def _write_pngs(root):
    """Nested folders, one gray image, one of another size: what a real image folder holds."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(9):
        size = 40 if i == 4 else 32
        sub = root / f"class_{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L") if i == 6 else Image.fromarray(pixels)
        path = sub / f"img_{i}.{'jpg' if i == 2 else 'png'}"
        image.save(path)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return sorted(paths)


def test_image_folder_reference_equals_the_stats_of_the_same_images(inception_path, tmp_path):
    feature = InceptionFeatures(inception_path)
    files = _write_pngs(tmp_path / "ref")

    def read(p):            # independent of the loader: PIL -> RGB uint8 -> [-1, 1]
        return torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1

    expected = stats_from_images(feature, [read(p)[None] for p in files])
    got = folder_stats(feature, tmp_path / "ref", cache_dir=tmp_path / "cache", batch_size=4)
    assert got.count == 9
    assert torch.allclose(got.mu, expected.mu, atol=1e-10) and torch.allclose(got.sigma, expected.sigma, atol=1e-10)
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and set(np.load(cached[0]).files) >= {"mu", "sigma"}    # pytorch-fid's keys
    again = folder_stats(feature, tmp_path / "ref", cache_dir=tmp_path / "cache")
    assert torch.allclose(again.sigma, got.sigma, atol=0)
    first5 = folder_stats(feature, tmp_path / "ref", limit=5, cache_dir=tmp_path / "cache")
    assert torch.allclose(first5.mu, stats_from_images(feature, [read(p)[None] for p in files[:5]]).mu, atol=1e-10)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref" / "class_0" / "new.png")
    folder_stats(feature, tmp_path / "ref", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3            # a changed folder is recomputed


def test_folder_reference_through_the_config_scores_3x512_samples(inception_path, tmp_path):
    _write_pngs(tmp_path / "ref")
    config = MetricsConfig(fid="inception", inception_path=str(inception_path), reference=str(tmp_path / "ref"),
                           reference_samples=0, classifier=None, cache_dir=str(tmp_path / "cache"))
    metrics = build_metrics(config, SimpleNamespace(num_classes=1000), base_kind="maskgit")
    metrics.add_fake(_images(4, 5, size=512))
    assert metrics.compute()["fid_inception"] > 0


def _one_line_error(call, match):
    with pytest.raises(CheckpointError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_missing_or_unreadable_reference_files_are_one_line_errors_naming_them(inception_path, tmp_path):
    _one_line_error(lambda: read_stats(tmp_path / "imagenet512.npz"), r"imagenet512\.npz not found.*pytorch-fid")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    _one_line_error(lambda: read_stats(tmp_path / "images.npz"), r"images\.npz: no FID statistics.*arr_0.*mu and sigma")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    _one_line_error(lambda: read_stats(tmp_path / "junk.pt"), r"junk\.pt: cannot read FID statistics")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    _one_line_error(lambda: read_stats(tmp_path / "other.pt"), r"other\.pt: no FID statistics.*weights")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    _one_line_error(lambda: read_stats(tmp_path / "bad.npz"), r"bad\.npz: sigma has shape \(3, 3\), expected \(4, 4\)")
    feature = InceptionFeatures(inception_path)
    _one_line_error(lambda: folder_stats(feature, tmp_path / "val"), r"image folder .*val not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: folder_stats(feature, tmp_path / "empty"), r"empty holds no image")
    config = MetricsConfig(fid="inception", inception_path=str(inception_path),
                           reference=str(tmp_path / "VIRTUAL_imagenet512.npz"), classifier=None)
    _one_line_error(lambda: build_metrics(config, base_kind="maskgit"), r"VIRTUAL_imagenet512\.npz not found")
    missing_net = MetricsConfig(fid="inception", inception_path=str(tmp_path / "pt_inception.pt"),
                                reference=str(tmp_path / "images.npz"), classifier=None)
    _one_line_error(lambda: build_metrics(missing_net, base_kind="maskgit"), r"Inception weights not found at .*pt_inception\.pt")


def test_statistics_of_another_feature_network_are_rejected(inception_path, tmp_path):
    np.savez(tmp_path / "ref2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r"ref2048\.npz: features have dimension 2048.*has 8"):
        QualityMetrics(InceptionFeatures(inception_path), read_stats(tmp_path / "ref2048.npz"))
