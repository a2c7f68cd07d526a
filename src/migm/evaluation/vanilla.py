"""Scores vanilla generation of a base model at several step counts: the reference curve.

It is the evaluation grid with vanilla rows only, so `evaluate` and `test` share one code path:
the same conditions (balanced classes), the same seeds, the same latency protocol.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm import tqdm

from migm.accel.method import Vanilla
from migm.data.images import load_fashion_mnist, to_model_range
from migm.evaluation.grid import EvaluationGrid, GridConfig
from migm.evaluation.quality import QualityMetrics
from migm.models.tokenizer import psnr


def balanced_conditions(num_samples: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_samples) % num_classes


def run_grid(grid: EvaluationGrid, num_samples: int, batch_size: int) -> list[dict]:
    """Feed `num_samples` balanced conditions in batches (seed = grid seed + first index)."""
    cond = balanced_conditions(num_samples, grid.model.num_classes)
    for start in tqdm(range(0, num_samples, batch_size), desc="generating", unit="batch"):
        grid.update(cond[start:start + batch_size], seed=grid.config.seed + start)
    return grid.compute(progress=lambda points: tqdm(points, desc="latency", unit="config"))


def score_steps(model, metrics: QualityMetrics, steps: list[int], *, num_samples: int = 1000,
                batch_size: int = 250, config: GridConfig | None = None) -> tuple[list[dict], EvaluationGrid]:
    """Vanilla rows at every N in `steps` (speedups relative to the largest N)."""
    config = dataclasses.replace(config or GridConfig(), methods=[Vanilla(steps=list(steps))],
                                 reference_steps=max(steps))
    grid = EvaluationGrid(model, None, metrics, config)
    return run_grid(grid, num_samples, batch_size), grid


def reconstruction_row(model, metrics, num_samples: int) -> dict:
    """The tokenizer's round trip on train images: the best FID any generator of these tokens
    can reach, measured against the same reference as the generated samples."""
    images, labels = load_fashion_mnist("train")
    x = to_model_range(images[:num_samples])
    metrics.reset()
    recon = torch.cat([model.decode(model.tokenizer.encode(chunk)) for chunk in x.split(500)])
    metrics.add_fake(recon, labels[:num_samples])
    return {"method": "reconstruction", "label": "tokenizer", "psnr_db": float(psnr(recon, x).mean()),
            **metrics.compute()}
