"""The baselines' selection rules against plain re-implementations of the reference code.

Each `ref_*` function below is written from the reference source (liebenxj/ReCAP@4d1da38
examples/MaskGIT+ReCAP/cache_decoding.py; maomaocun/dLLM-cache@17235bf dllm_cache/hooks/
cache_hook_MMaDA.py refresh_index; Alpha-VLLM/Lumina-DiMOO@81344e6 generators/
image_generation_generator.py l.138-145), not from the method modules; both sides get the same
random inputs (and the same noise where there is noise) and must pick the same positions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from migm.accel import dllm_cache, recap
from migm.accel.dllm_cache import DLLMCache, refresh_rows
from migm.accel.ml_cache import MLCacheConfig, MLCacheSource, select_rows
from migm.accel.recap import ReCAP, ReCAPConfig, rank_group
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig


# --- ReCAP: (u, T, T'), the grouping, the ranking ------------------------------------------------
def ref_count_schedule(gen_step: int, seq_len: int = 256) -> list[int]:
    """cache_decoding.py l.138-145: tokens revealed at each of gen_step steps (a power-2.5 ramp of
    the masked count, floored; zero steps raised to one at the last step's expense)."""
    masked = np.floor((1 - np.linspace(0, 1, gen_step + 1)[:-1] ** 2.5) * seq_len).astype(int)
    counts = [int(a - b) for a, b in zip(masked[:-1], masked[1:])]
    counts.append(seq_len - sum(counts))
    for i in range(len(counts)):
        if counts[i] == 0:
            counts[i], counts[-1] = 1, counts[-1] - 1
    return counts


def ref_groups(counts: list[int], pre_full_iters: int, num_cache_iters: int):
    """cache_decoding.py l.148-165, its indexing kept: (0-based step indices per group, group
    sizes); raises AssertionError where the reference's own sum assert does."""
    if num_cache_iters == 0:
        return [[i] for i in range(len(counts))], list(counts)
    groups, pos = [], 0
    while pos < len(counts):
        group = [pos]
        pos += 1
        if pos > pre_full_iters:
            for i in range(num_cache_iters):
                if pos + i >= len(counts):
                    break
                group.append(pos + i)          # the reference reads [cnt + i] and bumps cnt too
                pos += 1
        groups.append(group)
    sizes = [sum(counts[j] for j in g) for g in groups]
    assert sum(sizes) == sum(counts)
    return groups, sizes


@pytest.mark.parametrize("triple,reading,steps,k,full", [
    ((0, 8, 40), "local", 48, 5, [1, 7, 13, 19, 25, 31, 37, 43]),
    ((0, 8, 24), "local", 32, 3, [1, 5, 9, 13, 17, 21, 25, 29]),
    ((0, 8, 40), "total", 40, 4, [1, 6, 11, 16, 21, 26, 31, 36]),
    ((0, 8, 24), "total", 24, 2, [1, 4, 7, 10, 13, 16, 19, 22]),
])
def test_recap_paper_triples_under_both_readings(triple, reading, steps, k, full):
    config, N = ReCAPConfig.from_paper(*triple, reading=reading)
    assert (N, config.num_cache_iters, config.pre_full_iters) == (steps, k, 0)
    groups = config.groups(N)
    assert [g[0] for g in groups] == full
    local = N - len(full)
    assert local == (triple[2] if reading == "local" else triple[2] - triple[1])
    assert [s for g in groups for s in g] == list(range(1, N + 1))       # every step once, in order


def test_recap_readings_are_explicit_and_checked():
    with pytest.raises(TypeError):
        ReCAPConfig.from_paper(0, 8, 40)                                  # no default reading
    with pytest.raises(ValueError, match="reading"):
        ReCAPConfig.from_paper(0, 8, 40, reading="both")
    with pytest.raises(ValueError, match="no num_cache_iters"):
        ReCAPConfig.from_paper(0, 7, 8, reading="total")
    assert ReCAPConfig.from_paper(0, 5, 10, reading="local")[1] == 15      # k = 2: 5 groups of 3


def test_table_2_latencies_support_the_local_reading():
    """The docstring's arithmetic: vanilla's per-step cost from Table 2, then each reading's full-
    and local-step costs from ReCAP's two rows (7.05 s, 5.42 s)."""
    vanilla = 23.10 / 64
    costs = {}
    for reading in ("total", "local"):
        (c40, n40), (c24, n24) = (ReCAPConfig.from_paper(0, 8, t, reading=reading) for t in (40, 24))
        local40, local24 = n40 - 8, n24 - 8
        a = np.array([[8, local40], [8, local24]], dtype=float)
        costs[reading] = np.linalg.solve(a, [7.05, 5.42])                # (full, local) seconds
    assert costs["total"][0] / vanilla == pytest.approx(1.31, abs=0.01)   # 31% dearer: implausible
    assert costs["local"][0] / vanilla == pytest.approx(1.03, abs=0.01)   # a vanilla step + ranking


@pytest.mark.parametrize("N,u,k,overcount", [(40, 0, 4, 272), (24, 0, 2, 262), (48, 0, 5, 272),
                                             (32, 0, 3, 265)])
def test_recap_reference_grouping_overcounts_for_k_at_least_2_and_we_take_consecutive_steps(
        N, u, k, overcount):
    counts = ref_count_schedule(N)
    assert sum(counts) == 256
    with pytest.raises(AssertionError):                  # the reference stops before sampling
        ref_groups(counts, u, k)
    # what its loop builds before the assert: every other step, some steps counted twice
    groups, cnt = [], 0
    while cnt < N:
        idx = [cnt]
        cnt += 1
        for i in range(k):
            if cnt + i < N:
                idx.append(cnt + i)
                cnt += 1
            else:
                break
        groups.append(idx)
    assert sum(counts[s] for g in groups for s in g) == overcount and len(groups) == 9
    assert groups[0] == [0, 1] + list(range(3, 2 * k, 2))
    ours = ReCAPConfig(u, k).groups(N)
    assert ours[0] == list(range(1, k + 2)) and len(ours) == math.ceil(N / (k + 1))
    assert sum(counts[s - 1] for g in ours for s in g) == 256            # each step's count once


@pytest.mark.parametrize("N,u,k", [(32, 12, 1), (16, 8, 1), (16, 0, 1), (10, 0, 0)])
def test_recap_grouping_equals_the_reference_where_it_runs(N, u, k):
    groups, sizes = ref_groups(ref_count_schedule(N), u, k)
    assert ReCAPConfig(u, k).groups(N) == [[s + 1 for s in g] for g in groups]


def ref_rank(logits, x_, is_mask, conf_temp, gumbel_noise, ntoken):
    """cache_decoding.py l.219-225 over the whole grid, the noise given (there numpy's, fp64
    scaled then cast to fp32): unmasked positions score -inf, the top ntoken are the group."""
    picked = logits.log_softmax(-1).gather(-1, x_[..., None])[..., 0]
    score = picked.masked_fill(~is_mask, float("-inf")).float()
    score = score + torch.from_numpy(conf_temp * gumbel_noise.numpy()).float()
    return score.sort(dim=-1, descending=True).indices[:, :ntoken]


@pytest.mark.parametrize("seed", range(4))
def test_recap_ranking_is_the_references(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, K, G = 3, 30, 12, 8
    logits = 2 * torch.randn(B, L, K, generator=g)
    drawn = torch.randint(0, K, (B, L), generator=g)
    noise = -torch.log(-torch.log(torch.rand(B, L, generator=g, dtype=torch.float64)))
    M = 17
    is_mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        is_mask[b, torch.randperm(L, generator=g)[:M]] = True
    config = ReCAPConfig(choice_temperature=5.5)
    ref_scales = 5.5 * (1. - np.array([(i + 1) / G for i in range(G)]))   # l.172
    for group in (0, 3, G - 1):
        scale = config.conf_temperature(group, G)
        assert scale == pytest.approx(ref_scales[group], abs=1e-12)
        n = 6
        pos = is_mask.nonzero()[:, 1].view(B, M)                         # (B, M) masked, as _rank
        logp = torch.log_softmax(logits.gather(1, pos[..., None].expand(-1, -1, K)), -1)
        ours = pos.gather(1, rank_group(logp, drawn.gather(1, pos), noise.float().gather(1, pos),
                                        scale, n))
        assert torch.equal(ours, ref_rank(logits, drawn, is_mask, scale, noise, n))


def test_recap_source_ranks_each_group_at_its_schedules_temperature(small_migm, monkeypatch):
    seen, real = [], recap.rank_group

    def spy(logp, drawn, noise, scale, n):
        seen.append((scale, n))
        return real(logp, drawn, noise, scale, n)
    monkeypatch.setattr(recap, "rank_group", spy)
    method = ReCAP(steps=[12], num_cache_iters=[3], choice_temperature=5.5)
    (point,) = method.points()
    generate(small_migm, point.source(small_migm), torch.arange(2), 12, seed=0)
    groups = method.config(3).groups(12)
    assert [s for s, _ in seen] == pytest.approx([5.5 * (1 - (i + 1) / len(groups))
                                                  for i in range(len(groups))])


# --- dLLM-Cache: the rho least-similar V rows ---------------------------------------------------
def ref_refresh_index(new_features, cached_features, transfer_ratio):
    """cache_hook_MMaDA.py l.129-141 refresh_index: the int(G rho) lowest cosines per row."""
    k = int(new_features.shape[1] * transfer_ratio)
    similarity = torch.nn.functional.cosine_similarity(new_features, cached_features, dim=-1)
    return similarity.topk(k, dim=-1, largest=False).indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5])
def test_dllm_cache_refresh_rows_are_the_references(dtype, rho):
    g = torch.Generator().manual_seed(3)
    B, G, F_ = 2, 37, 24                                   # F_ = kv heads x head dim, flattened
    cached = torch.randn(B, G, F_, generator=g).to(dtype)
    new = (cached.float() + 0.7 * torch.randn(B, G, F_, generator=g)).to(dtype)
    ours = refresh_rows(new, cached, rho)
    assert ours.shape == (B, int(G * rho))
    assert torch.equal(ours, ref_refresh_index(new, cached, rho))


def test_dllm_cache_source_selects_with_the_references_rule(small_migm, monkeypatch):
    """On a real partial step: the rows the source refreshes are refresh_index's on the V rows
    it compares (the heads of each row flattened as v_proj writes them)."""
    seen, real = [], dllm_cache.refresh_rows

    def spy(v_new, v_cached, rho):
        out = real(v_new, v_cached, rho)
        seen.append(torch.equal(out, ref_refresh_index(v_new, v_cached, rho)))
        assert v_new.shape[-1] == small_migm.feature_dim           # all heads, not one
        return out
    monkeypatch.setattr(dllm_cache, "refresh_rows", spy)
    method = DLLMCache(steps=[8], prompt_interval=[8], gen_interval=[4], transfer_ratio=0.25)
    (point,) = method.points()
    generate(small_migm, point.source(small_migm), torch.arange(2), 8, seed=0,
             sampler=SamplerConfig(cfg_weight=1.0))
    assert seen and all(seen)


# --- ML-Cache: conf <= quantile(conf, 1 - c), ties included ---------------------------------------
def ref_to_compute(conf: torch.Tensor, cache_ratio: float) -> torch.Tensor:
    """image_generation_generator.py l.138-145 for one branch: conf (1, T) -> bool (1, T): at or
    below the fp32 linear quantile at 1 - cache_ratio."""
    cut = conf.float().quantile(1 - cache_ratio, dim=-1, keepdim=True)
    return conf <= cut


def tied_scores(B: int, T: int, seed: int) -> torch.Tensor:
    """Max-logit-like scores in bf16, where many values tie (as the reference's do)."""
    g = torch.Generator().manual_seed(seed)
    return (8 + torch.randn(B, T, generator=g) * 0.3).to(torch.bfloat16)


@pytest.mark.parametrize("c", [0.9, 0.75, 0.5])
def test_ml_cache_selects_every_row_the_reference_does_ties_included(c):
    conf = tied_scores(4, 211, seed=int(c * 100))
    rows = select_rows(conf.float(), c)                                     # (B, R)
    masks = [ref_to_compute(conf[b:b + 1], c)[0] for b in range(len(conf))]
    counts = [int(m.sum()) for m in masks]
    assert rows.shape[1] == max(counts)
    exact = int(torch.floor(torch.tensor(1 - c) * (211 - 1))) + 1
    assert max(counts) > exact                     # the ties matter: an exact top-k misses rows
    for b, (mask, n) in enumerate(zip(masks, counts)):
        assert set(rows[b, :n].tolist()) == set(mask.nonzero()[:, 0].tolist())
        filler = rows[b, n:]                       # padding to R: the next lowest scores
        rest = conf[b].float().masked_fill(mask, float("inf"))
        if len(filler):
            assert rest[filler].max() <= rest.sort().values[len(filler) - 1]


def test_ml_cache_quantile_is_over_each_rows_real_positions():
    conf = tied_scores(2, 90, seed=5).float()
    valid = torch.ones(2, 90, dtype=torch.bool)
    valid[1, 70:] = False                                    # a shorter prompt: right padding
    conf[1, 70:] = float("inf")
    rows = select_rows(conf, 0.9, valid)
    short = ref_to_compute(conf[1:, :70].to(torch.bfloat16), 0.9)[0]
    n = int(short.sum())
    assert set(rows[1, :n].tolist()) == set(short.nonzero()[:, 0].tolist())
    assert (rows[1] < 70).all()                              # padding only as filler, never here


def test_ml_cache_source_picks_with_select_rows():
    """The source's own _pick on given confidences is the reference's selection."""
    conf = tied_scores(3, 120, seed=9).float()
    source = MLCacheSource.__new__(MLCacheSource)
    source.conf, source.config = conf, MLCacheConfig(cache_ratio=0.9)
    source.repeat, source.counts = None, []

    class Stream:
        key_mask = None
    rows = source._pick(Stream())
    for b in range(3):
        mask = ref_to_compute(conf[b:b + 1].to(torch.bfloat16), 0.9)[0]
        assert set(mask.nonzero()[:, 0].tolist()) <= set(rows[b].tolist())


def test_ml_cache_repeats_another_runs_counts_on_the_same_ranking():
    """`count` cuts the same ranking at another run's R (speed composition: a base with no layer
    ties at every masked row, so left alone it would recompute most of them); `repeat_work`
    makes the source's partial steps take those counts, and `work` reports them."""
    conf = tied_scores(2, 120, seed=3).float()
    natural = select_rows(conf, 0.9)
    R = natural.shape[1]
    assert torch.equal(select_rows(conf, 0.9, count=R), natural)
    more = select_rows(conf, 0.9, count=R + 9)
    assert torch.equal(more[:, :R], natural) and more.shape == (2, R + 9)
    for b in range(2):                          # the extra rows: the next lowest confidences
        rest = conf[b].masked_fill(torch.zeros(120, dtype=torch.bool).index_fill(0, natural[b], True),
                                   float("inf"))
        assert rest[more[b, R:]].max() <= rest.sort().values[8]
    assert torch.equal(select_rows(conf, 0.9, count=3), natural[:, :3])

    source = MLCacheSource.__new__(MLCacheSource)
    source.conf, source.config, source.repeat = conf, MLCacheConfig(cache_ratio=0.9), None
    source.reset(), source.repeat_work([5, R + 2])
    source.conf = conf

    class Stream:
        key_mask = None
    assert [source._pick(Stream()).shape[1] for _ in range(2)] == [5, R + 2] == source.work()


def test_ml_cache_distinct_scores_give_the_quantile_count():
    """Without ties the count is floor((1 - c)(T - 1)) + 1 with the position in fp32 (51 rows at
    c = 0.9: 6, where the fp64 product gives 5)."""
    for c in (0.9, 0.5, 0.75):
        for T in (17, 51, 121, 4229):
            conf = torch.randperm(T).float()[None]
            expected = int(ref_to_compute(conf, c).sum())
            assert select_rows(conf, c).shape[1] == expected
            q = torch.tensor(1 - c, dtype=torch.float32)
            assert expected == int(torch.floor(q * (T - 1))) + 1
