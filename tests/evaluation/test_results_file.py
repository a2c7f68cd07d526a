"""results.jsonl as a resumable record: rows kept per point, refused for another config."""

from __future__ import annotations

import json

import pytest
import torch

from migm.evaluation.results_file import CONFIG, RESULTS, ResultsFile, config_hash, flatten, plain
from migm.sampling.sampler import SamplerConfig

CONFIG_A = {"evaluation": {"reference_steps": 8, "sampler": SamplerConfig()}, "data": {"test_samples": 40}}


def row(label: str, fid: float) -> dict:
    return {"method": "vanilla", "label": label, "steps": int(label[1:]), "fid": fid}


def test_flatten_gives_one_dotted_key_per_setting():
    flat = flatten(plain({"a": {"b": 1, "c": [1, 2]}, "m": [{"class_path": "X", "init_args": {"steps": [4]}}]}))
    assert flat == {"a.b": 1, "a.c": [1, 2], "m.0.class_path": "X", "m.0.init_args.steps": [4]}
    assert flatten(plain(SamplerConfig()))["init_args.temperature"] == 1.0


def test_rows_added_are_kept_and_come_back_on_reopening(tmp_path):
    results = ResultsFile(tmp_path, CONFIG_A)
    results.add(0, row("N2", 10.0), torch.zeros(3, 1, 4, 4), ["class 0, seed 0 image 0"] * 3)
    results.add(1, row("N4", 5.0), None)
    results.close()
    lines = [json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert [r["label"] for r in lines] == ["N2", "N4"]
    assert {r["config_hash"] for r in lines} == {config_hash(flatten(plain(CONFIG_A)))}
    again = ResultsFile(tmp_path, CONFIG_A)
    assert again.finished("vanilla N2")["fid"] == 10.0 and again.finished("vanilla N8") is None
    images, captions = again.samples(0)
    assert torch.equal(images, torch.zeros(3, 1, 4, 4)) and captions == ["class 0, seed 0 image 0"] * 3
    assert again.samples(1) is None
    again.close()


def test_another_config_is_refused_naming_the_keys_that_differ_and_nothing_changes(tmp_path):
    results = ResultsFile(tmp_path, CONFIG_A)
    results.add(0, row("N2", 10.0), None)
    results.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / RESULTS, tmp_path / CONFIG)}
    other = {"evaluation": {"reference_steps": 16, "sampler": SamplerConfig(temperature=2.0)},
             "data": {"test_samples": 40}}
    with pytest.raises(ValueError) as err:
        ResultsFile(tmp_path, other)
    message = str(err.value)
    assert "\n" not in message and "holds rows of another config" in message
    assert "evaluation.reference_steps: 8 there, 16 now" in message
    assert "evaluation.sampler.init_args.temperature: 1.0 there, 2.0 now" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / RESULTS, tmp_path / CONFIG)} == before
    ResultsFile(tmp_path, CONFIG_A).close()          # the refusal released the lock


def test_resume_false_starts_over(tmp_path):
    results = ResultsFile(tmp_path, CONFIG_A)
    results.add(0, row("N2", 10.0), torch.ones(1))
    results.close()
    fresh = ResultsFile(tmp_path, {"other": 1}, resume=False)
    assert fresh.rows == {} and not (tmp_path / RESULTS).exists() and fresh.samples(0) is None
    fresh.close()


def test_rows_without_their_config_or_a_broken_line_are_named(tmp_path):
    (tmp_path / RESULTS).write_text(json.dumps(row("N2", 1.0)) + "\n")
    with pytest.raises(ValueError, match="does not say which config wrote it"):
        ResultsFile(tmp_path, CONFIG_A)
    (tmp_path / RESULTS).unlink()
    ResultsFile(tmp_path, CONFIG_A).close()
    (tmp_path / RESULTS).write_text(json.dumps(row("N2", 1.0)) + "\n{\"method\": \n")
    with pytest.raises(ValueError, match=rf"{RESULTS}, line 2: not a JSON row"):
        ResultsFile(tmp_path, CONFIG_A)


def test_completing_replaces_quality_rows_by_timed_ones_in_grid_order(tmp_path):
    results = ResultsFile(tmp_path, CONFIG_A)
    results.add(1, row("N4", 5.0), None)
    results.add(0, row("N2", 10.0), None)
    results.complete([{**row("N2", 10.0), "latency_ms_per_image": 1.0},
                      {**row("N4", 5.0), "latency_ms_per_image": 2.0}])
    lines = [json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert [(r["label"], r["latency_ms_per_image"]) for r in lines] == [("N2", 1.0), ("N4", 2.0)]
    results.close()


def test_a_setting_added_since_at_null_keeps_the_rows_and_restamps_them(tmp_path):
    results = ResultsFile(tmp_path, CONFIG_A)
    results.add(0, row("N2", 10.0), None)
    results.close()
    grown = {**CONFIG_A, "evaluation": {**CONFIG_A["evaluation"], "precision": None}}
    again = ResultsFile(tmp_path, grown)
    assert again.finished("vanilla N2")["fid"] == 10.0
    again.add(1, row("N4", 5.0), None)
    hashes = {json.loads(line)["config_hash"] for line in (tmp_path / RESULTS).read_text().splitlines()}
    assert hashes == {again.hash} != {config_hash(flatten(plain(CONFIG_A)))}
    again.close()
    with pytest.raises(ValueError, match="evaluation.precision: null there, \"16-mixed\" now"):
        ResultsFile(tmp_path, {**CONFIG_A, "evaluation": {**CONFIG_A["evaluation"], "precision": "16-mixed"}})
