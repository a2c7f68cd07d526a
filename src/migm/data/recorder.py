"""An observer that records a batch's trajectory as it is generated, without touching the loop."""

from __future__ import annotations

import numpy as np
import torch

from migm.sampling.loop import StepContext


class TrajectoryRecorder:
    """Keeps f_1..f_N of every CFG branch (as float16 by default), plus times and mask ratios.

    Features arrive stacked (branches*B, L, D); they are stored (B, N, branches, L, D) so one
    trajectory's step is contiguous, which is how the shards chunk them.
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self.features: list[torch.Tensor] = []
        self.times: list[float] = []
        self.mask_ratio: list[float] = []

    def on_step(self, ctx: StepContext, features: torch.Tensor, new_tokens: torch.Tensor,
                revealed: torch.Tensor) -> None:
        branches = features.shape[0] // new_tokens.shape[0]
        self.features.append(features.to(self.dtype).view(branches, -1, *features.shape[1:]).transpose(0, 1).cpu())
        self.times.append(ctx.t)
        self.mask_ratio.append(ctx.mask_ratio)

    def arrays(self) -> dict[str, np.ndarray]:
        """features (B, N, branches, L, D), times (N,), mask_ratio (N,)."""
        return {"features": torch.stack(self.features, 1).numpy(),
                "times": np.asarray(self.times, dtype=np.float32),
                "mask_ratio": np.asarray(self.mask_ratio, dtype=np.float32)}
