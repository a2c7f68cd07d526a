"""A run is named once; every output path and the W&B run's identity follow from that name.

`run:` in a config (or `--run.name X` on the command line) gives the run's name, its directory
(default `runs/<name>`), the W&B group a study's runs share (its collection, fit and test), and
tags. Before anything is built the CLI fills, wherever the config left them unset, the trainer's
`default_root_dir`, every logger's directory and name (W&B's `<name>-<job type>`, group, job
type and tags too; a resumed fit's W&B run id), the checkpoint callbacks' `dirpath`, and
`evaluation.out_dir`, and adds the callbacks a reviewed run needs (learning rate, W&B lineage).
So an experiment is the few lines it changes, and an output path stated explicitly is never
overwritten.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import loggers
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from migm.files import check_writable

# the W&B job type of each command (`collect` runs on Lightning's predict loop)
JOB_TYPES = {"fit": "fit", "validate": "validate", "test": "test", "predict": "collect"}


@dataclass
class RunConfig:
    """Args:
        name: the run's name: its W&B name, and its directory `runs/<name>` (default: the
            name of the last --config file, e.g. `pareto` for experiments/pareto.yaml).
        root: the run's directory, where logs, checkpoints and `eval/` go (default runs/<name>).
        group: the W&B group; give a study's collect, fit and test runs the same one (default:
            the name).
        tags: W&B tags.
    """

    name: str | None = None
    root: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def resolved(self, config_files: list[str]) -> RunConfig:
        """This run with every default filled in from the config files it was read from."""
        name = self.name or (Path(str(config_files[-1])).stem if config_files else "run")
        return RunConfig(name=name, root=self.root or f"runs/{name}", group=self.group or name,
                         tags=list(self.tags))


def _get(ns: Any, key: str, default=None):
    return ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)


def _fill(ns: Any, key: str, value, unset=(None,)) -> None:
    if _get(ns, key) in unset:
        ns[key] = value


def as_list(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def apply_run(config: Any, run: RunConfig, subcommand: str) -> None:
    """Fill the paths and logger identity the config left unset from the resolved `run`
    (`config` is a subcommand's jsonargparse namespace, before instantiation)."""
    root = run.root
    trainer = config["trainer"]
    _fill(trainer, "default_root_dir", root)
    evaluation = _get(config, "evaluation")
    explicit_out = _get(evaluation, "out_dir") if evaluation is not None else None
    loggers = as_list(_get(trainer, "logger"))
    for logger in loggers:
        args, cls = logger["init_args"], str(logger["class_path"])
        if cls.endswith("WandbLogger"):
            # the W&B run follows the run's outputs: a test's explicit out_dir (`wandb sync
            # <out_dir>/wandb/...`), else the trainer's directory (the run directory unless the
            # config names another, as collection configs name their shard directory)
            wandb_dir = explicit_out if subcommand == "test" and explicit_out else _get(trainer, "default_root_dir")
            _fill(args, "save_dir", wandb_dir, unset=(None, "."))
            job_type = JOB_TYPES.get(subcommand, subcommand)
            _fill(args, "name", f"{run.name}-{job_type}")
            _fill_wandb_extras(logger, run, subcommand)
            if subcommand == "fit":
                _resume_wandb_run(args, _get(config, "ckpt_path"))
        elif cls.endswith(("CSVLogger", "TensorBoardLogger")):        # migm.run's, or Lightning's
            _fill(args, "save_dir", root)
    for callback in as_list(_get(trainer, "callbacks")):
        if "dirpath" in callback["init_args"]:
            _fill(callback["init_args"], "dirpath", f"{root}/checkpoints")
    if evaluation is not None:
        _fill(evaluation, "out_dir", f"{root}/eval")
    _add_review_callbacks(trainer, loggers, subcommand)


def _add_review_callbacks(trainer: Any, loggers: list, subcommand: str) -> None:
    """Every logged fit records its learning rate (Lightning's LearningRateMonitor), and every
    run with a W&B logger its lineage (evaluation/lineage.py): added here, so no config (nor an
    experiment that replaces the callback list) can leave them out."""
    from jsonargparse import Namespace
    callbacks = as_list(_get(trainer, "callbacks"))
    present = {str(c["class_path"]).rsplit(".", 1)[-1] for c in callbacks}
    wanted = []
    if subcommand == "fit" and loggers and "LearningRateMonitor" not in present:
        wanted.append(("lightning.pytorch.callbacks.LearningRateMonitor", {"logging_interval": "step"}))
    if any(str(lg["class_path"]).endswith("WandbLogger") for lg in loggers) and "WandbLineage" not in present:
        wanted.append(("migm.evaluation.lineage.WandbLineage", {}))
    for class_path, init_args in wanted:
        callbacks.append(Namespace(class_path=class_path, init_args=Namespace(**init_args)))
    if wanted:
        trainer["callbacks"] = callbacks


def _resume_wandb_run(args: Any, ckpt_path: str | None) -> None:
    """A fit resumed from a checkpoint continues the W&B run that wrote it (the id stored in
    wandb_run.json beside the checkpoint; WandbLogger passes resume="allow"), so a requeued job
    is one run with one history, not a new run per requeue."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or _get(args, "id") or _get(args, "version"):
        return
    from migm.evaluation.lineage import WANDB_RUN_FILE
    stored = Path(ckpt_path).parent / WANDB_RUN_FILE
    if stored.is_file():
        import json
        try:
            args["id"] = json.loads(stored.read_text())["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{stored}: not a W&B run record ({err}); delete it to start a new "
                             "W&B run") from err


def _fill_wandb_extras(logger: Any, run: RunConfig, subcommand: str) -> None:
    """group, job_type and tags go to wandb.init through WandbLogger's **kwargs (jsonargparse's
    `dict_kwargs` of the logger entry), where the config did not set them. So `--run.group X`
    sets a study's group: `--trainer.logger.init_args.group` names no WandbLogger argument and,
    with several loggers, applies to the last one listed."""
    extras = dict(_get(logger, "dict_kwargs") or {})
    for key, value in (("group", run.group), ("job_type", JOB_TYPES.get(subcommand, subcommand)),
                       ("tags", run.tags or None)):
        if value is not None:
            extras.setdefault(key, value)
    logger["dict_kwargs"] = extras


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger (needs `pip install migm[tensorboard]`) whose directory may
    be left to the run, as for CSVLogger."""

    def __init__(self, save_dir: str | None = None, name: str | None = "tensorboard", **kwargs) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, **kwargs)


class CSVLogger(loggers.CSVLogger):
    """Lightning's CSVLogger whose directory may be left to the run (`save_dir: null` is filled
    with the run's directory; Lightning's own requires it in every config)."""

    def __init__(self, save_dir: str | None = None, name: str | None = "csv", **kwargs) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, **kwargs)


# --- a run that is stopped ----------------------------------------------------------------------
class Preemption(Callback):
    """What a signalled run saved, so the program can say it and exit 128 + the signal.

    SLURM (and any scheduler) sends SIGTERM before it kills a job; Lightning then stops its loop
    at the next batch and, left alone, the process exits 0, so a preempted study looked done.
    Here a stopped `fit` first writes a resumable checkpoint (`last.ckpt` in the checkpoint
    directory, atomically through the trainer's checkpoint IO), and `cli` turns the stop into one
    line and a non-zero exit status. Ctrl-C (SIGINT) is handled alike. A stopped `collect` keeps
    its finished shards (written atomically) and resumes from them when run again. Lightning's
    own SLURM requeue (SLURMEnvironment(auto_requeue=True), signal SIGUSR1) saves and requeues
    by itself; the requeued job finds that checkpoint with no --ckpt_path."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.saved: Path | None = None
        self.points: int = 0                # finished evaluation points kept in `saved` (test)
        self.shards: bool = False           # `saved` is a collection's directory (collect)

    def on_predict_batch_end(self, trainer, *args) -> None:
        """Lightning's predict loop never looks at the SIGTERM it caught (its fit loop does),
        so a signalled collect ran on to the end, or to the scheduler's SIGKILL: stop here, after
        the writer has taken this batch."""
        if trainer.received_sigterm:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.signal = signal.SIGTERM
        elif isinstance(exception, KeyboardInterrupt):
            self.signal = signal.SIGINT
        else:
            return
        if trainer.state.fn == TrainerFn.PREDICTING:             # collect: the shards it finished
            writer = next((cb for cb in trainer.callbacks if hasattr(cb, "batches_per_shard")), None)
            if writer is not None:
                self.saved, self.shards = Path(writer.out_dir), True
        results = getattr(pl_module, "results", None)          # test: evaluation/results_file.py
        if trainer.state.fn == TrainerFn.TESTING and results is not None and results.rows:
            self.saved, self.points = results.dir / "results.jsonl", len(results.rows)
        if trainer.state.fn == TrainerFn.FITTING and trainer.global_step > 0:
            ckpt = trainer.checkpoint_callback
            directory = Path(getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
            self.saved = directory / "last.ckpt"
            if ckpt is not None and hasattr(ckpt, "last_model_path"):
                # recorded in the checkpoint's callback state, so the resumed run's callback
                # overwrites this file instead of versioning a last-v1.ckpt beside it
                ckpt.last_model_path = str(self.saved)
            trainer.save_checkpoint(self.saved)

    def message(self, argv: list[str]) -> str:
        name = signal.Signals(self.signal).name
        if self.saved is None:
            return (f"stopped by {name}: nothing was finished or saved; run the same command again "
                    "to redo it")
        if self.shards:
            return (f"stopped by {name}: the finished shards are kept in {self.saved}; run the "
                    "same command again to resume from them")
        if self.points:
            kept = f"{self.points} finished points are" if self.points > 1 else "1 finished point is"
            return (f"stopped by {name}: {kept} kept in {self.saved}; run the same command again to "
                    "resume from them")
        args = [a for i, a in enumerate(argv) if a != "--ckpt_path" and (i == 0 or argv[i - 1] != "--ckpt_path")]
        return (f"stopped by {name}: saved {self.saved}; resume with: migm {' '.join(args)} "
                f"--ckpt_path {self.saved}")


# --- where a run writes, checked before it works ---------------------------------------------------
def output_dirs(trainer, subcommand: str) -> list[tuple[str, Path]]:
    """(the setting that chose it, directory) for everything this run will write: the run's
    directory and every logger's; for fit the checkpoint directories, for collect the shard
    directory (the evaluation's out_dir is checked by the evaluation, which also locks it)."""
    dirs = [("trainer.default_root_dir", Path(trainer.default_root_dir))]
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            dirs.append((f"trainer.logger ({type(logger).__name__}).save_dir", Path(save_dir)))
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if subcommand == "fit" and getattr(callback, "dirpath", None):
            dirs.append((f"trainer.callbacks ({name}).dirpath", Path(callback.dirpath)))
        if subcommand == "predict" and getattr(callback, "out_dir", None):
            dirs.append((f"trainer.callbacks ({name}).out_dir", Path(callback.out_dir)))
    return dirs


def check_outputs(trainer, subcommand: str) -> None:
    """Every output directory is writable, or one line says which setting to change: found
    after an epoch of training or an hour of generation, the work would be lost."""
    for field_name, directory in output_dirs(trainer, subcommand):
        check_writable(directory, field_name)


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
