"""MaskGIT's confidence-based sampler K(x_i | x_{i-1}, p_i): the per-step work that is not the model.

Tokens are drawn from the (guided, tempered) distribution at every position; the positions to
keep are the most confident masked ones, with Gumbel noise annealed towards zero so early steps
explore and late steps commit. Decoded positions are never chosen again, so a token once placed
never changes. Everything here is a handful of vectorised ops: it runs at every step, including
the shortcut steps whose point is to be cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplerConfig:
    temperature: float = 1.0          # softmax temperature for drawing tokens
    choice_temperature: float = 3.0   # scale of the Gumbel noise on confidences, times (1 - t)
    cfg_weight: float = 1.0           # w: logits = (1 + w) * cond - w * uncond; 0 disables CFG

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")
        if self.cfg_weight < 0:
            raise ValueError(f"cfg_weight must be >= 0, got {self.cfg_weight}")

    @property
    def branches(self) -> int:
        """1 without guidance, 2 with (conditional and unconditional rows stacked)."""
        return 2 if self.cfg_weight > 0 else 1


def gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(1e-20))


def guide(logits: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """Stacked logits (branches*B, L, K) -> guided logits (B, L, K)."""
    if cfg_weight == 0:
        return logits
    cond, uncond = logits.chunk(2)
    return (1 + cfg_weight) * cond - cfg_weight * uncond


def sample_step(logits: torch.Tensor, n_reveal: int, t: float, config: SamplerConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One unmasking step over the still-masked positions only.

    Every row of a batch has the same number M of masked positions (each step reveals the same
    count in every row), so the loop gathers them and the head and sampler never touch decoded
    positions: half the per-step work on average, and that work is what no accelerator removes.

    Args:
        logits: guided logits (B, M, K) at the M still-masked positions of each row.
        n_reveal: how many of them to fill in every row.
        t: t_{i-1} in [0, 1); the Gumbel scale is choice_temperature * (1 - t).
    Returns:
        (drawn tokens (B, M), keep (B, M) bool: the n_reveal positions filled at this step).
    """
    logits = logits.float() / config.temperature
    drawn = (logits + gumbel(logits.shape, generator, logits.device)).argmax(-1)       # (B, M)
    confidence = torch.log_softmax(logits, -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    if config.choice_temperature > 0:
        confidence = confidence + config.choice_temperature * (1.0 - t) * gumbel(
            confidence.shape, generator, confidence.device)
    chosen = confidence.topk(n_reveal, dim=-1).indices                                  # (B, n)
    keep = torch.zeros_like(drawn, dtype=torch.bool).scatter_(1, chosen, True)
    return drawn, keep
