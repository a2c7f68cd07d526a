"""Recorded generation trajectories in HDF5 shards: the schema, a writer and a reader.

Decoded tokens never change in MIGM sampling, so a trajectory's tokens are two arrays of length L:
the final tokens and the step (1..N) at which each position was decoded; x_i and the tokens
decoded at step i follow from them. The bulk is the features: f_1..f_N for each CFG branch.

Schema (version 1), one file holding T trajectories:

    attrs     schema_version, base_model, base_config_hash, steps (N), schedule, num_tokens (L),
              feature_dim (D), vocab_size, mask_id, branches (1 or 2; row 0 conditional,
              row 1 unconditional), cfg_weight, temperature, choice_temperature, complete
    features    (T, N, branches, L, D) float16  f_i = features[:, i-1]: features of x_{i-1}
    tokens      (T, L) int32                     final tokens x_N
    decode_step (T, L) int16                     step at which each position was decoded
    cond        (T,) int64                       class id (or prompt index)
    seed        (T,) int64                       generation seed of the trajectory's batch
    times       (N,) float32                     t_{i-1} = (i-1)/N seen by step i
    mask_ratio  (N,) float32                     fraction masked in x_{i-1}

x_i = where(decode_step <= i, tokens, mask_id); the tokens decoded at step i are at decode_step == i.
Features are chunked one (trajectory, step) per chunk, so a random training read is one chunk.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

SCHEMA_VERSION = 1


class ShardError(ValueError):
    """A shard is corrupt, truncated or does not match the others; the message names it."""


@dataclass(frozen=True)
class ShardSchema:
    """What every shard of one collection must agree on."""

    base_model: str
    base_config_hash: str
    steps: int
    schedule: str
    num_tokens: int
    feature_dim: int
    vocab_size: int
    mask_id: int
    branches: int
    cfg_weight: float
    temperature: float
    choice_temperature: float
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_attrs(cls, attrs, path: Path) -> ShardSchema:
        values = {}
        for name in cls.__dataclass_fields__:
            if name not in attrs:
                raise ShardError(f"{path}: attribute '{name}' is missing")
            value = attrs[name]
            values[name] = value.decode() if isinstance(value, bytes) else (
                value.item() if hasattr(value, "item") else value)
        return cls(**values)

    def mismatch(self, other: ShardSchema) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def x_at_step(tokens: torch.Tensor, decode_step: torch.Tensor, i: int, mask_id: int) -> torch.Tensor:
    """The grid after step i (i = 0: all masked)."""
    return torch.where(decode_step <= i, tokens, torch.full_like(tokens, mask_id))


def write_shard(path: Path, schema: ShardSchema, features: np.ndarray, tokens: np.ndarray,
                decode_step: np.ndarray, cond: np.ndarray, seed: np.ndarray, times: np.ndarray,
                mask_ratio: np.ndarray, compression: str | None = None) -> Path:
    """Write a complete shard under a temporary name, then rename: a shard on disk is whole."""
    T, N, branches, Lt, D = features.shape
    expected = (schema.steps, schema.branches, schema.num_tokens, schema.feature_dim)
    if (N, branches, Lt, D) != expected:
        raise ShardError(f"{path}: features have shape (T, N, branches, L, D) = {features.shape}, "
                         f"schema says (*, {', '.join(map(str, expected))})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in asdict(schema).items():
                f.attrs[key] = value
            f.attrs["complete"] = False
            f.create_dataset("features", data=features, chunks=(1, 1, branches, Lt, D),
                             compression=compression)
            f.create_dataset("tokens", data=tokens.astype(np.int32))
            f.create_dataset("decode_step", data=decode_step.astype(np.int16))
            f.create_dataset("cond", data=cond.astype(np.int64))
            f.create_dataset("seed", data=seed.astype(np.int64))
            f.create_dataset("times", data=times.astype(np.float32))
            f.create_dataset("mask_ratio", data=mask_ratio.astype(np.float32))
            f.attrs["complete"] = True
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def open_shard(path: Path) -> tuple[ShardSchema, int]:
    """Validate a shard's structure; returns its schema and trajectory count."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ShardError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        schema = ShardSchema.from_attrs(f.attrs, path)
        if schema.schema_version != SCHEMA_VERSION:
            raise ShardError(f"{path}: schema_version {schema.schema_version}, this code reads {SCHEMA_VERSION}")
        if not bool(f.attrs.get("complete", False)):
            raise ShardError(f"{path}: attribute 'complete' is false (the writer did not finish)")
        for name in ("features", "tokens", "decode_step", "cond", "seed", "times", "mask_ratio"):
            if name not in f:
                raise ShardError(f"{path}: dataset '{name}' is missing")
        T = f["tokens"].shape[0]
        want = {"features": (T, schema.steps, schema.branches, schema.num_tokens, schema.feature_dim),
                "tokens": (T, schema.num_tokens), "decode_step": (T, schema.num_tokens),
                "cond": (T,), "seed": (T,), "times": (schema.steps,), "mask_ratio": (schema.steps,)}
        for name, shape in want.items():
            if f[name].shape != shape:
                raise ShardError(f"{path}: dataset '{name}' has shape {f[name].shape}, expected {shape}")
    return schema, T
