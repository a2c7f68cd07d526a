"""How fast trajectories are made and served: the numbers that pick collection and loader defaults.

Collection throughput is timed on the real predict-loop module; shard size and loader speed are
measured on copies of one real shard rewritten with each compression, read through the same
TrajectoryDataset/DataLoader that training uses.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from migm.data.collection import write_manifest
from migm.data.datamodule import TrajectoryDataset, scan_shards
from migm.data.trajectories import rewrite_shard


@torch.no_grad()
def collection_rate(module, num: int = 50, batch_size: int = 50) -> float:
    """Trajectories per second of CollectionModule.predict_step (generation + recording)."""
    cond = torch.arange(num) % module.model.num_classes
    start = time.perf_counter()
    for s in range(0, num, batch_size):
        module.predict_step((cond[s:s + batch_size], torch.arange(s, min(s + batch_size, num))), 0)
    return num / (time.perf_counter() - start)


def recompress(source_dir: Path, out_dir: Path, compression: str | None) -> Path:
    """Copy a shard directory with every shard rewritten under `compression`."""
    schema, shards = scan_shards([source_dir])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for path, _ in shards:
        rewrite_shard(path, out_dir / path.name, compression)
    write_manifest(out_dir, schema, {"recompressed_from": str(source_dir), "compression": compression})
    return out_dir


def loader_rate(dirs: list[Path], batch_size: int = 256, num_workers: int = 0,
                max_batches: int = 40, seed: int = 0) -> float:
    """Samples per second through a shuffled DataLoader (worker start-up included)."""
    schema, shards = scan_shards(dirs)
    total = sum(n for _, n in shards)
    ds = TrajectoryDataset(schema, shards, np.arange(total))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    start, seen = time.perf_counter(), 0
    for k, batch in enumerate(loader):
        seen += len(batch["step"])
        if k + 1 >= max_batches:
            break
    return seen / (time.perf_counter() - start)


def bytes_per_trajectory(dirs: list[Path]) -> float:
    _, shards = scan_shards(dirs)
    return sum(p.stat().st_size for p, _ in shards) / sum(n for _, n in shards)


def shortcut_step_rate(module, dirs: list[Path], batch_size: int = 256, steps: int = 5) -> float:
    """Samples per second one optimizer step of the shortcut consumes (forward, backward, AdamW),
    on real batches already in memory: what the loader must outpace."""
    schema, shards = scan_shards(dirs)
    ds = TrajectoryDataset(schema, shards, np.arange(sum(n for _, n in shards)))
    batch = next(iter(DataLoader(ds, batch_size=batch_size, shuffle=True)))
    opt = torch.optim.AdamW(module.network.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = module._loss(module._predict(module.network, batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch_size / float(np.median(times[1:]))
