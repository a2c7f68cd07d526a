import h5py
import numpy as np
import pytest
import torch

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
                       seed=np.full(3, 5), **arrays)
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
                  cond=np.array([0, 1]), seed=np.zeros(2), **rec.arrays())
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
