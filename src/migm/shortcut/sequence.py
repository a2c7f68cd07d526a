"""What a whole-sequence shortcut network sees at a step: `SequenceStep`, and how to build it.

The official shortcuts (Kaiwen-Zhu/MIGM-Shortcut: MaskGIT-Shortcut and DiMOO-Shortcut) do not
extrapolate only the L grid features the head reads: they carry the base's last-layer state at
EVERY position of its input sequence (MaskGIT's class slot; DiMOO's prompt, markers and newlines)
from one step to the next, because the next step's attention reads all of them.

Base adapter (protocol members beside `features`):
- `sequence(tokens (B, L), cond (B,)) -> (ids (B, T), valid (B, T) bool or None, grid (B, L))`:
  the base's input sequence for the grid x and condition, WITHOUT running the network. `ids` are
  in the base's input vocabulary (what its token table is indexed by), `valid` marks real (not
  padding) positions (None: no padding), `grid[b, j]` is the sequence index of grid position j.
  Rows may differ in length (DiMOO's prompts, its unconditional branch) and are right-padded.
- `sequence_features(tokens, cond) -> (B, T, D)`: the last-layer state at every sequence position,
  in `sequence`'s row layout, such that gathering it at `grid` gives exactly `features(tokens,
  cond)` (the state is what the head reads, after the final norm).

Network (shortcut/maskgit_official.py, shortcut/dimoo_official.py):
- class attribute `positions = "sequence"` (our ShortcutNetwork maps (B, L, D) grid features and
  has no such attribute);
- `step(s: SequenceStep) -> (R, T, D)`: the next state over the whole sequence from the fields of
  `SequenceStep`; it reads what it needs (MaskGIT: states, ids at `new`, mask_ratio; DiMOO: also
  `cond`/`uncond` to feed prompt tokens in the conditional rows only).

The feature source that runs such a network on the loop is accel/sequence.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceStep:
    """What a sequence shortcut sees at a step it stands in for the base (step i: f_{i-1} -> f_i).

    R rows = branches * B, stacked [cond; uncond]; T = the longest sequence of the batch."""

    states: torch.Tensor            # (R, T, D) f_{i-1}: the state of x_{i-2} at every position
    ids: torch.Tensor               # (R, T) the sequence of x_{i-1}, in the base's input vocabulary
    new: torch.Tensor               # (R, T) bool: grid positions decoded at step i-1, in sequence
    grid: torch.Tensor              # (R, L) sequence index of each grid position
    valid: torch.Tensor | None      # (R, T) bool real positions; None: no padding
    cond: torch.Tensor              # (R,) condition ids, the null condition in uncond rows
    uncond: torch.Tensor            # (R,) bool: rows of CFG's unconditional branch
    mask_ratio: torch.Tensor        # (R,) fraction of the grid still masked in x_{i-1}
    t: torch.Tensor                 # (R,) (i-1)/N: the loop's time of x_{i-1}
    # the base's input token table (model.input_embedding(), None where the base has no such
    # member): DiMOO's official shortcut embeds the tokens it is fed with it (dimoo_official.py)
    embed: torch.nn.Embedding | None = None
    # positions every row decoded at step i-1, where the loop's schedule says (None: count them)
    new_count: int | None = None


def gather_grid(states: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """states (R, T, D) at grid (R, L) -> (R, L, D)."""
    return states.gather(1, grid[..., None].expand(-1, -1, states.shape[-1]))


def sequence_step(base, states: torch.Tensor, tokens: torch.Tensor, cond: torch.Tensor,
                  revealed: torch.Tensor, mask_ratio: torch.Tensor, t: torch.Tensor) -> SequenceStep:
    """The SequenceStep of the grid x_{i-1} = `tokens` (R, L) whose step-(i-1) reveals are
    `revealed` (R, L, bool), from `states` (R, T, D) of x_{i-2}; mask_ratio and t (R,) of x_{i-1}.
    The source builds it at every shortcut step; the benchmark (evaluation/bench.py) times the
    network on one."""
    ids, valid, grid = base.sequence(tokens, cond)
    new = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, grid, revealed)            # (R, T)
    return SequenceStep(states=states, ids=ids, new=new, grid=grid, valid=valid, cond=cond,
                        uncond=cond == base.null_condition(cond), mask_ratio=mask_ratio, t=t,
                        embed=base.input_embedding() if hasattr(base, "input_embedding") else None)
