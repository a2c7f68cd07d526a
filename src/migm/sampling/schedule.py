"""Mask schedules gamma(t): the fraction of tokens still masked at time t in [0, 1].

gamma(0) = 1 (all masked), gamma(1) = 0, monotone decreasing. With t_i = i/N, step i reveals
ceil(L*gamma(t_{i-1})) - ceil(L*gamma(t_i)) tokens, so exactly L are revealed after N steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Schedule = Callable[[torch.Tensor], torch.Tensor]


def arccos(t: torch.Tensor) -> torch.Tensor:
    """MaskGIT's recommended inference schedule: slow start, most tokens revealed late."""
    return torch.arccos(t.clamp(0, 1)) / (math.pi / 2)


def cosine(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t.clamp(0, 1) * math.pi / 2)


def linear(t: torch.Tensor) -> torch.Tensor:
    return 1.0 - t.clamp(0, 1)


SCHEDULES: dict[str, Schedule] = {"arccos": arccos, "cosine": cosine, "linear": linear}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]


def masked_counts(num_tokens: int, steps: int, schedule: str = "arccos") -> list[int]:
    """Number of still-masked tokens before step 1 and after each step: length N+1, from L to 0.

    Each step reveals at least one token: a schedule that would reveal none at some step (flat
    regions with small L and large N) is pushed down by one, so no base call is wasted.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > num_tokens:
        raise ValueError(f"steps ({steps}) cannot exceed the number of tokens L={num_tokens}: "
                         "every step must reveal at least one token")
    gamma = get_schedule(schedule)
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    counts = torch.ceil(num_tokens * gamma(t) - 1e-9).long().tolist()
    counts[0], counts[-1] = num_tokens, 0
    # Enforce strict decrease (at least one token a step) while keeping the endpoints.
    for i in range(1, steps + 1):
        counts[i] = min(counts[i], counts[i - 1] - 1)
    for i in range(steps - 1, 0, -1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def reveal_counts(num_tokens: int, steps: int, schedule: str = "arccos") -> list[int]:
    """Tokens revealed at steps 1..N; sums to L."""
    c = masked_counts(num_tokens, steps, schedule)
    return [c[i - 1] - c[i] for i in range(1, steps + 1)]
