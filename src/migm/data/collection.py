"""Trajectory collection on Lightning's predict loop: `python -m migm collect --config ...`.

Running on the predict loop means the same command spreads over devices and nodes
(`--trainer.devices`, `--trainer.num_nodes`): each rank generates its share of the conditions and
writes its own shards, `shard-<rank>-<index>.h5`, each one whole or absent (temp file + rename).

Re-running the command resumes: a batch whose shard already exists is skipped, an unfinished
shard is redone, and temporaries a killed run left are removed (logged). Which trajectories a
shard holds depends on the model, sampler, schedule, steps and the batch layout (batch size,
batches per shard, world size), so the first run writes `collection.json` with all of them and
a resume with any difference is refused, naming it, before anything is written into the
directory (`config.yaml` included); rank 0 writes `manifest.json` at the end. A full disk stops
the run with one DiskFullError naming the shard, whose temporary is gone: the rerun resumes.

Storage: full recording keeps N steps x branches x L x D per trajectory (Lumina-DiMOO: 64 x 2 x
4,096 x 4,096 fp16 = 4 GiB). `recorded_pairs: P` keeps P random (i, i+1) pairs of each
trajectory instead, the training tuples the shortcut uses, 2P of the N steps on disk and in
memory (P = 4: 512 MiB); the pairs are drawn from (seed, trajectory index), so a resume or
another rank redraws the same ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from migm.data.recorder import TrajectoryRecorder
from migm.data.trajectories import ShardError, ShardSchema, open_shard, trajectory_keys, write_shard
from migm.files import atomic_write_bytes, remove_orphans, sha256
from migm.models.assets import checkpoint_digest
from migm.models.registry import BaseKind, check_files, load_spec
from migm.sampling.loop import StepOutput, VanillaSource, generate
from migm.shortcut.sequence import gather_grid
from migm.sampling.sampler import SamplerConfig

MANIFEST = "manifest.json"
RECORD = "collection.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class ConditionDataset(Dataset):
    """Trajectory j has class j % num_classes (order "cycle"; for a prompt table: prompt j), or
    (order "shuffled") entry j of a seeded random permutation of a class-balanced pool holding
    each class ceil(n / C) times. The latter is how MaskGIT's reference draws its evaluation
    classes: the labels of its shuffled ImageNet-val loader, 50 per class in random order at
    n = 50,000 (valeoai/Maskgit-pytorch@674ef1d Metrics/sample_and_eval.py samples with each test
    batch's labels; Trainer/trainer.py builds that loader with shuffle=True). Its index also fixes
    its batch's seed."""

    def __init__(self, num_trajectories: int, num_classes: int, order: str = "cycle", seed: int = 0) -> None:
        if order not in ("cycle", "shuffled"):
            raise ValueError(f"condition order: expected cycle or shuffled, got {order!r}")
        self.n, self.num_classes = num_trajectories, num_classes
        self.classes = None
        if order == "shuffled":
            pool = np.tile(np.arange(num_classes), -(-num_trajectories // num_classes))
            self.classes = np.random.default_rng(seed).permutation(pool)[:num_trajectories].tolist()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple[int, int]:
        return (j % self.num_classes if self.classes is None else self.classes[j]), j


class ConditionDataModule(L.LightningDataModule):
    def __init__(self, num_trajectories: int = 1000, num_classes: int | None = None,
                 batch_size: int = 50) -> None:
        """
        Args:
            num_trajectories: trajectories to record; trajectory j has condition j % num_classes.
            num_classes: conditions cycled through; None: all the base has (its classes, or the
                prompts of its prompt file).
            batch_size: trajectories generated together (one seed per batch).
        """
        super().__init__()
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or null (the base's), got {num_classes}")
        self.save_hyperparameters()

    def num_conditions(self) -> int:
        if self.hparams.num_classes is not None:
            return self.hparams.num_classes
        if self.trainer is None:
            raise ValueError("num_classes null takes the base's count, which needs the trainer's module")
        return self.trainer.lightning_module.model.num_classes

    def layout(self) -> dict:
        return {"num_trajectories": self.hparams.num_trajectories, "num_classes": self.num_conditions(),
                "batch_size": self.hparams.batch_size}

    def predict_dataloader(self) -> DataLoader:
        ds = ConditionDataset(self.hparams.num_trajectories, self.num_conditions())
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False)


class SequenceStates(VanillaSource):
    """The base at every step through `sequence_features`: keeps the whole (R, T, D) state for
    the recorder and returns the grid part to the loop (what `features` would have given)."""

    def step(self, ctx) -> StepOutput:
        self.state = self.model.sequence_features(ctx.tokens, ctx.cond)          # (R, T, D)
        grid = self.model.sequence(ctx.tokens, ctx.cond)[2]                        # (R, L)
        return StepOutput(gather_grid(self.state, grid))


class CollectionModule(L.LightningModule):
    """Vanilla generation of the base model with a TrajectoryRecorder on the loop."""

    def __init__(self, base: str = "base.pt", tokenizer: str = "tokenizer.pt", steps: int = 16,
                 schedule: str = "arccos", sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
                 feature_dtype: Literal["float16", "float32"] = "float16", base_kind: BaseKind = "tiny",
                 base_config: dict | None = None, prompts: str | None = None,
                 recorded_pairs: int = 0, positions: Literal["grid", "sequence"] = "grid") -> None:
        """
        Args:
            base: base model weights (asset name or local path; a Lumina-DiMOO directory).
            tokenizer: tokenizer weights (asset name or local path).
            steps: N, the number of unmasking steps recorded.
            schedule: mask schedule (a name of sampling/schedule.py).
            sampler: temperatures and classifier-free guidance weight.
            seed: batch seeds are seed * 1,000,003 + index of the batch's first trajectory.
            feature_dtype: how features are stored (float16 halves the shards; HDF5 has no bf16).
            base_kind: which base MIGM adapter (tiny = the embedded default; maskgit; dimoo).
            base_config: the adapter's config fields, where they differ from the released model.
            prompts: a prompt file (text, one per line, or JSONL; models/prompts.py) for a
                text-to-image base: condition j is prompt j, and num_classes null takes them all.
            recorded_pairs: 0 records every step; P > 0 records P random (i, i+1) pairs per
                trajectory (2P of the N steps), which bounds disk to 2P/N of a full recording.
            positions: grid records `features` (L positions); sequence records the base's
                `sequence_features` (every input position, e.g. MaskGIT's class slot), for the
                official shortcuts; the base must have it and one T for every row.
        """
        super().__init__()
        self.save_hyperparameters()
        if feature_dtype not in DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(DTYPES)}, got {feature_dtype!r}")
        if recorded_pairs < 0 or (recorded_pairs and 2 * recorded_pairs >= steps):
            raise ValueError(f"recorded_pairs must be 0 (every step) or in [1, {(steps - 1) // 2}] for "
                             f"steps {steps} (2P stored steps < N), got {recorded_pairs}")
        if prompts is not None and base_kind != "dimoo":
            raise ValueError(f"base_kind {base_kind}: prompts apply to a text-to-image base only "
                             "(dimoo); class ids need no prompt file")
        check_files(base_kind, base, tokenizer, prompts)   # named now, before a trainer is built
        self.sampler = sampler
        self.dtype_ = DTYPES[feature_dtype]
        self.skip_batch = lambda batch_idx: False      # set by ShardWriter for resumption

    @property
    def model(self):
        """The frozen base, loaded on first use (a file error then surfaces as itself, from
        `setup`, and building the module reads nothing)."""
        if "_model" not in self._modules:
            h = self.hparams
            model = load_spec(h)
            if h.positions == "sequence" and not hasattr(model, "sequence_features"):
                raise ValueError(f"positions: sequence needs a base with sequence_features; "
                                 f"{h.base_kind} has none")
            self._model = model.eval().requires_grad_(False)
        return self._model

    def setup(self, stage: str) -> None:
        self.model                                     # before Lightning moves the module to its device

    def _sequence_length(self) -> int:
        """T recorded per row: 0 for grid features (T = L); refused when rows differ."""
        if self.hparams.positions == "grid":
            return 0
        C = self.model.num_classes
        # the base's own device: the record is built in ShardWriter.setup, before Lightning
        # moves the module (whose `device` already names the target then)
        device = next(itertools.chain(self.model.parameters(), self.model.buffers()), torch.empty(0)).device
        probe = torch.full((C + 1, self.model.num_tokens), self.model.mask_id, device=device)
        ids, valid, _ = self.model.sequence(probe, torch.arange(C + 1, device=device))
        if valid is not None:                          # right-padded: prompt-dependent lengths
            raise ValueError(f"positions: sequence needs one sequence length for every condition; "
                             f"{self.hparams.base_kind}'s differ with the prompt: record grid")
        return ids.shape[1]

    @cached_property
    def files(self) -> dict[str, str]:
        """Real sha256 of the base, tokenizer and prompt file: the collection's provenance."""
        h = self.hparams
        out = {"base": checkpoint_digest(h.base)}
        if h.tokenizer:
            out["tokenizer"] = checkpoint_digest(h.tokenizer)
        if h.prompts:
            out["prompts"] = sha256(Path(h.prompts))
        return out

    @cached_property
    def _schema(self) -> ShardSchema:
        config_hash = hashlib.sha256(json.dumps(self.model.config_dict(), sort_keys=True,
                                                default=str).encode()).hexdigest()[:16]
        return ShardSchema(base_model=f"{self.hparams.base_kind}:{self.files['base'][:16]}",
                           base_config_hash=config_hash, steps=self.hparams.steps,
                           schedule=self.hparams.schedule, num_tokens=self.model.num_tokens,
                           feature_dim=self.model.feature_dim, vocab_size=self.model.vocab_size,
                           mask_id=self.model.mask_id, branches=self.sampler.branches,
                           cfg_weight=self.sampler.cfg_weight, temperature=self.sampler.temperature,
                           choice_temperature=self.sampler.choice_temperature,
                           recorded_pairs=self.hparams.recorded_pairs,
                           sequence_length=self._sequence_length(),
                           sampler=json.dumps(asdict(self.sampler), sort_keys=True))

    def schema(self) -> ShardSchema:
        return self._schema

    def settings(self) -> dict:
        """What, beyond the schema, decides the recorded data: seeds, storage."""
        h = self.hparams
        return {"seed": h.seed, "feature_dtype": h.feature_dtype, "positions": h.positions}

    def pair_steps(self, index: torch.Tensor) -> np.ndarray | None:
        """(B, P) the first steps of trajectory j's recorded pairs: P distinct i in 1..N-1, drawn
        from (seed, j) alone, so a resume, any rank or batch layout redraws the same."""
        P, N = self.hparams.recorded_pairs, self.hparams.steps
        if not P:
            return None
        rows = [np.sort(np.random.default_rng([self.hparams.seed, int(j)]).choice(N - 1, P, replace=False)) + 1
                for j in index.tolist()]
        return np.stack(rows)

    def predict_step(self, batch, batch_idx: int):
        if self.skip_batch(batch_idx):
            return None
        cond, index = batch
        seed = self.hparams.seed * 1_000_003 + int(index[0])
        pairs = self.pair_steps(index)
        source = SequenceStates(self.model) if self.hparams.positions == "sequence" else VanillaSource(self.model)
        recorder = TrajectoryRecorder(self.dtype_, pairs, states=source if isinstance(source, SequenceStates) else None)
        out = generate(self.model, source, cond, self.hparams.steps,
                       schedule=self.hparams.schedule, sampler=self.sampler, seed=seed,
                       observers=[recorder])
        extra = {} if pairs is None else {"pair_step": pairs}
        return {"tokens": out.tokens.cpu().numpy(), "decode_step": out.decode_step.cpu().numpy(),
                "cond": cond.cpu().numpy(), "seed": np.full(len(cond), seed),
                "index": index.cpu().numpy(), **extra, **recorder.arrays()}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def record_differences(recorded: dict, current: dict) -> list[str]:
    a, b = _flat(recorded), _flat(current)
    return [f"{k}: {a.get(k)!r} (recorded) != {b.get(k)!r} (this run)"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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

    def record(self, trainer, pl_module: CollectionModule) -> dict:
        """The started collection: everything that decides which trajectory lands in which shard."""
        dm = trainer.datamodule
        return {"schema": asdict(pl_module.schema()), "settings": pl_module.settings(),
                "files": pl_module.files, "data": dm.layout() if hasattr(dm, "layout") else {},
                "world_size": trainer.world_size, "batches_per_shard": self.batches_per_shard}

    def setup(self, trainer, pl_module: CollectionModule, stage: str) -> None:
        """Check a resume before anything is written into the directory.

        LightningCLI's SaveConfigCallback, added after the config's callbacks, writes
        `config.yaml` from its own `setup` into the trainer's `default_root_dir`, which the
        collect configs set to this directory. Checked any later (it was `on_predict_start`), a
        refused resume had already replaced the collection's config.yaml by the refused
        settings, beside shards and a collection.json of the recorded ones. So the record is
        built and checked here, and only then does rank 0 clear, create or write anything.
        """
        if stage != "predict":
            return
        self.current = self.record(trainer, pl_module)     # may raise: the base's files, ...
        path = self.out_dir / RECORD
        if not self.overwrite:
            self._check_existing(path)                  # every rank, read only: all raise alike
        trainer.strategy.barrier()                      # all have read before rank 0 changes it
        if trainer.is_global_zero:
            if self.overwrite and self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            remove_orphans(self.out_dir)               # nothing of this run writes yet
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                text = json.dumps(self.current, indent=2, sort_keys=True) + "\n"
                atomic_write_bytes(path, lambda tmp: tmp.write_text(text))
        trainer.strategy.barrier()
        self._check_record(path)                        # every rank: all raise alike, none waits

    def _check_existing(self, path: Path) -> None:
        """A directory that already holds a collection (or its record) must match this run."""
        started = any(self.out_dir.glob("shard-*.h5")) or (self.out_dir / MANIFEST).exists()
        if path.exists() or started:
            self._check_record(path)

    def on_predict_start(self, trainer, pl_module: CollectionModule) -> None:
        rank = trainer.global_rank
        pl_module.skip_batch = lambda b: self._path(rank, b // self.batches_per_shard).exists()
        if trainer.is_global_zero:
            s = pl_module.schema()
            n = self.current["data"].get("num_trajectories", 0)
            per = s.trajectory_bytes(pl_module.dtype_.itemsize)
            print(f"collecting {n} trajectories into {self.out_dir}: about {n * per / 2**30:.2f} GiB of "
                  f"features ({per / 2**20:.2f} MiB per trajectory: {s.slots} of {s.steps} steps x "
                  f"{s.branches} branches x {s.sequence_length or s.num_tokens} positions x "
                  f"{s.feature_dim} x {pl_module.dtype_.itemsize} B)")

    def _check_record(self, path: Path) -> None:
        hint = ("pass --trainer.callbacks.init_args.overwrite true to start over, or choose another "
                "out_dir")
        if not path.exists():
            raise ValueError(f"{self.out_dir}: holds shards but no {RECORD} (written by an older "
                             f"version): a resume cannot be checked; {hint}")
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); {hint}") from err
        diff = record_differences(recorded, json.loads(json.dumps(self.current)))
        if diff:
            raise ValueError(f"{self.out_dir}: holds a collection made with other settings "
                             f"({'; '.join(diff)}); a resume needs the same model, sampler and "
                             f"layout: rerun with those, or {hint}")

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
            write_manifest(self.out_dir, pl_module.schema(), dict(pl_module.hparams), self.current)


def write_manifest(out_dir: Path, schema: ShardSchema, config: dict, collection: dict | None = None) -> dict:
    """List the shards (each validated against `schema`; no trajectory twice) with the config."""
    shards, owner = [], {}
    for path in sorted(Path(out_dir).glob("shard-*.h5")):
        got, count = open_shard(path)
        if got.mismatch(schema):
            raise ShardError(f"{path}: does not match this collection: {got.mismatch(schema)}")
        for key in map(tuple, trajectory_keys(path, got).tolist()):
            if key in owner:
                raise ShardError(f"{path}: trajectory (seed {key[0]}, index {key[1]}) is also in "
                                 f"{owner[key]}: recorded twice")
            owner[key] = path.name
        shards.append({"file": path.name, "trajectories": count})
    config = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in config.items()}
    body = {"schema": asdict(schema), "config": config, "shards": shards,
            "trajectories": sum(s["trajectories"] for s in shards)}
    if collection is not None:
        body["collection"] = collection
    body["config_hash"] = hashlib.sha256(json.dumps([body["schema"], config], sort_keys=True,
                                                    default=str).encode()).hexdigest()[:16]
    text = json.dumps(body, indent=2) + "\n"
    atomic_write_bytes(Path(out_dir) / MANIFEST, lambda tmp: tmp.write_text(text))
    return body
