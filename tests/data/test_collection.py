"""Collection on Lightning's predict loop: shards per rank, manifest, resume, determinism."""

import json

import h5py
import numpy as np
import torch
import yaml

from migm.cli import REPO_ROOT, main
from migm.data.trajectories import open_shard, x_at_step


def _config(tmp_path, base="base.pt", **data) -> str:
    cfg = yaml.safe_load((REPO_ROOT / "configs/collect_tiny.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(tmp_path / "traj"), batches_per_shard=2)
    cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(tmp_path / "traj"))
    cfg["model"]["init_args"].update(steps=4, base=base)
    cfg["data"]["init_args"].update(num_trajectories=10, batch_size=3, **data)
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _read(path):
    with h5py.File(path) as f:
        return {k: f[k][:] for k in f}


def test_collect_writes_shards_and_manifest_then_resumes(tmp_path):
    main(["collect", "--config", _config(tmp_path)])
    out = tmp_path / "traj"
    shards = sorted(out.glob("shard-*.h5"))
    assert [p.name for p in shards] == ["shard-000-00000.h5", "shard-000-00001.h5"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trajectories"] == 10
    assert [s["trajectories"] for s in manifest["shards"]] == [6, 4]
    schema, _ = open_shard(shards[0])
    assert schema.steps == 4 and schema.branches == 2

    first = _read(shards[1])
    d = first["decode_step"].astype(np.int64)
    assert d.min() == 1 and d.max() == 4
    x0 = x_at_step(torch.from_numpy(first["tokens"]), torch.from_numpy(d), 0, schema.mask_id)
    assert (x0 == schema.mask_id).all()

    # Simulated crash: the second shard is lost, the first must be kept untouched.
    stamp = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    main(["collect", "--config", _config(tmp_path)])
    assert shards[0].stat().st_mtime_ns == stamp
    again = _read(shards[1])
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)     # deterministic


def test_two_processes_split_the_work_and_each_write_their_shards(tmp_path):
    """DDP with 2 CPU processes (gloo), launched as its own process tree: under pytest, Lightning
    would re-launch pytest itself in the child and could hide a failing child."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")
           and not k.startswith("MASTER_") and not k.startswith("PL_")}
    cmd = [sys.executable, "-m", "migm", "collect", "--config", _config(tmp_path),
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "traj"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trajectories"] == 10
    seen = {}
    for shard in manifest["shards"]:
        rank = int(shard["file"].split("-")[1])
        with h5py.File(out / shard["file"]) as f:
            seen.setdefault(rank, set()).update(f["seed"][:].tolist())
    assert set(seen) == {0, 1}
    assert not seen[0] & seen[1]                       # no batch generated twice


def test_overwrite_starts_over(tmp_path):
    main(["collect", "--config", _config(tmp_path)])
    shard = tmp_path / "traj" / "shard-000-00000.h5"
    stamp = shard.stat().st_mtime_ns
    (tmp_path / "traj" / "stray.txt").write_text("from an earlier run")
    main(["collect", "--config", _config(tmp_path), "--trainer.callbacks.init_args.overwrite", "true"])
    assert shard.stat().st_mtime_ns != stamp
    assert not (tmp_path / "traj" / "stray.txt").exists()
    assert json.loads((tmp_path / "traj" / "manifest.json").read_text())["trajectories"] == 10
