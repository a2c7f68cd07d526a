"""Latency at the real depth composed from two shallow copies of the base (evaluation/speed.py):
exact where every layer costs the same (a fake clock that only layers, embeddings, the shortcut
and the decoder advance), and the `speed` command through the shipped Table 1 and 2 configs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from migm.accel.method import Vanilla
from migm.accel.ml_cache import MLCache
from migm.accel.shortcut import Shortcut
from migm.cli import REPO_ROOT, main
from migm.evaluation import latency, speed, step_clock
from migm.evaluation.grid import GridConfig
from migm.evaluation.speed import SpeedStudy, build_models, random_shortcut
from migm.models.maskgit import MaskGITConfig
from migm.shortcut.maskgit_official import MaskGITShortcutConfig
from migm.gpu_check import SMALL
from small_bases import DIMOO_64, MASKGIT_64

LAYER_MS, EMBED_MS, SHORTCUT_MS, DECODE_MS = 10.0, 3.0, 2.0, 50.0


class Clock:
    """time.perf_counter for speed.py and latency.py: seconds advanced only by `spend`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float):
        def hook(*_):
            self.now += ms / 1000
        return hook


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    for module in (step_clock, latency):
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=c))
    return c


def test_composed_latency_is_the_whole_runs_where_layers_cost_the_same(clock):
    """Every block costs LAYER_MS, each embedding EMBED_MS, a shortcut call SHORTCUT_MS, a decode
    DECODE_MS: composed from depths 1 and 2, depth 4 is what running depth 4 measures, and each
    number is the plan's arithmetic."""
    config = MaskGITConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in MASKGIT_64.items()})
    models = build_models("maskgit", config, (1, 2), whole=True)
    for model in models.models.values():
        for block in model.transformer.blocks:
            block.register_forward_hook(clock.spend(LAYER_MS))
        model.transformer.tok_emb.register_forward_hook(clock.spend(EMBED_MS))
        model.vqgan.register_forward_hook(clock.spend(DECODE_MS))
    network = MaskGITShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=64, heads=4)
    shortcut = random_shortcut(network)
    shortcut.register_forward_hook(clock.spend(SHORTCUT_MS))
    grid = GridConfig(methods=[Vanilla(steps=[8, 15]), Shortcut(steps=[15], budgets=[7], plan="official")],
                      reference_steps=15)
    batch = 2
    study = SpeedStudy(models, shortcut, grid, batch, whole=["vanilla N8", "shortcut N15/B7"], rounds=2)
    rows = {r["label"]: r for r in study.rows(study.measure())}

    full = 4 * LAYER_MS + EMBED_MS                       # one base call at depth 4
    v8, v15 = 8 * full + DECODE_MS, 15 * full + DECODE_MS
    s = rows["N15/B7"]
    assert (s["base_calls"], s["shortcut_calls"]) == (7, 8)
    short = 7 * full + 8 * SHORTCUT_MS + DECODE_MS
    assert rows["N8"]["latency_ms_per_image"] == pytest.approx(v8 / batch)
    assert rows["N15"]["latency_ms_per_image"] == pytest.approx(v15 / batch)
    assert s["latency_ms_per_image"] == pytest.approx(short / batch)
    assert s["speedup"] == pytest.approx(v15 / short) and rows["N8"]["speedup"] == pytest.approx(v15 / v8)
    for row in (rows["N8"], s):
        assert row["composed_over_measured"] == pytest.approx(1.0) and row["within_5pct"]
    assert s["base_call_ms"] == pytest.approx(4 * LAYER_MS)
    assert s["fixed_step_ms"] == pytest.approx(EMBED_MS)
    assert s["shortcut_call_ms"] == pytest.approx(SHORTCUT_MS - EMBED_MS)   # a step less the fixed
    assert s["step_ms"] == pytest.approx({"full": full, "shortcut_calls": SHORTCUT_MS})
    assert s["step_counts"] == {"full": 7, "shortcut_calls": 8}
    # ideal: only model calls cost time, the reference's base call for every full step
    assert s["ideal_speedup"] == pytest.approx(15 * 40 / (7 * 40 + 8 * (SHORTCUT_MS - EMBED_MS)))
    # less the decode every point pays once after its steps
    assert s["generation_speedup"] == pytest.approx(15 * full / (7 * full + 8 * SHORTCUT_MS))
    assert s["generation_over_ideal"] == pytest.approx(s["generation_speedup"] / s["ideal_speedup"])
    assert s["composed_from"] == "depths 1,2" and s["depth"] == 4 and s["weights"] == "random"
    # weights grow one layer at a time: depth 4's are depth 1's plus three layers
    w = {d: speed.weights_mib(m) for d, m in models.models.items()}
    assert models.weights_mib[4] == pytest.approx(w[4]) == pytest.approx(w[1] + 3 * (w[2] - w[1]))


def test_one_layer_composition_checked_at_a_smaller_depth_is_exact_where_layers_cost_the_same(clock):
    """Depths 0 and 1 (no layer, one real layer): `composed_from: one_layer`. The whole run is
    checked at depth 2 (`check_depth`), and both the composition to 2 and to the base's 4 are
    the plan's arithmetic."""
    config = MaskGITConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in MASKGIT_64.items()})
    models = build_models("maskgit", config, (0, 1), whole=True, check_depth=2)
    assert sorted(models.models) == [0, 1, 2] and models.composed_from == "one_layer"
    for model in models.models.values():
        for block in model.transformer.blocks:
            block.register_forward_hook(clock.spend(LAYER_MS))
        model.transformer.tok_emb.register_forward_hook(clock.spend(EMBED_MS))
        model.vqgan.register_forward_hook(clock.spend(DECODE_MS))
    grid = GridConfig(methods=[Vanilla(steps=[8, 15])], reference_steps=15)
    study = SpeedStudy(models, None, grid, 1, whole=["vanilla N8"], rounds=2)
    rows = {r["label"]: r for r in study.rows(study.measure())}
    n8 = rows["N8"]
    assert n8["composed_from"] == "one_layer" and n8["measured_depth"] == 2
    assert n8["latency_ms_per_image"] == pytest.approx(8 * (4 * LAYER_MS + EMBED_MS) + DECODE_MS)
    assert n8["measured_latency_ms_per_image"] == pytest.approx(8 * (2 * LAYER_MS + EMBED_MS) + DECODE_MS)
    assert n8["composed_over_measured"] == pytest.approx(1.0)
    assert n8["composed_over_measured_rounds"] == pytest.approx([1.0, 1.0])     # one per round
    assert n8["fixed_step_ms"] == pytest.approx(EMBED_MS) and n8["base_call_ms"] == pytest.approx(4 * LAYER_MS)
    assert "measured_peak_memory_mib" in n8 and "composed_peak_at_measured_depth_mib" in n8
    # vanilla keeps nothing between steps: its estimate is the weights and one step's own
    assert n8["held_mib"] == 0 and n8["estimated_peak_memory_mib"] == pytest.approx(
        models.weights_mib[4] + study.transient_mib, abs=0.1)
    with pytest.raises(ValueError, match=r"speed.check_depth: .*\(1 < depth <= 4\), got 1"):
        build_models("maskgit", config, (0, 1), whole=True, check_depth=1)


def test_each_rounds_ratio_is_its_own_whole_run_against_its_own_composition(clock):
    """The machine slows from round to round, but only while the whole run at the check depth
    runs (DRIFT ms more an embedding per earlier call of it): each round's composed/measured is
    that round's, in round order, and the median sits between them."""
    drift = 5.0
    config = MaskGITConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in MASKGIT_64.items()})
    models = build_models("maskgit", config, (0, 1), whole=True, check_depth=2)
    for model in models.models.values():
        for block in model.transformer.blocks:
            block.register_forward_hook(clock.spend(LAYER_MS))
        model.transformer.tok_emb.register_forward_hook(clock.spend(EMBED_MS))
        model.vqgan.register_forward_hook(clock.spend(DECODE_MS))
    calls = {"n": 0}

    def slower(*_):                     # the g-th generation at depth 2 (0: warm-up) pays g DRIFT a step
        clock.now += drift * (calls["n"] // 8) / 1000
        calls["n"] += 1

    models.models[2].transformer.tok_emb.register_forward_hook(slower)
    grid = GridConfig(methods=[Vanilla(steps=[8, 15])], reference_steps=15)
    study = SpeedStudy(models, None, grid, 1, whole=["vanilla N8"], rounds=3)
    n8 = {r["label"]: r for r in study.rows(study.measure())}["N8"]
    composed = 8 * (2 * LAYER_MS + EMBED_MS) + DECODE_MS
    wholes = [composed + 8 * drift * g for g in (1, 2, 3)]
    assert calls["n"] == 4 * 8                                 # one warm-up and three timed runs
    assert n8["composed_over_measured_rounds"] == pytest.approx([composed / w for w in wholes])
    assert n8["composed_over_measured"] == pytest.approx(composed / wholes[1])
    assert n8["measured_latency_ms_per_image"] == pytest.approx(wholes[1])
    assert not n8["within_5pct"]                               # the median round: 234 ms against 314


def test_plain_full_steps_share_one_layer_cost_and_a_caches_keep_their_own(clock):
    """While the shortcut point runs at depth 2 its layers cost EXTRA more (as if the machine
    slowed then): its own full steps read LAYER_MS + 2 EXTRA a layer, vanilla's LAYER_MS, and
    both points compose their full steps with the mean over all 22 plain full steps. ML-Cache's
    full steps store a cache, so they keep their own readings: exact against its whole run."""
    extra = 4.0
    config = MaskGITConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in MASKGIT_64.items()})
    models = build_models("maskgit", config, (1, 2), whole=True)
    slow = {"on": False}
    for model in models.models.values():
        for block in model.transformer.blocks:       # the MLP: the cache's per-layer path runs it too
            block.mlp.register_forward_hook(lambda *_: setattr(clock, "now", clock.now + (
                LAYER_MS + extra * slow["on"]) / 1000))
        model.transformer.tok_emb.register_forward_hook(clock.spend(EMBED_MS))
        model.vqgan.register_forward_hook(clock.spend(DECODE_MS))
    shortcut = random_shortcut(MaskGITShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=64, heads=4))
    shortcut.register_forward_hook(clock.spend(SHORTCUT_MS))
    grid = GridConfig(methods=[Vanilla(steps=[15]), Shortcut(steps=[15], budgets=[7], plan="official"),
                               MLCache(steps=[15], warmup_ratio=[0.1], refresh_interval=[5])],
                      reference_steps=15)
    study = SpeedStudy(models, shortcut, grid, 1, whole=["ml_cache N15/w0.1/r5/c0.9"], rounds=2)
    generate = study.generate

    def timed(point, depth, compiled=False):
        slow["on"] = point.name == "shortcut" and depth == 2
        try:
            return generate(point, depth, compiled)
        finally:
            slow["on"] = False

    study.generate = timed
    rows = {r["method"]: r for r in study.rows(study.measure())}
    v, s, m = rows["vanilla"], rows["shortcut"], rows["ml_cache"]
    assert v["full_layer_ms"] == pytest.approx(LAYER_MS) and s["full_layer_ms"] == pytest.approx(LAYER_MS + 2 * extra)
    pooled = (15 * LAYER_MS + 7 * (LAYER_MS + 2 * extra)) / 22
    assert v["pooled_full_layer_ms"] == pytest.approx(pooled) == s["pooled_full_layer_ms"]
    full = LAYER_MS + EMBED_MS + 3 * pooled              # depth 1's step, three pooled layers more
    v15, short = 15 * full + DECODE_MS, 7 * full + 8 * SHORTCUT_MS + DECODE_MS
    assert v["latency_ms_per_image"] == pytest.approx(v15) and s["latency_ms_per_image"] == pytest.approx(short)
    assert s["speedup"] == pytest.approx(v15 / short) and s["base_call_ms"] == pytest.approx(4 * pooled)
    assert "pooled_full_layer_ms" not in m and m["full_layer_ms"] == pytest.approx(LAYER_MS)
    assert m["composed_over_measured"] == pytest.approx(1.0)


def test_a_shortcut_step_is_the_mean_of_its_two_readings_not_extrapolated():
    """A full step extrapolates along the line through its two depths; a shortcut step runs no
    base layer, so the difference of its readings is noise and is not multiplied by the scale."""
    composed = speed.compose([10.0, 5.0, 4.0], [20.0, 7.0, 4.5], ["full", "shortcut_calls", "forecasts"], 31.0)
    assert composed == pytest.approx([10 + 31 * 10, 6.0, 4.0 + 31 * 0.5])


def test_held_bytes_counts_each_kept_tensor_once_and_no_weights():
    """What a source keeps between steps: tensors in its attributes, lists, dicts and plain
    objects, a view of a kept tensor not twice, a module's weights not at all."""
    import torch

    class Cache:
        def __init__(self):
            self.k = torch.zeros(2, 3, 5)                  # 30 floats
            self.rows = [torch.zeros(4, dtype=torch.bfloat16), {"v": torch.zeros(2, 2)}]
            self.view = self.k[0]                          # the same storage as k
            self.model = torch.nn.Linear(100, 100)         # weights: counted as weights
            self.steps, self.name = 7, "dllm"

    assert step_clock.held_bytes(Cache()) == 30 * 4 + 4 * 2 + 4 * 4


def test_a_depth_outside_the_base_or_an_unknown_point_is_named():
    config = MaskGITConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in MASKGIT_64.items()})
    with pytest.raises(ValueError, match=r"speed.depths: .* <= 4"):
        build_models("maskgit", config, (2, 5), whole=False)
    models = build_models("maskgit", config, (1, 2), whole=False)
    grid = GridConfig(methods=[Vanilla(steps=[8])], reference_steps=8)
    with pytest.raises(ValueError, match="speed.whole: 'vanilla N9' is not a point"):
        SpeedStudy(models, None, grid, 1, whole=["vanilla N9"])
    with pytest.raises(ValueError, match="speed.points: 'shortcut N8/B2' is not a point"):
        SpeedStudy(models, None, grid, 1, only=["shortcut N8/B2"])


@pytest.mark.parametrize("study, base_config, network", [
    ("maskgit.yaml", MASKGIT_64, {"feature_dim": 32, "vocab_size": 16, "num_tokens": 64, "heads": 4}),
    ("dimoo.yaml", DIMOO_64, {"feature_dim": 32, "vocab_size": 16, "num_tokens": 64, "heads": 4}),
])
def test_speed_runs_every_point_of_the_shipped_study(tmp_path, study, base_config, network):
    """`migm speed --study configs/<table>.yaml`, sizes overridden: a row per grid point, random
    weights, composed from two depths, the whole run of one point beside its composition."""
    out = tmp_path / "speed.jsonl"
    main(["speed", "--study", str(REPO_ROOT / "configs" / study), "--base_config", json.dumps(base_config),
          "--network", json.dumps(network), "--batch", "1", "--rounds", "1", "--warmup", "0",
          "--whole", "[vanilla N13]", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from migm.commands import study_sections
    grid = study_sections([str(REPO_ROOT / "configs" / study)])["evaluation"]
    assert [(r["method"], r["label"]) for r in rows] == [(p.name, p.label) for p in grid.points()]
    for r in rows:
        assert r["weights"] == "random" and r["composed_from"] == "depths 1,2"
        assert r["depth"] == base_config.get("depth", base_config.get("n_layers"))
        assert sum(r["step_counts"].values()) == r["steps"]
        assert r["reference_steps"] == grid.reference_steps
        assert "paper_speedup" not in r and "ours_over_paper" not in r   # 64 tokens: not the paper's base
    assert out.with_suffix(".md").read_text().count("\n") == len(rows) + 2
    assert out.with_suffix(".png").stat().st_size > 1000
    (whole,) = [r for r in rows if "measured_latency_ms_per_image" in r]
    assert whole["label"] == "N13" and whole["composed_over_measured"] > 0
    if study == "dimoo.yaml":                 # every baseline's cached step is a kind of its own
        kinds = set().union(*(r["step_counts"] for r in rows))
        assert {"full", "shortcut_calls", "partial_steps", "local_steps", "forecasts"} <= kinds


def test_one_layer_on_the_shipped_dimoo_study_names_each_cached_step(tmp_path):
    """`--depths "[0, 1]"`: with no layer a cache is empty (dLLM-Cache takes every step for its
    first, full one); the step kinds come from the one-layer run, so cached steps keep their
    name, and the whole run at the check depth 2 stands beside its composition."""
    out = tmp_path / "speed.jsonl"
    main(["speed", "--study", str(REPO_ROOT / "configs" / "dimoo.yaml"), "--base_config", json.dumps(DIMOO_64),
          "--network", json.dumps(SMALL["dimoo"]["network"]),
          "--batch", "1", "--rounds", "1", "--warmup", "0", "--depths", "[0, 1]", "--check_depth", "2",
          "--points", "[dllm_cache N64/Kp10/Kr5 rho0]", "--whole", "[dllm_cache N64/Kp10/Kr5 rho0]",
          "--out", str(out)])
    reference, dllm = [json.loads(line) for line in out.read_text().splitlines()]
    assert reference["label"] == "N64" and reference["step_counts"] == {"full": 64}
    assert dllm["composed_from"] == "one_layer" and dllm["measured_depth"] == 2
    assert dllm["step_counts"]["partial_steps"] > 0 and sum(dllm["step_counts"].values()) == 64
    assert dllm["held_mib"] > 0 and dllm["estimated_peak_memory_mib"] > dllm["weights_mib"]


def test_ml_caches_shallower_depth_repeats_the_rows_the_deeper_one_recomputed():
    """With no layer every masked row has the same features, so ML-Cache's ties would make its
    partial steps recompute most rows at depth 0 and far fewer at depth 1, and depth 1 minus
    depth 0 would not be one layer's work. The study runs depth 1 first and depth 0 repeats its
    counts; the whole run at the check depth keeps its own."""
    from migm.commands import _base_config, study_sections
    sections = study_sections([str(REPO_ROOT / "configs" / "dimoo.yaml")])
    config = _base_config("dimoo", {**(sections["model"].get("base_config") or {}), **DIMOO_64})
    models = build_models("dimoo", config, (0, 1), whole=True, check_depth=2)
    grid = GridConfig(methods=[Vanilla(steps=[16]), MLCache(steps=[16], warmup_ratio=[0.0],
                                                            refresh_interval=[5], cache_ratio=[0.9])],
                      reference_steps=16)
    study = SpeedStudy(models, None, grid, 1, whole=["ml_cache N16/w0/r5/c0.9"], rounds=2, warmup=0)
    point = study.points[1]
    assert study.runs(point) == [1, 0, 2]
    left_alone = study.generate(point, 0)[0].work            # nothing recorded yet: its own ties
    measured = study.measure()
    records = measured["records"]
    for r in range(2):
        one, none = records[(point, 1)][r].work, records[(point, 0)][r].work
        assert one == none and len(one) == 12                # 16 steps, 4 of them full
    assert left_alone != records[(point, 1)][0].work         # the repeat is what made them equal
    row = study.rows(measured)[1]
    assert row["rows_per_partial_step"] == pytest.approx(sum(records[(point, 1)][0].work) / 12)


def test_speed_refuses_the_embedded_default(tmp_path):
    with pytest.raises(ValueError, match="speed: .*tiny.yaml has base_kind 'tiny'"):
        main(["speed", "--study", str(REPO_ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path / "x")])


def test_the_papers_number_stands_beside_a_base_of_the_papers_size_only():
    """A MaskGIT of 32x32 = 1,024 tokens (Table 1's; narrow and shallow, so it runs here) gets
    the paper's speedup and ours over it; the same base at 16x16 (MaskGIT-256's grid) gets none."""
    rows = {}
    for grid_size in (32, 16):
        fields = {**MASKGIT_64, "grid_size": grid_size, "resolution": 2 * grid_size,
                  "attn_resolutions": [grid_size], "depth": 3}
        config = MaskGITConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        models = build_models("maskgit", config, (1, 2), whole=False)
        grid = GridConfig(methods=[Vanilla(steps=[8, 15])], reference_steps=15)
        study = SpeedStudy(models, None, grid, 1, rounds=1, warmup=0)
        rows[grid_size] = {r["label"]: r for r in study.rows(study.measure())}
    n8 = rows[32]["N8"]
    assert n8["paper_speedup"] == 1.92 and n8["paper_table"] == "Table 1"
    assert n8["ours_over_paper"] == pytest.approx(n8["speedup"] / 1.92)
    assert not any(k.startswith("paper") or k == "ours_over_paper" for k in rows[16]["N8"])


def test_every_point_of_the_shipped_tables_stands_beside_the_papers_number():
    """Table 1's and 2's speed columns as the paper prints them, for every point of the configs."""
    from migm.commands import study_sections
    from migm.evaluation.paper_tables import paper_row
    expected = {("maskgit", "shortcut", "N32/B9"): 1.36, ("maskgit", "vanilla", "N8"): 1.92,
                ("dimoo", "shortcut", "N64/B14"): 4.01, ("dimoo", "recap", "u0/T8/N32"): 4.26,
                ("dimoo", "dllm_cache", "N64/Kp64/Kr16 rho0.25"): 1.62,
                ("dimoo", "ml_cache", "N64/w0/r5/c0.9"): 2.54}
    for (kind, method, label), speedup in expected.items():
        assert paper_row(kind, method, label)["paper_speedup"] == speedup
        tokens = {"maskgit": 1024, "dimoo": 4096}[kind]          # the paper's bases: 32x32, 64x64
        assert paper_row(kind, method, label, tokens)["paper_speedup"] == speedup
        assert paper_row(kind, method, label, tokens // 4) == {}   # MaskGIT-256, a smaller DiMOO
    for kind in ("maskgit", "dimoo"):
        grid = study_sections([str(REPO_ROOT / "configs" / f"{kind}.yaml")])["evaluation"]
        missing = [p.label for p in grid.points() if not paper_row(kind, p.name, p.label)]
        assert not missing, (kind, missing)
