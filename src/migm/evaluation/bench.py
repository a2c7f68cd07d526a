"""Per-call costs of the pieces of one generation step, each timed alone on the same input.

The loop's cost per step is base (or shortcut) features + head + sampler; the accelerators can
only remove the first term, so the fixed per-step work bounds every speedup and is reported here.
"""

from __future__ import annotations

import torch

from migm.accel.method import Vanilla
from migm.accel.shortcut import Shortcut
from migm.evaluation.latency import interleaved_rounds, measure_latency
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig, guide, sample_step
from migm.shortcut.sequence import sequence_step


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

    half = Lt // 2                       # mid-generation: the head and sampler see masked positions only
    positions = torch.arange(half, device=feats.device).expand(feats.shape[0], half)

    def sampler_step():
        logits = guide(model.head(feats[:, :half], positions=positions), sampler.cfg_weight)
        sample_step(logits, 1, 0.5, sampler, g)

    costs = {
        "base_features_ms": measure_latency(lambda: model.features(rows, conds), 1, repeats=repeats).ms_per_batch,
        "head_and_sampler_ms": measure_latency(sampler_step, 1, repeats=repeats).ms_per_batch,
        "decode_ms": measure_latency(lambda: model.decode(tokens.clamp(max=model.vocab_size - 1)), 1,
                                     repeats=repeats).ms_per_batch,
    }
    return {"batch_size": B, "threads": torch.get_num_threads(), **costs}


def mid_generation_inputs(model, batch_size: int, seed: int = 0, device: str | torch.device = "cpu"):
    """What a model call sees halfway through generation: both CFG branches (2 x batch_size rows),
    half the positions still masked, ~5% just decoded (the shortcut's new tokens), t = 0.5."""
    g = torch.Generator().manual_seed(seed)
    rows, L = 2 * batch_size, model.num_tokens
    tokens = torch.randint(0, model.vocab_size, (rows, L), generator=g)
    masked = torch.rand(rows, L, generator=g) < 0.5
    new = (torch.rand(rows, L, generator=g) < 0.05) & ~masked
    tokens = tokens.masked_fill(masked, model.mask_id)
    cond = torch.arange(rows) % model.num_classes
    return tokens.to(device), cond.to(device), new.to(device), torch.full((rows,), 0.5, device=device)


@torch.no_grad()
def call_costs(model, shortcut=None, batch_size: int = 64, repeats: int = 5,
               device: str | torch.device = "cpu") -> dict[str, float]:
    """ms per base call and (if given) per shortcut call on the same input, timed in interleaved
    rounds; `call_speed_ratio` is the median per-round base/shortcut ratio, with its range."""
    tokens, cond, new, t = mid_generation_inputs(model, batch_size, device=device)
    calls = {"base_call_ms": lambda: model.features(tokens, cond)}
    if shortcut is not None and getattr(shortcut, "positions", "grid") == "sequence" \
            and hasattr(model, "sequence_features"):
        # a whole-sequence network (the official ones) is timed as the loop runs it: on the
        # base's sequence state, through step() (its forward takes other arguments)
        ratio = (tokens == model.mask_id).float().mean(1)                          # (rows,)
        step = sequence_step(model, model.sequence_features(tokens, cond), tokens, cond, new, ratio, t)
        calls["shortcut_call_ms"] = lambda: shortcut.step(step)
    elif shortcut is not None:
        feats = model.features(tokens, cond)
        calls["shortcut_call_ms"] = lambda: shortcut(feats, tokens, new, t)
    rounds = interleaved_rounds(calls, rounds=repeats, device=str(device))
    out = {name: rounds.median_ms(name) for name in calls}
    if shortcut is not None:
        ratio, lo, hi = rounds.speedup("base_call_ms", "shortcut_call_ms")
        out |= {"call_speed_ratio": ratio, "call_speed_ratio_min": lo, "call_speed_ratio_max": hi}
    return out


def shortcut_costs(model, shortcut, batch_size: int = 64, repeats: int = 5) -> dict:
    """Parameters and per-call cost of the base features and of the shortcut, and their ratios."""
    costs = call_costs(model, shortcut, batch_size, repeats)
    network = getattr(model, "transformer", model)        # the tiny adapter also holds its tokenizer
    base_params = sum(p.numel() for p in network.parameters())
    short_params = sum(p.numel() for p in shortcut.parameters())
    return {"rows": 2 * batch_size, "base_params": base_params, "shortcut_params": short_params,
            "param_ratio": base_params / short_params, **costs}


def end_to_end(model, shortcut, steps: int, budgets: list[int], batch_size: int = 64,
               repeats: int = 5) -> list[dict]:
    """Latency per image of vanilla N and shortcut N/B (decode included), one process, timed in
    interleaved rounds; speedup = median over rounds of the per-round ratio to vanilla."""

    cond = torch.arange(batch_size) % model.num_classes
    points = Vanilla(steps=[steps]).points() + Shortcut(steps=[steps], budgets=list(budgets)).points()
    fns = {p: (lambda p=p: model.decode(generate(model, p.source(model, shortcut), cond, steps).tokens))
           for p in points}
    rounds = interleaved_rounds(fns, rounds=repeats)
    rows = []
    for p in points:
        speedup, lo, hi = rounds.speedup(points[0], p)
        rows.append({"config": f"{p.name} {p.label}", "ms_per_image": rounds.median_ms(p) / batch_size,
                     "speedup": speedup, "speedup_min": lo, "speedup_max": hi,
                     "threads": rounds.threads, "load_before": rounds.load[0]})
    return rows
