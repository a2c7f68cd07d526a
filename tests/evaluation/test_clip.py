"""CLIPScore from a local directory, with a small randomly initialised CLIP saved the way real
weights are (transformers layout): the plumbing is real, only the network is small."""

import json

import pytest
import torch

from migm.evaluation.clip import class_prompts, load_clip, to_clip_images
from migm.evaluation.quality import QualityMetrics
from migm.files import CheckpointError


def save_clip(d):
    """A small random CLIP in `d`, saved as real weights are (transformers layout); also used by
    tests/test_real_models.py."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=52,
                         eos_token_id=53, pad_token_id=53),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(d)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip"))


def _images(n=20, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_missing_clip_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="preprocessor_config.json.*model.safetensors"):
        load_clip(tmp_path)


def test_clip_score_matches_a_direct_computation_with_the_same_network(clip_dir):
    model, processor = load_clip(clip_dir)
    prompts = class_prompts()
    metrics = QualityMetrics(clip=(model, processor), prompts=prompts)
    images, labels = _images(), torch.arange(20) % 10
    metrics.add_fake(images[:12], labels[:12])
    metrics.add_fake(images[12:], labels[12:])                    # accumulated over batches

    with torch.no_grad():
        inputs = processor(text=[prompts[c] for c in labels], images=list(to_clip_images(images)),
                           return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = (100 * torch.cosine_similarity(img, txt, dim=-1)).mean().clamp_min(0)
    assert metrics.compute()["clip_score"] == pytest.approx(float(expected), abs=1e-3)

    shifted = metrics.clone()                       # same CLIP, other prompts: another score
    assert shifted.clip.model is metrics.clip.model
    shifted.add_fake(images, (labels + 3) % 10)
    assert shifted.compute()["clip_score"] != pytest.approx(metrics.compute()["clip_score"], abs=1e-3)
    metrics.reset()
    assert metrics.clip.n_samples == 0


def test_clip_needs_prompts(clip_dir):
    with pytest.raises(ValueError, match="prompts"):
        QualityMetrics(clip=load_clip(clip_dir))


def test_text_to_image_scores_each_sample_against_its_own_prompt(clip_dir, tmp_path):
    # condition j is prompt j of the evaluation prompt file; no FID, no class accuracy
    from types import SimpleNamespace

    from migm.evaluation.setup import MetricsConfig, build_metrics
    texts = ["a red cat on a mat", "a blue dog", "an old lighthouse at night"]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"prompt": t, "id": f"p{i}"})
                                                   for i, t in enumerate(texts)) + "\n")
    config = MetricsConfig(fid="none", classifier=None, clip_path=str(clip_dir), prompts=str(tmp_path / "eval.jsonl"))
    metrics = build_metrics(config, SimpleNamespace(num_classes=3), base_kind="dimoo")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1   # RGB samples
    metrics.add_fake(images, torch.arange(3))
    got = metrics.compute()
    assert set(got) == {"clip_score", "num_samples"}

    model, processor = load_clip(clip_dir)
    with torch.no_grad():
        inputs = processor(text=texts, images=list(to_clip_images(images)), return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = (100 * torch.cosine_similarity(img, txt, dim=-1)).mean().clamp_min(0)   # torchmetrics: max(mean, 0)
    assert got["clip_score"] == pytest.approx(float(expected), abs=1e-3)

    # the base's own prompt table is the default; a file that disagrees with it is an error
    base = SimpleNamespace(num_classes=3, prompts=texts)
    assert build_metrics(MetricsConfig(fid="none", classifier=None, clip_path=str(clip_dir)), base,
                         base_kind="dimoo").prompts == texts
    (tmp_path / "other.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="other.txt differs from the base's prompt table"):
        build_metrics(MetricsConfig(fid="none", classifier=None, clip_path=str(clip_dir),
                                    prompts=str(tmp_path / "other.txt")), base, base_kind="dimoo")
