"""The CLI as a function (torchgeo style): every shipped YAML parses, bad input names the field."""

from pathlib import Path

import pytest
import yaml

from migm.cli import main

REPO = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "networks")
NETWORK_CONFIGS = sorted((REPO / "configs" / "networks").glob("*.yaml"))


@pytest.mark.parametrize("network", NETWORK_CONFIGS, ids=lambda p: p.name)
def test_every_network_config_overrides_its_base_models_config(network, capsys):
    """configs/networks/<base>_<which>.yaml replaces the network of configs/<base>.yaml."""
    base = REPO / "configs" / f"{network.stem.split('_')[0]}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(base), "--model.init_args.network", str(network), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["network"]
    original = yaml.safe_load(network.read_text())
    assert resolved["class_path"] == original["class_path"]
    assert resolved["init_args"].items() >= original["init_args"].items()


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_resolves(config, capsys):
    subcommand = "predict" if config.name.startswith("collect") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load(config.read_text())
    assert resolved["model"]["class_path"] == original["model"]["class_path"]
    assert resolved["seed_everything"] == original["seed_everything"]


@pytest.mark.parametrize("config", sorted((REPO / "experiments").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_experiment_resolves(config, capsys):
    """Lightning experiments are overrides (no model class_path) of the shipped config their
    usage line names, resolved through fit (or predict, for a collection); the rest are
    `evaluate` configs. Every key an override sets comes out of the resolved config."""
    import re
    original = yaml.safe_load(config.read_text())
    if "evaluation" in original or "model" in original or "trainer" in original or "run" in original:
        assert "class_path" not in original.get("model", {}), f"{config}: a full copy, not an override"
        rel = str(config.relative_to(REPO))
        usage = next((line for line in config.read_text().splitlines() if f"--config {rel}" in line), "")
        chain = re.findall(r"--config (\S+)", usage.split(f"--config {rel}")[0])
        assert chain, f"{config}: an override's usage line must name the configs it overrides"
        sub = "predict" if "collect" in chain[0] else "fit"
        with pytest.raises(SystemExit) as exit_info:
            main([sub, *[a for c in chain for a in ("--config", str(REPO / c))], "--config", str(config),
                  "--print_config"])
        assert exit_info.value.code == 0
        resolved = yaml.safe_load(capsys.readouterr().out)
        if "methods" in original.get("evaluation", {}):
            got = resolved["evaluation"]
            assert [m["class_path"] for m in got["methods"]] == \
                [m["class_path"] for m in original["evaluation"]["methods"]]
            assert got["seed"] == original["evaluation"].get("seed", 0)
        for key, value in original.get("model", {}).get("init_args", {}).items():
            if not isinstance(value, dict):
                assert resolved["model"]["init_args"][key] == value, key
        for key, value in original.get("data", {}).get("init_args", {}).items():
            assert resolved["data"]["init_args"][key] == value, key
        return
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key, value in yaml.safe_load(config.read_text()).items():
        if isinstance(value, dict):          # fields the file leaves out resolve to their defaults
            assert resolved[key].items() >= value.items(), key
        else:
            assert resolved[key] == value, key


def test_unknown_config_key_is_an_error_naming_the_key(tmp_path, capsys):
    cfg = yaml.safe_load((REPO / "configs/base/classifier.yaml").read_text())
    cfg["model"]["init_args"]["learning_rat"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def test_project_commands_print_their_config(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--steps", "12", "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["steps"] == 12 and resolved["sampler"]["cfg_weight"] == 1.0


def test_generate_end_to_end_writes_a_grid(tmp_path):
    out = main(["generate", "--steps", "4", "--classes", "[0, 7]", "--per_class", "3",
                "--out", str(tmp_path / "grid.png")])
    from matplotlib.image import imread
    img = imread(out)
    assert img.shape[0] == 2 * 30 * 3 and img.shape[1] == 3 * 30 * 3      # rows x cols, 3x upscaled
    assert img.std() > 0.05                                                 # not a blank picture


def test_generate_rejects_bad_steps_and_classes(tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        main(["generate", "--steps", "0", "--out", str(tmp_path / "a.png")])
    with pytest.raises(ValueError, match="class id out of range"):
        main(["generate", "--classes", "[12]", "--out", str(tmp_path / "a.png")])


def test_evaluate_writes_results_and_grids(tmp_path):
    import json
    rows = main(["evaluate", "--steps", "[2, 6]", "--num_samples", "40", "--batch_size", "20",
                 "--metrics.reference_samples", "1000", "--latency_batch", "8", "--latency_repeats", "1",
                 "--metrics.cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path)])
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == rows and [r.get("steps") for r in rows] == [2, 6, None]
    rows, recon = rows[:-1], rows[-1]
    assert recon["method"] == "reconstruction" and recon["psnr_db"] > 20
    assert (tmp_path / "cache" / "fid_classifier_test1000.pt").exists()
    for r in rows:
        assert r["fid_classifier"] > 0 and 0 <= r["class_accuracy"] <= 1
        assert r["latency_ms_per_image"] > 0 and r["base_calls"] == r["steps"]
        assert r["num_samples"] == 40
    assert rows[1]["speedup"] == 1.0                                  # N=6 is the reference
    assert rows[0]["ideal_speedup"] == pytest.approx(3.0)             # 6 base calls over 2, not a timing
    assert (tmp_path / "samples.png").exists() and (tmp_path / "pareto.png").exists()


def test_bench_reports_every_part_of_a_step(tmp_path, monkeypatch):
    import json

    from wandb_runs import offline_runs
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = main(["bench", "--batch_size", "4", "--repeats", "1", "--steps", "8", "--budgets", "[2]",
                "--trajectories", str(tmp_path / "none"), "--out", str(tmp_path / "b.json"),
                "--group", "study"])
    assert json.loads((tmp_path / "b.json").read_text()) == out
    # the same numbers as a W&B run of the study's group, read back with wandb's reader
    (run,) = offline_runs(tmp_path / "wandb")
    assert (run.run["job_type"], run.run["run_group"], run.run["display_name"]) == ("bench", "study", "bench")
    assert run.config["batch_size"] == 4 and run.config["budgets"] == [2]
    assert run.summary["bench/shortcut_vs_base/rows"] == 8
    assert run.table("bench/end_to_end")["columns"][0] == "config"
    costs = out["step_costs"]
    assert all(costs[k] > 0 for k in ("base_features_ms", "head_and_sampler_ms", "decode_ms"))
    short = out["shortcut_vs_base"]
    assert short["rows"] == 8 and short["base_params"] > 5 * short["shortcut_params"]
    assert [r["config"] for r in out["end_to_end"]] == ["vanilla N8", "shortcut N8/B2"]
    assert out["end_to_end"][0]["speedup"] == 1.0 and "data" not in out


def test_default_configs_apply_only_without_config():
    from migm.cli import default_config, with_default_config
    assert with_default_config(["fit"]) == ["fit", "--config", str(default_config("tiny.yaml"))]
    assert with_default_config(["collect", "--trainer.devices", "2"]) == \
        ["predict", "--config", str(default_config("collect_tiny.yaml")), "--trainer.devices", "2"]
    assert with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert with_default_config(["generate", "--steps", "4"]) == ["generate", "--steps", "4"]


def test_default_configs_resolve_from_the_working_directory_first(tmp_path, monkeypatch):
    """A non-editable install has no source tree beside it: the defaults come from ./configs."""
    import migm.cli as cli
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("seed_everything: 1\n")
    monkeypatch.chdir(tmp_path)
    assert cli.default_config("tiny.yaml") == tmp_path / "configs" / "tiny.yaml"
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="configs/collect_tiny.yaml not found .* pass --config"):
        cli.with_default_config(["collect"])


@pytest.mark.parametrize("name,params", [("maskgit", 5.08e6), ("dimoo", 220e6)])
def test_real_model_configs_build_the_papers_shortcut_on_the_meta_device(name, params):
    """DiMOO: the paper's 220M (ours at the paper's R=2, one block). MaskGIT: the official
    architecture in the released key layout has 5.08M trainable parameters (the paper reports
    8.6M; with the frozen copies of the base's token and position tables it holds 6.65M)."""
    import torch

    import importlib
    network = yaml.safe_load((REPO / f"configs/{name}.yaml").read_text())["model"]["init_args"]["network"]
    module, name = network["class_path"].rsplit(".", 1)
    with torch.device("meta"):
        net = getattr(importlib.import_module(module), name)(**network["init_args"]).build()
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - params) / params < 0.15, count


def test_real_models_fail_with_a_message_saying_what_is_missing(tmp_path):
    from migm.files import CheckpointError
    from migm.models.registry import load_base
    with pytest.raises(CheckpointError, match="Maskgit-pytorch"):
        load_base("maskgit", tmp_path / "MaskGIT_ImageNet_512.pth", tmp_path / "vqgan.pth")
    with pytest.raises(CheckpointError, match="Lumina-DiMOO"):
        load_base("dimoo", tmp_path / "Lumina-DiMOO", "")


def test_ckpt_path_does_not_override_the_configs_model_arguments(tmp_path):
    """`test --ckpt_path C --model.init_args.X v` must evaluate with v, whatever C was trained with."""
    import torch
    from lightning import LightningDataModule, LightningModule

    from migm.cli import MigmCLI

    class Parsed(Exception):
        pass

    class Probe(MigmCLI):                      # stops after parsing, before anything is built
        def before_instantiate_classes(self):
            raise Parsed(self.config["test"])

    ckpt = tmp_path / "trained.ckpt"
    torch.save({"hyper_parameters": {"lr": 0.5, "evaluation": {"reference_steps": 16}}, "state_dict": {},
                "pytorch-lightning_version": "2.6.6"}, ckpt)
    with pytest.raises(Parsed) as parsed:
        Probe(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
              args=["test", "--config", str(REPO / "configs/tiny.yaml"), "--ckpt_path", str(ckpt),
                    "--evaluation.reference_steps", "8", "--model.init_args.lr", "0.01"])
    args = parsed.value.args[0]
    assert args["model"]["init_args"]["lr"] == 0.01 and args["evaluation"]["reference_steps"] == 8


def test_an_override_alone_names_the_config_it_overrides():
    with pytest.raises(ValueError, match=r"pareto.yaml: an override .* --config configs/tiny.yaml --config"):
        main(["test", "--config", str(REPO / "experiments/pareto.yaml")])
