"""Lineage in W&B: shards -> checkpoint -> results, as artifacts a study's runs log and use.

`collect` logs its shard directory as a `dataset` artifact: a reference artifact (shards stay on
the filesystem that holds them, however large; the manifest and the collection record are
uploaded) named after the collection's config hash, aliased by its manifest's hash. `fit` names
the dataset artifacts of its data directories as its inputs and logs its best and last
checkpoints as a `model` artifact; `test` names the model artifact of the checkpoint it
evaluates (recorded in wandb_run.json beside the checkpoint) and logs its results as a
`results` artifact.

Offline, wandb refuses `use_artifact` ("Cannot use artifact when in offline mode"), so a run
records what it used in its config (`lineage.inputs`, `name:alias` references) and in the
metadata of what it logs; online it also calls `use_artifact`, so W&B draws the graph. Every
artifact is logged from rank 0, and each command's W&B run is finished when the command ends.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from migm.data.datamodule import manifest_hash
from migm.files import atomic_write_bytes

WANDB_RUN_FILE = "wandb_run.json"          # beside the checkpoints (the name run.py reads back)


def artifact_name(text: str) -> str:
    """W&B artifact names take letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def dataset_ref(shard_dir: Path) -> str | None:
    """`trajectories-<config hash>:manifest-<manifest hash>` of a finished shard directory."""
    manifest = Path(shard_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    config_hash = json.loads(manifest.read_text()).get("config_hash", "unknown")
    return f"trajectories-{config_hash}:manifest-{manifest_hash([shard_dir])}"


def dataset_artifact(shard_dir: Path):
    """The shard directory as a reference artifact with its manifest and collection record."""
    import wandb
    shard_dir = Path(shard_dir).resolve()
    ref = dataset_ref(shard_dir)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    name, alias = ref.split(":")
    artifact = wandb.Artifact(name, type="dataset", metadata={
        "config_hash": manifest.get("config_hash"), "manifest_sha256": alias.removeprefix("manifest-"),
        "trajectories": manifest.get("trajectories"), "shards": len(manifest.get("shards", [])),
        "schema": manifest.get("schema"), "directory": str(shard_dir)})
    for small in ("manifest.json", "collection.json", "config.yaml"):
        if (shard_dir / small).is_file():
            artifact.add_file(str(shard_dir / small), name=small)
    for shard in manifest.get("shards", []):
        # no checksum: the manifest (uploaded) already names every shard and its trajectories
        artifact.add_reference(f"file://{shard_dir / shard['file']}", name=shard["file"], checksum=False)
    return artifact, alias


def wandb_run(trainer):
    """The W&B run of this trainer's WandbLogger on rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    return None if logger is None else logger.experiment


def use(run, refs: list[str]) -> None:
    """Record `refs` as this run's inputs: in its config always, through use_artifact online."""
    run.config.update({"lineage.inputs": refs}, allow_val_change=True)
    if run.settings._offline:
        return
    import wandb
    for ref in refs:
        try:
            run.use_artifact(ref)
        except (wandb.errors.CommError, ValueError) as err:   # logged by a run never synced
            wandb.termwarn(f"lineage: {ref} is not in W&B yet ({err}); recorded in the config only")


class WandbLineage(Callback):
    """Logs and uses the study's artifacts (this module's docstring); added by run.apply_run to
    every run with a WandbLogger."""

    def __init__(self) -> None:
        self.inputs: list[str] = []

    # --- collect ---------------------------------------------------------------------------------
    def on_predict_end(self, trainer, pl_module) -> None:
        run = wandb_run(trainer)
        for writer in (c for c in trainer.callbacks if type(c).__name__ == "ShardWriter"):
            if run is not None and (Path(writer.out_dir) / "manifest.json").is_file():
                artifact, alias = dataset_artifact(writer.out_dir)
                run.log_artifact(artifact, aliases=["latest", alias])

    # --- fit -------------------------------------------------------------------------------------
    def _record_file(self, trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        directory = getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(directory) / WANDB_RUN_FILE

    def _write_record(self, trainer, **fields) -> None:
        path = self._record_file(trainer)
        record = json.loads(path.read_text()) if path.is_file() else {}
        text = json.dumps({**record, **fields}, indent=2) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda tmp: tmp.write_text(text))

    def on_fit_start(self, trainer, pl_module) -> None:
        run = wandb_run(trainer)
        if run is None:
            return
        self._write_record(trainer, id=run.id, project=run.project)
        dirs = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("dirs") or []
        self.inputs = [ref for ref in map(dataset_ref, dirs) if ref]
        use(run, self.inputs)

    def on_fit_end(self, trainer, pl_module) -> None:
        run, ckpt = wandb_run(trainer), trainer.checkpoint_callback
        if run is None or ckpt is None:
            return
        files = {Path(p).name: Path(p) for p in (getattr(ckpt, "best_model_path", ""),
                                                 getattr(ckpt, "last_model_path", "")) if p and Path(p).is_file()}
        if not files:
            return
        import wandb
        name = artifact_name(f"model-{run.group or run.name}")
        alias = f"{run.id}-step{trainer.global_step}"
        score = getattr(ckpt, "best_model_score", None)
        artifact = wandb.Artifact(name, type="model", metadata={
            "inputs": self.inputs, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
            "monitor": getattr(ckpt, "monitor", None), "best_score": None if score is None else float(score),
            "files": sorted(files)})
        for file_name, path in files.items():
            artifact.add_file(str(path), name=file_name)
        run.log_artifact(artifact, aliases=["latest", alias])
        self._write_record(trainer, model=f"{name}:{alias}")

    # --- test ------------------------------------------------------------------------------------
    def on_test_start(self, trainer, pl_module) -> None:
        run = wandb_run(trainer)
        if run is None:
            return
        checkpoint = getattr(pl_module, "checkpoint", None)
        record = Path(checkpoint).parent / WANDB_RUN_FILE if checkpoint else None
        model = json.loads(record.read_text()).get("model") if record and record.is_file() else None
        self.inputs = [model] if model else []
        weights = checkpoint or getattr(getattr(pl_module, "evaluation", None), "weights", None)
        run.config.update({"lineage.weights": weights}, allow_val_change=True)
        use(run, self.inputs)

    def on_test_end(self, trainer, pl_module) -> None:
        run = wandb_run(trainer)
        evaluation = getattr(pl_module, "evaluation", None)
        if run is None or evaluation is None:
            return
        out = Path(evaluation.out_dir or Path(trainer.default_root_dir) / "eval")
        if not (out / "results.jsonl").is_file():
            return
        import wandb

        from migm.evaluation.wandb_log import results_table
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
        artifact = wandb.Artifact(artifact_name(f"results-{run.group or run.name}"), type="results",
                                  metadata={"inputs": self.inputs, "rows": len(rows)})
        grid_rows = [r for r in rows if r.get("speedup") is not None]
        if grid_rows:
            artifact.add(results_table(grid_rows), "results")
        for name in ("results.jsonl", "pareto.png", "samples.png"):
            if (out / name).is_file():
                artifact.add_file(str(out / name), name=name)
        run.log_artifact(artifact, aliases=["latest", f"{run.id}"])

    # --- every command ---------------------------------------------------------------------------
    def teardown(self, trainer, pl_module, stage: str) -> None:
        """One W&B run per command: finished here, so its artifacts are committed and a next
        command in the same process (tests, notebooks) starts its own run."""
        run = wandb_run(trainer)
        if run is not None:
            run.finish()
