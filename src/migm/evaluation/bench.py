"""Per-call costs of the pieces of one generation step, each timed alone on the same input.

The loop's cost per step is base (or shortcut) features + head + sampler; the accelerators can
only remove the first term, so the fixed per-step work bounds every speedup and is reported here.
"""

from __future__ import annotations

import torch

from migm.evaluation.latency import measure_latency
from migm.sampling.sampler import SamplerConfig, guide, sample_step


@torch.no_grad()
def step_costs(model, batch_size: int = 64, repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Milliseconds per call at `batch_size` images (2x rows with CFG), mid-generation grid."""
    sampler = SamplerConfig()
    g = torch.Generator().manual_seed(seed)
    B, Lt = batch_size, model.num_tokens
    tokens = torch.randint(0, model.vocab_size, (B, Lt), generator=g)
    tokens[torch.rand(B, Lt, generator=g) < 0.5] = model.mask_id              # half decoded
    cond = torch.arange(B) % model.num_classes
    rows, conds = torch.cat([tokens, tokens]), torch.cat([cond, model.null_condition(cond)])
    feats = model.features(rows, conds)

    def sampler_step():
        logits = guide(model.head(feats), sampler.cfg_weight)
        sample_step(logits, tokens, model.mask_id, 1, 0.5, sampler, g)

    costs = {
        "base_features_ms": measure_latency(lambda: model.features(rows, conds), 1, repeats=repeats).ms_per_batch,
        "head_and_sampler_ms": measure_latency(sampler_step, 1, repeats=repeats).ms_per_batch,
        "decode_ms": measure_latency(lambda: model.decode(tokens.clamp(max=model.vocab_size - 1)), 1,
                                     repeats=repeats).ms_per_batch,
    }
    return {"batch_size": B, "threads": torch.get_num_threads(), **costs}
