"""Learning-rate schedule shared by every trainer in the project: linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure(module, lr: float, weight_decay: float, warmup_steps: int) -> dict:
    """AdamW + warm-up/cosine over the Trainer's planned steps, stepped every batch."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    total = int(module.trainer.estimated_stepping_batches)
    sched = warmup_cosine(opt, warmup_steps, total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
