"""Scores vanilla generation of a base model at several step counts: the reference curve.

Every configuration uses the same conditions (balanced classes) and the same seeds, so rows
differ only by N. Latency is measured in the same process, on the same batch size, after warm-up.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Iterable

import torch
from tqdm import tqdm

from migm.data.images import load_fashion_mnist, to_model_range
from migm.evaluation.latency import measure_latency
from migm.evaluation.quality import QualityMetrics
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig
from migm.training.tokenizer import psnr


def balanced_conditions(num_samples: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_samples) % num_classes


def score_steps(model, metrics: QualityMetrics, steps_list: Iterable[int], *, num_samples: int = 1000,
                batch_size: int = 250, seed: int = 0, schedule: str = "arccos",
                sampler: SamplerConfig | None = None, latency_batch: int = 64,
                latency_repeats: int = 3, keep: int = 0) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Returns one result row per N, and the first `keep` images generated at each N."""
    sampler = sampler or SamplerConfig()
    cond = balanced_conditions(num_samples, model.num_classes)
    rows, kept = [], {}
    for steps in steps_list:
        metrics.reset()
        source = VanillaSource(model)
        images_kept, calls = [], 0
        for b, chunk in enumerate(tqdm(cond.split(batch_size), desc=f"vanilla N={steps}", leave=False)):
            result = generate(model, source, chunk, steps, schedule=schedule, sampler=sampler, seed=seed + b)
            images = model.decode(result.tokens)
            metrics.add_fake(images, chunk)
            calls += result.counts["base_calls"]
            if sum(len(x) for x in images_kept) < keep:
                images_kept.append(images)
        lat_cond = cond[:latency_batch]
        latency = measure_latency(
            lambda: model.decode(generate(model, VanillaSource(model), lat_cond, steps,
                                          schedule=schedule, sampler=sampler, seed=seed).tokens),
            batch_size=len(lat_cond), repeats=latency_repeats)
        row = {"method": "vanilla", "steps": steps, "budget": steps, "num_samples": num_samples,
               "seed": seed, "schedule": schedule, **asdict(sampler), **metrics.compute(),
               "base_calls_per_batch": calls // len(cond.split(batch_size)),
               "latency_ms_per_image": latency.ms_per_image, "latency_batch": latency.batch_size,
               "threads": latency.threads}
        rows.append(row)
        if keep:
            kept[steps] = torch.cat(images_kept)[:keep]
    return rows, kept


def reconstruction_row(model, metrics, num_samples: int) -> dict:
    """The tokenizer's round trip on train images: the best FID any generator of these tokens
    can reach, measured against the same reference as the generated samples."""
    images, labels = load_fashion_mnist("train")
    x = to_model_range(images[:num_samples])
    metrics.reset()
    recon = torch.cat([model.decode(model.tokenizer.encode(chunk)) for chunk in x.split(500)])
    metrics.add_fake(recon, labels[:num_samples])
    return {"method": "reconstruction", "num_samples": num_samples,
            "psnr_db": float(psnr(recon, x).mean()), **metrics.compute()}

