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
- cache_decoding.py l.41-47, l.138-165: `gen_step` (N) is the total number of token-revealing
  steps, `pre_full_iters` (u) leading steps are groups of one, then each group is one full step
  plus up to `num_cache_iters` (k) local steps; the group reveals the sum of its steps' counts.
  So a run has u + ceil((N - u) / (k + 1)) full steps and the rest are local.
- where we depart: for k >= 2 the reference's inner loop indexes `ntoken_schedule[cnt + i]`
  while also advancing `cnt`, so a group reads base steps c, c+2, c+4, ... and the next group
  restarts at c+k: some steps' counts are used twice, others never, the group sums exceed the
  sequence length (272 of 256 at N = 40, k = 4) and its own `assert sum(ntoken_schedule) ==
  seq_len` (l.165) stops the script before sampling. It fails so at all four of Table 2's
  settings under either reading below (N = 40, 24, 48, 32), so those rows cannot come from that
  loop. We take k consecutive steps (`groups`): what the loop means to do, and what it does for
  k = 1 (the released scripts' only value). tests/accel/test_baseline_references.py pins both
  loops.
- l.200-229: per group one full forward with use_cache=True; a token is drawn at every position
  from the full step's logits at temperature 1 (Categorical), confidence = its log-softmax,
  masked positions only (-inf elsewhere), + conf_temp_g x Gumbel (numpy, cast to fp32),
  conf_temp_g = conf_temp (1 - (g+1)/G) with G the number of groups after grouping (l.172);
  sorted descending, the group is the top n; the K/V of the other positions (class token
  excluded) are kept per layer; the local steps fill the group's chunks in that order, each from
  the logits of a forward of the group's tokens alone (their positions as position_ids) over the
  cached K/V (models/uvit.py Attention: k, v = cat(past, new)). `rank_group` is that ranking.

The paper's (u, T, T'). The code never names T or T', and the ReCAP text that defines them was
not reachable; MIGM-Shortcut's Table 2 lists (0, 8, 40) and (0, 8, 24) on Lumina-DiMOO (whose
re-implementation is not released). T is the number of full steps in both readings:
- "total": T' is the total step count: (0, 8, 40) is N = 40, k = 4; (0, 8, 24) is N = 24, k = 2;
- "local": T' is the number of local (cached) steps, N = T + T': (0, 8, 40) is N = 48, k = 5;
  (0, 8, 24) is N = 32, k = 3.
Table 2's latencies support "local". Vanilla there costs 0.361 s a step (23.10 s / 64; its 32,
16, 14, 13-step rows fit 0.3613 N - 0.005). Solving ReCAP's two rows (7.05 s, 5.42 s) for a
full-step cost f and a local-step cost l: "total" gives 8f + 32l = 7.05, 8f + 16l = 5.42, so
l = 0.102 and f = 0.474 s, a full step 31% dearer than a vanilla step although it is one (plus
the ranking); "local" gives 8f + 40l = 7.05, 8f + 24l = 5.42, so l = 0.102 and f = 0.372 s,
a vanilla step plus 3% for the ranking. This is an inference from the numbers, not quoted text.
`ReCAPConfig.from_paper` takes the reading explicitly; configs/dimoo.yaml uses "local".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from migm.accel.method import Method
from migm.models.layers import cached_forward, flop_share, gather_rows, put_rows, rows_forward
from migm.sampling.loop import FeatureSource, StepContext, StepOutput
from migm.sampling.sampler import gumbel

PaperReading = Literal["total", "local"]
PAPER_READINGS = ("total", "local")


def rank_group(logp: torch.Tensor, drawn: torch.Tensor, noise: torch.Tensor, scale: float,
               n: int) -> torch.Tensor:
    """The reference's group choice over the M masked positions of each row.

    Args:
        logp: (B, M, K) log-softmax of the full step's logits at the masked positions.
        drawn: (B, M) a token drawn at each from those logits (temperature 1).
        noise: (B, M) standard Gumbel noise.
        scale: the group's conf_temperature (no noise is added at 0).
        n: the group size (the tokens its steps reveal).
    Returns:
        (B, n) indices into M, most confident first: the order the group's chunks are filled in.
    """
    score = logp.gather(-1, drawn[..., None]).squeeze(-1)                       # (B, M)
    if scale > 0:
        score = score + scale * noise
    return score.argsort(-1, descending=True)[:, :n]


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
    def from_paper(cls, u: int, full: int, t_prime: int, *, reading: PaperReading,
                   **kw) -> tuple[ReCAPConfig, int]:
        """The paper's (u, T, T') -> (config, N), under the named reading of T' (module docstring):
        "total": N = T'; "local": N = T + T' (T' local steps). T is the number of full steps; the
        k that gives exactly T full steps in N is found, or the triple is an error."""
        if reading not in PAPER_READINGS:
            raise ValueError(f"ReCAP (u, T, T'): reading must be one of {list(PAPER_READINGS)}, got "
                             f"{reading!r}")
        steps = t_prime if reading == "total" else full + t_prime
        if not 0 <= u < full <= steps:
            raise ValueError(f"ReCAP (u, T, T') = ({u}, {full}, {t_prime}) under reading {reading!r}: "
                             f"needs 0 <= u < T <= N = {steps}")
        k = -(-(steps - u) // (full - u)) - 1          # ceil((N - u) / (T - u)) - 1
        config = cls(u, k, **kw)
        if len(config.groups(steps)) != full:
            raise ValueError(f"ReCAP (u, T, T') = ({u}, {full}, {t_prime}) under reading {reading!r}: "
                             f"no num_cache_iters gives exactly {full} full steps in {steps} steps")
        return config, steps

    def conf_temperature(self, g: int, groups: int) -> float:
        """The ranking's Gumbel scale at group g (0-based) of `groups`: conf_temp (1 - (g+1)/G),
        zero at the last group (cache_decoding.py l.172)."""
        return self.choice_temperature * (1 - (g + 1) / groups)

    def check_steps(self, steps: int) -> None:
        if self.pre_full_iters >= steps:
            raise ValueError(f"ReCAP.pre_full_iters: {self.pre_full_iters} >= N={steps}: every "
                             f"step would be a full step")
        if self.num_cache_iters >= steps:
            raise ValueError(f"ReCAP.num_cache_iters: {self.num_cache_iters} >= N={steps}: a group "
                             f"cannot have more local steps than the run has steps")

    def groups(self, steps: int) -> list[list[int]]:
        """1-indexed steps of each group; a group's first step is its full step, the next up to k
        consecutive steps its local steps (the reference's loop with its k >= 2 skip removed)."""
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
        drawn = (logp + gumbel(logp.shape, self.generator, logp.device)).argmax(-1)  # (B, M)
        scale = self.config.conf_temperature(g, len(self.groups))
        noise = gumbel(drawn.shape, self.generator, logp.device) if scale > 0 else None
        sched = ctx.schedule
        reveals = [sched[s - 1] - sched[s] for s in group]
        ranked = pos.gather(1, rank_group(logp, drawn, noise, scale, sum(reveals)))  # (B, n)
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
    `choice_temperature`. The paper's (u, T, T') = (0, 8, 40) is steps 48, k 5 and (0, 8, 24) is
    steps 32, k 3 under the reading Table 2's latencies support ("local"; steps 40, k 4 and
    steps 24, k 2 under "total"): ReCAPConfig.from_paper."""

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
