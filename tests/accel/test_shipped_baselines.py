"""The shipped configs state the baselines' settings as docs/baselines.md describes them: Table 2's
rows in configs/dimoo.yaml (the ReCAP reading its latencies support, dLLM-Cache's rho swept and
labelled ours, the reference's bf16 sampler), reference and tuned rows side by side in
experiments/pareto.yaml, and Table 1's FID preprocessing and shortcut size in configs/maskgit.yaml.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from migm.accel.recap import ReCAPConfig
from migm.sampling.sampler import SamplerConfig

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> tuple[dict, str]:
    text = (REPO / name).read_text()
    return yaml.safe_load(text), text


def methods(config: dict) -> list:
    out = []
    for entry in config["evaluation"]["methods"]:
        module, _, cls = entry["class_path"].rpartition(".")
        out.append(getattr(importlib.import_module(module), cls)(**entry.get("init_args", {})))
    return out


def test_dimoo_config_lists_table_2_as_read():
    config, text = load("configs/dimoo.yaml")
    ms = methods(config)
    vanilla = next(m for m in ms if m.name == "vanilla")
    assert set(vanilla.steps) == {64, 32, 16, 14, 13}                  # Table 2's vanilla rows
    recap = [(m.steps, m.num_cache_iters, m.pre_full_iters) for m in ms if m.name == "recap"]
    expected = []
    for t_prime in (40, 24):
        c, N = ReCAPConfig.from_paper(0, 8, t_prime, reading="local")
        expected.append(([N], [c.num_cache_iters], c.pre_full_iters))
    assert recap == expected == [([48], [5], 0), ([32], [3], 0)]
    rhos = {}
    for m in ms:
        if m.name == "dllm_cache":
            rhos.setdefault((m.prompt_interval[0], m.gen_interval[0]), set()).add(m.transfer_ratio)
            assert m.tag == f"rho{m.transfer_ratio:g}"
    assert rhos == {(10, 5): {0.0, 0.25, 0.5}, (64, 16): {0.0, 0.25, 0.5}}
    sampler = SamplerConfig(**config["evaluation"]["sampler"])
    assert (sampler.noise_dtype, sampler.logits_dtype) == ("bfloat16", "bfloat16")
    header = text.split("seed_everything")[0]
    assert "OUR choice" in header and "local steps" in header and "13 steps" in header
    labels = [f"{p.name} {p.label}" for m in ms for p in m.points()]
    assert len(labels) == len(set(labels))


def test_pareto_study_has_reference_and_tuned_rows_of_every_baseline():
    config, _ = load("experiments/pareto.yaml")
    ms = methods(config)
    for name in ("taylorseer", "recap", "dllm_cache", "ml_cache"):
        mine = [m for m in ms if m.name == name]
        reference = [m for m in mine if m.temperature == 1.0]
        tuned = [m for m in mine if m.temperature != 1.0]
        assert reference and tuned, name
        assert all("+temp" not in m.tag for m in reference), name
        assert all(f"+temp{m.temperature:g}" in m.tag for m in tuned), name
        if name != "dllm_cache":
            assert all(m.tag == "" for m in reference), name     # the method name as published
    recap = next(m for m in ms if m.name == "recap" and m.temperature == 1.0)
    assert any(p.label == "u0/T8/N32" for p in recap.points())   # (0, 8, 24), T' local steps
    rhos = {m.transfer_ratio for m in ms if m.name == "dllm_cache" and m.temperature == 1.0}
    assert rhos == {0.0, 0.25, 0.5}
    for name in ("shortcut", "reuse", "vanilla"):                # kept as they were
        assert any(m.name == name for m in ms)
    labels = [f"{p.name} {p.label}" for m in ms for p in m.points()]
    assert len(labels) == len(set(labels))


def test_maskgit_config_measures_fid_as_table_1_and_states_the_shortcuts_size():
    config, text = load("configs/maskgit.yaml")
    assert config["metrics"]["fid_preprocess"] == "reference_minmax"
    header = text.split("seed_everything")[0]
    assert "5.08M" in header and "reference_minmax" in header
    network = config["model"]["init_args"]["network"]
    module, _, cls = network["class_path"].rpartition(".")
    net = getattr(importlib.import_module(module), cls)(**network["init_args"]).build()
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(5.08e6, abs=5e3)
