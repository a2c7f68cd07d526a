"""An observer that records a batch's trajectory as it is generated, without touching the loop."""

from __future__ import annotations

import numpy as np
import torch

from migm.sampling.loop import StepContext


class TrajectoryRecorder:
    """Keeps f_i of every CFG branch (as float16 by default) at the steps a shard stores, plus
    the times and mask ratios of every step.

    `states`: a feature source with a `state` attribute (collection.SequenceStates): its whole
    (branches*B, T, D) sequence state is recorded instead of the grid features.
    `pair_steps` (B, P): record only f_i and f_{i+1} for each listed i (slots 2k, 2k+1, see
    trajectories.py), so memory and disk hold 2P of the N steps; None records every step.
    Features arrive stacked (branches*B, L, D) and are kept (B, S, branches, L, D) so one
    trajectory's slot is contiguous, which is how the shards chunk them; the buffer is allocated
    once, at the first step, and only the wanted steps are copied into it.
    """

    def __init__(self, dtype: torch.dtype = torch.float16, pair_steps: np.ndarray | None = None,
                 states=None) -> None:
        self.dtype = dtype
        self.states = states           # a source whose `state` (R, T, D) is kept instead of f_i
        self.pair_steps = None if pair_steps is None else np.asarray(pair_steps, dtype=np.int64)
        self.features: torch.Tensor | None = None
        self.times: list[float] = []
        self.mask_ratio: list[float] = []

    def _slot_steps(self, B: int, N: int) -> torch.Tensor:
        """(B, S) the step whose features each slot keeps."""
        if self.pair_steps is None:
            return torch.arange(1, N + 1).expand(B, N)
        if self.pair_steps.shape[0] != B:
            raise ValueError(f"pair_steps has {self.pair_steps.shape[0]} rows for a batch of {B}")
        first = torch.from_numpy(self.pair_steps)
        return torch.stack([first, first + 1], -1).reshape(B, -1)

    def on_step(self, ctx: StepContext, features: torch.Tensor, new_tokens: torch.Tensor,
                revealed: torch.Tensor) -> None:
        B = new_tokens.shape[0]
        if self.states is not None:
            features = self.states.state                                  # (branches*B, T, D)
        branches = features.shape[0] // B
        if self.features is None:
            self.slots = self._slot_steps(B, ctx.steps)
            self.features = torch.empty(B, self.slots.shape[1], branches, *features.shape[1:], dtype=self.dtype)
        rows, slots = (self.slots == ctx.step).nonzero(as_tuple=True)
        if len(rows):
            f = features.view(branches, B, *features.shape[1:]).transpose(0, 1)   # (B, branches, L, D)
            self.features[rows, slots] = f[rows.to(f.device)].to(self.dtype).cpu()
        self.times.append(ctx.t)
        self.mask_ratio.append(ctx.mask_ratio)

    def arrays(self) -> dict[str, np.ndarray]:
        """features (B, S, branches, L, D), times (N,), mask_ratio (N,)."""
        if self.features is None:
            raise ValueError("nothing recorded: the recorder saw no step")
        return {"features": self.features.numpy(),
                "times": np.asarray(self.times, dtype=np.float32),
                "mask_ratio": np.asarray(self.mask_ratio, dtype=np.float32)}
