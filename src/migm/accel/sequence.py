"""A shortcut that evolves the base's whole-sequence state, as a feature source for the one loop.

The official shortcuts (Kaiwen-Zhu/MIGM-Shortcut: MaskGIT-Shortcut and DiMOO-Shortcut) do not
extrapolate only the L grid features the head reads: they carry the base's last-layer state at
EVERY position of its input sequence (MaskGIT's class slot; DiMOO's prompt, markers and newlines)
from one step to the next, because the next step's attention reads all of them. The loop stays
the same; only what the source keeps between steps grows.

The contract (shared with the DiMOO shortcut; /work/notes/sequence_contract.md says the same):

Base adapter (ADDED protocol members; `features` etc. unchanged):
- `sequence(tokens (B, L), cond (B,)) -> (ids (B, T), valid (B, T) bool or None, grid (B, L))`:
  the base's input sequence for the grid x and condition, WITHOUT running the network. `ids` are
  in the base's input vocabulary (what its token table is indexed by), `valid` marks real (not
  padding) positions (None: no padding), `grid[b, j]` is the sequence index of grid position j.
  Rows may differ in length (DiMOO's prompts, its unconditional branch) and are right-padded.
- `sequence_features(tokens, cond) -> (B, T, D)`: the last-layer state at every sequence position,
  in `sequence`'s row layout, such that gathering it at `grid` gives exactly `features(tokens,
  cond)` (the state is what the head reads, after the final norm).

Network (e.g. shortcut/maskgit_official.py):
- class attribute `positions = "sequence"` (our ShortcutNetwork, which maps (B, L, D) grid
  features, has no such attribute and keeps working through accel/shortcut.py);
- `step(s: SequenceStep) -> (R, T, D)`: the next state over the whole sequence from the fields of
  `SequenceStep` below; it reads what it needs (MaskGIT: states, ids at `new`, mask_ratio;
  DiMOO: also `cond`/`uncond` to feed prompt tokens in the conditional rows only).

Source (`SequenceShortcutSource`, a PlannedSource): at the plan's base steps it calls
`sequence_features` and keeps the full state; at the other steps it builds the SequenceStep of
x_{i-1} (the step's new tokens scattered from grid to sequence positions), runs the network, keeps
its output as the state; either way it returns the state at the grid, (R, L, D), to the loop.
R = branches * B, rows stacked [cond; uncond] as everywhere in the loop; both branches go through
one network call, each with its own state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from migm.accel.refresh import PlannedSource, RefreshPlan
from migm.sampling.loop import StepContext


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


class _KeepState:
    """The base as PlannedSource sees it: its `features` runs `sequence_features` and hands the
    full state to the source, so the plan's bookkeeping (which steps, counts) lives once."""

    def __init__(self, model, keep) -> None:
        self.model, self.keep = model, keep

    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        _, _, grid = self.model.sequence(tokens, cond)
        states = self.model.sequence_features(tokens, cond)                     # (R, T, D)
        self.keep(states)
        return gather_grid(states, grid)


class SequenceShortcutSource(PlannedSource):
    """The base at the plan's steps, a sequence shortcut (`positions == "sequence"`) between."""

    def __init__(self, model, shortcut, plan: RefreshPlan, temperature: float = 1.0) -> None:
        if getattr(shortcut, "positions", "grid") != "sequence":
            raise ValueError(f"{type(shortcut).__name__} maps grid features: use ShortcutSource "
                             f"(accel/shortcut.py), not SequenceShortcutSource")
        missing = [m for m in ("sequence", "sequence_features") if not hasattr(model, m)]
        if missing:
            raise ValueError(f"base {type(model).__name__} lacks {missing}: a sequence shortcut "
                             f"needs the base's whole-sequence state")
        if shortcut.config.feature_dim != model.feature_dim:
            raise ValueError(f"shortcut feature_dim {shortcut.config.feature_dim} != base model "
                             f"feature_dim {model.feature_dim}")
        super().__init__(_KeepState(model, self._keep), plan, temperature)
        self.base, self.shortcut = model, shortcut
        self.states: torch.Tensor | None = None

    def _keep(self, states: torch.Tensor) -> None:
        self.states = states

    def reset(self) -> None:
        super().reset()
        self.states = None

    def between(self, ctx: StepContext) -> torch.Tensor:
        R, device = len(ctx.tokens), ctx.tokens.device
        step = sequence_step(self.base, self.states, ctx.tokens, ctx.cond, ctx.revealed,
                             torch.full((R,), ctx.mask_ratio, device=device),
                             torch.full((R,), ctx.t, device=device))
        self.states = self.shortcut.step(step).to(self.states.dtype)
        return gather_grid(self.states, step.grid)

    def counts(self) -> dict[str, int]:
        return {"base_calls": self.base_calls, "shortcut_calls": self.skipped}


def shortcut_source(model, shortcut, plan: RefreshPlan, temperature: float = 1.0):
    """The source a trained shortcut runs in: a sequence-state network over a base that has a
    sequence (MaskGIT's class slot, DiMOO's prompt) here; any other pair in accel/shortcut.py's
    ShortcutSource on grid features (the tiny base's sequence is its grid)."""
    if getattr(shortcut, "positions", "grid") == "sequence" and hasattr(model, "sequence_features"):
        return SequenceShortcutSource(model, shortcut, plan, temperature)
    from migm.accel.shortcut import ShortcutSource
    return ShortcutSource(model, shortcut, plan, temperature)
