import json

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from migm.data.collection import write_manifest
from migm.data.datamodule import TrajectoryDataModule, scan_shards
from migm.data.recorder import TrajectoryRecorder
from migm.data.trajectories import ShardError, ShardSchema, write_shard, x_at_step
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig


def _schema(model, steps):
    s = SamplerConfig()
    return ShardSchema("test", "0", steps, "arccos", model.num_tokens, model.feature_dim,
                       model.vocab_size, model.mask_id, 2, s.cfg_weight, s.temperature,
                       s.choice_temperature)


def _collect(model, path, n, steps=4, seed=0):
    rec = TrajectoryRecorder()
    cond = torch.arange(n) % 10
    out = generate(model, VanillaSource(model), cond, steps, seed=seed, observers=[rec])
    return write_shard(path, _schema(model, steps), tokens=out.tokens.numpy(),
                       decode_step=out.decode_step.numpy(), cond=cond.numpy(),
                       seed=np.full(n, seed), index=np.arange(n), **rec.arrays())


@pytest.fixture
def shard_dir(small_migm, tmp_path):
    d = tmp_path / "traj"
    _collect(small_migm, d / "shard-000-00000.h5", 5, seed=0)
    _collect(small_migm, d / "shard-001-00000.h5", 3, seed=1)
    write_manifest(d, _schema(small_migm, 4), {})
    return d


def test_samples_are_the_recorded_pairs_split_by_trajectory(shard_dir):
    dm = TrajectoryDataModule([str(shard_dir)], val_fraction=0.25, batch_size=4, seed=0)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 8 * 3 * 2          # T * (N-1) * branches
    assert not set(dm.train_set.trajectories) & set(dm.val_set.trajectories)
    ds = dm.train_set
    files = [h5py.File(p) for p in sorted(shard_dir.glob("shard-*.h5"))]
    feats = np.concatenate([f["features"][:] for f in files])
    tokens = torch.from_numpy(np.concatenate([f["tokens"][:] for f in files])).long()
    dsteps = torch.from_numpy(np.concatenate([f["decode_step"][:] for f in files])).long()
    for k in range(len(ds)):
        s = ds[k]
        row = k // 6
        traj, i, b = ds.trajectories[row], int(s["step"]), int(s["branch"])
        assert torch.equal(s["features"], torch.from_numpy(feats[traj, i - 1, b]).float())
        assert torch.equal(s["target"], torch.from_numpy(feats[traj, i, b]).float())
        assert torch.equal(s["tokens"], x_at_step(tokens[traj], dsteps[traj], i, ds.schema.mask_id))
        assert torch.equal(s["new"], dsteps[traj] == i) and s["new"].any()
        assert float(s["t"]) == pytest.approx(i / 4)


def test_workers_and_ranks_see_everything_once(shard_dir):
    dm = TrajectoryDataModule([str(shard_dir)], val_fraction=0.25, batch_size=5, num_workers=2)
    dm.setup()
    n = sum(len(b["step"]) for b in dm.train_dataloader())
    assert n == len(dm.train_set)
    ranks = [set(DistributedSampler(dm.train_set, num_replicas=2, rank=r, shuffle=True, seed=0))
             for r in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == len(dm.train_set)


def test_bad_shard_sets_name_the_file_and_field(small_migm, shard_dir, tmp_path):
    with pytest.raises(ShardError, match="manifest.json: missing"):
        scan_shards([tmp_path])
    other = tmp_path / "other"
    _collect(small_migm, other / "shard-000-00000.h5", 2, steps=5)
    write_manifest(other, _schema(small_migm, 5), {})
    with pytest.raises(ShardError, match=r"other/shard-000-00000.h5: does not match .*steps: 5 != 4"):
        scan_shards([shard_dir, other])
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    (shard_dir / "shard-001-00000.h5").unlink()
    with pytest.raises(ShardError, match="shard-001-00000.h5: listed in .* but missing"):
        scan_shards([shard_dir])
    (shard_dir / "shard-001-00000.h5").write_bytes(b"not hdf5")
    with pytest.raises(ShardError, match="shard-001-00000.h5: not a readable HDF5 file"):
        scan_shards([shard_dir])
    assert manifest["trajectories"] == 8


def test_throughput_helpers_recompress_losslessly_and_read(shard_dir, tmp_path):
    from migm.data.throughput import bytes_per_trajectory, loader_rate, recompress
    for compression in ("lzf", "gzip"):
        copy = recompress(shard_dir, tmp_path / compression, compression)
        for name in ("shard-000-00000.h5", "shard-001-00000.h5"):
            with h5py.File(shard_dir / name) as a, h5py.File(copy / name) as b:
                assert b["features"].compression == compression
                np.testing.assert_array_equal(a["features"][:], b["features"][:])
        assert bytes_per_trajectory([copy]) > 0
    assert loader_rate([shard_dir], batch_size=4, max_batches=3) > 0


# --- issue 16.4: one directory, one trajectory, one split ------------------------------------------
def test_the_same_directory_twice_is_an_error(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir.parent)
    for dirs in ([str(shard_dir), str(shard_dir) + "/"], [str(shard_dir), shard_dir.name],
                 [str(shard_dir), f"{shard_dir}/../{shard_dir.name}"]):
        with pytest.raises(ShardError, match=r"dirs: .* are the same directory"):
            TrajectoryDataModule(dirs, val_fraction=0.25).setup()


def test_a_trajectory_recorded_twice_is_an_error_never_in_both_splits(shard_dir, tmp_path):
    import shutil

    shutil.copytree(shard_dir, tmp_path / "copy")                 # the same generations again
    with pytest.raises(ShardError, match=r"copy/shard-000-00000.h5: trajectory \(seed 0, index 0\) "
                                         r"is recorded twice \(also in .*traj/shard-000-00000.h5\)"):
        TrajectoryDataModule([str(shard_dir), str(tmp_path / "copy")], val_fraction=0.25).setup()
    dm = TrajectoryDataModule([str(shard_dir)], val_fraction=0.25)
    dm.setup()
    train = {tuple(k) for k in dm.train_set.keys.tolist()}
    val = {tuple(k) for k in dm.val_set.keys.tolist()}
    assert len(train) + len(val) == 8 and not train & val


def test_test_conditions_follow_the_base_when_num_classes_is_null(shard_dir):
    import types

    dm = TrajectoryDataModule([str(shard_dir)], test_samples=7, test_batch_size=7, num_classes=None)
    base = types.SimpleNamespace(num_classes=3)                # what a prompt-table base reports
    dm.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(base=base))
    cond, index = next(iter(dm.test_dataloader()))
    assert cond.tolist() == [0, 1, 2, 0, 1, 2, 0] and index.tolist() == list(range(7))


def test_a_corrupt_shard_manifest_is_a_shard_error_naming_it(shard_dir):
    (shard_dir / "manifest.json").write_text('{"schema": ')
    with pytest.raises(ShardError, match=r"manifest\.json: not valid JSON"):
        scan_shards([shard_dir])


def test_rollout_windows_are_the_recorded_steps_that_follow(shard_dir):
    """rollout r: a sample starts at step i = 1..N-r and carries steps i+1..i+r-1 as `next_*`,
    each exactly what the shard holds for that step (features f_{j+1}, grid x_j, tokens new at j)."""
    dm = TrajectoryDataModule([str(shard_dir)], val_fraction=0.25, batch_size=4, seed=0, rollout=2)
    dm.setup()
    ds = dm.train_set
    assert len(ds) == len(ds.trajectories) * (4 - 2) * 2 and len(dm.val_set) == len(dm.val_set.trajectories) * 3 * 2
    assert "next_target" not in dm.val_set[0]                          # validation scores pairs
    files = [h5py.File(p) for p in sorted(shard_dir.glob("shard-*.h5"))]
    feats = np.concatenate([f["features"][:] for f in files])
    tokens = torch.from_numpy(np.concatenate([f["tokens"][:] for f in files])).long()
    dsteps = torch.from_numpy(np.concatenate([f["decode_step"][:] for f in files])).long()
    starts = set()
    for k in range(len(ds)):
        s = ds[k]
        traj, i, b = ds.trajectories[k // 4], int(s["step"]), int(s["branch"])
        starts.add(i)
        assert s["next_target"].shape == (1, 49, ds.schema.feature_dim)
        assert torch.equal(s["target"], torch.from_numpy(feats[traj, i, b]).float())
        assert torch.equal(s["next_target"][0], torch.from_numpy(feats[traj, i + 1, b]).float())
        assert torch.equal(s["next_tokens"][0], x_at_step(tokens[traj], dsteps[traj], i + 1, ds.schema.mask_id))
        assert torch.equal(s["next_new"][0], dsteps[traj] == i + 1)
        assert float(s["next_t"][0]) == pytest.approx((i + 1) / 4)
    assert starts == {1, 2}
    with pytest.raises(ValueError, match="rollout: between 1 and N-1 = 3"):
        bad = TrajectoryDataModule([str(shard_dir)], val_fraction=0.25, rollout=4)
        bad.setup()
