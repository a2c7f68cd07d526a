"""MetricsConfig: settings of the embedded default never silently apply to a real base."""

from types import SimpleNamespace

import pytest

from migm.evaluation.setup import MetricsConfig, build_metrics, condition_texts


def test_the_default_is_the_embedded_default_and_is_rejected_for_real_bases():
    MetricsConfig().check_base("tiny")
    with pytest.raises(ValueError, match="metrics.fid: classifier features are the embedded default's"):
        MetricsConfig().check_base("maskgit")
    with pytest.raises(ValueError, match="metrics.reference: fashion_test is the embedded default's"):
        MetricsConfig(fid="inception").check_base("maskgit")
    with pytest.raises(ValueError, match="metrics.classifier: .* set metrics.classifier: null"):
        MetricsConfig(fid="inception", reference="stats.npz").check_base("dimoo")
    MetricsConfig(fid="inception", reference="stats.npz", classifier=None).check_base("maskgit")
    MetricsConfig(fid="none", classifier=None, clip_path="clip").check_base("dimoo")


@pytest.mark.parametrize("fields, match", [
    ({"fid": "kid"}, "metrics.fid: expected classifier, inception or none"),
    ({"classifier": None}, "metrics.fid: classifier features need metrics.classifier"),
    ({"fid": "inception", "reference": ""}, "metrics.reference: FID needs a reference"),
    ({"reference_samples": -1}, "metrics.reference_samples: expected >= 0"),
    ({"unipercept_path": "ckpt/unipercept"}, "metrics.unipercept_path: UniPercept-IQA is not supported"),
])
def test_bad_settings_name_their_field(fields, match):
    with pytest.raises(ValueError, match=match):
        MetricsConfig(**fields)


def test_condition_texts_come_from_the_file_the_base_or_the_class_names(tmp_path):
    tiny = SimpleNamespace(num_classes=10)
    assert condition_texts(MetricsConfig(), tiny, "tiny")[7] == "a photo of a sneaker"
    with pytest.raises(ValueError, match="on the maskgit base need the text of each class id"):
        condition_texts(MetricsConfig(), SimpleNamespace(num_classes=1000), "maskgit")
    (tmp_path / "classes.txt").write_text("a photo of a tench\na photo of a goldfish\n")
    config = MetricsConfig(prompts=str(tmp_path / "classes.txt"))
    assert condition_texts(config, SimpleNamespace(num_classes=2), "maskgit")[1] == "a photo of a goldfish"
    with pytest.raises(ValueError, match="metrics.prompts: 2 prompts for 1000 condition ids"):
        condition_texts(config, SimpleNamespace(num_classes=1000), "maskgit")


def test_without_fid_or_text_metrics_only_the_count_is_reported():
    import torch
    metrics = build_metrics({"fid": "none", "classifier": None}, SimpleNamespace(num_classes=3), "dimoo")  # YAML's dict
    metrics.add_fake(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]))
    assert metrics.compute() == {"num_samples": 2}


def test_test_on_a_real_base_needs_its_own_shortcut_weights(tmp_path):
    # never the embedded default's shortcut.pt: a one-line error before any model is loaded
    import lightning as L
    from torch.utils.data import DataLoader

    from migm.data.collection import ConditionDataset
    from migm.files import CheckpointError
    from migm.evaluation.module import EvaluationModule
    for name in ("MaskGIT.pth", "VQGAN.pth"):              # present (never read before the error)
        (tmp_path / name).touch()
    module = EvaluationModule(base_kind="maskgit", base=str(tmp_path / "MaskGIT.pth"),
                              tokenizer=str(tmp_path / "VQGAN.pth"),
                              metrics=MetricsConfig(fid="none", classifier=None))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="test on the maskgit base needs trained shortcut weights: "
                                              "pass --ckpt_path") as err:
        trainer.test(module, dataloaders=DataLoader(ConditionDataset(2, 2), batch_size=2))
    assert "\n" not in str(err.value)
