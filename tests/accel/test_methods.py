"""The shared contract of every acceleration method, and the reference arithmetic each pins.

Every method of the registry, on the same loop: equals vanilla when its cache is disabled; spends
fewer base FLOPs when enabled, as many as it predicts (checked against torch's FlopCounterMode
over its calls); no NaN; differs from vanilla when enabled; deterministic under a seed; a knob
that cannot apply is a ValueError naming the field. Run on the tiny adapter, and the per-layer
methods also on small random MaskGIT and Lumina-DiMOO models. The step lists are the
references' own numbers (see each module's "Reference facts").
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import migm.accel
from migm.accel.adaptive import AdaptiveShortcut
from migm.accel.dllm_cache import DLLMCache, DLLMCacheConfig
from migm.accel.method import Method, Vanilla
from migm.accel.ml_cache import MLCache, MLCacheConfig
from migm.accel.recap import ReCAP, ReCAPConfig
from migm.accel.refresh import RefreshPlan
from migm.accel.reuse import Reuse, ReuseSource
from migm.accel.shortcut import Shortcut
from migm.accel.taylorseer import TaylorFactors, TaylorSeer, TaylorSeerConfig
from migm.sampling.loop import FeatureSource, VanillaSource, generate
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from test_layers import AttentionFlops, randomise, small_dimoo, small_maskgit  # noqa: E402  (small random adapters)


# --- the references' step selection ------------------------------------------------------------
def dit_taylorseer_full_steps(N: int, interval: int, first_enhance: int) -> list[int]:
    """cal_type.py as the DiT loop runs it: step i counts N-1 .. 0 and a counter of Taylor steps."""
    full, counter = [], 0
    for i in reversed(range(N)):
        if i > N - first_enhance - 1 or counter == interval - 1:
            full.append(N - i)                     # the 1-indexed position of this step
            counter = 0
        else:
            counter += 1
    return full


def test_taylorseer_full_steps_are_the_references():
    assert TaylorSeerConfig(interval=4).full_steps(32) == [1, 2, 6, 10, 14, 18, 22, 26, 30]
    assert TaylorSeerConfig(interval=8).full_steps(64) == [1, 2, 10, 18, 26, 34, 42, 50, 58]
    for N, interval, fe in [(50, 4, 2), (64, 4, 2), (15, 3, 1), (32, 5, 3), (7, 7, 2)]:
        assert TaylorSeerConfig(interval=interval, first_enhance=fe).full_steps(N) == \
            dit_taylorseer_full_steps(N, interval, fe)


def test_taylor_factors_follow_the_references_recursion():
    """derivative_approximation/taylor_formula re-done on dicts, steps counted down as in DiT."""
    g = torch.Generator().manual_seed(0)
    N, fe, order, full = 32, 2, 2, [1, 2, 6, 10]
    ours, ref, activated = TaylorFactors(), {}, [N - 1]
    for s in full:
        value = torch.randn(3, 4, generator=g)
        i = N - s                                                       # DiT's descending index
        activated.append(i)
        if i == N - 1:
            ref = {}
        new = {0: value}
        for k in range(order):
            if ref.get(k) is not None and i < N - fe + 1:
                new[k + 1] = (new[k] - ref[k]) / (activated[-1] - activated[-2])
            else:
                break
        ref = new
        ours.update(value, s - (full[full.index(s) - 1] if s != 1 else 0), order,
                    differentiate=s != 1 and s >= fe)
        assert len(ours.factors) == len(ref)
        for x in (1, 2, 3):                                             # forecast x steps later
            expected = sum(ref[k] * (-x) ** k / [1, 1, 2][k] for k in ref)   # x = step - last (desc)
            assert torch.allclose(ours.forecast(x), expected, atol=1e-5)


def test_recap_groups_are_the_references():
    def reference(N, u, k):                                            # cache_decoding.py l.148-165
        groups, cnt = [], 0
        while cnt < N:
            group = [cnt]
            cnt += 1
            if cnt > u:
                for i in range(k):
                    if cnt + i < N:
                        group.append(cnt + i)
                        cnt += 1
                    else:
                        break
            groups.append([s + 1 for s in group])
        return groups

    (paper40, n40), (paper24, n24) = (ReCAPConfig.from_paper(0, 8, t, reading="total") for t in (40, 24))
    assert (paper40.num_cache_iters, paper24.num_cache_iters, n40, n24) == (4, 2, 40, 24)
    assert [g[0] for g in paper40.groups(40)] == [1, 6, 11, 16, 21, 26, 31, 36]
    assert paper40.groups(40)[0] == [1, 2, 3, 4, 5] and paper24.groups(24)[-1] == [22, 23, 24]
    (local40, m40), (local24, m24) = (ReCAPConfig.from_paper(0, 8, t, reading="local") for t in (40, 24))
    assert (local40.num_cache_iters, local24.num_cache_iters, m40, m24) == (5, 3, 48, 32)
    run_script = ReCAPConfig(pre_full_iters=12, num_cache_iters=1).groups(32)      # its 1st line
    assert len(run_script) == 22 and run_script[11] == [12] and run_script[12] == [13, 14]
    for N, u, k in [(32, 12, 1), (24, 10, 1), (16, 8, 1), (16, 0, 1), (10, 0, 0)]:   # its scripts' k
        assert ReCAPConfig(u, k).groups(N) == reference(N, u, k)
    # for k >= 2 the reference's loop reads schedule[cnt + i] while also advancing cnt, so a
    # group takes every other step's count (its own sum assert then fails); we take the k
    # consecutive steps (test_baseline_references.py transcribes the whole loop and its assert)
    assert reference(40, 0, 4)[0] == [1, 2, 4, 6, 8] and paper40.groups(40)[1] == [6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="no num_cache_iters"):
        ReCAPConfig.from_paper(0, 7, 8, reading="total")


def test_ml_cache_refresh_steps_are_the_references():
    assert MLCacheConfig(0.1, 5, 0.9).refresh_steps(64) == \
        [1, 2, 3, 4, 5, 6, 7, 12, 17, 22, 27, 32, 37, 42, 47, 52, 57, 62]
    assert MLCacheConfig(0.0, 5, 0.9).refresh_steps(64) == list(range(1, 64, 5))
    # the recompute counts: tests/accel/test_baseline_references.py (select_rows, ties included)


def test_dllm_cache_refresh_steps_are_the_references():
    def steps(config, N):
        both = [config.refreshes(i) for i in range(1, N + 1)]
        return [i for i, (p, _) in enumerate(both, 1) if p], [i for i, (_, g) in enumerate(both, 1) if g]

    prompt, gen = steps(DLLMCacheConfig(10, 5), 64)
    assert prompt == [1, 11, 21, 31, 41, 51, 61] and gen == list(range(1, 65, 5))
    assert steps(DLLMCacheConfig(64, 16), 64) == ([1], [1, 17, 33, 49])


# --- the shared contract -------------------------------------------------------------------------


class Measured(FeatureSource):
    """A source whose base FLOPs are counted: every op of its calls, or for a learned shortcut
    (whose own network is not the base) the ops inside the base's `features` calls."""

    def __init__(self, source) -> None:
        super().__init__(source.temperature)
        self.steps, self.step_temperatures = source.steps, source.step_temperatures
        self.source, self.flops = source, 0
        self.whole = getattr(source, "shortcut", None) is None
        if not self.whole:
            model, features = source.model, source.model.features

            def counted(*args):
                with FlopCounterMode(display=False) as linear, AttentionFlops() as attention:
                    out = features(*args)
                self.flops += linear.get_total_flops() + attention.flops
                return out
            model.features = counted

    def close(self) -> None:
        if not self.whole:
            del self.source.model.features          # the class's method again

    def reset(self) -> None:
        self.source.reset()

    def step(self, ctx):
        if not self.whole:
            return self.source.step(ctx)
        with FlopCounterMode(display=False) as linear, AttentionFlops() as attention:
            out = self.source.step(ctx)
        self.flops += linear.get_total_flops() + attention.flops
        return out


def zero_shortcut(model) -> ShortcutNetwork:
    return ShortcutNetwork(ShortcutConfig(feature_dim=model.feature_dim, vocab_size=model.vocab_size,
                                          num_tokens=model.num_tokens)).eval()


# method name -> (enabled method, disabled method or a source factory, [(bad kwargs, field)])
def cases(N: int) -> dict:
    return {
        "vanilla": (lambda: Vanilla(steps=[N]), None, [({"steps": [0]}, "steps")]),
        "reuse": (lambda: Reuse(steps=[N], budgets=[N // 3]),
                  lambda m: ReuseSource(m, RefreshPlan.uniform(N, N)),
                  [({"budgets": [N]}, "budgets")]),
        "shortcut": (lambda: Shortcut(steps=[N], budgets=[N // 3]), None, [({"budgets": [0]}, "budgets")]),
        "adaptive": (lambda: AdaptiveShortcut(steps=[N], budgets=[N // 3], threshold=[0.3]), None,
                     [({"budgets": [N]}, "budgets"), ({"threshold": [-1.0]}, "threshold")]),
        "taylorseer": (lambda: TaylorSeer(steps=[N], interval=[3], order=[2]),
                       lambda: TaylorSeer(steps=[N], interval=[1], order=[2]),
                       [({"interval": [N + 1]}, "interval"), ({"order": [-1]}, "order")]),
        "taylorseer_layers": (lambda: TaylorSeer(steps=[N], interval=[3], order=[1], per_layer=True),
                              lambda: TaylorSeer(steps=[N], interval=[1], per_layer=True),
                              [({"interval": [N + 2], "per_layer": True}, "interval"),
                               ({"first_enhance": N + 1}, "first_enhance")]),
        "recap": (lambda: ReCAP(steps=[N], num_cache_iters=[2]),
                  lambda: ReCAP(steps=[N], num_cache_iters=[0]),
                  [({"pre_full_iters": N}, "pre_full_iters"), ({"num_cache_iters": [N]}, "num_cache_iters"),
                   ({"choice_temperature": -1.0}, "choice_temperature")]),
        "dllm_cache": (lambda: DLLMCache(steps=[N], prompt_interval=[4], gen_interval=[3], transfer_ratio=0.25),
                       lambda: DLLMCache(steps=[N], prompt_interval=[1], gen_interval=[1]),
                       [({"gen_interval": [N + 1]}, "gen_interval"), ({"transfer_ratio": 1.5}, "transfer_ratio")]),
        "ml_cache": (lambda: MLCache(steps=[N], warmup_ratio=[0.1], refresh_interval=[4], cache_ratio=[0.75]),
                     lambda: MLCache(steps=[N], refresh_interval=[1]),
                     [({"warmup_ratio": [0.99]}, "warmup_ratio"), ({"cache_ratio": [1.5]}, "cache_ratio"),
                      ({"refresh_interval": [N]}, "refresh_interval"),
                      ({"cache_ratio": [1.0]}, "cache_ratio")]),
    }


def discovered() -> dict[str, type[Method]]:
    """Every Method subclass in migm.accel, by name: found, not listed, so a new method is one
    module (plus its own tests) and is held to this contract without editing this file."""
    for info in pkgutil.iter_modules(migm.accel.__path__):
        importlib.import_module(f"migm.accel.{info.name}")

    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)
    return {cls.name: cls for cls in walk(Method) if cls.name != Method.name}


def test_every_method_is_found():
    assert set(discovered()) >= {"vanilla", "shortcut", "reuse", "adaptive", "taylorseer", "recap",
                                 "dllm_cache", "ml_cache"}


def case(name: str, N: int):
    """(enabled, disabled, bad knobs) of a named case, or a found method at its defaults."""
    if name in cases(N):
        return cases(N)[name]
    return (lambda: discovered()[name](steps=[N])), None, []


LAYERED = ["taylorseer", "taylorseer_layers", "recap", "dllm_cache", "ml_cache"]
NAMES = sorted(set(cases(12)) | set(discovered()))
COMBOS = [("tiny", name) for name in NAMES] + [(b, n) for b in ("maskgit", "dimoo") for n in LAYERED]
STEPS = {"tiny": 12, "maskgit": 8, "dimoo": 6}


@pytest.fixture(scope="module")
def bases():
    return {"maskgit": small_maskgit(), "dimoo": small_dimoo()}


@pytest.fixture
def tiny(small_migm):
    """small_migm with every weight drawn at 0.3 (its 0.02 init makes features nearly blind to
    the tokens, so no cache could change a sample and the contract could not fail)."""
    model = copy.deepcopy(small_migm)
    randomise(model.transformer, 0)
    return model


def setup(base_name, name, small_migm, bases):
    model = small_migm if base_name == "tiny" else bases[base_name]
    N = STEPS[base_name]
    enabled, disabled, bad = case(name, N)
    return model, N, enabled, disabled, bad


def run(model, method_or_source, N, seed=3, shortcut=None, observers=()):
    source = method_or_source
    if hasattr(source, "points"):
        (point,) = source.points()
        source = point.source(model, shortcut)
    cond = torch.arange(3) % model.num_classes
    measured = Measured(source)
    try:
        out = generate(model, measured, cond, N, sampler=SamplerConfig(cfg_weight=1.5), seed=seed,
                       observers=observers)
    finally:
        measured.close()
    return out, measured


class Finite:
    def __init__(self):
        self.ok = True

    def on_step(self, ctx, features, new_tokens, revealed):
        self.ok &= bool(torch.isfinite(features).all())


@pytest.mark.parametrize("base_name,name", COMBOS)
def test_contract(base_name, name, tiny, bases):
    model, N, enabled, disabled, bad = setup(base_name, name, tiny, bases)
    shortcut = zero_shortcut(model) if type(enabled()).needs_shortcut else None
    vanilla, v_meter = run(model, VanillaSource(model), N)
    finite = Finite()
    out, meter = run(model, enabled(), N, shortcut=shortcut, observers=[finite])
    assert finite.ok, "NaN or inf in the features"
    assert (out.tokens != model.mask_id).all()
    again, _ = run(model, enabled(), N, shortcut=shortcut)
    assert torch.equal(out.tokens, again.tokens), "not deterministic under a seed"
    if disabled is not None:
        made = disabled(model) if name == "reuse" else disabled()
        off, _ = run(model, made, N)
        assert torch.equal(off.tokens, vanilla.tokens), "disabled cache must be vanilla"
    if name == "vanilla":
        return
    assert not torch.equal(out.tokens, vanilla.tokens), "enabled but changes nothing"
    counts = out.counts
    predicted = counts["base_flops_fraction"]
    measured = meter.flops / v_meter.flops
    assert predicted < 1 and measured < 1
    assert predicted == pytest.approx(measured, rel=1e-2), counts


@pytest.mark.parametrize("name", NAMES)
def test_knobs_that_cannot_apply_name_the_field(name):
    enabled, _, bad = case(name, 12)
    cls = type(enabled())
    base = {k: v for k, v in vars(enabled()).items()}
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            cls(**(base | kwargs))


# --- what each method's cache does, exactly ------------------------------------------------------
@pytest.mark.parametrize("base_name", ["tiny", "maskgit", "dimoo"])
def test_partial_paths_recomputing_every_row_are_vanilla(base_name, tiny, bases):
    """dLLM-Cache refreshing all rows between refreshes (rho = 1, Kp = 1) and ML-Cache
    recomputing every row (c = 0) go through their partial code paths yet must be vanilla."""
    model = tiny if base_name == "tiny" else bases[base_name]
    N = STEPS[base_name]
    vanilla, _ = run(model, VanillaSource(model), N)
    for method in (DLLMCache(steps=[N], prompt_interval=[1], gen_interval=[N], transfer_ratio=1.0),
                   MLCache(steps=[N], warmup_ratio=[0.0], refresh_interval=[N - 1], cache_ratio=[0.0])):
        out, _ = run(model, method, N)
        assert out.counts["partial_steps"] == N - 2 if isinstance(method, MLCache) else N - 1
        assert torch.equal(out.tokens, vanilla.tokens), type(method).__name__


class Revealed:
    def __init__(self):
        self.steps = []

    def on_step(self, ctx, features, new_tokens, revealed):
        self.steps.append(revealed.clone())


@pytest.mark.parametrize("base_name", ["tiny", "dimoo"])
def test_recap_reveals_its_group_in_the_full_steps_order(base_name, tiny, bases):
    model = tiny if base_name == "tiny" else bases[base_name]
    N = STEPS[base_name]
    method = ReCAP(steps=[N], num_cache_iters=[2])
    (point,) = method.points()
    source = point.source(model, None)
    chunks, seen, step = [], [], source.step
    source.step = lambda ctx: seen.append(step(ctx)) or seen[-1]

    class Spy:
        def on_step(self, ctx, features, new_tokens, revealed):
            chunks.append((ctx.step, seen[-1].eligible, revealed.clone()))

    out = generate(model, source, torch.arange(3) % model.num_classes, N,
                   sampler=SamplerConfig(cfg_weight=1.5), seed=5, observers=[Spy()])
    groups = method.config(2).groups(N)
    for step, eligible, revealed in chunks:
        (group,) = [g for g in groups if step in g]
        if len(group) > 1:                  # exactly the chunk the full step's ranking fixed
            assert torch.equal(eligible[:3], revealed)
    assert out.counts["base_calls"] == len(groups)
    assert out.counts["local_steps"] == N - len(groups)


def test_loop_restricts_reveals_to_eligible_positions(small_migm):
    """A source may narrow the positions a step fills (ReCAP's chunks); the count stays the
    schedule's, and a source that leaves too few is an error, not a silent shortfall."""
    class Leftmost(VanillaSource):          # only the n + 2 leftmost masked positions (or `spare`)
        spare = 2

        def step(self, ctx):
            n = ctx.schedule[ctx.step - 1] - ctx.schedule[ctx.step]
            masked = ctx.tokens == small_migm.mask_id
            out = super().step(ctx)
            out.eligible = masked & (masked.cumsum(1) <= n + self.spare)
            self.seen.append(out.eligible.clone())
            return out

    class Seen:
        def __init__(self, source):
            self.source, self.rows = source, []

        def on_step(self, ctx, features, new_tokens, revealed):
            self.rows.append((revealed, self.source.seen[-1][:4], ctx.schedule))

    source = Leftmost(small_migm)
    source.seen = []
    seen = Seen(source)
    generate(small_migm, source, torch.arange(4), 12, seed=1, observers=[seen])
    for i, (revealed, eligible, schedule) in enumerate(seen.rows, 1):
        assert (revealed.sum(1) == schedule[i - 1] - schedule[i]).all()
        assert not (revealed & ~eligible).any()
    source.spare = -1
    with pytest.raises(ValueError, match="eligible"):
        generate(small_migm, source, torch.arange(4), 12, seed=1)

    class Split(VanillaSource):             # the CFG branches of one sample must agree
        def step(self, ctx):
            out = super().step(ctx)
            out.eligible = torch.ones_like(ctx.tokens, dtype=torch.bool)
            out.eligible[len(ctx.tokens) // 2:, 0] = False
            return out

    with pytest.raises(ValueError, match="CFG branches"):
        generate(small_migm, Split(small_migm), torch.arange(4), 12, seed=1)
