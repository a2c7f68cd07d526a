"""The sampler's reference options against plain re-implementations of the references' formulas.

Each reference step is written out here from its source (valeoai/Maskgit-pytorch@674ef1d
Trainer/vit.py `sample`; Alpha-VLLM/Lumina-DiMOO generators/image_generation_generator.py and
utils/generation_utils.py), without calling our sampler. Both sides get the same noise: the
reference draws its token from Categorical(softmax), which a Gumbel-max draw realises exactly, and
adds Gumbel noise to the confidences, so the test feeds the reference formula the two Gumbel
tensors our sampler draws, in the order it draws them. Drawn tokens and kept positions must then
agree exactly.
"""

import pytest
import torch

from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig, guide, gumbel, sample_step
from migm.sampling.schedule import reveal_counts

B, M, K = 3, 40, 16


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(B, M, K, generator=g), 3 * torch.randn(B, M, K, generator=g)


def _noise(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Gumbel tensors sample_step draws from a generator seeded `seed`, in its order."""
    g = torch.Generator().manual_seed(seed)
    return gumbel(torch.Size([B, M, K]), g, torch.device("cpu")), gumbel(torch.Size([B, M]), g,
                                                                          torch.device("cpu"))


def maskgit_reference_step(cond, uncond, w, sm_temp, r_temp, indice, steps, t, g_draw, g_conf):
    """Trainer/vit.py sample(), one iteration with randomize="linear" (indice is 0-based)."""
    _w = w * (indice / (steps - 1))
    logit = (1 + _w) * cond - _w * uncond
    prob = torch.softmax(logit * sm_temp, -1)
    pred_code = (torch.log(prob) + g_draw).argmax(-1)               # = Categorical(probs=prob)
    conf = torch.gather(prob, 2, pred_code.unsqueeze(-1)).squeeze(-1)
    ratio = indice / (steps - 1)
    conf = torch.log(conf) + r_temp * g_conf * (1 - ratio)
    chosen = torch.topk(conf, k=t, dim=-1).indices                 # all positions are masked here
    return pred_code, torch.zeros(B, M, dtype=torch.bool).scatter_(1, chosen, True)


def dimoo_reference_step(cond, uncond, cfg_scale, temperature, keep_n, g_draw, g_conf):
    """generate_image(), one iteration: gumbel_max_sample and mask_by_random_topk."""
    logits = (1 + cfg_scale) * cond - cfg_scale * uncond
    sampled = (logits / temperature + g_draw).argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    conf = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    confidence = torch.log(conf.clamp_min(1e-20)) + temperature * g_conf
    cut_off = torch.sort(confidence, dim=-1).values.gather(1, torch.full((B, 1), keep_n))
    stay_masked = confidence < cut_off
    return sampled, ~stay_masked


MASKGIT = SamplerConfig(cfg_weight=2.8, choice_temperature=7.0, logit_scale=1.3,
                        cfg_schedule="linear", choice_schedule="linear_to_zero")


def _ours(config, cond, uncond, n_reveal, step, steps, seed):
    guided = guide(torch.cat([cond, uncond]), config.guidance_weight(step, steps), config.branches)
    generator = torch.Generator().manual_seed(seed)
    return sample_step(guided, n_reveal, (step - 1) / steps, config, generator, step=step,
                       steps=steps)


@pytest.mark.parametrize("step", [1, 2, 9, 15])
def test_one_guided_step_matches_the_maskgit_reference_formula(step):
    cond, uncond = _logits(step)
    steps, n_reveal, seed = 15, 7, 100 + step
    drawn, keep = _ours(MASKGIT, cond, uncond, n_reveal, step, steps, seed)
    ref_drawn, ref_keep = maskgit_reference_step(cond, uncond, 2.8, 1.3, 7.0, step - 1, steps,
                                                 n_reveal, *_noise(seed))
    assert torch.equal(drawn, ref_drawn)
    assert torch.equal(keep, ref_keep) and (keep.sum(1) == n_reveal).all()


def test_the_default_sampler_differs_from_the_maskgit_reference_where_the_formulas_differ():
    """The comparison above can fail: today's constant weight and 1/N annealing do not match it."""
    cond, uncond = _logits(1)
    plain = SamplerConfig(cfg_weight=2.8, choice_temperature=7.0, logit_scale=1.3)
    drawn, _ = _ours(plain, cond, uncond, 7, 1, 15, 101)            # step 1: full w instead of 0
    ref_drawn, _ = maskgit_reference_step(cond, uncond, 2.8, 1.3, 7.0, 0, 15, 7, *_noise(101))
    assert not torch.equal(drawn, ref_drawn)
    cond, uncond = _logits(15)                                      # last step: noise 7/15 vs 0
    _, keep = _ours(SamplerConfig(cfg_weight=2.8, choice_temperature=7.0, logit_scale=1.3,
                                  cfg_schedule="linear"), cond, uncond, 7, 15, 15, 115)
    _, ref_keep = maskgit_reference_step(cond, uncond, 2.8, 1.3, 7.0, 14, 15, 7, *_noise(115))
    assert not torch.equal(keep, ref_keep)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("step", [1, 30, 63])
def test_one_guided_step_matches_the_dimoo_reference_formula(step, temperature):
    config = SamplerConfig(cfg_weight=4.0, temperature=temperature, choice_temperature=temperature,
                           choice_schedule="constant", tempered_confidence=False)
    cond, uncond = _logits(step)
    keep_n, seed = 25, 200 + step                               # 25 of the 40 stay masked
    drawn, keep = _ours(config, cond, uncond, M - keep_n, step, 64, seed)
    ref_drawn, ref_keep = dimoo_reference_step(cond, uncond, 4.0, temperature, keep_n,
                                               *_noise(seed))
    assert torch.equal(drawn, ref_drawn) and torch.equal(keep, ref_keep)


def test_tempered_confidence_is_another_rule_away_from_temperature_one():
    """The DiMOO comparison can fail: with the tempered confidence (our default) it does."""
    tempered = SamplerConfig(cfg_weight=4.0, temperature=1.3, choice_temperature=1.3,
                             choice_schedule="constant")
    differs = []
    for seed in range(5):
        cond, uncond = _logits(seed)
        _, keep = _ours(tempered, cond, uncond, M - 25, 30, 64, seed)
        _, ref_keep = dimoo_reference_step(cond, uncond, 4.0, 1.3, 25, *_noise(seed))
        differs.append(not torch.equal(keep, ref_keep))
    assert any(differs)


def test_guidance_ramp_and_noise_factors_by_hand():
    ramp = SamplerConfig(cfg_weight=2.8, cfg_schedule="linear", choice_schedule="linear_to_zero")
    assert [ramp.guidance_weight(i, 15) for i in (1, 8, 15)] == [0.0, 2.8 * (7 / 14), 2.8]
    assert [ramp.noise_factor(i, 15) for i in (1, 8, 15)] == [1.0, 1 - 7 / 14, 0.0]
    today = SamplerConfig(cfg_weight=2.8)
    assert [today.guidance_weight(i, 15) for i in (1, 15)] == [2.8, 2.8]
    assert [today.noise_factor(i, 15) for i in (1, 15)] == [1.0, 1 - 14 / 15]
    assert SamplerConfig(choice_schedule="constant").noise_factor(64, 64) == 1.0


def test_a_ramped_weight_of_zero_returns_the_conditional_rows_exactly():
    cond, uncond = _logits(3)
    assert torch.equal(guide(torch.cat([cond, uncond]), 0.0, 2), cond)
    assert guide(torch.cat([cond, uncond]), 0.0).shape == (2 * B, M, K)    # unstacked: as before


def test_generate_ramps_guidance_from_zero_at_step_one(small_migm):
    """Step 1 under the ramp must be the unguided conditional step (same noise, same features)."""
    class First:
        def on_step(self, ctx, features, new_tokens, revealed):
            if ctx.step == 1:
                self.tokens = new_tokens.clone()

    cond = torch.tensor([0, 3, 9, 5])
    ramped, unguided, constant = First(), First(), First()
    kwargs = {"choice_temperature": 7.0, "choice_schedule": "linear_to_zero"}
    generate(small_migm, VanillaSource(small_migm), cond, 6, schedule="maskgit_reference", seed=2,
             sampler=SamplerConfig(cfg_weight=2.8, cfg_schedule="linear", **kwargs),
             observers=[ramped])
    generate(small_migm, VanillaSource(small_migm), cond, 6, schedule="maskgit_reference", seed=2,
             sampler=SamplerConfig(cfg_weight=0.0, **kwargs), observers=[unguided])
    generate(small_migm, VanillaSource(small_migm), cond, 6, schedule="maskgit_reference", seed=2,
             sampler=SamplerConfig(cfg_weight=2.8, **kwargs), observers=[constant])
    assert torch.equal(ramped.tokens, unguided.tokens)
    assert not torch.equal(ramped.tokens, constant.tokens)


def test_generate_with_the_maskgit_reference_settings_reveals_its_counts(small_migm):
    counts = []

    class Count:
        def on_step(self, ctx, features, new_tokens, revealed):
            counts.append(int(revealed[0].sum()))

    generate(small_migm, VanillaSource(small_migm), torch.tensor([1, 2]), 15, seed=0,
             schedule="maskgit_reference", sampler=MASKGIT, observers=[Count()])
    assert counts == reveal_counts(49, 15, "maskgit_reference") == [1, 1, 2, 2, 3, 3, 3, 3, 4, 4,
                                                                    4, 5, 5, 5, 4]


def test_bad_sampler_settings_name_the_field(small_migm):
    for field, value in [("logit_scale", 0.0), ("cfg_schedule", "cosine"),
                         ("choice_schedule", "linear_n"), ("tempered_confidence", "no")]:
        with pytest.raises(ValueError, match=field):
            SamplerConfig(**{field: value})
    with pytest.raises(ValueError, match="cfg_schedule 'linear' needs steps >= 2"):
        generate(small_migm, VanillaSource(small_migm), torch.tensor([0]), 1,
                 sampler=SamplerConfig(cfg_schedule="linear"))
    with pytest.raises(ValueError, match="choice_schedule 'linear_to_zero' needs steps >= 2"):
        generate(small_migm, VanillaSource(small_migm), torch.tensor([0]), 1,
                 sampler=SamplerConfig(choice_schedule="linear_to_zero"))
    with pytest.raises(ValueError, match="needs sample_step's step and steps"):
        sample_step(torch.zeros(1, 4, 8), 1, 0.0, SamplerConfig(choice_schedule="constant"),
                    torch.Generator())
    # without guidance or without noise the ramps have nothing to divide: one step is fine
    assert SamplerConfig(cfg_schedule="linear", cfg_weight=0.0).guidance_weight(1, 1) == 0.0
    no_noise = SamplerConfig(choice_schedule="linear_to_zero", choice_temperature=0.0, cfg_weight=0)
    assert no_noise.noise_factor(1, 1) == 0.0
    out = generate(small_migm, VanillaSource(small_migm), torch.tensor([0]), 1, sampler=no_noise)
    assert (out.tokens != small_migm.mask_id).all()
