"""Offline W&B runs read back with wandb's own reader (`wandb leet inspect --json`), as records.

Tests assert on what W&B itself would upload on `wandb sync`: the run record (name, group, job
type, tags), config updates, history and summary items, and artifact records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OfflineRun:
    path: Path
    records: list[dict] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [r[kind] for r in self.records if r.get("type") == kind]

    @property
    def run(self) -> dict:
        return self.of("run")[0]

    @property
    def config(self) -> dict:
        merged = dict(self.run.get("config", {}).get("update", {}))
        for c in self.of("config"):
            merged.update(c.get("update", {}))
        return merged

    @property
    def summary(self) -> dict:
        merged = {}
        for s in self.of("summary"):
            merged.update(s.get("update", {}))
        return merged

    @property
    def history(self) -> list[dict]:
        return [h["item"] for h in self.of("history")]

    @property
    def artifacts(self) -> list[dict]:
        """Artifacts the run logged itself (not the tables W&B stores as run_table artifacts)."""
        return [a for a in self.of("artifact") if a.get("type") != "run_table"]

    def table(self, key: str) -> dict:
        """A logged wandb.Table's JSON (columns, data, media cells with their captions): the
        run_table artifact W&B made of it holds the full table (the run's own media file keeps
        only "Image" for a media cell); offline its file waits in wandb's staging directory."""
        for artifact in self.of("artifact"):
            for entry in artifact["manifest"]["contents"]:
                if artifact.get("type") == "run_table" and entry["path"] == f"{key}.table.json":
                    return json.loads(Path(entry["local_path"]).read_text())
        raise KeyError(f"{self.path}: no table {key!r}")


def read_run(path: Path) -> OfflineRun:
    wandb = Path(sys.executable).with_name("wandb")
    dump = subprocess.run([str(wandb), "leet", "inspect", "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    return OfflineRun(Path(path), [json.loads(line) for line in dump.stdout.splitlines() if line.strip()])


def offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline run under `root`, oldest first."""
    return [read_run(p) for p in sorted(Path(root).rglob("offline-run-*")) if p.is_dir()]
