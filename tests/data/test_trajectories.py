import dataclasses
import shutil

import h5py
import numpy as np
import pytest
import torch

from migm.data.datamodule import TrajectoryDataset
from migm.data.recorder import TrajectoryRecorder
from migm.data.trajectories import ShardError, ShardSchema, open_shard, write_shard, x_at_step
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig


def _schema(model, steps, branches=2) -> ShardSchema:
    s = SamplerConfig()
    return ShardSchema(base_model="test", base_config_hash="0", steps=steps, schedule="arccos",
                       num_tokens=model.num_tokens, feature_dim=model.feature_dim,
                       vocab_size=model.vocab_size, mask_id=model.mask_id, branches=branches,
                       cfg_weight=s.cfg_weight, temperature=s.temperature,
                       choice_temperature=s.choice_temperature)


class StepLog:
    def __init__(self):
        self.grids, self.features = [], []

    def on_step(self, ctx, features, new_tokens, revealed):
        self.grids.append(ctx.tokens[: len(new_tokens)].clone())
        self.features.append(features.clone())


def test_round_trip_rebuilds_every_step(small_migm, tmp_path):
    steps, cond = 6, torch.tensor([1, 4, 7])
    rec, log = TrajectoryRecorder(), StepLog()
    out = generate(small_migm, VanillaSource(small_migm), cond, steps, seed=5, observers=[rec, log])
    arrays = rec.arrays()
    path = write_shard(tmp_path / "shard-0-0.h5", _schema(small_migm, steps), tokens=out.tokens.numpy(),
                       decode_step=out.decode_step.numpy(), cond=cond.numpy(),
                       seed=np.full(3, 5), index=np.arange(3), **arrays)
    schema, count = open_shard(path)
    assert count == 3 and schema == _schema(small_migm, steps)
    with h5py.File(path) as f:
        tokens, dstep = torch.from_numpy(f["tokens"][:]).long(), torch.from_numpy(f["decode_step"][:]).long()
        for i in range(1, steps + 1):
            # x_{i-1} as the loop saw it at step i, rebuilt from two arrays.
            assert torch.equal(x_at_step(tokens, dstep, i - 1, small_migm.mask_id), log.grids[i - 1])
            stored = torch.from_numpy(f["features"][:, i - 1])                 # (T, branches, L, D)
            live = log.features[i - 1].view(2, 3, 49, -1).transpose(0, 1)
            assert torch.allclose(stored.float(), live, atol=2e-3, rtol=1e-2)
    assert not list(tmp_path.glob(".*tmp"))


def test_truncated_and_mismatched_shards_are_named(small_migm, tmp_path):
    rec = TrajectoryRecorder()
    out = generate(small_migm, VanillaSource(small_migm), torch.tensor([0, 1]), 4, observers=[rec])
    kwargs = dict(tokens=out.tokens.numpy(), decode_step=out.decode_step.numpy(),
                  cond=np.array([0, 1]), seed=np.zeros(2), index=np.arange(2), **rec.arrays())
    with pytest.raises(ShardError, match="schema says"):
        write_shard(tmp_path / "bad.h5", _schema(small_migm, 5), **kwargs)
    path = write_shard(tmp_path / "ok.h5", _schema(small_migm, 4), **kwargs)
    raw = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ShardError, match="cut.h5"):
        open_shard(tmp_path / "cut.h5")
    with h5py.File(path, "a") as f:
        del f.attrs["mask_id"]
    with pytest.raises(ShardError, match="ok.h5: attribute 'mask_id' is missing"):
        open_shard(path)


# --- issue 16.1: corrupt or non-finite features are a ShardError naming file, trajectory, step ----
def _shard(model, path, steps=4, n=3, seed=5, pairs=None, recorded_pairs=0):
    cond = torch.arange(n) % 10
    rec = TrajectoryRecorder(pair_steps=pairs)
    out = generate(model, VanillaSource(model), cond, steps, seed=seed, observers=[rec])
    schema = dataclasses.replace(_schema(model, steps), recorded_pairs=recorded_pairs)
    extra = {} if pairs is None else {"pair_step": pairs}
    write_shard(path, schema, tokens=out.tokens.numpy(), decode_step=out.decode_step.numpy(),
                cond=cond.numpy(), seed=np.full(n, seed), index=np.arange(n), **rec.arrays(), **extra)
    return schema, out, rec


def test_flipped_bytes_in_a_feature_chunk_are_a_shard_error_naming_trajectory_and_step(small_migm, tmp_path):
    schema, _, _ = _shard(small_migm, tmp_path / "s.h5")
    ds = TrajectoryDataset(schema, [(tmp_path / "s.h5", 3)], np.arange(3))
    with h5py.File(tmp_path / "s.h5") as f:
        chunk = f["features"].id.get_chunk_info_by_coord((1, 2, 0, 0, 0))     # trajectory 1, f_3
    raw = bytearray((tmp_path / "s.h5").read_bytes())
    raw[chunk.byte_offset + 1000: chunk.byte_offset + 5096] = bytes(range(256)) * 16   # 4 KB inside
    (tmp_path / "s.h5").write_bytes(bytes(raw))
    ds[0]                                                          # other trajectories still read
    pairs = (schema.steps - 1) * schema.branches
    for i in (2, 3):                                               # f_3 as target, then as input
        with pytest.raises(ShardError, match=r"s.h5: trajectory 1 \(seed 5, index 1\), step 3 .*checksum"):
            ds[pairs + (i - 1) * schema.branches]


def test_non_finite_features_are_refused_when_written_and_when_read(small_migm, tmp_path):
    schema, _, _ = _shard(small_migm, tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "a") as f:                  # a valid write: checksum updated
        f["features"][0, 1, 1, 5, 3] = np.nan
    ds = TrajectoryDataset(schema, [(tmp_path / "s.h5", 3)], np.arange(3))
    with pytest.raises(ShardError, match=r"s.h5: trajectory 0 \(seed 5, index 0\), step 2 branch 1: .*not finite"):
        ds[1]                                                      # i = 1, branch 1: f_1 and f_2
    rec = TrajectoryRecorder()
    out = generate(small_migm, VanillaSource(small_migm), torch.tensor([0, 1]), 4, observers=[rec])
    arrays = rec.arrays()
    arrays["features"][1, 2, 0, 7] = np.inf
    with pytest.raises(ShardError, match=r"bad.h5: trajectory 1 \(index 11\), step 3: features are not finite"):
        write_shard(tmp_path / "bad.h5", schema, tokens=out.tokens.numpy(), decode_step=out.decode_step.numpy(),
                    cond=np.array([0, 1]), seed=np.zeros(2), index=np.array([10, 11]), **arrays)
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.glob(".*tmp"))


def _write_v1(path, schema_v1: dict, arrays: dict) -> None:
    """The schema-1 layout exactly as the old writer made it: no checksums, no index."""
    with h5py.File(path, "w") as f:
        for k, v in schema_v1.items():
            f.attrs[k] = v
        f.attrs["complete"] = True
        T, N, branches, L, D = arrays["features"].shape
        f.create_dataset("features", data=arrays["features"], chunks=(1, 1, branches, L, D))
        for k in ("tokens", "decode_step", "cond", "seed", "times", "mask_ratio"):
            f.create_dataset(k, data=arrays[k])


def test_schema_v1_shards_are_still_read_with_a_finite_check(small_migm, tmp_path, caplog):
    from migm.data.collection import write_manifest
    from migm.data.datamodule import scan_shards

    rec = TrajectoryRecorder()
    out = generate(small_migm, VanillaSource(small_migm), torch.tensor([2, 3]), 4, seed=9, observers=[rec])
    old = dataclasses.asdict(_schema(small_migm, 4))
    del old["recorded_pairs"]
    old["schema_version"] = 1
    arrays = {"tokens": out.tokens.numpy().astype(np.int32), "decode_step": out.decode_step.numpy().astype(np.int16),
              "cond": np.array([2, 3]), "seed": np.array([9, 9]), **rec.arrays()}
    (tmp_path / "traj").mkdir()
    _write_v1(tmp_path / "traj" / "shard-000-00000.h5", old, arrays)
    with caplog.at_level("WARNING"):
        schema, count = open_shard(tmp_path / "traj" / "shard-000-00000.h5")
    assert schema.schema_version == 1 and schema.recorded_pairs == 0 and count == 2
    assert "schema v1" in caplog.text and "no checksums" in caplog.text
    write_manifest(tmp_path / "traj", schema, {})
    schema, shards = scan_shards([tmp_path / "traj"])
    ds = TrajectoryDataset(schema, shards, np.arange(2))
    s = ds[3 * 2 + 2 * 2 + 1]                                      # trajectory 1, i = 3, branch 1
    assert torch.equal(s["features"], torch.from_numpy(arrays["features"][1, 2, 1]).float())
    assert torch.equal(s["target"], torch.from_numpy(arrays["features"][1, 3, 1]).float())
    shutil.copytree(tmp_path / "traj", tmp_path / "nan")
    with h5py.File(tmp_path / "nan" / "shard-000-00000.h5", "a") as f:
        f["features"][1, 3, 1, 0, 0] = np.nan
    ds = TrajectoryDataset(*scan_shards([tmp_path / "nan"]), np.arange(2))
    with pytest.raises(ShardError, match=r"trajectory 1 \(seed 9\), step 4 branch 1: .*not finite"):
        ds[3 * 2 + 2 * 2 + 1]


# --- issue 14.3: a bounded number of (i, i+1) pairs per trajectory --------------------------------
def test_recorded_pairs_store_exactly_those_steps_and_serve_them(small_migm, tmp_path):
    steps, pairs = 5, np.array([[1, 3], [2, 3]])
    full = TrajectoryRecorder()
    generate(small_migm, VanillaSource(small_migm), torch.tensor([0, 1]), steps, seed=5, observers=[full])
    f_full = full.arrays()["features"]                              # (2, 5, 2, L, D)
    schema, out, rec = _shard(small_migm, tmp_path / "p.h5", steps=steps, n=2, pairs=pairs, recorded_pairs=2)
    assert rec.arrays()["features"].shape == (2, 4, 2, 49, small_migm.feature_dim)   # 2P slots, not N
    _, count = open_shard(tmp_path / "p.h5")
    ds = TrajectoryDataset(schema, [(tmp_path / "p.h5", count)], np.arange(2))
    assert len(ds) == 2 * 2 * 2                                     # T * P * branches
    for k in range(len(ds)):
        s = ds[k]
        row, pair, b = k // 4, (k // 2) % 2, k % 2
        i = int(pairs[row, pair])
        assert int(s["step"]) == i and int(s["branch"]) == b
        assert torch.equal(s["features"], torch.from_numpy(f_full[row, i - 1, b]).float())    # f_i
        assert torch.equal(s["target"], torch.from_numpy(f_full[row, i, b]).float())          # f_{i+1}
        assert torch.equal(s["tokens"], x_at_step(out.tokens[row], out.decode_step[row], i, small_migm.mask_id))
        assert float(s["t"]) == pytest.approx(i / steps)
    with pytest.raises(ShardError, match="pair_step"):
        _shard(small_migm, tmp_path / "q.h5", steps=steps, n=2, pairs=np.array([[1, 5], [2, 3]]),
               recorded_pairs=2)
