"""Runs a small evaluation grid during `fit`, so the training run shows FID and latency at a few
budgets over time, not only the regression loss."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from migm.accel.method import Vanilla
from migm.accel.shortcut import Shortcut
from migm.data.collection import ConditionDataset
from migm.evaluation.grid import EvaluationGrid, GridConfig
from migm.evaluation.report import finish_evaluation
from migm.evaluation.setup import MetricsConfig, build_metrics


def small_grid(like: GridConfig | None = None) -> GridConfig:
    """A few configurations, sampled the way `like` (the module's `test` grid) samples and with its
    shortcut's plan and temperature, so the numbers logged during fit are the ones `test` reports."""
    shortcut = next((m for m in like.methods if isinstance(m, Shortcut)), None) if like else None
    knobs = {} if shortcut is None else {"plan": shortcut.plan, "plan_power": shortcut.plan_power,
                                         "temperature": shortcut.temperature}
    sampling = {} if like is None else {"sampler": like.sampler, "schedule": like.schedule}
    return GridConfig(methods=[Vanilla(steps=[8, 16]), Shortcut(steps=[16], budgets=[4, 8], **knobs)],
                      reference_steps=16, latency_batch=32, latency_repeats=1, keep_images=10,
                      **sampling)


class EvaluationCallback(Callback):
    def __init__(self, every_n_epochs: int = 1, num_samples: int = 200, batch_size: int = 100,
                 grid: GridConfig | None = None, metrics: MetricsConfig | None = None) -> None:
        """
        Args:
            every_n_epochs: evaluate after every k-th training epoch.
            num_samples: images per configuration, split over ranks.
            batch_size: generation batch size.
            grid: configurations to run (default: vanilla N=8,16; shortcut N=16 at B=4,8, with
                the sampler and inference knobs of the config's `evaluation`).
            metrics: what samples are measured against (default: the config's `metrics`, the
                ones `test` uses). Conditions are drawn as the datamodule's `test_conditions`
                says (cycle, or MaskGIT's shuffled balanced classes), seeded alike.
        """
        self.every, self.num_samples, self.batch_size = every_n_epochs, num_samples, batch_size
        self.grid = grid
        self.metrics = metrics
        self.like: GridConfig | None = None          # the config's `evaluation` (set by the CLI)
        self.like_metrics: MetricsConfig | None = None   # the config's `metrics` (set by the CLI)
        self._metrics = None

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every or trainer.sanity_checking:
            return
        base = pl_module.base
        if self._metrics is None:
            config = self.metrics or self.like_metrics
            self._metrics = build_metrics(config, base, pl_module.spec["base_kind"], pl_module.device)
        data = getattr(getattr(trainer, "datamodule", None), "hparams", {})
        conditions = ConditionDataset(self.num_samples, base.num_classes,
                                      data.get("test_conditions", "cycle"), data.get("seed", 0))
        config = self.grid or small_grid(self.like)
        grid = EvaluationGrid(base, pl_module.ema, self._metrics, config).to(pl_module.device)
        # rank r takes batches r, r + W, ...: every rank works, FID is synchronised on compute
        starts = range(trainer.global_rank * self.batch_size, self.num_samples,
                       trainer.world_size * self.batch_size)
        for start in starts:
            index = torch.arange(start, min(start + self.batch_size, self.num_samples))
            cond = torch.tensor([conditions[int(j)][0] for j in index])
            grid.update(cond.to(pl_module.device), seed=config.seed + start)
        out = f"{trainer.default_root_dir}/fit_eval/epoch_{trainer.current_epoch:03d}"
        finish_evaluation(grid, trainer, out, prefix="fit_eval")
