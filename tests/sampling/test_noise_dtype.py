"""Precision as Lumina-DiMOO runs its sampler: Gumbel noise and sampler arithmetic in bf16.

The reference (Alpha-VLLM/Lumina-DiMOO@81344e6 utils/generation_utils.py gumbel_noise,
gumbel_max_sample, mask_by_random_topk) draws u = torch.rand(..., dtype=t.dtype) with t its bf16
logits or probabilities and computes -log(-log(u + 1e-20) + 1e-20) in that dtype. The cap of that
noise is computed here directly from the largest bf16 below 1, not from our sampler.
"""

import pytest
import torch

from migm.sampling.sampler import SamplerConfig, guide, gumbel, sample_step

B, M, K = 3, 40, 64
BF16 = torch.bfloat16


def reference_gumbel(shape, generator):
    """gumbel_noise with a generator: u in bf16, every op in bf16."""
    u = torch.rand(shape, device="cpu", dtype=BF16, generator=generator)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


def test_bf16_noise_is_capped_at_the_value_of_the_largest_bf16_below_one():
    one = torch.tensor(1.0, dtype=BF16)
    below = torch.nextafter(one, torch.tensor(0.0, dtype=BF16))
    assert float(below) == 1 - 2 ** -8                                  # 8 significant bits
    cap = -torch.log(-torch.log(below + 1e-20) + 1e-20)
    assert cap.dtype == BF16 and float(cap) == 5.53125                 # bf16(8 ln 2); fp32: 16.6
    g = torch.Generator().manual_seed(0)
    noise = gumbel(torch.Size([2048, 1024]), g, torch.device("cpu"), BF16)
    assert noise.dtype == BF16
    assert float(noise.max()) == float(cap)
    assert float((noise == cap).float().mean()) == pytest.approx(1 / 256, rel=0.1)
    fp32 = gumbel(torch.Size([2048, 1024]), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert float(fp32.max()) > 10                                       # the default is not capped


def test_bf16_noise_is_the_references_draw_from_the_same_generator():
    ours = gumbel(torch.Size([B, M]), torch.Generator().manual_seed(4), torch.device("cpu"), BF16)
    ref = reference_gumbel((B, M), torch.Generator().manual_seed(4))
    assert torch.equal(ours, ref)


def dimoo_reference_step_bf16(cond, uncond, cfg_scale, temperature, gen):
    """generate_image's step with its tensors in bf16: returns (tokens, confidence)."""
    logits = (1 + cfg_scale) * cond - cfg_scale * uncond                # bf16
    sampled = (logits / temperature + reference_gumbel(logits.shape, gen)).argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    conf = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    confidence = torch.log(conf.clamp_min(1e-20)) + temperature * reference_gumbel(conf.shape, gen)
    return sampled, confidence


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_one_bf16_step_is_the_dimoo_reference_in_bf16(temperature):
    g = torch.Generator().manual_seed(11)
    cond, uncond = ((3 * torch.randn(B, M, K, generator=g)).to(BF16) for _ in range(2))
    config = SamplerConfig(cfg_weight=4.0, temperature=temperature, choice_temperature=temperature,
                           choice_schedule="constant", tempered_confidence=False,
                           noise_dtype="bfloat16", logits_dtype="bfloat16")
    guided = guide(torch.cat([cond, uncond]), 4.0, 2)                    # bf16, as the reference
    n = 15
    drawn, keep = sample_step(guided, n, 0.5, config, torch.Generator().manual_seed(5), step=30, steps=64)
    ref_drawn, confidence = dimoo_reference_step_bf16(cond, uncond, 4.0, temperature,
                                                      torch.Generator().manual_seed(5))
    assert torch.equal(drawn, ref_drawn)
    assert (keep.sum(1) == n).all()
    # the kept positions are the n most confident under the reference's bf16 scores (ties allowed)
    for b in range(B):
        assert confidence[b][keep[b]].min() >= confidence[b][~keep[b]].max()


def test_fp32_noise_on_the_same_step_differs():
    """The bf16 comparison above can fail: with the default fp32 noise the draws differ."""
    g = torch.Generator().manual_seed(11)
    cond, uncond = ((3 * torch.randn(B, M, K, generator=g)).to(BF16) for _ in range(2))
    config = SamplerConfig(cfg_weight=4.0, choice_temperature=1.0, choice_schedule="constant",
                           tempered_confidence=False)
    drawn, _ = sample_step(guide(torch.cat([cond, uncond]), 4.0, 2), 15, 0.5, config,
                           torch.Generator().manual_seed(5), step=30, steps=64)
    ref_drawn, _ = dimoo_reference_step_bf16(cond, uncond, 4.0, 1.0, torch.Generator().manual_seed(5))
    assert not torch.equal(drawn, ref_drawn)


def test_bad_dtypes_name_the_field():
    for name, bad in (("noise_dtype", "float16"), ("logits_dtype", "float64")):
        with pytest.raises(ValueError, match=f"sampler.{name}"):
            SamplerConfig(**{name: bad})


def test_an_fp16_step_keeps_the_most_confident_under_the_maskgit_references_fp16_softmax():
    """MaskGIT's reference softmaxes the fp16 logits of its autocast forward and ranks by
    log(prob[drawn]) in fp16 (Trainer/vit.py sample_shortcut): logits_dtype float16 does too."""
    g = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(B, M, K, generator=g)).to(torch.float16)
    config = SamplerConfig(cfg_weight=0.0, choice_temperature=0.0, logits_dtype="float16")
    drawn, keep = sample_step(logits, 15, 0.5, config, torch.Generator().manual_seed(5), step=8, steps=15)
    prob = torch.softmax(logits, -1)                                     # fp16, as the reference
    confidence = torch.log(prob.gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
    assert confidence.dtype == torch.float16 and (keep.sum(1) == 15).all()
    for b in range(B):
        assert confidence[b][keep[b]].min() >= confidence[b][~keep[b]].max()
    # the fp32 ranking of the same draws differs from the fp16 one somewhere (fp16 ties)
    fp32 = torch.log_softmax(logits.float(), -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    assert not torch.equal(confidence.float(), fp32)
