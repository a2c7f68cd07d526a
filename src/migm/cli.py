"""`python -m migm`: LightningCLI for fit/validate/test/predict, jsonargparse for the rest.

Lightning's subcommands are Trainer methods, so the project's own verbs (`generate`, ...) are
plain typed functions exposed through jsonargparse: both kinds take `--config FILE` and
`--print_config`, and every experiment is a YAML file.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
COLLECT_CONFIG = REPO_ROOT / "configs" / "collect_tiny.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _project_commands() -> dict:
    from migm import commands
    return {"export": commands.export, "generate": commands.generate, "evaluate": commands.evaluate,
            "bench": commands.bench, "curves": commands.curves}


def with_default_config(argv: list[str]) -> list[str]:
    """Insert `--config configs/tiny.yaml` after a Lightning subcommand when no --config is given.

    `collect` is `predict` with configs/collect_tiny.yaml as its default: trajectory collection
    runs on Lightning's predict loop. (jsonargparse's default_config_files would merge tiny.yaml
    under every other config too, so a classifier config would inherit the base's trainer.)
    """
    if not argv:
        return argv
    default = DEFAULT_CONFIG
    if argv[0] == "collect":
        argv, default = ["predict", *argv[1:]], COLLECT_CONFIG
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    if argv[0] not in LIGHTNING_SUBCOMMANDS or has_config or not default.exists():
        return argv
    if any(a in ("-h", "--help") for a in argv):
        return argv
    return [argv[0], "--config", str(default), *argv[1:]]


class LoggedConfig(SaveConfigCallback):
    """Saves config.yaml beside the run (Lightning's default) and also hands the full resolved
    config to every logger, so a W&B run says exactly how it was made."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class MigmCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        """The config (with its command-line overrides) decides the module; --ckpt_path only
        supplies weights and training state.

        Lightning's default replaces the config's model arguments with the hyperparameters saved in
        the checkpoint, so `test --ckpt_path C --model.init_args.evaluation.budgets "[8]"` silently
        ran the grid the model was trained with. A network that does not fit the checkpoint still
        fails loudly, at load_state_dict.
        """


def default_wandb_mode() -> None:
    """W&B offline unless the user configured an API key: runs never need a network, and
    `wandb sync <run dir>` uploads them later."""
    netrc = Path.home() / ".netrc"
    logged_in = "WANDB_API_KEY" in os.environ or (netrc.exists() and "wandb" in netrc.read_text())
    if not logged_in:
        os.environ.setdefault("WANDB_MODE", "offline")


def enable_method_classes() -> None:
    """Let YAML choose acceleration methods (`evaluation.methods`) and shortcut architectures
    (`network`) by class_path: jsonargparse treats dataclasses as fixed groups unless their
    subclasses are enabled."""
    from jsonargparse import set_parsing_settings

    from migm.accel.method import Method
    from migm.shortcut.network import NetworkConfig
    set_parsing_settings(subclasses_enabled=[Method, NetworkConfig])


def lightning_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    enable_method_classes()
    default_wandb_mode()
    return MigmCLI(
        LightningModule, LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        seed_everything_default=0, save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": True},
        args=args, run=run,
    )


def main(args: list[str] | None = None):
    """Entry point; `args` lets tests call the CLI as a function (None reads sys.argv)."""
    argv = with_default_config(list(sys.argv[1:] if args is None else args))
    commands = _project_commands()
    if argv and argv[0] in commands:
        from jsonargparse import auto_cli
        return auto_cli(commands, args=argv)
    return lightning_main(argv)
