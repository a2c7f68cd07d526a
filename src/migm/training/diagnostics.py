"""Diagnostics of a predicted step f_hat against the base model's f_{i+1}, overall and per step.

MSE alone hides what matters for sampling: whether the prediction beats "features do not change"
(relative error ||f_hat - f_{i+1}|| / ||f_{i+1} - f_i||: 1 is the copy-previous baseline, 0 is
exact), whether it points the right way (cosine similarity), and whether the base head would
sample the same tokens from it (argmax agreement on still-masked positions). Errors are not
uniform in time, so each is also kept per step i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_error(pred: torch.Tensor, target: torch.Tensor, prev: torch.Tensor, scope: torch.Tensor
                   ) -> torch.Tensor:
    """(B,): ||f_hat - f_{i+1}|| / ||f_{i+1} - f_i|| over the positions in `scope` (B, L)."""
    w = scope.unsqueeze(-1).float()
    err = ((pred - target) ** 2 * w).sum((1, 2)).sqrt()
    change = ((target - prev) ** 2 * w).sum((1, 2)).sqrt().clamp_min(1e-8)
    return err / change


def step_diagnostics(pred: torch.Tensor, target: torch.Tensor, prev: torch.Tensor, scope: torch.Tensor,
                     pred_logits: torch.Tensor, target_logits: torch.Tensor, masked: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """Per-sample values (B,).

    pred, target, prev: (B, L, D); scope: (B, L) positions the loss covers; *_logits: (B, L, K);
    masked: (B, L) positions still masked after the step (the ones the head will sample from).
    """
    cos = F.cosine_similarity(pred, target, dim=-1)                                  # (B, L)
    agree = (pred_logits.argmax(-1) == target_logits.argmax(-1)).float()             # (B, L)

    def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (x * m).sum(1) / m.sum(1).clamp_min(1)

    return {"rel_err": relative_error(pred, target, prev, scope), "cosine": masked_mean(cos, scope.float()),
            "argmax_agree": masked_mean(agree, masked.float())}


class StepwiseMeans:
    """Running sums of per-sample diagnostics bucketed by step i (1..N-1), reduced over ranks."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(steps)

    def update(self, values: dict[str, torch.Tensor], step: torch.Tensor) -> None:
        step = step.detach().cpu().long()
        self.counts.index_add_(0, step, torch.ones(len(step)))
        for name, v in values.items():
            self.sums.setdefault(name, torch.zeros(self.steps)).index_add_(0, step, v.detach().float().cpu())

    def compute(self, reduce=lambda t: t) -> dict[str, float]:
        """{'rel_err': overall mean, 'rel_err/step_03': mean at step 3, ...}; `reduce` sums
        a tensor over DDP ranks (the strategy's reduce)."""
        counts = reduce(self.counts.clone())
        out = {}
        for name, s in self.sums.items():
            s = reduce(s.clone())
            out[name] = float(s.sum() / counts.sum().clamp_min(1))
            for i in torch.nonzero(counts).flatten().tolist():
                out[f"{name}/step_{i:02d}"] = float(s[i] / counts[i])
        return out
