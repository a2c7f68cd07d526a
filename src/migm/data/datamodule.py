"""Serves recorded trajectories to shortcut training as (trajectory, step, branch) samples.

A sample is the paper's training tuple (f_i, x_i, t_i, f_{i+1}): the features the base model
produced at step i, the grid after step i and which positions step i decoded, the time, and the
next step's features as target. Splits are by trajectory, never by step, so validation measures
generalisation to unseen generations. HDF5 handles open lazily in whichever process reads
(DataLoader workers included) and never cross a process boundary.

Every sample read is checked (trajectories.read_features): a chunk failing its checksum or a
non-finite feature is a ShardError naming the file, trajectory and step. The directories are
resolved and must be distinct, and a trajectory (seed, index) recorded twice anywhere in them is
an error: otherwise a directory listed as `d` and `d/` put every validation trajectory in
training too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import h5py
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from migm.data.collection import ConditionDataset
from migm.data.trajectories import (
    ShardError,
    ShardSchema,
    open_shard,
    read_features,
    read_small,
    trajectory_keys,
)


def resolve_dirs(dirs: list[str | Path]) -> list[Path]:
    """Absolute, symlink-free directories; the same one named twice is an error."""
    seen: dict[Path, str] = {}
    for d in dirs:
        real = Path(d).resolve()
        if real in seen:
            raise ShardError(f"dirs: {seen[real]!s} and {d!s} are the same directory ({real}); "
                             "list each shard directory once")
        seen[real] = str(d)
    return list(seen)


def _manifest(path: Path) -> dict:
    if not path.exists():
        raise ShardError(f"{path}: missing; run `python -m migm collect` to completion "
                         "(the manifest is written last)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err}); rerun `python -m migm collect` to "
                         "rewrite it") from err


def scan_shards(dirs: list[str | Path]) -> tuple[ShardSchema, list[tuple[Path, int]]]:
    """Validate every shard listed by each directory's manifest; all must share one schema, and
    no trajectory (seed, index) may appear twice."""
    schema, shards, owner = None, [], {}
    for d in resolve_dirs(dirs):
        manifest_path = d / "manifest.json"
        manifest = _manifest(manifest_path)
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
            for row, key in enumerate(map(tuple, trajectory_keys(path, got).tolist())):
                if key in owner:
                    raise ShardError(f"{path}: trajectory (seed {key[0]}, index {key[1]}) is recorded "
                                     f"twice (also in {owner[key]}): the same generation would be in "
                                     "training and validation; list each collection once")
                owner[key] = path
            shards.append((path, n))
    if schema is None or not shards:
        raise ShardError(f"no trajectories in {', '.join(map(str, dirs))}")
    return schema, shards


def shared_times(paths: list[Path]) -> np.ndarray:
    """The (N,) step times t_{i-1} every shard must hold alike, each shard's checked: one set is
    served for all, so a NaN in any shard but the one read (the last, before) reached training
    as the time input of every sample of the step."""
    times, first = None, None
    for path in paths:
        t = read_small(path, "times")
        if not np.isfinite(t).all():
            raise ShardError(f"{path}: dataset 'times' holds NaN or inf ({t.tolist()}); the file was "
                             "altered or is corrupt: recollect it")
        if times is None:
            times, first = t, path
        elif not np.array_equal(t, times):
            raise ShardError(f"{path}: dataset 'times' {t.tolist()} differs from {times.tolist()} in "
                             f"{first}: the shards are not of one collection")
    return times


class TrajectoryDataset(Dataset):
    """Samples (trajectory, pair, branch): every i = 1..N-1 of a full recording, or the P pairs a
    bounded one stored (schema.recorded_pairs), over a fixed list of trajectories.

    `rollout` r > 1 (full recordings only) serves windows instead: i = 1..N-r, with the pair's
    keys for step i and `next_*` keys (r-1 leading) for steps i+1..i+r-1, so the shortcut can be
    trained on its own predictions: f_hat_{i+1} = S(f_i, ...), f_hat_{i+2} = S(f_hat_{i+1}, ...)."""

    def __init__(self, schema: ShardSchema, shards: list[tuple[Path, int]],
                 trajectories: np.ndarray, rollout: int = 1) -> None:
        if rollout < 1 or rollout > max(1, schema.steps - 1):
            raise ValueError(f"data rollout: between 1 and N-1 = {schema.steps - 1} steps, got {rollout}")
        if rollout > 1 and schema.recorded_pairs:
            raise ValueError(f"data rollout: {rollout} consecutive steps need full recordings; these "
                             f"shards keep {schema.recorded_pairs} pairs per trajectory (recorded_pairs)")
        self.schema, self.rollout = schema, rollout
        self.paths = [p for p, _ in shards]
        offsets = np.cumsum([0] + [n for _, n in shards])
        self.trajectories = trajectories                     # global trajectory ids
        self.shard_of = np.searchsorted(offsets, trajectories, side="right") - 1
        self.local = trajectories - offsets[self.shard_of]
        self.pairs = (schema.pairs - rollout + 1) * schema.branches
        # Token arrays are tiny: read (and checksum-verified) once here, not once per sample.
        tokens, steps, keys, pair_step = [], [], [], []
        for path in self.paths:
            tokens.append(read_small(path, "tokens"))
            steps.append(read_small(path, "decode_step"))
            keys.append(trajectory_keys(path, schema))
            if schema.recorded_pairs:
                pair_step.append(read_small(path, "pair_step"))
        times = shared_times(self.paths)
        self.tokens = torch.from_numpy(np.concatenate(tokens)[trajectories].astype(np.int64))
        self.decode_step = torch.from_numpy(np.concatenate(steps)[trajectories].astype(np.int64))
        self.keys = np.concatenate(keys)[trajectories]                       # (n, 2) seed, index
        self.pair_step = (np.concatenate(pair_step)[trajectories].astype(np.int64)
                          if schema.recorded_pairs else None)               # (n, P)
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
        pair, branch = divmod(rest, self.schema.branches)
        if self.pair_step is None:
            i, slot = pair + 1, pair                    # step 1..N-1; f_i sits in slot i - 1
        else:
            i, slot = int(self.pair_step[row, pair]), 2 * pair      # slots 2k, 2k+1: f_i, f_{i+1}
        shard = int(self.shard_of[row])
        read = lambda s, step: read_features(self._file(shard)["features"], self.paths[shard],
                                             int(self.local[row]), s, branch, step, self.keys[row],
                                             self.schema.schema_version)
        f_i, f_next = read(slot, i), read(slot + 1, i + 1)       # features of x_{i-1} and of x_i
        decode_step = self.decode_step[row]
        x_i = torch.where(decode_step <= i, self.tokens[row], self.schema.mask_id)
        item = {"features": f_i, "target": f_next, "tokens": x_i, "new": decode_step == i,
                "t": self.times[i], "step": torch.tensor(i), "branch": torch.tensor(branch)}
        if self.rollout > 1:                                     # steps i+1 .. i+r-1
            later = range(i + 1, i + self.rollout)
            item.update(
                next_target=torch.stack([read(j, j + 1) for j in later]),           # (r-1, L, D)
                next_tokens=torch.stack([torch.where(decode_step <= j, self.tokens[row],
                                                     self.schema.mask_id) for j in later]),  # (r-1, L)
                next_new=torch.stack([decode_step == j for j in later]),             # (r-1, L)
                next_t=self.times[i + 1:i + self.rollout])                           # (r-1,)
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state


class EpochSampler(DistributedSampler):
    """A seeded DistributedSampler (epoch e has one order, resumed or not) whose pass over a
    given epoch can start at a given sample: how a resumed epoch continues where it stopped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume: tuple[int, int] | None = None       # (epoch, samples of it already served)

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__()
        if self.resume is not None and self.resume[0] == self.epoch:
            skip, self.resume = self.resume[1], None      # once: a later pass of it is whole
            return iter(list(order)[skip:])
        return order


class ResumableLoader(DataLoader):
    """The training DataLoader, stateful in Lightning's sense (`state_dict`/`load_state_dict`):
    a checkpoint records the epoch and how many of its batches were served, and a resumed run
    continues that epoch at the next batch, in the same order.

    Without it, a run resumed from a mid-epoch checkpoint (max_steps reached inside an epoch, a
    step-interval save) began the epoch's order again at its first batch while Lightning counted
    on from the saved batch index, so the rest of the epoch was never trained. The state is per
    rank and alike on every rank (each serves as many batches of its own share).

    `epoch_of` (the trainer's current epoch) sets the sampler's epoch as each pass starts:
    Lightning sets it from its count of processed epochs, which a resume of a step-limited run
    from an epoch-end checkpoint leaves one ahead for the rest of the run, so every later epoch
    would be served in the next epoch's order."""

    epoch_of: Callable[[], int] | None = None
    _served = 0
    _epoch = 0

    def __iter__(self):
        sampler = self.sampler
        if self.epoch_of is not None:
            sampler.set_epoch(self.epoch_of())
        resume = sampler.resume
        if resume is not None and resume[0] != sampler.epoch:
            sampler.resume = resume = None                  # that epoch is over
        self._epoch, self._served = sampler.epoch, resume[1] // self.batch_size if resume else 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._served, "batch_size": self.batch_size,
                "num_replicas": self.sampler.num_replicas, "samples": len(self.sampler)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = {"batch_size": self.batch_size, "num_replicas": self.sampler.num_replicas,
                  "samples": len(self.sampler)}
        differ = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if differ:
            rank_zero_warn("training data: the checkpoint was made with another layout ("
                           + ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in differ.items())
                           + "): the resumed epoch restarts at its first batch, not where it stopped")
            return
        if 0 < state["batches"] < len(self):                 # stopped inside the epoch
            self.sampler.resume = (state["epoch"], state["batches"] * self.batch_size)


def manifest_hash(dirs: list[str | Path]) -> str:
    """sha256 over the manifests of `dirs`: names the exact training data in a run's config."""
    digest = hashlib.sha256()
    for d in resolve_dirs(dirs):
        digest.update((d / "manifest.json").read_bytes())
    return digest.hexdigest()[:16]


class TrajectoryDataModule(L.LightningDataModule):
    """fit/validate: trajectories from shard directories. test: the evaluation conditions, one seed
    per batch, so `test` needs no shards: `test_conditions` cycle (classes 0..C-1 in turn; prompt
    j for a prompt table) or shuffled (a class-balanced pool in a random order seeded by `seed`,
    as MaskGIT's reference draws its evaluation classes; data/collection.py ConditionDataset)."""

    def __init__(self, dirs: list[str], val_fraction: float = 0.1, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, test_samples: int = 1000,
                 test_batch_size: int = 250, num_classes: int | None = 10,
                 test_conditions: Literal["cycle", "shuffled"] = "cycle", rollout: int = 1) -> None:
        """num_classes: `test`'s C; None takes the base's (its classes, or its prompts).
        rollout: consecutive steps per training sample (1: pairs; r > 1: the shortcut is rolled
        out on its own predictions for r steps, paper App. B); validation always scores pairs."""
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        for name, value in (("test_samples", test_samples), ("test_batch_size", test_batch_size),
                            ("batch_size", batch_size)):
            if value < 1:       # 0 test samples ran nothing and left an older results.jsonl
                raise ValueError(f"data.{name}: must be >= 1, got {value}")
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
        self.train_set = TrajectoryDataset(self.schema, shards, np.sort(order[n_val:]), self.hparams.rollout)
        self.val_set = TrajectoryDataset(self.schema, shards, np.sort(order[:n_val]))

    def _loader(self, ds: Dataset, sampler: DistributedSampler | None = None) -> DataLoader:
        return DataLoader(ds, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        # A seeded sampler even on one process: Lightning sets its epoch, so epoch e has the same
        # order whether or not training was resumed; the loader's state continues a resumed
        # epoch at the batch where its checkpoint was written (ResumableLoader).
        trainer = self.trainer
        sampler = EpochSampler(self.train_set, num_replicas=trainer.world_size if trainer else 1,
                               rank=trainer.global_rank if trainer else 0, shuffle=True,
                               seed=self.hparams.seed)
        loader = ResumableLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
                                 num_workers=self.hparams.num_workers,
                                 persistent_workers=self.hparams.num_workers > 0)
        if trainer is not None:
            loader.epoch_of = lambda: trainer.current_epoch
        return loader

    def num_conditions(self) -> int:
        if self.hparams.num_classes is not None:
            return self.hparams.num_classes
        base = getattr(self.trainer.lightning_module, "base", None) if self.trainer else None
        if base is None:
            raise ValueError("data num_classes null takes the base model's count: it needs a module "
                             "with a base (ShortcutModule)")
        return base.num_classes

    def test_dataloader(self) -> DataLoader:
        ds = ConditionDataset(self.hparams.test_samples, self.num_conditions(),
                              self.hparams.test_conditions, self.hparams.seed)
        return DataLoader(ds, batch_size=self.hparams.test_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
