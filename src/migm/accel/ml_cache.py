"""ML-Cache (Lumina-DiMOO's own accelerator): recompute only the least confident rows.

After W = int(N w) warm-up steps (steps 0..W, 0-indexed, are full: W + 1 of them) the base runs
in full every `refresh_interval` steps. At the other steps only the (1 - c) fraction of sequence
rows whose largest image-code logit was lowest at the previous step goes through the layers:
their K/V rows overwrite the per-layer cache, their queries attend over the whole cached K/V, and
every other row keeps its cached output (its logits, here its final features). Rows are all of
the sequence's (prompt, layout tokens, decoded and masked image cells), as in the reference.

Reference facts this relies on (Alpha-VLLM/Lumina-DiMOO@81344e6):
- generators/image_generation_generator.py l.74-79: warmup_step = int(timesteps * warmup_ratio);
  step (0-indexed) is a refresh step iff step <= warmup_step or (step - warmup_step) %
  refresh_interval == 0; l.98-102 the caches are emptied at refresh steps; l.138-145 after step s,
  if step s+1 is not a refresh step, per branch: conf = max over the image-code logits at every
  position of the sequence, threshold = torch.quantile(conf.float(), 1 - cache_ratio) (linear
  interpolation), recompute the positions with conf <= threshold: ties at the threshold are
  all included, so the count is floor((1 - c)(T - 1)) + 1 for T distinct values and more where
  scores tie (bf16 max-logits tie often). `select_rows` is that selection.
- model/modeling_llada.py LLaDAModel.forward l.1244: only the selected input ids are embedded;
  LLaDALlamaBlock.forward l.929-940: their k/v overwrite the cache rows ('cond' and 'uncond'
  caches apart), attention of their queries over the whole cache with RoPE at their positions
  (attention, q_mask = the selected indices); l.1406-1411 their logits overwrite the logit cache,
  the others keep theirs.
- README.md l.185 / inference/inference_t2i.py l.41-43: cache_ratio in (0, 1), warmup_ratio in
  [0, 1), refresh_interval in (1, N - int(w N) - 1]; defaults 0.9, 0.3, 5. Here c = 0 is allowed
  too (every row recomputed: the cache path checked against vanilla) and r = 1 is vanilla.
- differences, named: both CFG branches (and every sample) run in one batch here, and a batch
  recomputes one count of rows per row: each row recomputes every row the reference's rule
  selects in it, and rows whose selection is smaller than the batch's largest are padded with
  their next-lowest-confidence rows (recomputing a row more only brings it closer to vanilla);
  the quantile is taken over each row's real (not padding) positions, as the reference's
  unpadded per-branch sequences have it, and padding rows are chosen only as that padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from migm.accel.method import Method
from migm.models.layers import cached_forward, flop_share, gather_rows, put_rows, rows_forward
from migm.sampling.loop import FeatureSource, StepContext, StepOutput


def select_rows(conf: torch.Tensor, cache_ratio: float, valid: torch.Tensor | None = None,
                count: int | None = None) -> torch.Tensor:
    """The reference's `conf <= torch.quantile(conf, 1 - c)` per row, ties included, as indices.

    Args:
        conf: (B, T) each row's largest image-code logit at the previous step.
        cache_ratio: c, the share kept from the cache.
        valid: (B, T) bool, False at padding (None: all real); the quantile is over real rows.
        count: R fixed instead (the same ranking cut there): another run's count repeated.
    Returns:
        (B, R) row indices, R the largest selection of any row: each row's own selection first
        (lowest confidence first within it), then, where its selection is smaller, its next
        lowest-confidence rows (real ones before padding) to fill R.
    """
    real = conf.float() if valid is None else conf.float().masked_fill(~valid, float("nan"))
    threshold = torch.nanquantile(real, 1 - cache_ratio, dim=-1, keepdim=True)     # (B, 1) fp32
    chosen = conf <= threshold                                                      # NaN: False
    if valid is not None:
        chosen &= valid
    R = int(chosen.sum(1).max()) if count is None else count
    # sort key: chosen rows, then the others by confidence (padding, conf inf, last)
    key = conf.float().masked_fill(chosen, float("-inf"))
    if valid is not None:
        key = key.masked_fill(~valid, float("inf"))
    order = torch.sort(conf.float(), dim=-1, stable=True).indices                   # (B, T)
    ranked = torch.sort(key.gather(1, order), dim=-1, stable=True).indices          # (B, T)
    return order.gather(1, ranked[:, :R])                                           # (B, R)


@dataclass
class MLCacheConfig:
    """One setting. The paper's (w, r, c) = (0.1, 5, 0.9) and (0.0, 5, 0.9) at 64 steps."""

    warmup_ratio: float = 0.1      # w in [0, 1): steps 0..int(N w) (0-indexed) are full
    refresh_interval: int = 5      # r: a full step every r steps after the warm-up (1 = vanilla)
    cache_ratio: float = 0.9       # c in [0, 1): share of rows kept from the cache between
                                   # (0: every row recomputed, a check of the cache's code path)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"ML-Cache.warmup_ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if not isinstance(self.refresh_interval, int) or self.refresh_interval < 1:
            raise ValueError(f"ML-Cache.refresh_interval: must be an integer >= 1, got "
                             f"{self.refresh_interval!r}")
        if not 0 <= self.cache_ratio < 1:
            raise ValueError(f"ML-Cache.cache_ratio: must lie in [0, 1), got {self.cache_ratio}")

    def check_steps(self, steps: int) -> None:
        W = int(steps * self.warmup_ratio)
        if W >= steps - 1:
            raise ValueError(f"ML-Cache.warmup_ratio: {self.warmup_ratio} at N={steps} makes "
                             f"steps 1..{W + 1} warm-up, the whole run: the cache never applies")
        if self.refresh_interval > steps - W - 1:
            raise ValueError(f"ML-Cache.refresh_interval: {self.refresh_interval} > N - int(N w) - 1 "
                             f"= {steps - W - 1} at N={steps}: no refresh after the warm-up (the "
                             f"reference's README bounds it so)")

    def refresh_steps(self, steps: int) -> list[int]:
        """1-indexed full steps (the reference's loop over 0-indexed steps, shifted by one)."""
        W = int(steps * self.warmup_ratio)
        return [j + 1 for j in range(steps) if j <= W or (j - W) % self.refresh_interval == 0]


class MLCacheSource(FeatureSource):
    def __init__(self, model, config: MLCacheConfig, steps: int) -> None:
        super().__init__()
        config.check_steps(steps)
        self.model, self.config, self.steps = model, config, steps
        self.refresh = frozenset(config.refresh_steps(steps))
        self.repeat: list[int] | None = None        # R of each partial step, from another run
        self.reset()

    def reset(self) -> None:
        self.cache: list[dict[str, torch.Tensor]] = []   # per layer: k, v of every row
        self.rows_out: torch.Tensor | None = None   # (B, T, D) final features of every row
        self.conf: torch.Tensor | None = None       # (B, T) largest code logit of every row
        self.counts: list[int] = []                 # R of each partial step so far

    def work(self) -> list[int]:
        """R, the rows each partial step recomputed: ties at the threshold decide it, so it
        depends on the features (a base with no layer ties at every masked row)."""
        return list(self.counts)

    def repeat_work(self, work: list) -> None:
        self.repeat = list(work)

    def step(self, ctx: StepContext) -> StepOutput:
        m = self.model
        s = m.embed_sequence(ctx.tokens, ctx.cond)
        shape, (B, T), L = m.layer_shape(), s.hidden.shape[:2], s.grid.shape[1]
        rank_next = ctx.step < self.steps and ctx.step + 1 not in self.refresh
        if ctx.step in self.refresh or self.conf is None:
            h, self.cache = cached_forward(m, s)
            self.rows_out = m.final(h)                                          # (B, T, D)
            spent = shape.call(B, T, L) + B * (T - L) * shape.final_row
            if rank_next:
                self.conf = self._confidence(self.rows_out, s.rows, s)
                spent += B * shape.head(T)
            return StepOutput(gather_rows(self.rows_out, s.grid), base_flops=flop_share(shape, s, spent))
        rows = self._pick(s)                                                     # (B, R)
        R = rows.shape[1]
        fresh = m.final(rows_forward(m, s, rows, self.cache))
        put_rows(self.rows_out, rows, fresh)
        spent = B * (T * shape.embed_row + shape.depth * shape.layer(R, T) + R * shape.final_row)
        if rank_next:
            put_rows(self.conf, rows, self._confidence(fresh, rows, None))
            spent += B * shape.head(R)
        return StepOutput(gather_rows(self.rows_out, s.grid), full=False, kind="partial_steps",
                          base_flops=flop_share(shape, s, spent))

    def _confidence(self, features: torch.Tensor, rows: torch.Tensor, s) -> torch.Tensor:
        conf = self.model.row_logits(features, rows).float().amax(-1)           # (B, M)
        if s is not None and s.key_mask is not None:
            conf = conf.masked_fill(~s.key_mask, float("inf"))                  # padding: never
        return conf

    def _pick(self, s) -> torch.Tensor:
        """The rows to recompute (select_rows over the previous step's confidences; as many as
        the repeated run's step recomputed, where one is repeated)."""
        count = self.repeat[len(self.counts)] if self.repeat is not None else None
        rows = select_rows(self.conf, self.config.cache_ratio, s.key_mask, count)
        self.counts.append(rows.shape[1])
        return rows


@dataclass
class MLCache(Method):
    """ML-Cache on the one loop. Swept: `steps`, `warmup_ratio` (w), `refresh_interval` (r),
    `cache_ratio` (c)."""

    warmup_ratio: list[float] = field(default_factory=lambda: [0.1])
    refresh_interval: list[int] = field(default_factory=lambda: [5])
    cache_ratio: list[float] = field(default_factory=lambda: [0.9])

    name: ClassVar[str] = "ml_cache"

    def check(self, steps: int, warmup_ratio: float, refresh_interval: int, cache_ratio: float,
              **knobs) -> None:
        super().check(steps)
        MLCacheConfig(warmup_ratio, refresh_interval, cache_ratio).check_steps(steps)

    def label(self, steps: int, warmup_ratio: float, refresh_interval: int, cache_ratio: float,
              **knobs) -> str:
        return f"N{steps}/w{warmup_ratio:g}/r{refresh_interval}/c{cache_ratio:g}"

    def source(self, model, shortcut, steps: int, warmup_ratio: float, refresh_interval: int,
               cache_ratio: float, **knobs):
        return MLCacheSource(model, MLCacheConfig(warmup_ratio, refresh_interval, cache_ratio), steps)
