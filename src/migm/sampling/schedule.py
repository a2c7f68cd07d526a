"""Mask schedules: how many tokens are still masked after each of the N steps.

Two kinds, both selected by name. A *gamma* schedule gamma(t) (arccos, cosine, linear) is the
fraction still masked at time t in [0, 1]: with t_i = i/N, step i reveals
ceil(L*gamma(t_{i-1})) - ceil(L*gamma(t_i)) tokens, so exactly L are revealed after N steps.
A *count* schedule is a reference implementation's own per-step arithmetic, transcribed so that
our loop reveals exactly the counts the reference reveals (its trajectories, mask ratios and FID
depend on them; the gamma formula with the same curve gives other counts):

- `maskgit_reference`: MaskGIT's `adap_sche`, arccos mode.
- `dimoo_cosine`: Lumina-DiMOO's cosine keep-masked rule.

Reference facts this relies on (exact float32 arithmetic, CPU, as the references run it):
- valeoai/Maskgit-pytorch@674ef1d Trainer/vit.py `adap_sche` (l.141-169): r = linspace(1, 0, N)
  (float32), v = arccos(r) / (pi/2), reveals = round(v / sum(v) * L) (round half to even), zeros
  raised to 1, then L - sum added to the last entry. v[0] = 0, so step 1 reveals one token; at
  N = 1 the division is 0/0. Kaiwen-Zhu/MIGM-Shortcut MaskGIT-Shortcut/Trainer/vit.py l.148-176
  is the same.
- Alpha-VLLM/Lumina-DiMOO@81344e6 generators/image_generation_generator.py (l.91-96, 133) and
  utils/generation_utils.py `mask_by_random_topk` (l.48-61): after 0-based step s < N-1,
  keep = max(1, floor(float32(L) * cos(0.5 pi (s+1)/N))) stay masked, 0 after the last; the
  top-k cut clamps keep to at most (masked now) - 1, so every step reveals at least one token.
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


def maskgit_reference(num_tokens: int, steps: int) -> list[int]:
    """Still-masked counts (length N+1, L to 0) of MaskGIT's `adap_sche` (arccos mode)."""
    if steps < 2:
        raise ValueError(f"schedule 'maskgit_reference' needs steps >= 2 (the reference divides "
                         f"by its schedule's sum, 0 at one step), got {steps}")
    r = torch.linspace(1, 0, steps, dtype=torch.float32)
    v = torch.arccos(r) / (math.pi * 0.5)
    reveals = ((v / v.sum()) * num_tokens).round()
    reveals[reveals == 0] = 1
    reveals[-1] += num_tokens - reveals.sum()
    reveals = reveals.int().tolist()
    if reveals[-1] < 1:
        raise ValueError(f"schedule 'maskgit_reference' at L={num_tokens} reveals "
                         f"{reveals[-1]} tokens at step {steps} (the reference would stop early): "
                         f"use fewer steps")
    counts = [num_tokens]
    for n in reveals:
        counts.append(counts[-1] - n)
    return counts


def dimoo_cosine(num_tokens: int, steps: int) -> list[int]:
    """Still-masked counts (length N+1, L to 0) of Lumina-DiMOO's `generate_image`."""
    length = torch.tensor([[num_tokens]])
    counts = [num_tokens]
    for s in range(steps - 1):                    # s: the reference's 0-based step
        frac = torch.cos(0.5 * math.pi * torch.tensor([(s + 1) / steps], dtype=torch.float32))
        keep = int((length.float() * frac).floor().clamp_min(1).long())
        keep = min(keep, counts[-1] - 1)          # its top-k cut reveals at least one token
        if keep < 1:
            raise ValueError(f"schedule 'dimoo_cosine' at L={num_tokens} has nothing left to "
                             f"reveal after step {s + 1} of {steps} (the reference would stop "
                             f"early): use fewer steps")
        counts.append(keep)
    return counts + [0]


COUNT_SCHEDULES: dict[str, Callable[[int, int], list[int]]] = {
    "maskgit_reference": maskgit_reference, "dimoo_cosine": dimoo_cosine}


def get_schedule(name: str) -> Schedule:
    """The gamma function of a gamma schedule (count schedules have none)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} to have a gamma(t) "
                         f"(the count schedules {sorted(COUNT_SCHEDULES)} have none), got {name!r}")
    return SCHEDULES[name]


def masked_counts(num_tokens: int, steps: int, schedule: str = "arccos") -> list[int]:
    """Number of still-masked tokens before step 1 and after each step: length N+1, from L to 0.

    Each step reveals at least one token: a gamma schedule that would reveal none at some step
    (flat regions with small L and large N) is pushed down by one, so no base call is wasted.
    """
    if schedule not in SCHEDULES and schedule not in COUNT_SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES) + sorted(COUNT_SCHEDULES)}, "
                         f"got {schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > num_tokens:
        raise ValueError(f"steps ({steps}) cannot exceed the number of tokens L={num_tokens}: "
                         "every step must reveal at least one token")
    if schedule in COUNT_SCHEDULES:
        return COUNT_SCHEDULES[schedule](num_tokens, steps)
    gamma = SCHEDULES[schedule]
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
