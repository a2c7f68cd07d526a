"""Recorded generation trajectories in HDF5 shards: the schema, a writer and a checked reader.

Decoded tokens never change in MIGM sampling, so a trajectory's tokens are two arrays of length L:
the final tokens and the step (1..N) at which each position was decoded; x_i and the tokens
decoded at step i follow from them. The bulk is the features: f_i for each CFG branch.

Schema (version 2), one file holding T trajectories:

    attrs     schema_version, base_model, base_config_hash, steps (N), schedule, num_tokens (L),
              feature_dim (D), vocab_size, mask_id, branches (1 or 2; row 0 conditional,
              row 1 unconditional), cfg_weight, temperature, choice_temperature,
              recorded_pairs (P), sequence_length (0: grid), sampler (JSON), complete
    features    (T, S, branches, L', D) float16  S = N slots when P = 0: slot s holds f_{s+1},
                                                  the features of x_s (every step recorded);
                                                  S = 2P when P > 0: slots 2k, 2k+1 hold f_i,
                                                  f_{i+1} for i = pair_step[:, k]; L' = L grid
                                                  positions, or T = sequence_length positions
                                                  of the base's sequence_features (MaskGIT: the
                                                  grid, then the class slot)
    pair_step   (T, P) int16 (P > 0 only)         the pairs' first steps, distinct, in 1..N-1
    tokens      (T, L) int32                      final tokens x_N
    decode_step (T, L) int16                      step at which each position was decoded
    cond        (T,) int64                        class id (or prompt index)
    seed        (T,) int64                        generation seed of the trajectory's batch
    index       (T,) int64                        the trajectory's index j in its collection
    times       (N,) float32                      t_{i-1} = (i-1)/N seen by step i
    mask_ratio  (N,) float32                      fraction masked in x_{i-1}

x_i = where(decode_step <= i, tokens, mask_id); the tokens decoded at step i are at decode_step == i.
Features are chunked one (trajectory, slot, branch) per chunk: a training sample reads exactly
two chunks, its f_i and f_{i+1} (DiMOO: 32 MiB each), nothing of the other branch.

Integrity: every dataset carries HDF5's Fletcher-32 checksum per chunk (computed by the library
at write, verified by it at every read), and features are checked finite at write and at read:
a flipped byte or a NaN is a ShardError naming the file, the trajectory and the step, never a
training sample. A trajectory is (seed, index): two rows with the same key are one generation
recorded twice.

Schema 1 (written before checksums, pairs and `index`) is still read: it is schema 2 with P = 0,
without checksums (a warning says so; only the finite check protects it) and keyed by (seed, row
within the seed's batch). New shards are always schema 2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch

from migm.files import atomic_write_bytes

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCHEMA_2_FIELDS = ("recorded_pairs", "sequence_length", "sampler")
DATASETS = ("features", "tokens", "decode_step", "cond", "seed", "times", "mask_ratio")

log = logging.getLogger(__name__)


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
    recorded_pairs: int = 0        # P: 0 records every step; P > 0 records P (i, i+1) pairs
    sequence_length: int = 0       # T: 0 stores grid features (T = L); else sequence_features
    sampler: str = ""              # the full SamplerConfig as JSON (schema 2; "" in schema 1)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        P, N = self.recorded_pairs, self.steps
        if P < 0 or (P > 0 and 2 * P >= N):
            raise ValueError(f"recorded_pairs must be 0 (every step) or in [1, {(self.steps - 1) // 2}] "
                             f"for steps {self.steps} (2P slots < N), got {self.recorded_pairs}")

    @property
    def positions(self) -> int:
        """Feature rows stored per slot: L grid positions, or the T of sequence_features."""
        return self.sequence_length or self.num_tokens

    @property
    def slots(self) -> int:
        """Feature slots stored per trajectory: N, or 2P."""
        return 2 * self.recorded_pairs if self.recorded_pairs else self.steps

    @property
    def pairs(self) -> int:
        """Training pairs (f_i, f_{i+1}) a trajectory yields per branch: N - 1, or P."""
        return self.recorded_pairs or self.steps - 1

    def trajectory_bytes(self, itemsize: int) -> int:
        return self.slots * self.branches * self.positions * self.feature_dim * itemsize

    @classmethod
    def from_attrs(cls, attrs, path: Path) -> ShardSchema:
        version = attrs.get("schema_version")
        version = int(version) if version is not None else None
        values = {}
        for field in fields(cls):
            name = field.name
            if name not in attrs:
                if version == 1 and name in SCHEMA_2_FIELDS:        # schema 1: their defaults
                    continue
                raise ShardError(f"{path}: attribute '{name}' is missing")
            value = attrs[name]
            values[name] = value.decode() if isinstance(value, bytes) else (
                value.item() if hasattr(value, "item") else value)
        try:
            return cls(**values)
        except ValueError as err:
            raise ShardError(f"{path}: {err}") from err

    def mismatch(self, other: ShardSchema) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def x_at_step(tokens: torch.Tensor, decode_step: torch.Tensor, i: int, mask_id: int) -> torch.Tensor:
    """The grid after step i (i = 0: all masked)."""
    return torch.where(decode_step <= i, tokens, torch.full_like(tokens, mask_id))


def slot_steps(schema: ShardSchema, pair_step: np.ndarray | None, T: int) -> np.ndarray:
    """(T, S) the step i whose f_i each feature slot holds."""
    if not schema.recorded_pairs:
        return np.broadcast_to(np.arange(1, schema.steps + 1), (T, schema.steps))
    return np.stack([pair_step, pair_step + 1], -1).reshape(T, -1)


class _KeptErrorFile:
    """The file h5py's fileobj driver writes a new shard through; no call of it ever fails.

    When a write fails inside HDF5 (a full disk), HDF5 cannot flush on close, keeps the file and
    its objects open, and every one of them reports the failure again as it is freed (dozens of
    tracebacks), then the process crashes at exit (a segfault). Here the first OSError is kept,
    every later call becomes a no-op, HDF5 closes what it believes is a complete file, and
    `close()` raises the kept error, after which the writer deletes the file."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w+b")  # noqa: SIM115 (closed by close(), after HDF5 is done)
        self.error: OSError | None = None

    def _call(self, fn, *args, default=None):
        if self.error is None:
            try:
                return fn(*args)
            except OSError as err:
                self.error = err
        return default

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self._file.seek, offset, whence, default=offset)

    def tell(self) -> int:
        return self._call(self._file.tell, default=0)

    def read(self, size: int = -1) -> bytes:
        return self._call(self._file.read, size, default=b"")

    def readinto(self, buffer) -> int:
        return self._call(self._file.readinto, buffer, default=0)

    def write(self, data) -> int:
        self._call(self._file.write, data)
        return len(data)

    def truncate(self, size: int | None = None) -> int | None:
        self._call(self._file.truncate, size)
        return size

    def flush(self) -> None:
        self._call(self._file.flush)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            self.error = self.error or err
        if self.error is not None:
            raise self.error


def _write_h5(path: Path, fill: Callable[[h5py.File], None]) -> Path:
    """Write an HDF5 file whole or not at all (atomic_write_bytes: a temporary renamed onto
    `path`, a full disk a DiskFullError naming it). HDF5 writes through _KeptErrorFile, so the
    first write error surfaces only after HDF5 has closed the file (it crashes otherwise)."""
    def write(tmp: Path) -> None:
        raw = _KeptErrorFile(tmp)
        try:
            with h5py.File(raw, "w") as f:
                fill(f)
        finally:
            raw.close()
    atomic_write_bytes(Path(path), write)
    return Path(path)


def write_shard(path: Path, schema: ShardSchema, features: np.ndarray, tokens: np.ndarray,
                decode_step: np.ndarray, cond: np.ndarray, seed: np.ndarray, index: np.ndarray,
                times: np.ndarray, mask_ratio: np.ndarray, pair_step: np.ndarray | None = None,
                compression: str | None = None) -> Path:
    """Write a complete shard under a temporary name, then rename: a shard on disk is whole.
    Non-finite features are refused here, naming the trajectory and step."""
    path = Path(path)
    if schema.schema_version != SCHEMA_VERSION:
        raise ShardError(f"{path}: this code writes schema_version {SCHEMA_VERSION}, not {schema.schema_version}")
    T, S, branches, Lt, D = features.shape
    expected = (schema.slots, schema.branches, schema.positions, schema.feature_dim)
    if (S, branches, Lt, D) != expected:
        raise ShardError(f"{path}: features have shape (T, slots, branches, L, D) = {features.shape}, "
                         f"schema says (*, {', '.join(map(str, expected))})")
    P = schema.recorded_pairs
    if P:
        pair_step = np.asarray(pair_step) if pair_step is not None else None
        if pair_step is None or pair_step.shape != (T, P):
            raise ShardError(f"{path}: recorded_pairs {P} needs pair_step of shape {(T, P)}, got "
                             f"{None if pair_step is None else pair_step.shape}")
        if pair_step.min() < 1 or pair_step.max() > schema.steps - 1 or any(
                len(set(row)) != P for row in pair_step.tolist()):
            raise ShardError(f"{path}: pair_step must hold {P} distinct steps in [1, {schema.steps - 1}] "
                             f"per trajectory, got {pair_step.tolist()}")
    elif pair_step is not None:
        raise ShardError(f"{path}: pair_step given but the schema records every step (recorded_pairs 0)")
    finite = np.isfinite(features).reshape(T, S, -1).all(-1)                    # (T, S)
    if not finite.all():
        t, s = map(int, np.argwhere(~finite)[0])
        raise ShardError(f"{path}: trajectory {t} (index {int(index[t])}), step "
                         f"{int(slot_steps(schema, pair_step, T)[t, s])}: features are not finite (NaN or "
                         "inf); the base model produced them, nothing was written")
    for name, value in (("times", times), ("mask_ratio", mask_ratio)):
        if not np.isfinite(value).all():
            raise ShardError(f"{path}: {name} {np.asarray(value).tolist()} are not finite; nothing was written")
    arrays = {"tokens": tokens.astype(np.int32), "decode_step": decode_step.astype(np.int16),
              "cond": cond.astype(np.int64), "seed": seed.astype(np.int64),
              "index": np.asarray(index).astype(np.int64), "times": times.astype(np.float32),
              "mask_ratio": mask_ratio.astype(np.float32)}
    if P:
        arrays["pair_step"] = pair_step.astype(np.int16)

    def fill(f: h5py.File) -> None:
        for key, value in asdict(schema).items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        f.create_dataset("features", data=features, chunks=(1, 1, 1, Lt, D),
                         compression=compression, fletcher32=True)
        for key, value in arrays.items():
            f.create_dataset(key, data=value, fletcher32=True)
        f.attrs["complete"] = True

    return _write_h5(path, fill)


def rewrite_shard(source: Path, dest: Path, compression: str | None) -> Path:
    """Copy a shard with its features under another compression, everything else as it is
    (schema 1 stays schema 1); temp file + rename as write_shard."""

    def fill(out: h5py.File) -> None:
        with h5py.File(source, "r") as src:
            out.attrs.update(dict(src.attrs))
            for name, d in src.items():
                kwargs = {"chunks": d.chunks, "fletcher32": d.fletcher32}
                if name == "features":
                    kwargs["compression"] = compression
                out.create_dataset(name, data=d[()], **kwargs)

    return _write_h5(dest, fill)


_warned_v1: set[Path] = set()


def open_shard(path: Path) -> tuple[ShardSchema, int]:
    """Validate a shard's structure; returns its schema and trajectory count."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ShardError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        version = f.attrs.get("schema_version")
        if version is None or int(version) not in READABLE_VERSIONS:
            raise ShardError(f"{path}: schema_version {version}, this code reads {READABLE_VERSIONS}")
        schema = ShardSchema.from_attrs(f.attrs, path)
        if not bool(f.attrs.get("complete", False)):
            raise ShardError(f"{path}: attribute 'complete' is false (the writer did not finish)")
        names = DATASETS + (("index",) if schema.schema_version >= 2 else ()) + (
            ("pair_step",) if schema.recorded_pairs else ())
        for name in names:
            if name not in f:
                raise ShardError(f"{path}: dataset '{name}' is missing")
        T = f["tokens"].shape[0]
        want = {"features": (T, schema.slots, schema.branches, schema.positions, schema.feature_dim),
                "tokens": (T, schema.num_tokens), "decode_step": (T, schema.num_tokens),
                "cond": (T,), "seed": (T,), "times": (schema.steps,), "mask_ratio": (schema.steps,),
                "index": (T,), "pair_step": (T, schema.recorded_pairs)}
        for name in names:
            if f[name].shape != want[name]:
                raise ShardError(f"{path}: dataset '{name}' has shape {f[name].shape}, expected {want[name]}")
        if schema.schema_version >= 2 and not f["features"].fletcher32:
            raise ShardError(f"{path}: schema 2 features without their checksums")
    if schema.schema_version == 1 and path.resolve() not in _warned_v1:
        _warned_v1.add(path.resolve())
        log.warning("%s: schema v1 shard (written before checksums): no checksums, read with a "
                    "finite check only; recollect to protect it", path)
    return schema, T


def read_small(path: Path, name: str) -> np.ndarray:
    """A whole small dataset (tokens, seeds, ...), its checksum failure a ShardError."""
    try:
        with h5py.File(path, "r") as f:
            return f[name][()]
    except OSError as err:
        raise ShardError(f"{path}: dataset '{name}' cannot be read ({err}): the file is corrupt") from err


def trajectory_keys(path: Path, schema: ShardSchema) -> np.ndarray:
    """(T, 2) int64 identity of each trajectory: (seed, index); schema 1, without `index`:
    (seed, row among the rows of that seed), which is the row within its batch."""
    seed = read_small(path, "seed")
    if schema.schema_version >= 2:
        return np.stack([seed, read_small(path, "index")], 1)
    occurrence = np.zeros(len(seed), dtype=np.int64)
    seen: dict[int, int] = {}
    for row, s in enumerate(seed.tolist()):
        occurrence[row] = seen.get(s, 0)
        seen[s] = occurrence[row] + 1
    return np.stack([seed, occurrence], 1)


def read_features(dataset: h5py.Dataset, path: Path, row: int, slot: int, branch: int,
                  step: int, key: np.ndarray, schema_version: int) -> torch.Tensor:
    """(L, D) float32 features of one (trajectory, slot, branch), checksum- and finite-checked;
    errors name the file, trajectory (row in the shard, and its key) and step."""
    who = (f"{path}: trajectory {row} (seed {int(key[0])}"
           + (f", index {int(key[1])}" if schema_version >= 2 else "") + f"), step {step} branch {branch}")
    try:
        value = torch.from_numpy(dataset[row, slot, branch]).float()
    except OSError as err:
        raise ShardError(f"{who}: features cannot be read, their chunk fails its checksum ({err}); "
                         "the file is corrupt: recollect it") from err
    if not bool(torch.isfinite(value).all()):
        raise ShardError(f"{who}: features are not finite (NaN or inf); the file was altered or "
                         "is corrupt: recollect it")
    return value
