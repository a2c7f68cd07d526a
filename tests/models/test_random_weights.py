"""Random weights at the reference architectures: what `model.base: random` builds, and that no
quality metric is computed on it (speed and memory only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from migm.cli import REPO_ROOT
from migm.evaluation.setup import MetricsConfig, build_metrics
from migm.files import CheckpointError
from migm.models.checkpoints import check_files
from migm.models.llada import LLaDA, DiMOOConfig
from migm.models.maskgit import MaskGITConfig, MaskGITTransformer
from migm.models.checkpoints import random_seed
from migm.models.random_weights import parameter_count
from migm.models.registry import load_base, load_spec
from migm.sampling.loop import VanillaSource, generate
from small_bases import SMALL_DIMOO, SMALL_MASKGIT, SMALL_VQ



def _meta_params(build) -> int:
    with torch.device("meta"):
        return parameter_count(build())


def test_reference_sizes_are_the_papers():
    """MaskGIT-512 is 176,306,666 parameters, the 16x16 ImageNet-256 model 174,160,874 (its
    position table and per-position head bias are shorter), DiMOO is LLaDA-8B (8.0B) as its config.json sets it up."""
    assert _meta_params(lambda: MaskGITTransformer(MaskGITConfig())) == 176_306_666
    assert _meta_params(lambda: MaskGITTransformer(MaskGITConfig(grid_size=16))) == 174_160_874
    assert 7.9e9 < _meta_params(lambda: LLaDA(DiMOOConfig())) < 8.2e9


def test_seed_parsing_names_the_field():
    assert random_seed("random") == 0 and random_seed("random:7") == 7
    assert random_seed("checkpoints/maskgit/MaskGIT_ImageNet_512.pth") is None
    with pytest.raises(ValueError, match="model.base: 'random:x'"):
        random_seed("random:x")


def test_random_maskgit_is_seeded_and_runs_the_loop():
    a = load_base("maskgit", "random", "", SMALL_MASKGIT)
    b = load_base("maskgit", "random", "", SMALL_MASKGIT)
    c = load_base("maskgit", "random:1", "", SMALL_MASKGIT)
    assert a.weights == "random"
    wa, wb, wc = (m.transformer.tok_emb.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    cond = torch.arange(2)
    out = generate(a, VanillaSource(a), cond, steps=4)
    assert out.tokens.shape == (2, 16) and int(out.tokens.max()) < 16
    assert a.decode(out.tokens).shape == (2, 3, 8, 8)


def test_random_dimoo_has_the_prompt_table_shape_and_decodes():
    m = load_base("dimoo", "random", "", SMALL_DIMOO, prompts=["a", "b", "c"])
    assert m.weights == "random" and m.num_classes == 3
    assert m.prompt_table.shape == (4, 64)              # 3 prompts of 64 ids, the unconditional
    assert m.llm.transformer.wte.weight.dtype == torch.bfloat16
    from migm.models.random_weights import random_dimoo
    m = random_dimoo(DiMOOConfig(**SMALL_DIMOO), dtype=torch.float32, vq=SMALL_VQ, prompt_tokens=5)
    out = generate(m, VanillaSource(m), torch.arange(2), steps=3, schedule="dimoo_cosine")
    assert m.decode(out.tokens).shape == (2, 3, 6, 8)


def test_random_base_from_the_shipped_config_with_one_override():
    """configs/maskgit.yaml's model section, `base: random`: no file is looked for."""
    spec = yaml.safe_load((REPO_ROOT / "configs" / "maskgit.yaml").read_text())["model"]["init_args"]
    spec = {**spec, "base": "random", "base_config": SMALL_MASKGIT}
    check_files(spec["base_kind"], spec["base"], spec["tokenizer"])      # would raise on a path
    assert load_spec(spec).weights == "random"
    with pytest.raises(CheckpointError):
        check_files("maskgit", "missing.pth", "missing_vqgan.ckpt")


@pytest.mark.parametrize("field, metrics", [
    ("metrics.fid", {"fid": "inception", "reference": "x.npz", "classifier": None}),
    ("metrics.classifier", {"fid": "none", "classifier": "classifier.pt"}),
    ("metrics.clip_path", {"fid": "none", "classifier": None, "clip_path": "clip"}),
    ("metrics.image_reward_path", {"fid": "none", "classifier": None, "image_reward_path": "ir"}),
])
def test_quality_metrics_on_random_weights_are_refused(field, metrics):
    model = load_base("maskgit", "random", "", SMALL_MASKGIT)
    with pytest.raises(ValueError, match=f"^{field}: .*random weights.*speed and memory only"):
        build_metrics(MetricsConfig(**metrics), model, "maskgit")


def test_no_quality_metric_on_random_weights_is_allowed():
    model = load_base("maskgit", "random", "", SMALL_MASKGIT)
    quality = build_metrics(MetricsConfig(fid="none", classifier=None), model, "maskgit")
    assert quality is not None
    assert dataclasses.is_dataclass(MetricsConfig)


def test_every_row_of_a_random_base_says_so(small_migm):
    from migm.accel.method import Vanilla
    from migm.evaluation.grid import EvaluationGrid, GridConfig
    from migm.evaluation.quality import QualityMetrics

    model = load_base("maskgit", "random", "", SMALL_MASKGIT)
    config = GridConfig(methods=[Vanilla(steps=[2])], reference_steps=2)
    grid = EvaluationGrid(model, None, QualityMetrics(), config)
    grid.update(torch.arange(2), seed=0)
    assert grid.quality_row(grid.points[0])["weights"] == "random"
    trained = EvaluationGrid(small_migm, None, QualityMetrics(), config)
    assert trained.quality_row(trained.points[0])["weights"] == "trained"


def test_a_random_dimoo_names_a_missing_prompt_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"prompt file {tmp_path / 'none.txt'} not found"):
        load_base("dimoo", "random", "", SMALL_DIMOO, prompts=str(tmp_path / "none.txt"))
    (tmp_path / "two.txt").write_text("a red fox\na blue bird\n")
    assert load_base("dimoo", "random", "", SMALL_DIMOO, prompts=str(tmp_path / "two.txt")).num_classes == 2
