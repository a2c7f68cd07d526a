"""ReCAP (Liu et al. 2025): fix a group of positions at a full step, then run only those.

After `pre_full_iters` single full steps, steps come in groups of one full step and up to
`num_cache_iters` local steps. At the group's full step the base runs on every row and each
layer's keys and values are cached; the group G is then fixed: the n masked positions ranked
highest by confidence, n = the tokens the group's steps will reveal, and the group's steps reveal
G chunk by chunk in that order. At a local step only G's rows go through the layers, attending to
the cached K/V of every other row (G's own K/V are fresh): the context is reused, the tokens
being decided are recomputed with what the group has revealed so far.

On the one loop: the source sets `eligible` to the chunk this step must fill, and the loop's
sampler draws the tokens from the fresh logits there (the count is the schedule's). The ranking
is the reference's: the log-probability of a token drawn from the full step's logits plus Gumbel
noise scaled by choice_temperature (1 - (g+1)/groups) at group g; its noise comes from a
generator of the source's own, seeded from the loop's seed, so the loop's generator is consumed
exactly as by every other method. Differences, named: the ranking reads the conditional branch's
logits (the reference ranks guided logits; a source does not see the guidance weight), and a
base's condition rows (MaskGIT's class token) stay cached at local steps (the reference's UViT
recomputes its one context token with G).

Reference facts this relies on (liebenxj/ReCAP@4d1da38, examples/MaskGIT+ReCAP/):
- cache_decoding.py l.148-165: groups built over the per-step token counts: take one step; once
  more than pre_full_iters groups' steps are taken, append up to num_cache_iters more; the
  group's count is their sum. So at T' steps with u = pre_full_iters, k = num_cache_iters there
  are u + ceil((T' - u) / (k + 1)) full evaluations.
- l.200-257: per group one full forward with use_cache=True; a token is sampled at every position
  from the logits, confidence = log-softmax at it (masked positions only) + Gumbel(conf_temp_g),
  conf_temp_g = conf_temp (1 - (g+1)/groups) (l.172); sorted descending, G = the top n, the K/V of
  the other positions (class token excluded) are kept per layer; the local steps fill G's chunks
  in that order, each chunk sampled from the logits of a forward of G's tokens alone (their
  positions as position_ids) over the cached K/V (models/uvit.py Attention: k, v = cat(past, new)).
- the paper's (u, T, T') read as (pre_full_iters, full evaluations, total steps): (0, 8, 40) is
  k = 4 at N = 40, (0, 8, 24) is k = 2 at N = 24 (inferred from this arithmetic; `from_paper`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from migm.accel.method import Method
from migm.models.layers import cached_forward, flop_share, gather_rows, put_rows, rows_forward
from migm.sampling.loop import FeatureSource, StepContext, StepOutput
from migm.sampling.sampler import gumbel


@dataclass
class ReCAPConfig:
    """One setting of ReCAP."""

    pre_full_iters: int = 0        # u: single full steps before the first group
    num_cache_iters: int = 4       # k: local steps after each group's full step (0 = vanilla)
    choice_temperature: float = 3.0  # the reference's conf_temp: Gumbel scale of the ranking
                                   # (5.5 in its MaskGIT runs; match your sampler's for a fair row)

    def __post_init__(self) -> None:
        for name in ("pre_full_iters", "num_cache_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ReCAP.{name}: must be an integer >= 0, got {value!r}")
        if self.choice_temperature < 0:
            raise ValueError(f"ReCAP.choice_temperature: must be >= 0, got {self.choice_temperature}")

    @classmethod
    def from_paper(cls, u: int, full: int, total: int, **kw) -> ReCAPConfig:
        """(u, T, T'): u pre-full steps, T full evaluations in T' steps -> the k that gives it."""
        if not 0 <= u < full <= total:
            raise ValueError(f"ReCAP (u, T, T') must satisfy 0 <= u < T <= T', got ({u}, {full}, {total})")
        k = -(-(total - u) // (full - u)) - 1
        config = cls(u, k, **kw)
        if len(config.groups(total)) != full:
            raise ValueError(f"ReCAP (u, T, T') = ({u}, {full}, {total}): no num_cache_iters gives "
                             f"exactly {full} full evaluations in {total} steps")
        return config

    def check_steps(self, steps: int) -> None:
        if self.pre_full_iters >= steps:
            raise ValueError(f"ReCAP.pre_full_iters: {self.pre_full_iters} >= N={steps}: every "
                             f"step would be a full step")
        if self.num_cache_iters >= steps:
            raise ValueError(f"ReCAP.num_cache_iters: {self.num_cache_iters} >= N={steps}: a group "
                             f"cannot have more local steps than the run has steps")

    def groups(self, steps: int) -> list[list[int]]:
        """1-indexed steps of each group; a group's first step is its full step."""
        groups, cnt = [], 0
        while cnt < steps:
            group = [cnt + 1]
            cnt += 1
            if cnt > self.pre_full_iters:
                take = min(self.num_cache_iters, steps - cnt)
                group += list(range(cnt + 1, cnt + take + 1))
                cnt += take
            groups.append(group)
        return groups


class ReCAPSource(FeatureSource):
    def __init__(self, model, config: ReCAPConfig, steps: int) -> None:
        super().__init__()
        config.check_steps(steps)
        self.model, self.config, self.steps = model, config, steps
        self.groups = config.groups(steps)
        self.group_of = {s: (g, j) for g, group in enumerate(self.groups) for j, s in enumerate(group)}
        self.reset()

    def reset(self) -> None:
        self.cache: list[dict[str, torch.Tensor]] = []   # per layer: k, v at the group's full step
        self.order: torch.Tensor | None = None     # (rows, n) grid positions of G, ranked
        self.chunks: list[int] = []                # offsets of each step's chunk in `order`
        self.features: torch.Tensor | None = None
        self.generator: torch.Generator | None = None

    def step(self, ctx: StepContext) -> StepOutput:
        if len(ctx.schedule) != self.steps + 1:
            raise ValueError("ReCAP needs the loop's step schedule (StepContext.schedule)")
        g, j = self.group_of[ctx.step]
        out = self._full(ctx, g) if j == 0 else self._local(ctx)
        if len(self.groups[g]) > 1:                   # a lone full step: the sampler's own choice
            chunk = self.order[:, self.chunks[j]:self.chunks[j + 1]]
            out.eligible = torch.zeros_like(ctx.tokens, dtype=torch.bool).scatter_(1, chunk, True)
        return out

    def _full(self, ctx: StepContext, g: int) -> StepOutput:
        m = self.model
        s = m.embed_sequence(ctx.tokens, ctx.cond)
        h, self.cache = cached_forward(m, s)
        f = m.final(gather_rows(h, s.grid))
        shape = m.layer_shape()
        spent = shape.call(len(h), h.shape[1], s.grid.shape[1])
        self.features = f
        group = self.groups[g]
        if len(group) > 1:
            spent += self._rank(ctx, f, g, group)
        return StepOutput(f, base_flops=flop_share(shape, s, spent))

    def _rank(self, ctx: StepContext, f: torch.Tensor, g: int, group: list[int]) -> int:
        """Fix G and its chunk order from the full step's logits (the reference's confidence);
        returns the FLOPs of the ranking's head."""
        if self.generator is None:
            self.generator = torch.Generator(device=f.device).manual_seed(ctx.seed + 0x5EC4)
        B = len(ctx.tokens) // ctx.branches
        tokens = ctx.tokens[:B]
        masked = tokens == self.model.mask_id
        M = ctx.schedule[ctx.step - 1]                                           # masked per row
        pos = masked.nonzero()[:, 1].view(B, M)                                  # (B, M)
        feats = gather_rows(f[:B], pos)
        logp = torch.log_softmax(self.model.head(feats, positions=pos).float(), -1)  # (B, M, K)
        drawn = (logp + gumbel(logp.shape, self.generator, logp.device)).argmax(-1)
        score = logp.gather(-1, drawn[..., None]).squeeze(-1)                    # (B, M)
        scale = self.config.choice_temperature * (1 - (g + 1) / len(self.groups))
        if scale > 0:
            score = score + scale * gumbel(score.shape, self.generator, score.device)
        sched = ctx.schedule
        reveals = [sched[s - 1] - sched[s] for s in group]
        ranked = pos.gather(1, score.argsort(-1, descending=True)[:, :sum(reveals)])  # (B, n)
        self.order = ranked.repeat(ctx.branches, 1)                              # same G per branch
        self.chunks = [0]
        for r in reveals:
            self.chunks.append(self.chunks[-1] + r)
        return B * self.model.layer_shape().head(M)

    def _local(self, ctx: StepContext) -> StepOutput:
        m = self.model
        s = m.embed_sequence(ctx.tokens, ctx.cond)
        rows = s.grid.gather(1, self.order)                                      # (rows, n) sequence rows
        h = rows_forward(m, s, rows, self.cache)                                 # G's rows are fresh
        f = self.features.clone()
        put_rows(f, self.order, m.final(h))
        self.features = f
        shape, n, T = m.layer_shape(), rows.shape[1], s.hidden.shape[1]
        spent = len(h) * (T * shape.embed_row + shape.depth * shape.layer(n, T) + n * shape.final_row)
        return StepOutput(f, full=False, kind="local_steps", base_flops=flop_share(shape, s, spent))


@dataclass
class ReCAP(Method):
    """ReCAP on the one loop. Swept: `steps`, `num_cache_iters` (k); fixed: `pre_full_iters` (u),
    `choice_temperature`. The paper's (u, T, T') = (0, 8, 40) is steps 40, k 4; (0, 8, 24) is
    steps 24, k 2 (ReCAPConfig.from_paper)."""

    num_cache_iters: list[int] = field(default_factory=lambda: [4])
    pre_full_iters: int = 0
    choice_temperature: float = 3.0

    name: ClassVar[str] = "recap"

    def config(self, num_cache_iters: int) -> ReCAPConfig:
        return ReCAPConfig(self.pre_full_iters, num_cache_iters, self.choice_temperature)

    def check(self, steps: int, num_cache_iters: int, **knobs) -> None:
        super().check(steps)
        self.config(num_cache_iters).check_steps(steps)

    def label(self, steps: int, num_cache_iters: int, **knobs) -> str:
        full = len(self.config(num_cache_iters).groups(steps))
        return f"u{self.pre_full_iters}/T{full}/N{steps}"

    def source(self, model, shortcut, steps: int, num_cache_iters: int, **knobs):
        return ReCAPSource(model, self.config(num_cache_iters), steps)
