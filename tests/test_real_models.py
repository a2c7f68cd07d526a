"""End to end on the real-model formats: `collect -> fit -> test` through the SHIPPED configs.

A user with the released weights runs configs/collect_maskgit.yaml then configs/maskgit.yaml (or
the DiMOO pair); here the same files run on small random checkpoints written in the released
layouts, with only sizes (model widths, grid, trajectories, batch sizes, step lists, training
length), paths and the device (CPU, one process, fp32) overridden in Python, through the CLI as
a function. So a config the real thing would crash on crashes here too. The checkpoint writers
are the ones the fidelity tests pin the layouts with (tests/models/test_maskgit.py, ...); the
FID network is a small TorchScript stand-in loaded through the real Inception path, CLIP and
ImageReward small random models saved in their released layouts.

The step counts and evaluation grids are the shipped ones (Table 1's and Table 2's, every
baseline at its paper settings): MaskGIT's 8x8 test grid and DiMOO's 8x10 one hold enough tokens
for 32 and 64 steps. One torch thread: see `_threads`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from migm.cli import REPO_ROOT, main


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """One torch thread for this module (the conftest's `_threads` runs two): on the shared 2-core
    machine the loaded second thread made a `test` call 10x slower (34 s instead of 3.4 s)."""
    torch.set_num_threads(1)


def _tests_module(path: str):
    """A test module holding the writers of a released layout (tests/ is not a package)."""
    name = "layout_" + path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fields(config) -> dict:
    """A model config dataclass as YAML gives base_config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _shipped(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "configs" / name).read_text())


def _write(cfg: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _on_cpu(cfg: dict, root: Path, **trainer) -> dict:
    """The shipped trainer on one CPU process, fp32, writing under `root`, W&B left out (its
    offline start costs seconds; the CSV logger stays)."""
    t = cfg["trainer"]
    t.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true",
             enable_progress_bar=False, **trainer)
    cfg["run"] = {"root": str(root)}                 # every output path follows the run's root
    if "logger" in t and t["logger"]:
        t["logger"] = [lg for lg in t["logger"] if "Wandb" not in lg["class_path"]]
    return cfg


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


# --- MaskGIT (issue 13): the reference transformer + VQGAN, the official shortcut -----------------
@pytest.fixture(scope="module")
def maskgit_fit(tmp_path_factory):
    """configs/collect_maskgit.yaml, then `fit` through configs/maskgit.yaml, on a random MaskGIT
    (8x8 grid: the shipped 15- and 32-step schedules fit its 64 tokens, K = 16, 5 classes, D = 32)."""
    layout = _tests_module("models/test_maskgit.py")
    root = tmp_path_factory.mktemp("maskgit")
    config = dataclasses.replace(layout.TINY, grid_size=8, resolution=16, attn_resolutions=(8,))
    base, vqgan, _, _ = layout.save_reference(root, c=config)
    files = {"base": str(base), "tokenizer": str(vqgan), "base_config": _fields(config)}

    # FID: the Inception path on a TorchScript stand-in, against a pytorch-fid .npz of 40 images
    torch.manual_seed(0)
    inception = root / "inception.pt"
    torch.jit.save(torch.jit.script(_tests_module("evaluation/test_reference.py").StandIn()), str(inception))
    from migm.evaluation.features import InceptionFeatures
    real = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = InceptionFeatures(inception)(real).double().numpy()
    np.savez_compressed(root / "imagenet_val.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))

    traj = root / "traj"
    cfg = _on_cpu(_shipped("collect_maskgit.yaml"), traj)
    cfg["trainer"]["callbacks"][0]["init_args"]["out_dir"] = str(traj)
    cfg["model"]["init_args"].update(files)
    cfg["data"]["init_args"].update(num_trajectories=10, num_classes=config.num_classes, batch_size=5)
    main(["collect", "--config", _write(cfg, root / "collect.yaml")])

    run = root / "run"
    cfg = _on_cpu(_shipped("maskgit.yaml"), run, max_epochs=1, limit_train_batches=4,
                  limit_val_batches=2, log_every_n_steps=1)
    m = cfg["model"]["init_args"]
    m["network"]["init_args"].update(feature_dim=32, vocab_size=16, num_tokens=64, heads=4)
    m.update(files, warmup_steps=2)
    cfg["evaluation"].update(latency_batch=2, latency_repeats=1, keep_images=4)   # Table 1's grid, whole
    cfg["metrics"].update(inception_path=str(inception), reference=str(root / "imagenet_val.npz"),
                          cache_dir=str(root / "cache"))
    cfg["data"]["init_args"].update(dirs=[str(traj)], batch_size=8, num_workers=0, val_fraction=0.2,
                                    test_samples=10, test_batch_size=10, num_classes=config.num_classes)
    config_path = _write(cfg, root / "maskgit.yaml")
    main(["fit", "--config", config_path])
    return {"root": root, "config": config_path, "run": run, "traj": traj, "model": config,
            "network": m["network"]["init_args"], **files}


def test_maskgit_collect_fit_test_through_the_shipped_configs(maskgit_fit):
    """The shipped pair records the sequence the official shortcut evolves (the grid, then the
    class slot), trains it, and `test --ckpt_path best.ckpt` writes FID rows for vanilla and the
    official plan's shortcut points."""
    from migm.data.trajectories import open_shard

    schema, n = open_shard(sorted(maskgit_fit["traj"].glob("shard-*.h5"))[0])
    assert (schema.steps, schema.branches, schema.num_tokens, schema.sequence_length) == (15, 2, 64, 65)
    assert schema.schedule == "maskgit_reference" and n == 10
    best = maskgit_fit["run"] / "checkpoints" / "best.ckpt"
    assert best.exists() and (best.parent / "last.ckpt").exists()
    metrics = next((maskgit_fit["run"] / "csv").rglob("metrics.csv")).read_text()
    assert "val/rel_err" in metrics and "train/loss" in metrics

    main(["test", "--config", maskgit_fit["config"], "--ckpt_path", str(best)])
    rows = _rows(maskgit_fit["run"] / "eval")
    table1 = [("vanilla", N, N) for N in (8, 9, 11, 13, 15, 32)] + \
        [("shortcut", 15, B) for B in (7, 8)] + [("shortcut", 32, B) for B in (8, 9, 12)]
    assert [(r["method"], r["steps"], r["budget"]) for r in rows] == table1
    assert [(r["base_calls"], r["shortcut_calls"] or 0) for r in rows] == [(B, N - B) for _, N, B in table1]
    for r in rows:
        assert np.isfinite(r["fid_inception"]) and r["fid_inception"] >= 0 and r["num_samples"] == 10
        assert "class_accuracy" not in r                      # no classifier of ImageNet's classes
        assert r["schedule"] == "maskgit_reference" and r["cfg_weight"] == 2.8 and r["reference_steps"] == 15


def test_maskgit_released_shortcut_layout_is_evaluated_with_test_weights(maskgit_fit, capsys):
    """A random checkpoint in maskgit-shortcut.pth's key layout, through the shipped config with
    --evaluation.weights, no --ckpt_path."""
    from migm.shortcut.maskgit_official import MaskGITShortcutConfig

    official = _tests_module("shortcut/test_maskgit_official.py")
    weights, _ = official.save_official(maskgit_fit["root"], MaskGITShortcutConfig(**maskgit_fit["network"]))
    cfg = yaml.safe_load(Path(maskgit_fit["config"]).read_text())
    e = cfg["evaluation"]
    vanilla, shortcut = e["methods"][:2]                                        # N15, N15/B7
    e["methods"] = [{**vanilla, "init_args": {"steps": [15]}},
                    {**shortcut, "init_args": {**shortcut["init_args"], "budgets": [7]}}]
    out = maskgit_fit["root"] / "official"
    e["out_dir"] = str(out)
    main(["test", "--config", _write(cfg, maskgit_fit["root"] / "official.yaml"),
          "--evaluation.weights", str(weights)])
    assert f"evaluating shortcut weights {weights}" in capsys.readouterr().out
    rows = _rows(out)
    assert [(r["label"], r["base_calls"], r["shortcut_calls"] or 0) for r in rows] == [("N15", 15, 0), ("N15/B7", 7, 8)]
    assert all(np.isfinite(r["fid_inception"]) for r in rows)
    assert rows[0]["fid_inception"] != rows[1]["fid_inception"]     # the imported network ran


def test_fit_refuses_shards_recorded_for_the_other_network_kind(maskgit_fit):
    """The official (whole-sequence) shortcut on grid-only shards, or ours on sequence shards,
    would train without an error and be wrong at test: refused, saying how to collect."""
    from migm.data.trajectories import open_shard
    from migm.shortcut.maskgit_official import MaskGITShortcutConfig
    from migm.training.shortcut import ShortcutModule
    from migm.shortcut.network import ShortcutConfig

    schema, _ = open_shard(sorted(maskgit_fit["traj"].glob("shard-*.h5"))[0])
    files = {k: maskgit_fit[k] for k in ("base", "tokenizer", "base_config")}
    official = ShortcutModule(MaskGITShortcutConfig(**maskgit_fit["network"]), "maskgit", **files)
    official._check_schema(schema)
    with pytest.raises(ValueError, match=r"hold grid features .* MaskGITShortcutNetwork evolves .* "
                                         r"--model.init_args.positions sequence"):
        official._check_schema(dataclasses.replace(schema, sequence_length=0))
    ours = ShortcutModule(ShortcutConfig(feature_dim=32, vocab_size=16, num_tokens=64, heads=4), "maskgit", **files)
    with pytest.raises(ValueError, match=r"hold sequence features \(T = 65\), but ShortcutNetwork maps"):
        ours._check_schema(schema)


def test_the_official_shortcut_reads_the_class_slot_and_is_scored_on_the_grid(maskgit_fit):
    """Sequence shards serve (L + 1)-row states; the network reads all of them (the class slot
    moves too), the loss and diagnostics cover the L grid rows only, as the official loss does."""
    from torch.utils.data import default_collate

    from migm.data.datamodule import TrajectoryDataModule
    from migm.shortcut.maskgit_official import MaskGITShortcutConfig
    from migm.training.shortcut import ShortcutModule

    dm = TrajectoryDataModule([str(maskgit_fit["traj"])], val_fraction=0.2, batch_size=4)
    dm.setup("fit")
    batch = default_collate([dm.train_set[k] for k in (0, 7, 30, 55)])
    assert batch["features"].shape == batch["target"].shape == (4, 65, 32) and batch["tokens"].shape == (4, 64)
    files = {k: maskgit_fit[k] for k in ("base", "tokenizer", "base_config")}
    module = ShortcutModule(MaskGITShortcutConfig(**maskgit_fit["network"]), "maskgit", loss_on="masked", **files)
    ratio = (batch["tokens"] == 16).float().mean(1)                         # mask ratio of x_i
    full = module.network(batch["features"], batch["tokens"], batch["new"], ratio)       # (4, 65, 32)
    pred = module._predict(module.network, batch)
    assert torch.equal(pred, full[:, :64])
    assert not torch.allclose(full[:, 64], batch["features"][:, 64])           # the class slot moves
    loss = module._loss(pred, module._on_grid(batch))
    moved = {**batch, "target": batch["target"].clone()}
    moved["target"][:, 64] += 1.0                                             # the class slot's target
    assert module._loss(pred, module._on_grid(moved)) == loss
    masked = int((batch["tokens"] == 16).any(0).nonzero()[0])                 # a grid row in the loss
    moved["target"][:, masked] += 1.0
    assert module._loss(pred, module._on_grid(moved)) != loss


# --- Lumina-DiMOO (issue 14): the released checkpoint directory, prompts, CLIP, ImageReward --------
DIMOO_PROMPTS = ["a red cat", "a big blue dog on the grass", "a cat on the grass"]


@pytest.fixture(scope="module")
def dimoo_fit(tmp_path_factory):
    """configs/collect_dimoo.yaml, then `fit` through configs/dimoo.yaml (our network), on a
    random checkpoint directory (8x10 grid: 80 tokens, K = 16, D = 32) with 3 prompts."""
    layout = _tests_module("models/test_dimoo.py")
    root = tmp_path_factory.mktemp("dimoo")
    config = dataclasses.replace(layout.TINY, grid_height=8, grid_width=10)
    layout.save_reference(root / "Lumina-DiMOO", c=config)
    (root / "prompts.txt").write_text("\n".join(DIMOO_PROMPTS) + "\n")
    files = {"base": str(root / "Lumina-DiMOO"), "base_config": _fields(config),
             "prompts": str(root / "prompts.txt")}
    clip, reward = root / "clip", root / "ImageReward"
    clip.mkdir(), reward.mkdir()
    _tests_module("evaluation/test_clip.py").save_clip(clip)
    _tests_module("evaluation/test_imagereward.py").save_image_reward(reward)

    traj = root / "traj"
    cfg = _on_cpu(_shipped("collect_dimoo.yaml"), traj)
    cfg["trainer"]["callbacks"][0]["init_args"]["out_dir"] = str(traj)
    cfg["model"]["init_args"].update(files)                                   # 64 steps, as shipped
    cfg["data"]["init_args"].update(num_trajectories=len(DIMOO_PROMPTS))
    main(["collect", "--config", _write(cfg, root / "collect.yaml")])

    run = root / "run"
    cfg = _on_cpu(_shipped("dimoo.yaml"), run, max_epochs=1, limit_train_batches=4,
                  limit_val_batches=2, log_every_n_steps=1)
    m = cfg["model"]["init_args"]
    m["network"]["init_args"].update(feature_dim=32, vocab_size=16, num_tokens=80, heads=4)
    m.update(files, warmup_steps=2)
    cfg["evaluation"].update(latency_repeats=1, keep_images=3)                # Table 2's grid, whole
    cfg["metrics"].update(clip_path=str(clip), image_reward_path=str(reward), cache_dir=str(root / "cache"))
    cfg["data"]["init_args"].update(dirs=[str(traj)], batch_size=4, num_workers=0, val_fraction=0.34,
                                    test_samples=len(DIMOO_PROMPTS), test_batch_size=len(DIMOO_PROMPTS))
    config_path = _write(cfg, root / "dimoo.yaml")
    main(["fit", "--config", config_path])
    return {"root": root, "config": config_path, "run": run, "traj": traj, "model": config}


def test_dimoo_collect_fit_test_through_the_shipped_configs(dimoo_fit):
    """Condition j is prompt j everywhere; `test --ckpt_path best.ckpt` scores every method class
    of Table 2's grid by CLIPScore and ImageReward against each sample's prompt."""
    manifest = json.loads((dimoo_fit["traj"] / "manifest.json").read_text())
    assert manifest["trajectories"] == 3 and manifest["collection"]["data"]["num_classes"] == 3
    assert manifest["schema"]["num_tokens"] == 80 and manifest["schema"]["schedule"] == "dimoo_cosine"
    best = dimoo_fit["run"] / "checkpoints" / "best.ckpt"
    assert best.exists()

    main(["test", "--config", dimoo_fit["config"], "--ckpt_path", str(best)])
    rows = _rows(dimoo_fit["run"] / "eval")
    assert [(r["method"], r["label"]) for r in rows] == [
        ("vanilla", "N13"), ("vanilla", "N14"), ("vanilla", "N16"), ("vanilla", "N32"), ("vanilla", "N64"),
        ("shortcut", "N64/B9"), ("shortcut", "N64/B11"), ("shortcut", "N64/B14"),
        ("ml_cache", "N64/w0.1/r5/c0.9"), ("ml_cache", "N64/w0/r5/c0.9"),
        ("recap", "u0/T8/N48"), ("recap", "u0/T8/N32"),      # (u, T, T') with T' the local steps
        *[("dllm_cache", f"N64/Kp{p}/Kr{r} rho{rho}") for p, r in ((10, 5), (64, 16)) for rho in ("0", "0.25", "0.5")],
        ("taylorseer", "N64/I4/O2/layers"), ("taylorseer", "N64/I8/O2/layers")]
    for r in rows:
        assert r["num_samples"] == 3
        assert 0 <= r["clip_score"] <= 100 and np.isfinite(r["image_reward"])
        assert not any(k.startswith("fid_") for k in r)
    assert [(r["base_calls"], r["shortcut_calls"]) for r in rows[5:8]] == [(9, 55), (11, 53), (14, 50)]


def test_dimoo_released_shortcut_is_evaluated_with_its_network_file(dimoo_fit, capsys):
    """`test --model.init_args.network configs/networks/dimoo_official.yaml --evaluation.weights
    <file>`: the official whole-sequence network (sizes overridden) from a random
    file in dimoo-shortcut.pth's layout, prompt tokens fed on the conditional branch."""
    official = _tests_module("shortcut/test_dimoo_official.py")
    root = dimoo_fit["root"]
    network = _shipped("networks/dimoo_official.yaml")
    base = dimoo_fit["model"]                 # the official shortcut takes heads and MLP from the base
    network["init_args"].update(feature_dim=32, heads=base.n_heads, kv_heads=base.n_kv_heads,
                                mlp_hidden=base.mlp_hidden_size, rope_theta=base.rope_theta)
    c = network["init_args"]
    weights = root / "dimoo-shortcut.pth"
    official.save_official(weights, official.official_shapes(32, c["ratio"], c["blocks"], c["heads"], c["kv_heads"],
                                                             c["mlp_hidden"], c["embed_t"], c["cross_attention"]))
    cfg = yaml.safe_load(Path(dimoo_fit["config"]).read_text())
    e = cfg["evaluation"]
    vanilla, shortcut = e["methods"][:2]                                        # N64, N64/B9
    e["methods"] = [{**vanilla, "init_args": {"steps": [64]}},
                    {**shortcut, "init_args": {**shortcut["init_args"], "budgets": [9]}}]
    e["out_dir"] = str(root / "official")
    main(["test", "--config", _write(cfg, root / "official.yaml"),
          "--model.init_args.network", _write(network, root / "dimoo_official.yaml"),
          "--evaluation.weights", str(weights)])
    assert f"evaluating shortcut weights {weights}" in capsys.readouterr().out
    rows = _rows(root / "official")
    assert [(r["label"], r["base_calls"], r["shortcut_calls"] or 0) for r in rows] == [("N64", 64, 0), ("N64/B9", 9, 55)]
    assert all(0 <= r["clip_score"] <= 100 and np.isfinite(r["image_reward"]) for r in rows)


NEEDS = ("checkpoints/Lumina-DiMOO not found", "config.json", "model.safetensors.index.json",
         "vqvae/diffusion_pytorch_model.safetensors", "prompt file", "Alpha-VLLM/Lumina-DiMOO")


def test_without_weights_the_shipped_dimoo_config_stops_at_once_naming_the_files(tmp_path, monkeypatch):
    """The user's own `python -m migm fit --config configs/dimoo.yaml` in a directory without the
    checkpoint: one line naming the directory and what it must hold, exit 1, before any trainer,
    GPU (this machine has none) or run directory exists; `collect` through its config alike."""
    from test_errors import assert_one_line, run_cli

    line = assert_one_line(run_cli("fit", "--config", str(REPO_ROOT / "configs/dimoo.yaml"), cwd=tmp_path), *NEEDS)
    assert "Union" not in line and "gpu" not in line
    assert not (tmp_path / "runs").exists()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        main(["collect", "--config", str(REPO_ROOT / "configs/collect_dimoo.yaml")], raise_errors=True)
    assert all(needle in str(err.value) for needle in NEEDS), err.value
    assert not (tmp_path / "runs").exists()
