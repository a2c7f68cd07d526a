"""`migm` (or `python -m migm`): LightningCLI for fit/validate/test/predict, jsonargparse for the rest.

Lightning's subcommands are Trainer methods, so the project's own verbs (`generate`, ...) are
plain typed functions exposed through jsonargparse: both kinds take `--config FILE` and
`--print_config`, and every experiment is a YAML file.

A user's mistake (a missing or wrong file, a setting that cannot apply) ends the command-line
program with one line, `error: <what and where>`, and exit status 1; MIGM_DEBUG=1 shows the
traceback instead. Called as a function (`main(args)`, as the tests do) errors are raised.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from migm.files import read_yaml
from migm.run import enable_method_classes

REPO_ROOT = Path(__file__).resolve().parents[2]
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

VERBS = {
    "fit": "train: the shortcut (configs/tiny.yaml by default), or a base, tokenizer or classifier config",
    "validate": "score a shortcut checkpoint on held-out trajectories",
    "test": "run the evaluation grid (methods x settings): quality, latency, speedup, Pareto plot",
    "predict": "Lightning's predict loop (collection runs on it)",
    "collect": "record base-model trajectories into HDF5 shards (configs/collect_tiny.yaml by default)",
    "evaluate": "score vanilla generation at several step counts (no shortcut)",
    "generate": "write a PNG grid of vanilla samples",
    "bench": "per-call costs, end-to-end speedup and data rates, to a JSON file",
    "speed": "latency, speedup and memory of a study's grid at the real base size (random weights)",
    "export": "turn a training checkpoint into a small shipped asset",
    "curves": "plot a shortcut run's per-step held-out error",
}


def usage() -> str:
    width = max(map(len, VERBS))
    rows = "\n".join(f"  {verb:<{width}}  {text}" for verb, text in VERBS.items())
    return (f"usage: migm <command> [--config FILE] [options]   (or: python -m migm ...)\n\n"
            f"Learned shortcuts for masked image generation models.\n\ncommands:\n{rows}\n\n"
            "`migm <command> --help` lists a command's options; `--print_config` shows the resolved "
            "config.\nErrors print one line; MIGM_DEBUG=1 shows the traceback.")


def default_config(name: str) -> Path:
    """configs/<name> in the working directory, else beside the source tree (an editable
    install): so the defaults resolve in any install when run from a checkout."""
    for root in (Path.cwd(), REPO_ROOT):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise FileNotFoundError(f"configs/{name} not found in {Path.cwd()} (nor in {REPO_ROOT}): run "
                            "migm from the repository root, or pass --config FILE")


def _project_commands() -> dict:
    from migm import commands
    return {"export": commands.export, "generate": commands.generate, "evaluate": commands.evaluate,
            "bench": commands.bench, "speed": commands.speed, "curves": commands.curves}


def with_default_config(argv: list[str]) -> list[str]:
    """Insert `--config configs/tiny.yaml` after a Lightning subcommand when no --config is given.

    `collect` is `predict` with configs/collect_tiny.yaml as its default: trajectory collection
    runs on Lightning's predict loop. (jsonargparse's default_config_files would merge tiny.yaml
    under every other config too, so a classifier config would inherit the base's trainer.)
    """
    if not argv:
        return argv
    default = "tiny.yaml"
    if argv[0] == "collect":
        argv, default = ["predict", *argv[1:]], "collect_tiny.yaml"
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    if argv[0] not in LIGHTNING_SUBCOMMANDS or has_config or any(a in ("-h", "--help") for a in argv):
        return argv
    return [argv[0], "--config", str(default_config(default)), *argv[1:]]


def refuse_a_lone_override(argv: list[str]) -> None:
    """An experiment is an override of a shipped config (it has no model class_path); alone,
    jsonargparse would only say "Option 'evaluation.methods' is not accepted" or build the
    default model: name the config it overrides instead."""
    if not argv or argv[0] not in LIGHTNING_SUBCOMMANDS:
        return
    configs = config_files(argv)
    first = configs[0] if configs else None
    if first is None or not first.is_file():
        return
    data = read_yaml(first)
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(data, dict) and not (isinstance(model, dict) and "class_path" in model):
        found = re.search(r"--config (\S+) --config \S*" + re.escape(first.name), first.read_text())
        base = found.group(1) if found else "the config it overrides"
        raise ValueError(f"{first}: an override (it names no model class_path); give the config it "
                         f"overrides first: --config {base} --config {first}")


def config_files(argv: list[str]) -> list[Path]:
    """The --config files of a command line, in order."""
    configs = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    return [Path(c) for c in configs + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]]


class LoggedConfig(SaveConfigCallback):
    """Saves config.yaml beside the run (Lightning's default) and also hands the full resolved
    config to every logger as flat keys (`trainer.precision`, `model.lr`,
    `evaluation.methods.Shortcut.budgets`), so W&B can filter and group a study's runs on any
    setting (one JSON string under one key could only be read, not filtered)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        import json
        config = flat_config(json.loads(self.parser.dump(self.config, skip_none=False, format="json")))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def flat_config(value, prefix: str = "") -> dict:
    """Nested config -> {"a.b.c": leaf}. A list of class_path entries (callbacks, loggers, grid
    methods) is keyed by class name (`Shortcut`, a second one `Shortcut_2`) so a key means the
    same setting in every run; other lists stay values."""
    if isinstance(value, dict):
        if "class_path" in value and prefix:
            out = {f"{prefix}.class_path": value["class_path"]}
            return out | flat_config(value.get("init_args") or {}, prefix)
        out = {}
        for key, item in value.items():
            out |= flat_config(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
        out, seen = {}, {}
        for item in value:
            name = str(item["class_path"]).rsplit(".", 1)[-1]
            seen[name] = seen.get(name, 0) + 1
            out |= flat_config(item, f"{prefix}.{name}" + (f"_{seen[name]}" if seen[name] > 1 else ""))
        return out
    return {prefix: value}


class MigmCLI(LightningCLI):
    """LightningCLI plus the project's three top-level sections: `run` (the run's name, from
    which every output path follows; run.py), `evaluation` (the grid `test` runs and the fit-time
    callback samples like) and `metrics` (what samples are measured against).

    `test` always runs EvaluationModule: the config's `model` names the base and the shortcut
    network (a ShortcutModule's fields, or an EvaluationModule's own), and --ckpt_path names the
    fit checkpoint whose shortcut weights are evaluated (never a state to restore)."""

    def __init__(self, *args, **kwargs) -> None:
        global _LAST_CLI
        _LAST_CLI = self
        enable_method_classes()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        from migm.evaluation.grid import default_methods
        from migm.evaluation.module import EvaluationConfig
        from migm.evaluation.setup import MetricsConfig
        from migm.run import RunConfig
        parser.add_class_arguments(RunConfig, "run", fail_untyped=False)
        parser.add_class_arguments(EvaluationConfig, "evaluation", fail_untyped=False)
        parser.add_class_arguments(MetricsConfig, "metrics", fail_untyped=False)
        # the default grid as class_path dicts (instances would not serialise into config.yaml)
        parser.set_defaults({"evaluation.methods": [as_class_path(m) for m in default_methods()]})

    def before_instantiate_classes(self) -> None:
        from migm.run import RunConfig, apply_run
        config = self.config[self.subcommand]
        files = [str(p) for p in (config.get("config") or [])]
        run = RunConfig(**{k: config["run"][k] for k in ("name", "root", "group", "tags")})
        self.run = run.resolved(files)
        config["run"] = vars(self.run) | {}
        apply_run(config, self.run, self.subcommand)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        init = self.config_init[self.subcommand]
        evaluation, metrics = init["evaluation"], init["metrics"]
        if self.subcommand == "test":
            from migm.evaluation.module import EvaluationModule
            self.model = EvaluationModule(**base_fields(self.model), evaluation=evaluation, metrics=metrics)
        from migm.evaluation.callback import EvaluationCallback
        from migm.run import Preemption
        for callback in self.trainer.callbacks:
            if isinstance(callback, EvaluationCallback):
                callback.like, callback.like_metrics = evaluation, metrics
        self.preemption = Preemption()                 # what a signalled run saved (cli())
        self.trainer.callbacks.append(self.preemption)
        from migm.run import check_outputs
        check_outputs(self.trainer, self.subcommand)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "test" and kwargs.get("ckpt_path"):
            self.model.checkpoint = str(kwargs.pop("ckpt_path"))     # its weights, not a state
        return kwargs


    def _parse_ckpt_path(self) -> None:
        """The config (with its command-line overrides) decides the module; --ckpt_path only
        supplies weights and training state.

        Lightning's default replaces the config's model arguments with the hyperparameters saved in
        the checkpoint, so `test --ckpt_path C --evaluation.reference_steps 8`
        silently ran the grid the model was trained with. A network that does not fit the
        checkpoint still fails loudly, at load_state_dict. What is checked here is that the file is
        a Lightning checkpoint at all (not a shard, an empty file or a shipped asset), in one line.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            from migm.ckpt import load_lightning_checkpoint
            load_lightning_checkpoint(ckpt_path)


def as_class_path(config) -> dict:
    """A config dataclass as YAML spells it: {"class_path", "init_args"}."""
    import dataclasses
    return {"class_path": f"{type(config).__module__}.{type(config).__qualname__}",
            "init_args": dataclasses.asdict(config)}


def base_fields(model) -> dict:
    """What `test` takes from the config's model: the base it names and the shortcut network."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError(f"test: model {type(model).__name__} names no base MIGM; use a shortcut "
                         "config (ShortcutModule) or migm.evaluation.module.EvaluationModule")
    return {**spec, "network": getattr(model, "network_config", None)}


_LAST_CLI = None            # the last LightningCLI built, so `cli` can read what a stopped run saved


def stopped(stop: SystemExit, preemption) -> None:
    """Exit 128 + signal, with one line, if the SystemExit is a signalled Lightning run's."""
    if preemption is None or preemption.signal is None:
        return
    print(f"error: {preemption.message(sys.argv[1:])}", file=sys.stderr)
    sys.exit(128 + int(preemption.signal))


def lightning_main(args: list[str] | None = None, run: bool = True, raise_errors: bool = False) -> LightningCLI:
    """LightningCLI over any LightningModule/DataModule; `raise_errors`: a bad config raises
    jsonargparse's ArgumentError instead of printing usage and exiting (the one-line mode)."""
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    from migm.run import default_wandb_mode
    default_wandb_mode()
    parser_kwargs = {}
    if raise_errors:
        parser_kwargs = {"exit_on_error": False, **{s: {"exit_on_error": False} for s in LIGHTNING_SUBCOMMANDS}}
    return MigmCLI(
        LightningModule, LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        seed_everything_default=0, save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": True},
        args=args, run=run, parser_kwargs=parser_kwargs,
    )


def main(args: list[str] | None = None, raise_errors: bool = False):
    """Run one command; `args` lets tests call the CLI as a function (None reads sys.argv)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if argv[0] not in VERBS:
        raise ValueError(f"unknown command {argv[0]!r}; commands: {', '.join(VERBS)} (migm --help)")
    argv = with_default_config(argv)
    for path in config_files(argv):
        read_yaml(path)                    # a syntax error names its file
    refuse_a_lone_override(argv)
    commands = _project_commands()
    if argv[0] in commands:
        from jsonargparse import auto_cli
        return auto_cli(commands, args=argv, exit_on_error=not raise_errors)
    return lightning_main(argv, raise_errors=raise_errors)


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: bad files, bad settings, a diverged run."""
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from migm.data.trajectories import ShardError
    from migm.files import CheckpointError, DiskFullError
    # MisconfigurationException: a trainer setting this machine cannot honour ("No supported gpu
    # backend found!" for the shipped accelerator: gpu configs on a CPU-only machine)
    return (CheckpointError, ShardError, DiskFullError, ValueError, FileNotFoundError, FloatingPointError, KeyError,
            ArgumentError, MisconfigurationException)


def cli() -> None:
    """The command-line program: a user error is one line on stderr and exit status 1; a run
    stopped by SIGTERM or SIGINT says what it saved and exits 128 + the signal."""
    try:
        main(raise_errors=not os.environ.get("MIGM_DEBUG"))
    except SystemExit as stop:
        stopped(stop, getattr(_LAST_CLI, "preemption", None))
        raise
    except user_errors() as err:
        if os.environ.get("MIGM_DEBUG"):
            raise
        discard_failed_wandb_run()
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {condense(message)}", file=sys.stderr)
        sys.exit(1)


_NOISE = ("Given value", "Subtypes:", "Errors:", "Problem with given class_path", "Expected a <class 'NoneType'>",
          "Does not validate against any of the Union subtypes", "- Expected a")


def condense(message: str) -> str:
    """jsonargparse explains a bad nested value as a tree (the union tried, each subtype's
    complaint, the whole value given); keep the key it names and the deepest real complaint."""
    lines = [l for l in message.splitlines() if l.strip()]
    if len(lines) <= 1:
        return message.strip()
    key = lines[0].strip().rstrip(":")
    if key.startswith('Parser key "'):                          # 'Parser key "model"' -> 'model'
        key = key[len('Parser key "'):].split('"')[0]
    causes = [l for l in lines[1:] if not any(n in l for n in _NOISE)]
    if not causes:
        return key
    deepest = max(causes, key=lambda l: len(l) - len(l.lstrip())).strip().lstrip("- ").strip()
    if any(n in key for n in _NOISE):      # a module's own error raised while it was built: the
        return deepest                     # tree names no key, only the union it was tried in
    return f"{key}: {deepest}"


def discard_failed_wandb_run() -> None:
    """A run that failed before it logged a step leaves no W&B run behind (offline or not), and
    wandb is kept from printing the `wandb sync` command of a run about to be deleted; a run that
    logged something is finished as failed and kept, and wandb's sync command for it holds."""
    import shutil
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb else None
    if run is None:
        return
    summary = [k for k in run.summary.keys() if not k.startswith("_")]
    empty = not summary and getattr(run, "step", 0) == 0
    run_dir = Path(run.dir).parent            # .../wandb/offline-run-<time>-<id>
    if empty:
        run._settings.silent = True           # its footer would name a directory deleted next
    wandb.finish(exit_code=1)
    if empty and run_dir.name.startswith(("offline-run-", "run-")):
        shutil.rmtree(run_dir, ignore_errors=True)
