"""torch.compile of the base's blocks and the shortcut (sampling/compiled.py): every block and the
shortcut compile whole (fullgraph: a graph break raises), generate the eager tokens, and the eager
blocks are back afterwards; `migm speed --compile true` times both in the same rounds."""

from __future__ import annotations

import json

import pytest
import torch

from migm.cli import REPO_ROOT, main
from migm.commands import study_sections
from migm.evaluation.speed import random_shortcut
from migm.models.random_weights import random_base
from migm.sampling.compiled import compile_twins, using_twins
from migm.sampling.loop import generate
from small_bases import SMALL_VQ
from migm.gpu_check import SMALL


@pytest.mark.parametrize("kind, study", [("maskgit", "maskgit.yaml"), ("dimoo", "dimoo.yaml")])
def test_compiled_blocks_and_shortcut_generate_the_eager_tokens(kind, study):
    torch._dynamo.reset()
    sections = study_sections([str(REPO_ROOT / "configs" / study)], SMALL[kind]["network"])
    options = {"vq": SMALL_VQ} if kind == "dimoo" else {}
    model = random_base(kind, SMALL[kind]["base_config"], seed=0, dtype=torch.float32, **options)
    shortcut = random_shortcut(sections["network"])
    grid = sections["evaluation"]
    point = next(p for p in grid.points() if p.name == "shortcut")      # full and shortcut steps
    cond = torch.tensor([1])

    def tokens(net):
        return generate(model, point.source(model, net), cond, point.steps, sampler=grid.sampler,
                        schedule=grid.schedule, seed=3).tokens

    eager_blocks = list(model.layers())
    eager = tokens(shortcut)
    twins = compile_twins(model, shortcut, backend="aot_eager")
    with using_twins(model, twins):
        assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.layers())
        compiled = tokens(twins.shortcut)
    assert torch.equal(compiled, eager)
    assert all(a is b for a, b in zip(model.layers(), eager_blocks))       # the eager blocks are back
    # the twins share the eager weights: nothing was copied
    assert twins.blocks[0]._orig_mod is eager_blocks[0] and twins.shortcut._orig_mod is shortcut


def test_twins_of_another_depth_are_refused():
    model = random_base("maskgit", SMALL["maskgit"]["base_config"], seed=0)
    other = random_base("maskgit", {**SMALL["maskgit"]["base_config"], "depth": 2}, seed=0)
    with pytest.raises(ValueError, match="2 compiled blocks for a base of 4"):
        with using_twins(model, compile_twins(other, backend="aot_eager")):
            pass


def test_speed_times_every_run_eager_and_compiled_in_the_same_rounds(tmp_path):
    torch._dynamo.reset()
    out = tmp_path / "speed.jsonl"
    main(["speed", "--study", str(REPO_ROOT / "configs" / "maskgit.yaml"),
          "--base_config", json.dumps(SMALL["maskgit"]["base_config"]),
          "--network", json.dumps(SMALL["maskgit"]["network"]), "--batch", "1", "--rounds", "1",
          "--warmup", "1", "--points", "[shortcut N32/B9]", "--compile", "true",
          "--compile_backend", "aot_eager", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["N15", "N32/B9"]
    for r in rows:
        assert r["compiled_latency_ms_per_image"] > 0
        assert r["compile_gain"] == pytest.approx(r["latency_ms_per_image"] / r["compiled_latency_ms_per_image"])
    assert rows[0]["compiled_speedup"] == pytest.approx(1.0)


def test_compile_without_a_warm_up_is_refused(tmp_path):
    with pytest.raises(ValueError, match="speed.warmup: --compile true needs at least one warm-up"):
        main(["speed", "--study", str(REPO_ROOT / "configs" / "maskgit.yaml"),
              "--base_config", json.dumps(SMALL["maskgit"]["base_config"]),
              "--network", json.dumps(SMALL["maskgit"]["network"]), "--warmup", "0",
              "--compile", "true", "--out", str(tmp_path / "x.jsonl")])
