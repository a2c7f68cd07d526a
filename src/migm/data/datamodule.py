"""Serves recorded trajectories to shortcut training as (trajectory, step, branch) samples.

A sample is the paper's training tuple (f_i, x_i, t_i, f_{i+1}): the features the base model
produced at step i, the grid after step i and which positions step i decoded, the time, and the
next step's features as target. Splits are by trajectory, never by step, so validation measures
generalisation to unseen generations. HDF5 handles open lazily in whichever process reads
(DataLoader workers included) and never cross a process boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from migm.data.trajectories import ShardError, ShardSchema, open_shard


def scan_shards(dirs: list[str | Path]) -> tuple[ShardSchema, list[tuple[Path, int]]]:
    """Validate every shard listed by each directory's manifest; all must share one schema."""
    schema, shards = None, []
    for d in map(Path, dirs):
        manifest_path = d / "manifest.json"
        if not manifest_path.exists():
            raise ShardError(f"{manifest_path}: missing; run `python -m migm collect` to completion "
                             "(the manifest is written last)")
        manifest = json.loads(manifest_path.read_text())
        listed = {s["file"]: s["trajectories"] for s in manifest.get("shards", [])}
        on_disk = {p.name for p in d.glob("shard-*.h5")}
        if on_disk - set(listed):
            raise ShardError(f"{manifest_path}: shards {sorted(on_disk - set(listed))} are on disk "
                             "but not in the manifest")
        for name, count in sorted(listed.items()):
            path = d / name
            if not path.exists():
                raise ShardError(f"{path}: listed in {manifest_path} but missing")
            got, n = open_shard(path)
            if n != count:
                raise ShardError(f"{path}: holds {n} trajectories, the manifest says {count}")
            if schema is None:
                schema = got
            elif got.mismatch(schema):
                raise ShardError(f"{path}: does not match {shards[0][0]}: {'; '.join(got.mismatch(schema))}")
            shards.append((path, n))
    if schema is None or not shards:
        raise ShardError(f"no trajectories in {', '.join(map(str, dirs))}")
    return schema, shards


class TrajectoryDataset(Dataset):
    """Samples (trajectory, i, branch) for i = 1..N-1 over a fixed list of trajectories."""

    def __init__(self, schema: ShardSchema, shards: list[tuple[Path, int]],
                 trajectories: np.ndarray) -> None:
        self.schema = schema
        self.paths = [p for p, _ in shards]
        offsets = np.cumsum([0] + [n for _, n in shards])
        self.trajectories = trajectories                     # global trajectory ids
        self.shard_of = np.searchsorted(offsets, trajectories, side="right") - 1
        self.local = trajectories - offsets[self.shard_of]
        self.pairs = (schema.steps - 1) * schema.branches
        # Token arrays are tiny: read once here instead of once per sample.
        tokens, steps, times = [], [], None
        for path in self.paths:
            with h5py.File(path, "r") as f:
                tokens.append(f["tokens"][:])
                steps.append(f["decode_step"][:])
                times = f["times"][:]
        all_tokens, all_steps = np.concatenate(tokens), np.concatenate(steps)
        self.tokens = torch.from_numpy(all_tokens[trajectories].astype(np.int64))
        self.decode_step = torch.from_numpy(all_steps[trajectories].astype(np.int64))
        self.times = torch.from_numpy(np.append(times, 1.0)).float()   # t_i for i = 0..N
        self._files: dict[int, h5py.File] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.trajectories) * self.pairs

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():          # a new process (worker): never reuse a parent's handle
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self.paths[shard], "r")
        return self._files[shard]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        row, rest = divmod(k, self.pairs)
        i, branch = divmod(rest, self.schema.branches)
        i += 1                                                      # step 1..N-1
        feats = self._file(int(self.shard_of[row]))["features"]
        local = int(self.local[row])
        f_i = torch.from_numpy(feats[local, i - 1, branch]).float()       # features of x_{i-1}
        f_next = torch.from_numpy(feats[local, i, branch]).float()        # features of x_i
        decode_step = self.decode_step[row]
        x_i = torch.where(decode_step <= i, self.tokens[row], self.schema.mask_id)
        return {"features": f_i, "target": f_next, "tokens": x_i, "new": decode_step == i,
                "t": self.times[i], "step": torch.tensor(i), "branch": torch.tensor(branch)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state


def manifest_hash(dirs: list[str | Path]) -> str:
    """sha256 over the manifests of `dirs`: names the exact training data in a run's config."""
    digest = hashlib.sha256()
    for d in dirs:
        digest.update((Path(d) / "manifest.json").read_bytes())
    return digest.hexdigest()[:16]


class TrajectoryDataModule(L.LightningDataModule):
    """fit/validate: trajectories from shard directories. test: the evaluation conditions (classes
    cycling 0..C-1, one seed per batch), so `test` needs no shards."""

    def __init__(self, dirs: list[str], val_fraction: float = 0.1, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, test_samples: int = 1000,
                 test_batch_size: int = 250, num_classes: int = 10) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.schema: ShardSchema | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in ("test", "predict"):
            return
        self.schema, shards = scan_shards(self.hparams.dirs)
        self.manifest_sha256 = manifest_hash(self.hparams.dirs)
        for logger in (self.trainer.loggers if self.trainer else []):     # the run names its data
            logger.log_hyperparams({"data_manifest_sha256": self.manifest_sha256})
        total = sum(n for _, n in shards)
        order = np.random.default_rng(self.hparams.seed).permutation(total)
        n_val = max(1, int(round(total * self.hparams.val_fraction)))
        if n_val >= total:
            raise ShardError(f"{total} trajectories cannot be split with val_fraction "
                             f"{self.hparams.val_fraction}: collect more")
        self.train_set = TrajectoryDataset(self.schema, shards, np.sort(order[n_val:]))
        self.val_set = TrajectoryDataset(self.schema, shards, np.sort(order[:n_val]))

    def _loader(self, ds: Dataset, sampler: DistributedSampler | None = None) -> DataLoader:
        return DataLoader(ds, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        # A seeded DistributedSampler even on one process: Lightning sets its epoch, so epoch e
        # has the same order whether or not training was resumed (exact resume at epoch ends).
        trainer = self.trainer
        sampler = DistributedSampler(self.train_set, num_replicas=trainer.world_size if trainer else 1,
                                     rank=trainer.global_rank if trainer else 0, shuffle=True,
                                     seed=self.hparams.seed)
        return self._loader(self.train_set, sampler)

    def test_dataloader(self) -> DataLoader:
        from migm.data.collection import ConditionDataset
        ds = ConditionDataset(self.hparams.test_samples, self.hparams.num_classes)
        return DataLoader(ds, batch_size=self.hparams.test_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
