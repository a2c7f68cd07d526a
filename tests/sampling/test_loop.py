import pytest
import torch

from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig
from migm.sampling.schedule import reveal_counts


class Recorder:
    def __init__(self):
        self.steps = []

    def on_step(self, ctx, features, new_tokens, revealed):
        self.steps.append((ctx.step, ctx.tokens.clone(), features.shape, new_tokens.clone(), revealed.clone()))


@pytest.mark.parametrize("steps", [1, 4, 12, 49])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_reveals_exactly_the_schedule_and_never_changes_a_token(small_migm, steps, cfg):
    cond = torch.tensor([0, 3, 9, 5])
    rec = Recorder()
    out = generate(small_migm, VanillaSource(small_migm), cond, steps,
                   sampler=SamplerConfig(cfg_weight=cfg), seed=1, observers=[rec])
    expected = reveal_counts(small_migm.num_tokens, steps)
    branches = 2 if cfg > 0 else 1
    prev = torch.full((4, 49), small_migm.mask_id)
    for (i, ctx_tokens, fshape, new, revealed), n in zip(rec.steps, expected):
        assert fshape == (branches * 4, 49, small_migm.feature_dim)
        assert torch.equal(ctx_tokens[:4], prev)                       # source saw x_{i-1}
        assert (revealed.sum(1) == n).all()                            # scheduled count, every row
        assert (prev[revealed] == small_migm.mask_id).all()            # only masked positions filled
        assert torch.equal(new[~revealed], prev[~revealed])            # nothing else changes
        prev = new
    assert (out.tokens != small_migm.mask_id).all()
    assert torch.equal(out.tokens, prev)
    assert out.decode_step.min() == 1 and out.decode_step.max() == steps
    assert out.counts == {"base_calls": steps, "shortcut_calls": 0, "base_flops_fraction": 1.0}


def test_deterministic_under_seed_and_seed_matters(small_migm):
    cond = torch.arange(6) % 10
    a = generate(small_migm, VanillaSource(small_migm), cond, 8, seed=3).tokens
    b = generate(small_migm, VanillaSource(small_migm), cond, 8, seed=3).tokens
    c = generate(small_migm, VanillaSource(small_migm), cond, 8, seed=4).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)




def test_bad_conditions_and_steps_name_the_field(small_migm):
    src = VanillaSource(small_migm)
    with pytest.raises(ValueError, match="class id out of range"):
        generate(small_migm, src, torch.tensor([0, 10]), 4)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        generate(small_migm, src, torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="cfg_weight"):
        SamplerConfig(cfg_weight=-1)


def test_gumbel_noise_is_finite_and_standard():
    from migm.sampling.sampler import gumbel
    g = gumbel(torch.Size([200_000]), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.isfinite(g).all()
    assert g.mean().item() == pytest.approx(0.5772, abs=0.01)       # Euler-Mascheroni constant


class _HotVanilla(VanillaSource):
    """The base's features, reported as a skipped step at temperature 2 every step."""

    def __init__(self, model):
        super().__init__(model)
        self.temperature = 2.0

    def step(self, ctx):
        out = super().step(ctx)
        out.full = False
        return out


def test_source_step_temperature_divides_the_logits(small_migm):
    """A skipped step's temperature must act exactly like the sampler's temperature."""
    cond = torch.arange(6) % 10
    a = generate(small_migm, _HotVanilla(small_migm), cond, 6, seed=4)
    b = generate(small_migm, VanillaSource(small_migm), cond, 6, seed=4, sampler=SamplerConfig(temperature=2.0))
    c = generate(small_migm, VanillaSource(small_migm), cond, 6, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_autocast_covers_the_networks_of_a_step_and_not_the_sampler(small_migm, monkeypatch):
    """As a reference's torch.autocast wraps its forward: the features, the head and the guidance
    under autocast; the sampler gets the logits as they are and computes in its logits_dtype."""
    import migm.sampling.loop as loop
    from tests.conftest import record_steps
    seen = []
    sample_step = loop.sample_step

    def spy(logits, *args, **kwargs):
        seen.append((logits.dtype, torch.is_autocast_cpu_enabled()))
        return sample_step(logits, *args, **kwargs)
    monkeypatch.setattr(loop, "sample_step", spy)
    source = VanillaSource(small_migm)
    outputs = record_steps(source)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    result = generate(small_migm, source, torch.arange(4), 4, sampler=SamplerConfig(cfg_weight=1.0),
                      autocast=bf16)
    assert len(outputs) == 4       # (features leave a final LayerNorm, which autocast keeps fp32)
    assert seen == [(torch.bfloat16, False)] * 4    # head and guidance in bf16, sampled outside
    assert (result.tokens < small_migm.mask_id).all()
    seen.clear()
    generate(small_migm, VanillaSource(small_migm), torch.arange(4), 4, sampler=SamplerConfig(cfg_weight=1.0))
    assert seen == [(torch.float32, False)] * 4                 # no autocast: fp32 throughout
