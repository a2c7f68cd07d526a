"""MaskGIT's confidence-based sampler K(x_i | x_{i-1}, p_i): the per-step work that is not the model.

Tokens are drawn from the (guided, tempered) distribution at every position; the positions to
keep are the most confident masked ones, with Gumbel noise on the confidences so early steps
explore and late steps commit. Decoded positions are never chosen again, so a token once placed
never changes. Everything here is a handful of vectorised ops: it runs at every step, including
the shortcut steps whose point is to be cheap.

The references differ only in a few choices, so they are fields of one config rather than
separate samplers (the defaults are this project's original sampler, bit for bit):

| choice                 | default (ours)    | MaskGIT reference        | Lumina-DiMOO        |
| ---------------------- | ----------------- | ------------------------ | ------------------- |
| guidance weight at i   | w                 | w (i-1)/(N-1)            | w                   |
| logits before softmax  | / temperature     | * sm_temp (logit_scale)  | / temperature       |
| confidence softmax     | tempered          | tempered                 | untempered          |
| Gumbel scale at step i | c (1 - (i-1)/N)   | r_temp (1 - (i-1)/(N-1)) | temperature         |
| Gumbel noise dtype     | fp32              | fp64 (numpy), cast fp32  | bf16                |
| sampler arithmetic     | fp32              | fp32                     | bf16                |

Reference facts this relies on:
- valeoai/Maskgit-pytorch@674ef1d Trainer/vit.py `sample` (l.397-430): `_w = w * (indice /
  (len(scheduler) - 1))` with indice = i - 1; `logit = (1 + _w) * cond - _w * uncond`;
  `prob = softmax(logit * sm_temp)`; the token is drawn from `prob`; confidence =
  log(prob[drawn]) + r_temp * gumbel * (1 - indice / (len(scheduler) - 1)); top-k over the masked
  positions. Kaiwen-Zhu/MIGM-Shortcut MaskGIT-Shortcut/Trainer/vit.py l.560-586: the same.
- Alpha-VLLM/Lumina-DiMOO@81344e6 generators/image_generation_generator.py l.118-133 and
  utils/generation_utils.py l.40-61: `(1 + cfg) * cond - cfg * uncond` at every step; the token is
  argmax(logits / temperature + gumbel); confidence = log(softmax(logits)[drawn]) (untempered) +
  temperature * gumbel, the same scale at every step.
- Alpha-VLLM/Lumina-DiMOO@81344e6 utils/generation_utils.py l.31-37 gumbel_noise: u =
  torch.rand_like(t) (or torch.rand(..., dtype=t.dtype)), g = -log(-log(u + 1e-20) + 1e-20), all
  in t's dtype; t is the CFG-mixed logits (gumbel_max_sample) or the softmax probabilities
  (mask_by_random_topk), both bf16 because the model is loaded in bf16, so the draws, the sums
  logits / tau + g and log(p) + T g, and the softmax are bf16. The largest bf16 below 1 is
  1 - 2^-8, so u + 1e-20 <= 1 - 2^-8, -log of it rounds to 2^-8 and g is at most bf16(8 ln 2) =
  5.53125 (fp32: 16.64): a token whose logit / tau is more than ~9.4 below its row's best can
  never be drawn. `noise_dtype` / `logits_dtype` "bfloat16" reproduce this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

CFG_SCHEDULES = ("constant", "linear")
CHOICE_SCHEDULES = ("linear", "linear_to_zero", "constant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SamplerConfig:
    temperature: float = 1.0          # divides the logits before the softmax that draws tokens
    choice_temperature: float = 3.0   # Gumbel scale on confidences at step 1 (MaskGIT's r_temp)
    cfg_weight: float = 1.0           # w: logits = (1 + w) * cond - w * uncond; 0 disables CFG
    logit_scale: float = 1.0          # multiplies the logits before the softmax (MaskGIT's sm_temp)
    cfg_schedule: Literal["constant", "linear"] = "constant"
    """Guidance weight at step i: "constant" w; "linear" w (i-1)/(N-1), none at step 1 (MaskGIT)."""
    choice_schedule: Literal["linear", "linear_to_zero", "constant"] = "linear"
    """Factor on choice_temperature at step i: "linear" 1 - (i-1)/N; "linear_to_zero"
    1 - (i-1)/(N-1), no noise at the last step (MaskGIT); "constant" 1 (Lumina-DiMOO)."""
    tempered_confidence: bool = True
    """Confidence from the scaled/tempered softmax that drew the token (MaskGIT); False: from the
    softmax of the guided logits as they come (Lumina-DiMOO). The same at temperature 1."""
    noise_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype the Gumbel noise is drawn and computed in. "bfloat16": as Lumina-DiMOO draws it
    (torch.rand in bf16, -log(-log(u + 1e-20) + 1e-20) in bf16), which caps the noise at 5.53125
    and quantises it; "float32" (ours, MaskGIT's up to its fp64 draw) reaches 16.6."""
    logits_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the sampler's arithmetic: the guided logits are cast to it before the scaling, the
    noised argmax and the confidence (Lumina-DiMOO: bf16, its logits' dtype); in bf16 the
    confidence is the reference's log(softmax[drawn].clamp_min(1e-20)), in fp32 log_softmax (the
    same up to rounding). The guidance mix before it is the loop's, in fp32 of the base's logits
    (bf16-exact for DiMOO), rounded once here where the reference rounds each product.
    "float16": MaskGIT's, whose softmax runs on the fp16 logits of its autocast forward (there the
    confidence is log(softmax[drawn]), -inf where fp16 underflows, as in the reference)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:                     # NaN fails this too
            raise ValueError(f"sampler.temperature: must be > 0, got {self.temperature}")
        if not self.choice_temperature >= 0:
            raise ValueError(f"sampler.choice_temperature: must be >= 0, got {self.choice_temperature}")
        if not self.cfg_weight >= 0:
            raise ValueError(f"sampler.cfg_weight: must be >= 0, got {self.cfg_weight}")
        if not self.logit_scale > 0:
            raise ValueError(f"sampler.logit_scale: must be > 0, got {self.logit_scale}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"sampler.cfg_schedule: must be one of {list(CFG_SCHEDULES)}, got "
                             f"{self.cfg_schedule!r}")
        if self.choice_schedule not in CHOICE_SCHEDULES:
            raise ValueError(f"sampler.choice_schedule: must be one of {list(CHOICE_SCHEDULES)}, got "
                             f"{self.choice_schedule!r}")
        if not isinstance(self.tempered_confidence, bool):
            raise ValueError(f"sampler.tempered_confidence: must be true or false, got "
                             f"{self.tempered_confidence!r}")
        for name, allowed in (("noise_dtype", ("float32", "bfloat16")), ("logits_dtype", tuple(DTYPES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"sampler.{name}: one of {list(allowed)}, got {getattr(self, name)!r}")

    @property
    def branches(self) -> int:
        """1 without guidance, 2 with (conditional and unconditional rows stacked)."""
        return 2 if self.cfg_weight > 0 else 1

    def check_steps(self, steps: int) -> None:
        """The ramps that divide by N - 1 are undefined at one step (the reference's 0/0)."""
        if steps < 2 and self.cfg_schedule == "linear" and self.cfg_weight > 0:
            raise ValueError(f"cfg_schedule 'linear' needs steps >= 2 (its weight is "
                             f"w (i-1)/(N-1)), got steps={steps}")
        if steps < 2 and self.choice_schedule == "linear_to_zero" and self.choice_temperature > 0:
            raise ValueError(f"choice_schedule 'linear_to_zero' needs steps >= 2 (its factor is "
                             f"1 - (i-1)/(N-1)), got steps={steps}")

    def guidance_weight(self, step: int, steps: int) -> float:
        """w_i for step i of N (1-based)."""
        if self.cfg_schedule == "constant" or self.cfg_weight == 0:
            return self.cfg_weight
        self.check_steps(steps)
        return self.cfg_weight * ((step - 1) / (steps - 1))

    def noise_factor(self, step: int, steps: int) -> float:
        """The factor on choice_temperature at step i of N (1-based)."""
        if self.choice_schedule == "linear":
            return 1.0 - (step - 1) / steps
        if self.choice_schedule == "constant":
            return 1.0
        self.check_steps(steps)
        if steps == 1:                    # only with choice_temperature 0: no noise to scale
            return 0.0
        return 1.0 - (step - 1) / (steps - 1)


def gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel noise of `shape`. fp32: this project's original draw (kept bit for bit);
    another dtype: Lumina-DiMOO's gumbel_noise, every op in that dtype."""
    if dtype == torch.float32:
        u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0)
        return -torch.log((-torch.log(u)).clamp_min(1e-20))
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


def guide(logits: torch.Tensor, cfg_weight: float, branches: int | None = None) -> torch.Tensor:
    """Stacked logits (branches*B, L, K) -> guided logits (B, L, K).

    `branches` says how the rows are stacked; by default 2 exactly when cfg_weight > 0 (as
    SamplerConfig.branches). A ramped weight is 0 at step 1 while both branches are stacked: the
    formula then returns the conditional rows (exactly, as in the reference).
    """
    if branches is None:
        branches = 2 if cfg_weight > 0 else 1
    if branches == 1:
        return logits
    cond, uncond = logits.chunk(2)
    return (1 + cfg_weight) * cond - cfg_weight * uncond


def sample_step(logits: torch.Tensor, n_reveal: int, t: float, config: SamplerConfig,
                generator: torch.Generator, *, step: int | None = None,
                steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One unmasking step over the still-masked positions only.

    Every row of a batch has the same number M of masked positions (each step reveals the same
    count in every row), so the loop gathers them and the head and sampler never touch decoded
    positions: half the per-step work on average, and that work is what no accelerator removes.

    Args:
        logits: guided logits (B, M, K) at the M still-masked positions of each row.
        n_reveal: how many of them to fill in every row.
        t: t_{i-1} = (i-1)/N in [0, 1); used for the Gumbel factor when step/steps are absent
            (only the "linear" choice_schedule, 1 - t, can be computed from it).
        step, steps: i (1-based) and N; the loop always passes them.
    Returns:
        (drawn tokens (B, M), keep (B, M) bool: the n_reveal positions filled at this step).
    """
    if step is None or steps is None:
        if config.choice_schedule != "linear":
            raise ValueError(f"choice_schedule {config.choice_schedule!r} needs sample_step's "
                             f"step and steps")
        factor = 1.0 - t
    else:
        factor = config.noise_factor(step, steps)
    noise = DTYPES[config.noise_dtype]
    raw = logits.to(DTYPES[config.logits_dtype])                                         # (B, M, K)
    scaled = raw * config.logit_scale if config.logit_scale != 1.0 else raw
    scaled = scaled / config.temperature
    drawn = (scaled + gumbel(scaled.shape, generator, scaled.device, noise)).argmax(-1)  # (B, M)
    scored = scaled if config.tempered_confidence else raw
    if config.logits_dtype == "float32":
        confidence = torch.log_softmax(scored, -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    else:                               # the reference's ops, in its dtype (rounding differs)
        p = torch.softmax(scored, -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)       # (B, M)
        confidence = torch.log(p.clamp_min(1e-20))
    if config.choice_temperature > 0:
        confidence = confidence + config.choice_temperature * factor * gumbel(
            confidence.shape, generator, confidence.device, noise)
    chosen = confidence.topk(n_reveal, dim=-1).indices                                  # (B, n)
    keep = torch.zeros_like(drawn, dtype=torch.bool).scatter_(1, chosen, True)
    return drawn, keep
