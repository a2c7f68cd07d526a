import pytest
import torch

from migm.data.images import load_fashion_mnist, to_model_range
from migm.evaluation.features import ClassifierFeatures, InceptionFeatures, load_classifier
from migm.evaluation.latency import measure_latency
from migm.evaluation.quality import QualityMetrics
from migm.models.assets import CheckpointError


@pytest.fixture(scope="module")
def metrics():
    net = load_classifier()
    m = QualityMetrics(ClassifierFeatures(net), net)
    images, _ = load_fashion_mnist("test")
    m.add_real(to_model_range(images[:5000]))
    return m


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
