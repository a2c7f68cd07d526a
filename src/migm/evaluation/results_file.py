"""results.jsonl as a resumable record: one line per finished grid point, so a stopped
evaluation keeps every point it finished and a rerun does only the rest.

A study's quality pass takes about an hour on a CPU (days on a cluster for DiMOO); a scheduler's
SIGTERM at minute 50 used to lose every row. Now each point's row is written the moment its
quality is computed (the whole file rewritten through a temporary and a rename, so a reader or a
kill never sees half a line), stamped with the hash of the config that produced it. The config
itself, flattened to dotted keys, sits beside it in `results.config.json`, so a rerun with
another config is refused naming the keys that differ instead of mixing rows of two studies.
Timing needs every point in the same interleaved rounds, so it runs once at the end, over the
finished points, and completes the rows in place.

    out_dir/results.jsonl         one JSON row per point (quality first, latency once timed)
    out_dir/results.config.json   {"config_hash": ..., "config": {dotted key: value}}
    out_dir/points/<n>.pt         the samples a finished point kept (and their captions)
    out_dir/.lock                 held while a run writes here (files.DirectoryLock)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from migm.files import DirectoryLock, atomic_write_bytes, check_writable

RESULTS, CONFIG, POINTS = "results.jsonl", "results.config.json", "points"


def plain(value: Any) -> Any:
    """A config value as JSON can hold it: dataclasses as {"class_path", "init_args"}."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys: {"evaluation.methods.0.init_args.steps": [8]}.
    Lists of scalars stay whole (one setting); lists holding dicts are indexed."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): value}


def config_hash(flat: dict[str, Any]) -> str:
    text = json.dumps(flat, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def point_key(method: str, label: str) -> str:
    """How a point is known across runs: its method and label ("shortcut N32/B8")."""
    return f"{method} {label}"


class ResultsFile:
    """The rows of one evaluation's out_dir, opened for this config: locked, checked against the
    config that wrote what is there (`resume=True`), or cleared (`resume=False`)."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], resume: bool = True) -> None:
        self.dir = check_writable(out_dir, "evaluation.out_dir")
        self.config = flatten(plain(config))
        self.hash = config_hash(self.config)
        self.lock = DirectoryLock(self.dir, "migm test").acquire()
        try:
            if not resume:
                self.clear()
            self.rows: dict[str, dict] = self._read()
        except BaseException:
            self.lock.release()
            raise
        atomic_write_bytes(self.dir / CONFIG, lambda tmp: tmp.write_text(
            json.dumps({"config_hash": self.hash, "config": self.config}, indent=1) + "\n"))

    # --- reading what a previous run finished -------------------------------------------------
    def _read(self) -> dict[str, dict]:
        path = self.dir / RESULTS
        if not path.exists():
            return {}
        stored, stored_hash = self._stored_config(path)
        # a setting migm gained since those rows were written, left at null, changes nothing
        now = {k: v for k, v in self.config.items() if k in stored or v is not None}
        if stored != now:
            raise ValueError(f"{path} holds rows of another config ({self._differences(stored)}); "
                             "rerun with that config to resume it, or pass --evaluation.resume false "
                             "to redo it here, or choose another --evaluation.out_dir")
        rows = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not a JSON row ({err.msg}); pass "
                                 "--evaluation.resume false to redo the evaluation") from None
            if row.get("config_hash") in (self.hash, stored_hash) and "method" in row:
                rows[point_key(row["method"], row["label"])] = {**row, "config_hash": self.hash}
        return rows

    def _stored_config(self, results: Path) -> tuple[dict[str, Any], str | None]:
        path = self.dir / CONFIG
        try:
            stored = json.loads(path.read_text())
            return stored["config"], stored.get("config_hash")
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{results} exists but {path} does not say which config wrote it; pass "
                             "--evaluation.resume false to redo it here, or choose another "
                             "--evaluation.out_dir") from None

    def _differences(self, stored: dict[str, Any], most: int = 4) -> str:
        keys = sorted(k for k in stored.keys() | self.config.keys()
                      if stored.get(k) != self.config.get(k) and (k in stored or self.config[k] is not None))
        said = [f"{k}: {json.dumps(stored.get(k))} there, {json.dumps(self.config.get(k))} now" for k in keys[:most]]
        return "; ".join(said) + (f"; and {len(keys) - most} more" if len(keys) > most else "")

    def clear(self) -> None:
        for name in (RESULTS, CONFIG):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / POINTS, ignore_errors=True)

    # --- recording ----------------------------------------------------------------------------
    def finished(self, key: str) -> dict | None:
        return self.rows.get(key)

    def samples(self, index: int) -> tuple[torch.Tensor, list[str]] | None:
        """The samples point `index` kept, and their captions, as a finished run wrote them."""
        path = self.dir / POINTS / f"{index:03d}.pt"
        if not path.exists():
            return None
        kept = torch.load(path, weights_only=True)
        return kept["images"], list(kept["captions"])

    def add(self, index: int, row: dict, samples: torch.Tensor | None, captions: list[str] = ()) -> None:
        """Record a finished point: its samples first, then its row (the row is the commit)."""
        if samples is not None:
            (self.dir / POINTS).mkdir(exist_ok=True)
            kept = {"images": samples, "captions": list(captions)}
            atomic_write_bytes(self.dir / POINTS / f"{index:03d}.pt", lambda tmp: torch.save(kept, tmp))
        self.rows[point_key(row["method"], row["label"])] = {**row, "config_hash": self.hash}
        self._write(list(self.rows.values()))

    def complete(self, rows: list[dict], extra_rows: list[dict] = ()) -> Path:
        """Replace the rows with the timed ones (in grid order), then any extra rows."""
        self.rows = {point_key(r["method"], r["label"]): {**r, "config_hash": self.hash} for r in rows}
        self._write([*self.rows.values(), *({**r, "config_hash": self.hash} for r in extra_rows)])
        return self.dir / RESULTS

    def _write(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write_bytes(self.dir / RESULTS, lambda tmp: tmp.write_text(text))

    def close(self) -> None:
        self.lock.release()
