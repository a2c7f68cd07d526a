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


def _load_test_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"ref_{name}", REPO_ROOT / f"tests/models/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# --- issue 16.3: a resume is keyed on the whole collection config ---------------------------------
def test_resume_with_another_layout_or_sampler_is_refused_naming_what_differs(tmp_path):
    import pytest

    main(["collect", "--config", _config(tmp_path)])
    out = tmp_path / "traj"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"traj: holds a collection made with other settings "
                                         r"\(data.batch_size: 3 \(recorded\) != 5 \(this run\)\).*overwrite"):
        main(["collect", "--config", _config(tmp_path), "--data.init_args.batch_size", "5"])
    with pytest.raises(ValueError, match=r"schema.cfg_weight: 1.0 \(recorded\) != 2.0 \(this run\)"):
        main(["collect", "--config", _config(tmp_path), "--model.init_args.sampler.cfg_weight", "2.0"])
    assert sorted(p.name for p in out.iterdir()) == before       # nothing written twice
    assert json.loads((out / "manifest.json").read_text())["trajectories"] == 10
    (out / "collection.json").unlink()                             # as an older version left it
    with pytest.raises(ValueError, match=r"no collection.json.*overwrite"):
        main(["collect", "--config", _config(tmp_path)])


# --- issue 16.2: a user's path is that file; provenance is the file's sha256 ----------------------
def test_a_user_base_path_is_that_file_and_its_sha256_is_the_provenance(tmp_path, monkeypatch):
    import shutil

    import pytest

    from migm.files import CheckpointError, sha256

    from migm.models.assets import ASSET_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "base.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"mine/base.pt: cannot be read as a torch checkpoint \(Unpick"):
        main(["collect", "--config", _config(tmp_path), "--model.init_args.base", "mine/base.pt"])
    assert not list((tmp_path / "traj").glob("shard-*"))
    shutil.copy(ASSET_DIR / "base.pt", tmp_path / "mine" / "base.pt")
    main(["collect", "--config", _config(tmp_path, base=str(tmp_path / "mine" / "base.pt"))])
    manifest = json.loads((tmp_path / "traj" / "manifest.json").read_text())
    digest = sha256(ASSET_DIR / "base.pt")
    assert manifest["schema"]["base_model"] == f"tiny:{digest[:16]}"
    assert manifest["collection"]["files"]["base"] == digest
    assert manifest["collection"]["files"]["tokenizer"] == sha256(ASSET_DIR / "tokenizer.pt")


# --- issue 16.5: a killed writer's temporaries go on the next run ---------------------------------
def test_orphan_temporaries_are_removed_on_the_next_run(tmp_path, caplog):
    out = tmp_path / "traj"
    out.mkdir()
    orphans = [out / ".shard-000-00001.h5.4242.tmp",                     # the old writer's name
               out / ".shard-000-00000.h5.otherhost.17.ab12cd34.tmp"]     # another node's, killed
    for p in orphans:
        p.write_bytes(b"half a shard")
    with caplog.at_level("WARNING"):
        main(["collect", "--config", _config(tmp_path)])
    assert not any(p.exists() for p in orphans) and not list(out.glob(".*tmp"))
    assert all(p.name in caplog.text for p in orphans) and "orphan" in caplog.text


# --- issue 14.1 / 14.3: conditions from the model, bounded storage ----------------------------------
def test_recorded_pairs_bound_the_shards_and_the_estimate(tmp_path, capsys):
    from migm.data.datamodule import TrajectoryDataModule

    main(["collect", "--config", _config(tmp_path), "--model.init_args.recorded_pairs", "1",
          "--data.init_args.num_classes", "null"])
    printed = capsys.readouterr().out
    per = 2 * 2 * 49 * 192 * 2                                # 2 of 4 steps x 2 branches x L x D x fp16
    assert f"{per / 2**20:.2f} MiB per trajectory" in printed and "2 of 4 steps" in printed
    with h5py.File(tmp_path / "traj" / "shard-000-00000.h5") as f:
        assert f["features"].shape == (6, 2, 2, 49, 192)
        pair_step, cond = f["pair_step"][:], f["cond"][:]
        assert f.attrs["recorded_pairs"] == 1
    assert pair_step.min() >= 1 and pair_step.max() <= 3
    assert cond.tolist() == [j % 10 for j in range(6)]        # num_classes null: the base's 10
    dm = TrajectoryDataModule([str(tmp_path / "traj")], val_fraction=0.2, batch_size=4)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 10 * 1 * 2   # T * P * branches
    again = tmp_path / "again"
    again.mkdir()
    main(["collect", "--config", _config(again), "--model.init_args.recorded_pairs", "1"])
    with h5py.File(again / "traj" / "shard-000-00000.h5") as f:
        np.testing.assert_array_equal(f["pair_step"][:], pair_step)     # seeded by trajectory


def test_collection_options_that_cannot_apply_are_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"recorded_pairs must be 0 \(every step\) or in \[1, 1\]"):
        main(["collect", "--config", _config(tmp_path), "--model.init_args.recorded_pairs", "2"])
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"base_kind tiny: prompts apply to a text-to-image base only"):
        main(["collect", "--config", _config(tmp_path), "--model.init_args.prompts", str(tmp_path / "p.txt")])


# --- issue 14.1 / 14.2: Lumina-DiMOO through configs/collect_dimoo.yaml, prompts as configuration ---
def test_collect_dimoo_config_records_prompt_conditions(tmp_path):
    """The shipped DiMOO collection config, only sizes and paths overridden, on a small random
    checkpoint in the released layout: condition j is line j of the prompt file, the number of
    conditions is the file's, and the schema hashes the adapter's config_dict (DiMOO has no
    transformer.config)."""
    import dataclasses

    ref = _load_test_module("test_dimoo")
    ckpt = tmp_path / "Lumina-DiMOO"
    ref.save_reference(ckpt)
    (tmp_path / "prompts.txt").write_text("a red cat\na big blue dog on the grass\n\na cat on the grass\n")
    cfg = yaml.safe_load((REPO_ROOT / "configs/collect_dimoo.yaml").read_text())
    out = tmp_path / "traj"
    cfg["trainer"].update(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(out))
    cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(out))
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ref.TINY).items()}
    cfg["model"]["init_args"].update(base=str(ckpt), prompts=str(tmp_path / "prompts.txt"), steps=3,
                                     base_config=fields, recorded_pairs=1)
    cfg["data"]["init_args"].update(num_trajectories=4)
    (tmp_path / "collect.yaml").write_text(yaml.safe_dump(cfg))
    main(["collect", "--config", str(tmp_path / "collect.yaml")])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trajectories"] == 4 and manifest["schema"]["base_model"].startswith("dimoo:")
    assert manifest["collection"]["data"]["num_classes"] == 3                  # from the file
    assert manifest["schema"]["num_tokens"] == 12 and manifest["schema"]["recorded_pairs"] == 1
    cond = np.concatenate([_read(out / s["file"])["cond"] for s in manifest["shards"]])
    assert cond.tolist() == [0, 1, 2, 0]
    (tmp_path / "prompts.txt").write_text("a red cat\na big blue dog on the grass\n")
    import pytest

    with pytest.raises(ValueError, match=r"data.num_classes: 3 \(recorded\) != 2 \(this run\); files.prompts: "):
        main(["collect", "--config", str(tmp_path / "collect.yaml")])
    with pytest.raises(ValueError, match=r"positions: sequence needs one sequence length for every condition"):
        main(["collect", "--config", str(tmp_path / "collect.yaml"), "--model.init_args.positions", "sequence",
              "--trainer.callbacks.init_args.overwrite", "true"])


# --- positions: sequence, the whole input state the official shortcuts evolve (accel/sequence.py) --
def test_positions_sequence_records_maskgit_class_slot_and_serves_it(tmp_path):
    import dataclasses

    import pytest

    from migm.data.datamodule import TrajectoryDataModule
    from migm.models.maskgit import MaskGITMIGM

    ref = _load_test_module("test_maskgit")
    tpath, vpath, _, _ = ref.save_reference(tmp_path)
    cfg = yaml.safe_load((REPO_ROOT / "configs/collect_maskgit.yaml").read_text())
    out = tmp_path / "traj"
    cfg["trainer"].update(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(out))
    cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(out), batches_per_shard=2)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ref.TINY).items()}
    cfg["model"]["init_args"].update(base=str(tpath), tokenizer=str(vpath), steps=4, base_config=fields,
                                     positions="sequence")
    cfg["data"]["init_args"].update(num_trajectories=6, num_classes=ref.TINY.num_classes, batch_size=3)
    (tmp_path / "collect.yaml").write_text(yaml.safe_dump(cfg))
    main(["collect", "--config", str(tmp_path / "collect.yaml")])
    shard = _read(out / "shard-000-00000.h5")
    assert shard["features"].shape == (6, 4, 2, 17, 32)                   # L + 1: grid, class slot
    model = MaskGITMIGM.from_checkpoints(tpath, vpath, ref.TINY)
    cond = torch.from_numpy(shard["cond"]).long()
    state = model.sequence_features(torch.full((6, 16), 16), cond)       # step 1: all masked
    torch.testing.assert_close(torch.from_numpy(shard["features"][:, 0, 0]).float(), state,
                               atol=2e-2, rtol=1e-2)
    dm = TrajectoryDataModule([str(out)], val_fraction=0.2, batch_size=4)
    dm.setup()
    s = dm.train_set[0]
    assert s["features"].shape == s["target"].shape == (17, 32) and s["tokens"].shape == (16,)
    assert dm.schema.sequence_length == 17
    with pytest.raises(ValueError, match=r"positions: sequence needs a base with sequence_features; tiny"):
        main(["collect", "--config", _config(tmp_path / "traj"), "--model.init_args.positions", "sequence"])
