"""Trajectory collection on Lightning's predict loop: `python -m migm collect --config ...`.

Running on the predict loop means the same command spreads over devices and nodes
(`--trainer.devices`, `--trainer.num_nodes`): each rank generates its share of the conditions and
writes its own shards, `shard-<rank>-<index>.h5`, each one whole or absent (temp file + rename).
Re-running the command resumes: a batch whose shard already exists is skipped, an unfinished
shard is redone. Rank 0 writes `manifest.json` at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from migm.data.recorder import TrajectoryRecorder
from migm.data.trajectories import ShardSchema, open_shard, write_shard
from migm.models.assets import ASSET_DIR, atomic_write_bytes, read_manifest
from migm.models.registry import BaseKind, load_base
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig

MANIFEST = "manifest.json"


class ConditionDataset(Dataset):
    """Trajectory j has class j % num_classes; its index also fixes its batch's seed."""

    def __init__(self, num_trajectories: int, num_classes: int) -> None:
        self.n, self.num_classes = num_trajectories, num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple[int, int]:
        return j % self.num_classes, j


class ConditionDataModule(L.LightningDataModule):
    def __init__(self, num_trajectories: int = 1000, num_classes: int = 10, batch_size: int = 50) -> None:
        super().__init__()
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        self.save_hyperparameters()

    def predict_dataloader(self) -> DataLoader:
        ds = ConditionDataset(self.hparams.num_trajectories, self.hparams.num_classes)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False)


class CollectionModule(L.LightningModule):
    """Vanilla generation of the base model with a TrajectoryRecorder on the loop."""

    def __init__(self, base: str = "base.pt", tokenizer: str = "tokenizer.pt", steps: int = 16,
                 schedule: str = "arccos", sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
                 feature_dtype: str = "float16", base_kind: BaseKind = "tiny",
                 base_config: dict | None = None) -> None:
        """
        Args:
            base: base model weights (asset name or local path).
            tokenizer: tokenizer weights (asset name or local path).
            steps: N, the number of unmasking steps recorded.
            schedule: mask schedule: arccos, cosine or linear.
            sampler: temperatures and classifier-free guidance weight.
            seed: batch seeds are seed * 1,000,003 + index of the batch's first trajectory.
            feature_dtype: how features are stored (float16 halves the shards).
            base_kind: which base MIGM adapter (tiny = the embedded default; maskgit).
            base_config: the adapter's config fields, where they differ from the released model.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = load_base(base_kind, base, tokenizer, base_config).eval().requires_grad_(False)
        self.sampler = sampler
        self.dtype_ = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[feature_dtype]
        self.skip_batch = lambda batch_idx: False      # set by ShardWriter for resumption

    def schema(self) -> ShardSchema:
        manifest = read_manifest(ASSET_DIR)
        base = self.hparams.base
        base_id = f"{self.hparams.base_kind}:{manifest.get(base, {}).get('sha256', str(base))[:16]}"
        config_hash = hashlib.sha256(json.dumps(asdict(self.model.transformer.config),
                                                sort_keys=True, default=str).encode()).hexdigest()[:16]
        return ShardSchema(base_model=base_id, base_config_hash=config_hash, steps=self.hparams.steps,
                           schedule=self.hparams.schedule, num_tokens=self.model.num_tokens,
                           feature_dim=self.model.feature_dim, vocab_size=self.model.vocab_size,
                           mask_id=self.model.mask_id, branches=self.sampler.branches,
                           cfg_weight=self.sampler.cfg_weight, temperature=self.sampler.temperature,
                           choice_temperature=self.sampler.choice_temperature)

    def predict_step(self, batch, batch_idx: int):
        if self.skip_batch(batch_idx):
            return None
        cond, index = batch
        seed = self.hparams.seed * 1_000_003 + int(index[0])
        recorder = TrajectoryRecorder(self.dtype_)
        out = generate(self.model, VanillaSource(self.model), cond, self.hparams.steps,
                       schedule=self.hparams.schedule, sampler=self.sampler, seed=seed,
                       observers=[recorder])
        return {"tokens": out.tokens.cpu().numpy(), "decode_step": out.decode_step.cpu().numpy(),
                "cond": cond.cpu().numpy(), "seed": np.full(len(cond), seed), **recorder.arrays()}


class ShardWriter(BasePredictionWriter):
    """Groups each rank's batches into shards of `batches_per_shard` and writes them atomically."""

    def __init__(self, out_dir: str = "runs/trajectories/tiny", batches_per_shard: int = 10,
                 compression: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.batches_per_shard = batches_per_shard
        self.compression = compression
        self.overwrite = overwrite
        self.pending: list[dict] = []

    def _path(self, rank: int, shard: int) -> Path:
        return self.out_dir / f"shard-{rank:03d}-{shard:05d}.h5"

    def on_predict_start(self, trainer, pl_module: CollectionModule) -> None:
        if self.overwrite and trainer.is_global_zero and self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        trainer.strategy.barrier()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        pl_module.skip_batch = lambda b: self._path(rank, b // self.batches_per_shard).exists()
        if trainer.is_global_zero:
            s = pl_module.schema()
            n = trainer.datamodule.hparams.num_trajectories if trainer.datamodule else 0
            per = s.steps * s.branches * s.num_tokens * s.feature_dim * pl_module.dtype_.itemsize
            print(f"collecting {n} trajectories into {self.out_dir}: about {n * per / 2**30:.2f} GiB "
                  f"of features ({per / 2**20:.2f} MiB per trajectory)")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if prediction is None:
            return
        self.pending.append(prediction)
        last = batch_idx == trainer.num_predict_batches[dataloader_idx] - 1
        if (batch_idx + 1) % self.batches_per_shard == 0 or last:
            merged = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]
                      if k not in ("times", "mask_ratio")}
            write_shard(self._path(trainer.global_rank, batch_idx // self.batches_per_shard),
                        pl_module.schema(), times=self.pending[0]["times"],
                        mask_ratio=self.pending[0]["mask_ratio"], compression=self.compression,
                        **merged)
            self.pending = []

    def on_predict_end(self, trainer, pl_module: CollectionModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            write_manifest(self.out_dir, pl_module.schema(), dict(pl_module.hparams))


def write_manifest(out_dir: Path, schema: ShardSchema, config: dict) -> dict:
    shards = []
    for path in sorted(Path(out_dir).glob("shard-*.h5")):
        got, count = open_shard(path)
        if got.mismatch(schema):
            raise ValueError(f"{path}: does not match this collection: {got.mismatch(schema)}")
        shards.append({"file": path.name, "trajectories": count})
    config = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in config.items()}
    body = {"schema": asdict(schema), "config": config, "shards": shards,
            "trajectories": sum(s["trajectories"] for s in shards)}
    body["config_hash"] = hashlib.sha256(json.dumps([body["schema"], config], sort_keys=True,
                                                    default=str).encode()).hexdigest()[:16]
    text = json.dumps(body, indent=2) + "\n"
    atomic_write_bytes(Path(out_dir) / MANIFEST, lambda tmp: tmp.write_text(text))
    return body
