"""Shortcut training through the CLI on real recorded trajectories of the shipped base."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from migm.cli import main
from migm.data.trajectories import ShardError


def _weights(cli):
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


def test_training_lowers_the_validation_error(recorded, tmp_path, make_config):
    cfg = make_config(tmp_path, recorded, max_epochs=6)
    before = main(["validate", "--config", cfg]).trainer.callback_metrics
    after = main(["fit", "--config", cfg]).trainer.callback_metrics
    assert before["val/rel_err"] == pytest.approx(1.0, abs=1e-6)     # identity at init
    assert after["val/loss"] < 0.9 * before["val/loss"]
    assert after["val/rel_err"] < 0.99
    assert "val/rel_err/step_03" in after and "val/argmax_agree" in after
    assert (tmp_path / "run/checkpoints/best.ckpt").exists()
    assert (tmp_path / "run/checkpoints/last.ckpt").exists()


def test_resume_from_an_epoch_checkpoint_is_exact(recorded, tmp_path, make_config):
    every_epoch = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": str(tmp_path / "epochs"), "filename": "{epoch}",
                                 "save_top_k": -1, "every_n_epochs": 1}}
    cfg_path = make_config(tmp_path, recorded, max_epochs=2)
    cfg = yaml.safe_load(Path(cfg_path).read_text())
    cfg["trainer"]["callbacks"].append(every_epoch)
    Path(cfg_path).write_text(yaml.safe_dump(cfg))
    straight = _weights(main(["fit", "--config", cfg_path]))
    resumed = _weights(main(["fit", "--config", cfg_path, "--ckpt_path", str(tmp_path / "epochs/epoch=0.ckpt")]))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)


def test_two_process_ddp_fit_splits_the_data_and_keeps_ranks_in_sync(recorded, tmp_path, make_config):
    cfg = make_config(tmp_path, recorded, max_epochs=1)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")
           and not k.startswith("MASTER_") and not k.startswith("PL_")}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ddp_fit.py")), cfg, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = (set(r["epoch0_indices"]) for r in ranks)
    assert a and not a & b                                   # disjoint halves of the epoch
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    assert ranks[0]["weights_head"] == ranks[1]["weights_head"]      # gradients were all-reduced
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]


def test_bad_input_gives_clear_errors(recorded, tmp_path, make_config):
    cfg = make_config(tmp_path, recorded)
    with pytest.raises(ValueError, match="feature_dim: shards have 192"):
        main(["fit", "--config", cfg, "--model.init_args.network.feature_dim", "256"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match="manifest.json: missing"):
        main(["fit", "--config", cfg, "--data.init_args.dirs", f"[{empty}]"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", cfg, "--model.init_args.netwrok.ratio", "2"])


def test_test_writes_results_plot_samples_and_a_wandb_run(recorded, tmp_path, make_config):
    cfg = make_config(tmp_path, recorded, wandb=True, max_epochs=1)
    main(["fit", "--config", cfg])
    main(["test", "--config", cfg, "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt")])
    out = tmp_path / "run/eval"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["label"]) for r in rows] == [("vanilla", "N2"), ("vanilla", "N4"),
                                                         ("shortcut", "N4/B2")]
    for r in rows:
        for key in ("steps", "budget", "latency_ms_per_image", "speedup", "ideal_speedup",
                    "base_calls", "shortcut_calls", "fid_classifier", "class_accuracy", "num_samples"):
            assert r[key] is not None, key
        assert r["num_samples"] == 40
    assert rows[2]["base_calls"] == 2 and rows[2]["shortcut_calls"] == 2
    assert rows[1]["speedup"] == 1.0                          # N=4 is the reference
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000

    from wandb_runs import offline_runs
    fit, test = offline_runs(tmp_path / "run/wandb")        # one W&B run per command
    keys = {key for item in test.history for key in item}
    assert "eval/results._type" in keys and "eval/pareto_chart_table._type" in keys, sorted(keys)[:20]
    assert not [k for k in keys if k.startswith("eval/shortcut_")]     # rows, not single-point lines
    assert {"val/rel_err", "train/loss"} <= {key for item in fit.history for key in item}
    assert {"trainer.max_epochs", "data_manifest_sha256"} <= set(fit.config)
    assert [r.run["job_type"] for r in (fit, test)] == ["fit", "test"]
    assert fit.run["run_group"] == test.run["run_group"] == "tiny"         # run.group: the name
    assert any(k.startswith("lr-") for item in fit.history for k in item)   # LearningRateMonitor
    (model,), (results,) = fit.artifacts, test.artifacts                  # checkpoint -> results
    assert json.loads(results["metadata"])["inputs"] == test.config["lineage.inputs"] == [
        f"{model['name']}:{next(a for a in model['aliases'] if a != 'latest')}"]


def test_evaluation_callback_scores_a_small_grid_during_fit(recorded, tmp_path, make_config):
    cfg_path = make_config(tmp_path, recorded, max_epochs=1)
    cfg = yaml.safe_load(Path(cfg_path).read_text())
    cfg["trainer"]["callbacks"].append({
        "class_path": "migm.evaluation.callback.EvaluationCallback",
        "init_args": {"every_n_epochs": 1, "num_samples": 20, "batch_size": 10,
                      "metrics": {"reference_samples": 500},
                      "grid": {"methods": [
                          {"class_path": "migm.accel.method.Vanilla", "init_args": {"steps": [4]}},
                          {"class_path": "migm.accel.shortcut.Shortcut", "init_args": {"steps": [4], "budgets": [2]}}],
                          "reference_steps": 4, "latency_batch": 4, "latency_repeats": 1}}})
    Path(cfg_path).write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", cfg_path])
    rows = [json.loads(x) for x in (tmp_path / "run/fit_eval/epoch_000/results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["N4", "N4/B2"] and all(r["num_samples"] == 20 for r in rows)
    metrics = (next((tmp_path / "run/csv").rglob("metrics.csv"))).read_text()
    assert "fit_eval/shortcut_N4_B2/fid_classifier" in metrics


def test_shipped_weights_load_into_either_gelu_form_but_not_another_architecture():
    from migm.shortcut.network import load_shortcut, shipped_weights
    from migm.shortcut.network import ShortcutNetwork

    shipped = load_shortcut("shortcut.pt")
    for gelu in ("none", "tanh"):
        config = dataclasses.replace(shipped.config, gelu=gelu)
        net = ShortcutNetwork(config).eval()
        net.load_state_dict(shipped_weights("shortcut.pt", config))
        f, tokens = torch.randn(2, 49, 192), torch.randint(0, 256, (2, 49))
        new, t = torch.rand(2, 49) < 0.1, torch.rand(2)
        # the two GELU forms differ by < 1e-3 per activation: the outputs nearly agree
        torch.testing.assert_close(net(f, tokens, new, t), shipped(f, tokens, new, t), rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="shortcut.pt: shortcut config .* differs"):
        shipped_weights("shortcut.pt", dataclasses.replace(shipped.config, heads=2))


def test_rollout_trains_on_its_own_predictions_the_mean_of_its_step_losses(recorded):
    """data rollout 3: the loss is the mean over the window's steps of the masked MSE, each step
    fed the previous step's prediction, computed here by hand from the network's forward."""
    from migm.data.datamodule import TrajectoryDataModule
    from migm.training.shortcut import ShortcutModule
    from migm.shortcut.network import ShortcutConfig

    dm = TrajectoryDataModule([str(recorded)], val_fraction=0.2, batch_size=8, seed=0, rollout=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = ShortcutModule(network=ShortcutConfig(feature_dim=192, blocks=1, heads=4))
    torch.manual_seed(0)
    for p in module.network.parameters():               # a non-identity network: steps differ
        p.data.add_(0.02 * torch.randn_like(p))
    mask_id = module.base.mask_id

    def step_loss(features, tokens, new, t, target):
        pred = module.network(features, tokens, new, t)
        masked = (tokens == mask_id).unsqueeze(-1).float()
        return pred, ((pred - target) ** 2 * masked).sum() / (masked.sum() * pred.shape[-1])

    pred, total = step_loss(batch["features"], batch["tokens"], batch["new"], batch["t"], batch["target"])
    for j in range(2):
        pred, loss = step_loss(pred, batch["next_tokens"][:, j], batch["next_new"][:, j],
                               batch["next_t"][:, j], batch["next_target"][:, j])
        total = total + loss
    assert module.training_step(batch, 0).item() == pytest.approx(total.item() / 3, rel=1e-5)


def test_fit_with_rollout_runs_through_the_shipped_config(recorded, tmp_path, make_config):
    cfg = make_config(tmp_path, recorded, max_epochs=2)
    after = main(["fit", "--config", cfg, "--data.init_args.rollout", "3"]).trainer.callback_metrics
    assert "train/first_step_loss" in after and after["val/rel_err"] < 1.0


def test_a_fitted_shortcut_exports_to_an_asset_that_loads(recorded, tmp_path, make_config):
    """`migm export shortcut` of a LightningCLI fit, whose network hparam is saved as
    {class_path, init_args} (it crashed loading: `unexpected keyword argument 'class_path'`)."""
    from migm.commands import export
    from migm.shortcut.network import load_shortcut

    cli = main(["fit", "--config", make_config(tmp_path, recorded, max_epochs=1)])
    out = export("shortcut", tmp_path / "run/checkpoints/last.ckpt", out=tmp_path / "assets/shortcut.pt")
    loaded = load_shortcut(out).eval()
    trained = cli.model.ema.eval()
    assert loaded.config == trained.config
    f, tokens = torch.randn(2, 49, trained.config.feature_dim), torch.randint(0, 256, (2, 49))
    new, t = torch.rand(2, 49) < 0.2, torch.rand(2)
    assert torch.allclose(loaded(f, tokens, new, t), trained(f, tokens, new, t), atol=1e-2, rtol=1e-2)


def test_a_fit_that_fails_after_logging_keeps_its_wandb_run_and_sync_line(recorded, tmp_path, make_config):
    """The other side of a failed run (tests/test_wandb_failed_run.py): one that logged steps
    before it failed (a diverging lr) is finished as failed and kept, with wandb's sync command."""
    import os
    import subprocess
    import sys

    from migm.cli import REPO_ROOT
    from wandb_runs import offline_runs
    cfg = make_config(tmp_path, recorded, wandb=True, max_epochs=3)
    env = {**{k: v for k, v in os.environ.items() if k != "MIGM_DEBUG"}, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "migm", "fit", "--config", cfg, "--model.init_args.lr", "1e30"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")][0].count("not finite")
    assert "wandb sync" in done.stderr + done.stdout
    (run,) = offline_runs(tmp_path / "run/wandb")
    assert any("train/loss" in item for item in run.history)
