"""`python -m migm`: LightningCLI for fit/validate/test/predict, jsonargparse for the rest.

Lightning's subcommands are Trainer methods, so the project's own verbs (`generate`, ...) are
plain typed functions exposed through jsonargparse: both kinds take `--config FILE` and
`--print_config`, and every experiment is a YAML file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


def _project_commands() -> dict:
    from migm import commands
    return {"export": commands.export, "generate": commands.generate, "evaluate": commands.evaluate}


class MigmCLI(LightningCLI):
    """LightningCLI whose default config is configs/tiny.yaml when that file exists."""


def lightning_main(args: list[str] | None = None, run: bool = True) -> MigmCLI:
    default_files = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else []
    return MigmCLI(
        LightningModule, LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"default_config_files": default_files},
        seed_everything_default=0, save_config_kwargs={"overwrite": True},
        args=args, run=run,
    )


def main(args: list[str] | None = None):
    """Entry point; `args` lets tests call the CLI as a function (None reads sys.argv)."""
    argv = list(sys.argv[1:] if args is None else args)
    commands = _project_commands()
    if argv and argv[0] in commands:
        from jsonargparse import auto_cli
        return auto_cli(commands, args=argv)
    return lightning_main(args)
