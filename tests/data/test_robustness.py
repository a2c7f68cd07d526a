"""What a collection survives: a refused resume writes nothing, a full disk is one line and
leaves a resumable directory, and every shard's step times are checked."""

from __future__ import annotations

import errno
import io
import json
import math

import h5py
import numpy as np
import pytest
import torch
import yaml

import test_datamodule  # noqa: E402  (tests/data: small real shards of a random base)
from migm.cli import REPO_ROOT, main
from migm.data import trajectories
from migm.data.collection import write_manifest
from migm.data.datamodule import TrajectoryDataModule
from migm.data.recorder import TrajectoryRecorder
from migm.data.trajectories import ShardError, ShardSchema, write_shard
from migm.files import DiskFullError, atomic_write_bytes
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig


def _config(tmp_path, **model) -> str:
    cfg = yaml.safe_load((REPO_ROOT / "configs/collect_tiny.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(tmp_path / "traj"), batches_per_shard=2)
    cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(tmp_path / "traj"),
                          logger=False)                # W&B's files are not the collection's
    cfg["model"]["init_args"].update(steps=4, **model)
    cfg["data"]["init_args"].update(num_trajectories=10, batch_size=3)
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _listing(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_refused_resume_writes_nothing_into_the_collection(tmp_path):
    """The collection's config.yaml (Lightning's SaveConfigCallback writes it into the trainer's
    default_root_dir, the shard directory) must keep saying seed 0 beside seed-0 shards."""
    main(["collect", "--config", _config(tmp_path)])
    out = tmp_path / "traj"
    before = _listing(out)
    assert yaml.safe_load(before["config.yaml"])["model"]["init_args"]["seed"] == 0
    with pytest.raises(ValueError, match=r"settings.seed: 0 \(recorded\) != 1 \(this run\)"):
        main(["collect", "--config", _config(tmp_path, seed=1)])
    assert _listing(out) == before                       # every file byte for byte, none added


def test_overwrite_keeps_the_new_runs_config(tmp_path):
    """Starting over clears the directory before anything of the new run is written there."""
    main(["collect", "--config", _config(tmp_path)])
    main(["collect", "--config", _config(tmp_path, seed=1), "--trainer.callbacks.init_args.overwrite", "true"])
    out = tmp_path / "traj"
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init_args"]["seed"] == 1
    assert json.loads((out / "collection.json").read_text())["settings"]["seed"] == 1


class FillingDisk:
    """`open` for the shard writer whose n-th file fills the disk after `room` bytes (HDF5
    then has half a file)."""

    def __init__(self, full_disk, fail_at: int, room: int = 4096) -> None:
        self.full_disk, self.fail_at, self.room, self.opened = full_disk, fail_at, room, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        self.opened += 1
        if self.opened != self.fail_at:
            return open(path, mode, *args, **kwargs)  # noqa: SIM115 (the writer closes it)
        return self.full_disk(path, "w+b" if "w" in mode else "r+", room=self.room)


def test_a_full_disk_at_a_shard_is_one_error_and_the_collection_resumes(tmp_path, monkeypatch, capfd,
                                                                        full_disk):
    disk = FillingDisk(full_disk, fail_at=2)
    monkeypatch.setattr(trajectories, "open", disk, raising=False)
    with pytest.raises(DiskFullError) as err:
        main(["collect", "--config", _config(tmp_path)])
    out = tmp_path / "traj"
    assert str(err.value).startswith(f"{out / 'shard-000-00001.h5'}: no space left on device (")
    assert "\n" not in str(err.value) and err.value.errno == errno.ENOSPC
    assert "Traceback" not in capfd.readouterr().err          # HDF5 reported nothing itself
    assert sorted(p.name for p in out.iterdir()) == ["collection.json", "config.yaml", "shard-000-00000.h5"]
    first = (out / "shard-000-00000.h5").read_bytes()

    monkeypatch.undo()
    main(["collect", "--config", _config(tmp_path)])
    assert (out / "shard-000-00000.h5").read_bytes() == first
    assert json.loads((out / "manifest.json").read_text())["trajectories"] == 10
    with h5py.File(out / "shard-000-00001.h5") as f:
        assert f.attrs["complete"] and f["seed"].shape == (4,)


def test_a_full_disk_at_an_atomic_write_is_one_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old\n")

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"manifest.json: no space left on device \(.* MiB free\)"):
        atomic_write_bytes(target, full)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

    # torch.save to a path says only this; the free space says why
    def stream(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(RuntimeError, match="basic_ios") as plenty:
        atomic_write_bytes(target, stream)
    assert not isinstance(plenty.value, DiskFullError)       # with room left it is not a full disk
    monkeypatch.setattr("migm.files.shutil.disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    with pytest.raises(DiskFullError, match=r"manifest.json: no space left on device \(1.0 MiB free"):
        atomic_write_bytes(target, stream)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


# --- every shard's times are read ----------------------------------------------------------------
_schema, _shard = test_datamodule._schema, test_datamodule._collect      # small real shards


@pytest.mark.parametrize("value", [float("nan"), 0.3])
def test_the_times_of_every_shard_are_checked_not_only_the_last(small_migm, tmp_path, value):
    d = tmp_path / "traj"
    first = _shard(small_migm, d / "shard-000-00000.h5", 4, seed=0)
    _shard(small_migm, d / "shard-001-00000.h5", 4, seed=1)
    write_manifest(d, _schema(small_migm, 4), {})
    with h5py.File(first, "r+") as f:                 # rewritten through HDF5: checksums stay valid
        f["times"][1] = value
    dm = TrajectoryDataModule([str(d)], val_fraction=0.25, batch_size=4)
    if math.isnan(value):
        expected = r"shard-000-00000.h5: dataset 'times' holds NaN or inf \(\[0.0, nan, 0.5, 0.75\]\)"
    else:
        expected = (r"shard-001-00000.h5: dataset 'times' \[0.0, 0.25, 0.5, 0.75\] differs from "
                    r"\[0.0, 0.30000001192092896, 0.5, 0.75\] in .*shard-000-00000.h5")
    with pytest.raises(ShardError, match=expected):
        dm.setup("fit")


def test_non_finite_times_are_refused_when_written(small_migm, tmp_path):
    rec = TrajectoryRecorder()
    out = generate(small_migm, VanillaSource(small_migm), torch.arange(2), 4, seed=0, observers=[rec])
    arrays = rec.arrays()
    arrays["times"][2] = np.inf
    with pytest.raises(ShardError, match=r"shard.h5: times .* are not finite; nothing was written"):
        write_shard(tmp_path / "shard.h5", _schema(small_migm, 4), tokens=out.tokens.numpy(),
                    decode_step=out.decode_step.numpy(), cond=np.arange(2), seed=np.zeros(2),
                    index=np.arange(2), **arrays)
    assert not list(tmp_path.iterdir())
