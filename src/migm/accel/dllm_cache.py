"""dLLM-Cache (Liu et al. 2025): per-layer caches refreshed on two clocks, plus a V-guided refresh.

Every layer caches K, V, its attention output and its MLP output for two segments of the
sequence: the condition (prompt, class token; refreshed every `prompt_interval` steps, Kp) and
the generated part (the image's rows; every `gen_interval` steps, Kr). A refreshed segment's rows
are recomputed (queries over all keys, cached or fresh); a segment not refreshed reuses its
cached attention and MLP outputs, added to the *current* residual stream. Between the generated
part's refreshes, V is recomputed for all of its rows and the `transfer_ratio` (rho) fraction
whose V moved most (lowest cosine to the cached V) get fresh K, attention and MLP, overwriting
their cache rows; V's cache takes all the new values.

Reference facts this relies on (maomaocun/dLLM-cache@17235bf):
- dllm_cache/cache/Cache.py: current_step is the forward's 1-based index (a per-layer counter
  bumped at each block entry, max over layers); refresh_gen iff (step - 1) % gen_interval_steps ==
  0, refresh_prompt iff (step - 1) % prompt_interval_steps == 0: both at step 1.
- dllm_cache/hooks/cache_hook_MMaDA.py cache_hook_feature: the four cases; prompt = rows
  [:prompt_length], gen = the rest; refresh_index: num_replace = int(gen_len * transfer_ratio)
  rows with the lowest cosine_similarity(v_new, v_cached) over the feature dim (kv heads
  flattened); transfer only when 0 < transfer_ratio <= 1; the refreshed rows' q and k recomputed,
  V cache replaced by all new values, K cache scattered at the rows, their attention (RoPE at
  their positions, q_index) and MLP outputs scattered into the caches; x = x + attention (cached
  or fresh), then og_x + MLP (cached or fresh).
- LLaDA_test_flops_script.py / Dream_test_flops_script.py l.24: --transfer_ratio defaults to 0.25,
  as every cache-enabled scripts/run_* passes; demo_MMada_t2i_cache.py l.16-19 (text-to-image)
  sets 0.0; dllm_cache/cache/Config.py defaults to 0.0. The paper's Table 2 gives (Kp, Kr) only:
  rho is ours to choose, and is swept (configs/dimoo.yaml, experiments/pareto.yaml).
- refresh_index (cache_hook_MMaDA.py l.129-141): cosine_similarity(new V, cached V, dim=-1) per
  row over v_proj's whole output (heads not split), in the model dtype; topk(largest=False,
  k=int(gen_len * transfer_ratio)). `refresh_rows` is that.
- demo_MMada_t2i_cache.py batches both CFG branches into one forward, so one clock serves both;
  it sets prompt_length to the whole input length (everything is "prompt"): the t2i demo never
  exercises the gen segment. Here the generated segment is the image part (Stream.generated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange

from migm.accel.method import Method
from migm.models.layers import attend, cached_forward, flop_share, gather_rows, put_rows
from migm.sampling.loop import FeatureSource, StepContext, StepOutput


def refresh_rows(v_new: torch.Tensor, v_cached: torch.Tensor, rho: float) -> torch.Tensor:
    """The generated rows to refresh between refreshes: the int(G rho) rows whose new V is least
    like the cached one (refresh_index of the reference).

    Args:
        v_new, v_cached: (B, G, F) V rows, all kv heads concatenated (v_proj's output layout).
        rho: transfer_ratio.
    Returns:
        (B, int(G rho)) row indices into G, lowest cosine first. The cosine runs in the inputs'
        dtype (the model's: bf16 for DiMOO), as the reference computes it, so near-ties break as
        there.
    """
    cos = F.cosine_similarity(v_new, v_cached, dim=-1)                              # (B, G)
    return cos.topk(int(v_new.shape[1] * rho), dim=-1, largest=False).indices


@dataclass
class DLLMCacheConfig:
    """One setting. The paper's (Kp, Kr) = (10, 5) and (64, 16) at DiMOO's 64 steps."""

    prompt_interval: int = 10    # Kp: the condition segment is recomputed every Kp steps
    gen_interval: int = 5        # Kr: the generated segment is recomputed every Kr steps
    transfer_ratio: float = 0.25  # rho in [0, 1]: share of generated rows refreshed in between
                                  # (0: none). Not in the MIGM-Shortcut paper, so any value is
                                  # OUR choice: the repo's eval scripts use 0.25, its
                                  # text-to-image demo 0.0; configs sweep 0, 0.25, 0.5

    def __post_init__(self) -> None:
        for name in ("prompt_interval", "gen_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"dLLM-Cache.{name}: must be an integer >= 1, got {value!r}")
        if not 0 <= self.transfer_ratio <= 1:
            raise ValueError(f"dLLM-Cache.transfer_ratio: must lie in [0, 1] (0 = no transfer), "
                             f"got {self.transfer_ratio}")

    def check_steps(self, steps: int) -> None:
        for name in ("prompt_interval", "gen_interval"):
            if getattr(self, name) > steps:
                raise ValueError(f"dLLM-Cache.{name}: {getattr(self, name)} > N={steps}: the cache "
                                 f"would never be refreshed on that clock")

    def refreshes(self, step: int) -> tuple[bool, bool]:
        """(condition, generated) refreshed at 1-indexed `step` (Cache.py)."""
        return (step - 1) % self.prompt_interval == 0, (step - 1) % self.gen_interval == 0


class DLLMCacheSource(FeatureSource):
    def __init__(self, model, config: DLLMCacheConfig, steps: int) -> None:
        super().__init__()
        config.check_steps(steps)
        self.model, self.config, self.steps = model, config, steps
        self.reset()

    def reset(self) -> None:
        self.cache: list[dict[str, torch.Tensor]] = []    # per layer: k, v, attn, mlp

    def step(self, ctx: StepContext) -> StepOutput:
        m = self.model
        s = m.embed_sequence(ctx.tokens, ctx.cond)
        shape, (B, T) = m.layer_shape(), s.hidden.shape[:2]
        refresh_ctx, refresh_gen = self.config.refreshes(ctx.step)
        refresh_ctx = refresh_ctx or s.context.shape[1] == 0
        if (refresh_ctx and refresh_gen) or not self.cache:
            h, self.cache = cached_forward(m, s, keep=("k", "v", "attn", "mlp"))
            return StepOutput(m.final(gather_rows(h, s.grid)))
        h, spent = s.hidden, B * (T * shape.embed_row + s.grid.shape[1] * shape.final_row)
        for layer, c in zip(m.layers(), self.cache):
            h, flops = self._layer(layer, c, h, s, refresh_ctx, refresh_gen, shape)
            spent += flops
        return StepOutput(m.final(gather_rows(h, s.grid)), full=False, kind="partial_steps",
                          base_flops=flop_share(shape, s, spent))

    def _layer(self, layer, c: dict, h: torch.Tensor, s, refresh_ctx: bool, refresh_gen: bool,
               shape) -> tuple[torch.Tensor, int]:
        """One layer's partial step; returns its output rows and the FLOPs it spent."""
        m, B, T = self.model, h.shape[0], h.shape[1]
        x = layer.attn_input(h)                                                  # (B, T, D)
        queries, rows = [], []                                                   # rows recomputed
        flops = 0
        for seg, refresh in ((s.context, refresh_ctx), (s.generated, refresh_gen)):
            if refresh and seg.shape[1]:
                q, k, v = layer.project(gather_rows(x, seg), m.position_encoding(seg))
                put_rows(c["k"], seg, k, dim=2), put_rows(c["v"], seg, v, dim=2)
                queries.append(q), rows.append(seg)
                flops += shape.q(seg.shape[1]) + 2 * shape.k(seg.shape[1])
        G = s.generated.shape[1]
        if not refresh_gen and self.config.transfer_ratio > 0:
            gen = s.generated
            xg = gather_rows(x, gen)
            v_new, = layer.project(xg, m.position_encoding(gen), "v")            # (B, Hkv, G, d)
            flat = lambda t: rearrange(t, "b h g d -> b g (h d)")                # v_proj's output
            pick = refresh_rows(flat(v_new), flat(gather_rows(c["v"], gen, dim=2)),
                                self.config.transfer_ratio)                      # (B, S)
            sel = gen.gather(1, pick)                                            # (B, S) rows
            q, k = layer.project(gather_rows(xg, pick), m.position_encoding(sel), "qk")
            put_rows(c["v"], gen, v_new, dim=2), put_rows(c["k"], sel, k, dim=2)
            queries.append(q), rows.append(sel)
            flops += shape.v(G) + shape.q(sel.shape[1]) + shape.k(sel.shape[1])
        fresh = torch.cat(rows, 1) if rows else None                              # (B, R)
        if fresh is not None:
            a = layer.project_attn(attend(torch.cat(queries, 2), c["k"], c["v"], s.key_mask))
            put_rows(c["attn"], fresh, a)
        h = h + c["attn"]
        if fresh is not None:
            put_rows(c["mlp"], fresh, layer.mlp_branch(gather_rows(h, fresh)))
            R = fresh.shape[1]
            flops += shape.attention(R, T) + shape.out(R) + shape.mlp(R)
        return h + c["mlp"], B * flops


@dataclass
class DLLMCache(Method):
    """dLLM-Cache on the one loop. Swept: `steps`, `prompt_interval` (Kp), `gen_interval` (Kr);
    fixed: `transfer_ratio` (rho: not given by the paper, so our choice; sweep it with one entry
    per value and a `tag`)."""

    prompt_interval: list[int] = field(default_factory=lambda: [10])
    gen_interval: list[int] = field(default_factory=lambda: [5])
    transfer_ratio: float = 0.25

    name: ClassVar[str] = "dllm_cache"

    def config(self, prompt_interval: int, gen_interval: int) -> DLLMCacheConfig:
        return DLLMCacheConfig(prompt_interval, gen_interval, self.transfer_ratio)

    def check(self, steps: int, prompt_interval: int, gen_interval: int, **knobs) -> None:
        super().check(steps)
        self.config(prompt_interval, gen_interval).check_steps(steps)

    def label(self, steps: int, prompt_interval: int, gen_interval: int, **knobs) -> str:
        return f"N{steps}/Kp{prompt_interval}/Kr{gen_interval}"

    def source(self, model, shortcut, steps: int, prompt_interval: int, gen_interval: int, **knobs):
        return DLLMCacheSource(model, self.config(prompt_interval, gen_interval), steps)
