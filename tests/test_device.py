"""The device tests: generation, the loop's host syncs, and collect -> fit -> test, parametrized
by device. On a machine without CUDA the cuda cases are skipped; `make gpu-check` runs this
file on a GPU (src/migm/gpu_check.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

from migm.accel.dllm_cache import DLLMCache
from migm.accel.method import Vanilla
from migm.accel.reuse import Reuse
from migm.accel.shortcut import Shortcut
from migm.cli import REPO_ROOT, main
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _methods():
    return [Vanilla(steps=[8]), Shortcut(steps=[8], budgets=[3]), Reuse(steps=[8], budgets=[3]),
            DLLMCache(steps=[8], prompt_interval=[4], gen_interval=[2], transfer_ratio=0.25)]


@pytest.mark.parametrize("device", DEVICES)
def test_every_method_generates_on_the_device(small_migm, device):
    model = small_migm.to(device)
    net = ShortcutNetwork(ShortcutConfig(feature_dim=model.feature_dim, vocab_size=model.vocab_size,
                                         num_tokens=model.num_tokens)).eval().to(device)
    cond = torch.arange(4, device=device) % model.num_classes
    for method in _methods():
        (point,) = method.points()
        out = generate(model, point.source(model, net), cond, 8, sampler=SamplerConfig(cfg_weight=2.0))
        assert out.tokens.device.type == device and out.tokens.shape == (4, model.num_tokens)
        assert not (out.tokens == model.mask_id).any(), point.label
        assert out.counts["base_calls"] <= 8
        assert model.decode(out.tokens).isfinite().all()
    small_migm.to("cpu")


@CUDA
def test_the_loop_does_not_sync_per_step_on_cuda(small_migm):
    """torch's sync debug mode warns at every host synchronisation: their number must not grow
    with N (tests/sampling/test_no_host_sync.py counts them on the CPU)."""
    model = small_migm.to("cuda")
    cond = torch.arange(4, device="cuda") % model.num_classes

    def syncs(steps: int) -> int:
        (point,) = Vanilla(steps=[steps]).points()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, point.source(model), cond, steps, sampler=SamplerConfig(cfg_weight=2.0))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    assert syncs(4) == syncs(12)
    small_migm.to("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_collect_fit_and_test_on_the_device(tmp_path, device):
    """The embedded default's pipeline through the CLI, on the device (bf16-mixed on a GPU)."""
    accel = ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
    shards = tmp_path / "shards"
    main(["collect", "--config", str(REPO_ROOT / "configs/collect_tiny.yaml"), *accel,
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "collect"),
          "--trainer.callbacks.init_args.out_dir", str(shards), "--model.init_args.steps", "6",
          "--data.init_args.num_trajectories", "20", "--data.init_args.batch_size", "10"])
    cfg = yaml.safe_load((REPO_ROOT / "configs/tiny.yaml").read_text())
    cfg["run"] = {"name": "dev", "root": str(tmp_path / "run")}
    cfg["trainer"].update(max_epochs=1, enable_progress_bar=False, log_every_n_steps=1,
                          logger=[lg for lg in cfg["trainer"]["logger"] if "Wandb" not in lg["class_path"]],
                          callbacks=[cb for cb in cfg["trainer"]["callbacks"]
                                     if "EvaluationCallback" not in cb["class_path"]],
                          precision="bf16-mixed" if device == "cuda" else "32-true")
    cfg["evaluation"].update(methods=[{"class_path": "migm.accel.method.Vanilla", "init_args": {"steps": [2, 4]}},
                                      {"class_path": "migm.accel.shortcut.Shortcut",
                                       "init_args": {"steps": [4], "budgets": [2]}}],
                             reference_steps=4, latency_batch=4, latency_repeats=1, keep_images=4)
    cfg["metrics"]["reference_samples"] = 200
    cfg["data"]["init_args"].update(dirs=[str(shards)], batch_size=16, val_fraction=0.2,
                                    test_samples=10, test_batch_size=10)
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path), *accel])
    main(["test", "--config", str(path), *accel, "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt")])
    rows = [json.loads(line) for line in (tmp_path / "run/eval/results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["N2", "N4", "N4/B2"]
    assert all(r["device"].startswith(device) and r["fid_classifier"] > 0 for r in rows)
