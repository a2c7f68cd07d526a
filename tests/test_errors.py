"""A user's mistake ends the real command-line program with one line that names the file or field.

Each case runs `python -m migm ...` in a subprocess (what a user types), and checks: exit status
1, no traceback, a few lines at most, and the named culprit in them. MIGM_DEBUG=1 brings the
traceback back for whoever debugs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, debug: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "MIGM_DEBUG")}
    env["WANDB_MODE"] = "offline"
    if debug:
        env["MIGM_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "migm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 1, (result.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tiny_config(tmp_path: Path, edit) -> str:
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    edit(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_setting_that_cannot_apply_names_its_field(tmp_path):
    def budgets_over_steps(cfg):
        cfg["evaluation"]["methods"][1]["init_args"].update(steps=[4], budgets=[8])
    line = assert_one_line(run_cli("test", "--config", tiny_config(tmp_path, budgets_over_steps)),
                           "Shortcut.budgets", "B=8", "N=4")
    assert len(line) < 400


def test_a_negative_temperature_is_the_methods_field_not_the_samplers(tmp_path):
    def negative(cfg):
        cfg["evaluation"]["methods"][1]["init_args"]["temperature"] = -1
    assert_one_line(run_cli("test", "--config", tiny_config(tmp_path, negative)), "Shortcut.temperature")


def test_a_missing_config_file_is_named():
    assert_one_line(run_cli("fit", "--config", "no/such/config.yaml"), "no/such/config.yaml")


@pytest.mark.parametrize("kind", ["shard", "empty", "asset"])
def test_ckpt_path_of_the_wrong_kind_says_what_the_file_is(tmp_path, kind):
    import h5py
    path = tmp_path / {"shard": "shard-000-00000.h5", "empty": "weights.pth", "asset": "x.pt"}[kind]
    if kind == "shard":
        with h5py.File(path, "w") as f:
            f["tokens"] = [1, 2, 3]
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes((REPO / "src/migm/assets/shortcut.pt").read_bytes())
    line = assert_one_line(run_cli("test", "--ckpt_path", str(path)), str(path))
    assert {"shard": "HDF5", "empty": "empty", "asset": "migm asset"}[kind] in line
    assert "weights_only=False" not in line


def test_a_missing_base_checkpoint_is_named_with_how_to_get_it(tmp_path):
    missing = tmp_path / "MaskGIT_ImageNet_512.pth"
    line = assert_one_line(run_cli("collect", "--config", "configs/collect_maskgit.yaml",
                                   "--model.init_args.base", str(missing),
                                   "--trainer.accelerator", "cpu"), str(missing))
    assert "Maskgit-pytorch" in line


def test_a_directory_without_shards_is_a_shard_error_and_leaves_no_wandb_run(tmp_path):
    def no_shards(cfg):
        cfg["data"]["init_args"]["dirs"] = [str(tmp_path / "nothing")]
        cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
        for logger in cfg["trainer"]["logger"]:
            logger["init_args"]["save_dir"] = str(tmp_path / "run")
        cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][:1]
    assert_one_line(run_cli("fit", "--config", tiny_config(tmp_path, no_shards)), "nothing", "manifest")
    assert not list((tmp_path / "run").rglob("offline-run-*")), "a failed fit left a W&B run"


def test_an_unknown_command_lists_the_commands():
    assert_one_line(run_cli("train"), "'train'", "collect", "bench")


def test_debug_mode_shows_the_traceback(tmp_path):
    result = run_cli("collect", "--config", "configs/collect_maskgit.yaml", "--trainer.accelerator", "cpu",
                     "--model.init_args.base", str(tmp_path / "missing.pth"), debug=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_help_lists_every_verb_under_the_program_name():
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in ("fit", "test", "collect", "bench", "generate", "evaluate", "export", "curves"):
        assert f"\n  {verb} " in result.stdout
    assert result.stdout.startswith("usage: migm")


# --- values that cannot be right, refused before any work ----------------------------------------
def test_invalid_yaml_names_its_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("evaluation:\n  reference_steps: [8\nmodel: 3\n")
    line = assert_one_line(run_cli("test", "--config", "configs/tiny.yaml", "--config", str(bad)),
                           str(bad), "line 3", "not valid YAML")
    assert "<unicode string>" not in line


def test_a_nan_sampler_temperature_is_refused_naming_the_field(tmp_path):
    nan = tmp_path / "nan.yaml"
    nan.write_text("evaluation:\n  sampler:\n    temperature: .nan\n")
    assert_one_line(run_cli("test", "--config", "configs/tiny.yaml", "--config", str(nan)),
                    "sampler.temperature", "nan")


def test_zero_test_samples_is_refused_and_leaves_the_older_results_alone(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.jsonl").write_text("{}\n")
    assert_one_line(run_cli("test", "--data.init_args.test_samples", "0", "--evaluation.out_dir", str(out)),
                    "data.test_samples", ">= 1")
    assert (out / "results.jsonl").read_text() == "{}\n"


def test_more_steps_than_tokens_is_refused_before_generation(tmp_path):
    def long(cfg):
        cfg["evaluation"].update(methods=[{"class_path": "migm.accel.method.Vanilla",
                                           "init_args": {"steps": [8, 500]}}], reference_steps=8)
        cfg["run"] = {"root": str(tmp_path / "run")}
    line = assert_one_line(run_cli("test", "--config", tiny_config(tmp_path, long)),
                           "evaluation.methods", "Vanilla.steps 500", "49 tokens")
    assert not (tmp_path / "run" / "eval" / "results.jsonl").exists()


@pytest.mark.parametrize("command", ["fit", "test", "collect"])
def test_an_unwritable_output_directory_is_found_before_any_work(tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # the collect config names its directory itself (the shards' and the run's)
    where = "--trainer.default_root_dir" if command == "collect" else "--run.root"
    result = run_cli(command, where, str(blocker / "run"))
    line = assert_one_line(result, str(blocker / "run"), "not writable", "Not a directory")
    assert line.startswith("error: trainer.default_root_dir") or "out_dir" in line
    assert "Epoch" not in result.stderr and "Testing DataLoader" not in result.stderr


def test_a_garbage_fid_reference_is_one_line_naming_it(tmp_path):
    garbage = tmp_path / "stats.npz"
    garbage.write_bytes(os.urandom(256))
    from migm.evaluation.reference import read_stats
    from migm.files import CheckpointError
    with pytest.raises(CheckpointError) as err:
        read_stats(garbage)
    assert str(garbage) in str(err.value) and "allow_pickle" not in str(err.value)
    assert "not a numpy .npz archive" in str(err.value)


def test_dropout_at_test_on_a_network_without_the_released_sites_is_refused():
    assert_one_line(run_cli("test", "--evaluation.shortcut_dropout_at_test", "0.1"),
                    "evaluation.shortcut_dropout_at_test", "ShortcutConfig", "MaskGITShortcutConfig")
