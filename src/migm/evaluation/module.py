"""`test`: the evaluation grid on Lightning's test loop, for any base, with or without a shortcut.

EvaluationModule owns everything `migm test` does: it loads the frozen base, the shortcut weights
a grid point needs (a fit checkpoint, an exported asset or a released file), builds the quality
metrics, and runs the grid point by point over every rank's share of the test conditions (FID
states summed over ranks by torchmetrics). Each point's row is written to results.jsonl when its
quality is computed, so a stopped evaluation resumes where it stopped (evaluation/results_file.py);
the points are then timed together in interleaved rounds and the report is written. A
training-free study (vanilla, reuse, the caches) needs no shortcut at all.

The CLI builds it from the config: the `model` section names the base and the shortcut network
(a ShortcutModule's fields, or this module's own), the top-level `evaluation` and `metrics`
sections say what is run and what it is measured against (cli.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm.auto import tqdm

from migm.evaluation.grid import EvaluationGrid, GridConfig, check_steps
from migm.evaluation.report import publish, write_pictures
from migm.evaluation.results_file import ResultsFile, point_key
from migm.evaluation.setup import MetricsConfig, build_metrics
from migm.evaluation.weights import load_test_weights
from migm.files import CheckpointError, sha256
from migm.models.registry import BaseKind, check_files, load_spec
from migm.shortcut.maskgit_official import set_test_dropout
from migm.shortcut.network import NetworkConfig, ShortcutConfig


AUTOCAST = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "32-true": None}


@dataclass
class EvaluationConfig(GridConfig):
    """The grid `test` runs (GridConfig's fields), and:

    Args:
        weights: the shortcut weights the grid's shortcut points use when no --ckpt_path is
            given: an exported asset (`shortcut.pt`, the embedded default's shipped one), a
            released file (`maskgit-shortcut.pth`, read by the network's importer) or a fit
            checkpoint. A real base needs its own (never the embedded default's).
        out_dir: where results.jsonl, pareto.png and samples.png go (default: <run dir>/eval).
        resume: keep the points a stopped run of the same config finished in out_dir (false:
            redo every point; a different config is refused either way, naming what differs).
        precision: the autocast every point generates under: null, the trainer's (its
            `precision`, which the fit config sets for training); "16-mixed", fp16 autocast, as
            the MaskGIT reference samples (its torch.amp.autocast('cuda') around every forward).
        shortcut_dropout_at_test: 0 (what infer.py and every other method do), or the dropout
            the MaskGIT shortcut samples with: the released evaluation (eval.sh) ran it with its
            training dropout, 0.1, active; 0.1 reproduces that exactly (MaskGIT official only).
    """

    weights: str | None = "shortcut.pt"
    out_dir: str | None = None
    resume: bool = True
    shortcut_dropout_at_test: float = 0.0
    precision: Literal["16-mixed", "bf16-mixed", "32-true"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in (None, *AUTOCAST):
            raise ValueError(f"evaluation.precision: one of {list(AUTOCAST)} or null (the trainer's), "
                             f"got {self.precision!r}")
        if not 0 <= self.shortcut_dropout_at_test < 1:
            raise ValueError("evaluation.shortcut_dropout_at_test: a dropout probability in [0, 1), "
                             f"got {self.shortcut_dropout_at_test}")

    def identity(self) -> dict:
        """The settings a row's quality depends on (not where it goes, nor how it is timed)."""
        skip = ("out_dir", "resume", "latency_batch", "latency_repeats")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


class EvaluationModule(L.LightningModule):
    def __init__(self, base_kind: BaseKind = "tiny", base: str = "base.pt", tokenizer: str = "tokenizer.pt",
                 base_config: dict | None = None, prompts: str | None = None,
                 network: NetworkConfig | None = None, evaluation: EvaluationConfig | None = None,
                 metrics: MetricsConfig | None = None) -> None:
        """
        Args:
            base_kind: which base MIGM adapter (tiny = the embedded default).
            base: base model weights (asset name, path, or DiMOO's checkpoint directory).
            tokenizer: tokenizer weights, for decoding images.
            base_config: the base adapter's config fields, where they differ from the release.
            prompts: a text-to-image base's prompt file: condition j is prompt j.
            network: the shortcut's architecture the weights are loaded into (default: ours at
                the embedded default's size).
            evaluation: the grid and where its outputs go (top-level `evaluation:` in YAML).
            metrics: what samples are measured against (top-level `metrics:` in YAML).
        """
        super().__init__()
        check_files(base_kind, base, tokenizer, prompts)       # a missing file stops us at once
        self.spec = {"base_kind": base_kind, "base": base, "tokenizer": tokenizer,
                     "base_config": base_config, "prompts": prompts}
        self.network_config = network or ShortcutConfig()
        self.evaluation = evaluation or EvaluationConfig()
        self.metrics = metrics or MetricsConfig()
        self.checkpoint: str | None = None          # a fit checkpoint given as --ckpt_path
        self._base = None

    @property
    def base(self):
        if self._base is None:
            base = load_spec(self.spec)
            # set past nn.Module's __setattr__: not a submodule, so it stays out of any state_dict
            object.__setattr__(self, "_base", base.requires_grad_(False).eval())
        if next(self._base.parameters()).device != self.device:
            self._base.to(self.device)
        return self._base

    def weights(self) -> str | None:
        """The shortcut weights under test (None when no point needs any), checked before any
        model is loaded."""
        if not any(m.needs_shortcut for m in self.evaluation.methods):
            return None
        weights = self.checkpoint or self.evaluation.weights
        kind = self.spec["base_kind"]
        if weights is None or (kind != "tiny" and weights == "shortcut.pt"):
            raise CheckpointError(f"test on the {kind} base needs trained shortcut weights: pass "
                                  "--ckpt_path (a fit checkpoint) or --evaluation.weights (exported "
                                  "or released weights); shortcut.pt is the embedded default's")
        return weights

    def shortcut(self, weights: str | None) -> torch.nn.Module | None:
        """The shortcut network with the weights under test, or None when no point needs one."""
        if weights is None:
            return None
        network = self.network_config.build()
        network.load_state_dict(load_test_weights(weights, self.network_config, self.spec, self.base))
        print(f"evaluating shortcut weights {weights}")
        network = network.eval().requires_grad_(False)
        if p := self.evaluation.shortcut_dropout_at_test:
            if not set_test_dropout(network, p):
                raise ValueError(f"evaluation.shortcut_dropout_at_test: {type(self.network_config).__name__} "
                                 "has none of the released MaskGIT shortcut's dropout sites "
                                 "(MaskGITShortcutConfig has)")
        return network

    def out_dir(self) -> Path:
        return Path(self.evaluation.out_dir or Path(self.trainer.default_root_dir) / "eval")

    def identity(self, weights: str | None) -> dict:
        """What the rows in out_dir must have been made with to be kept: the base, the shortcut
        weights (and their bytes), the grid, the metrics and the test conditions."""
        data = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}) or {}
        exists = weights is not None and Path(weights).is_file()
        return {"model": self.spec, "network": self.network_config, "weights": weights,
                "weights_sha256": sha256(Path(weights)) if exists else None,
                "evaluation": self.evaluation.identity(), "metrics": self.metrics,
                "data": {k: v for k, v in dict(data).items()
                         if k.startswith("test_") or k in ("num_classes", "seed")}}

    def setup(self, stage: str) -> None:
        """out_dir is checked, locked and matched against what it holds before anything loads
        or runs: on rank 0, which alone writes there; the other ranks learn its verdict."""
        if stage != "test":
            return
        weights = self.weights()
        check_steps(self.evaluation.points(), self.base.num_tokens)
        verdict, results = None, None
        if self.trainer.is_global_zero:
            try:
                results = ResultsFile(self.out_dir(), self.identity(weights), self.evaluation.resume)
            except ValueError as err:
                verdict = str(err)
        verdict = self.trainer.strategy.broadcast(verdict, src=0)
        if verdict:
            raise ValueError(verdict)
        object.__setattr__(self, "results", results)
        self.finished = self.trainer.strategy.broadcast(dict(results.rows) if results else None, src=0)

    def on_test_start(self) -> None:
        weights = self.weights()
        self.batches: list[tuple[torch.Tensor, int]] = []
        base = self.base
        metrics = build_metrics(self.metrics, base, self.spec["base_kind"], self.device)
        grid = EvaluationGrid(base, self.shortcut(weights), metrics, self.evaluation,
                              autocast=self.autocast).to(self.device)
        object.__setattr__(self, "grid", grid)        # holds the base: kept out of state_dict

    def test_step(self, batch, batch_idx):
        """Lightning hands each rank its share of the conditions; they are kept, and the grid
        runs over them point by point at the epoch's end (a point is what resumes)."""
        cond, index = batch
        self.batches.append((cond, self.evaluation.seed + int(index[0])))

    def autocast(self):
        """The autocast each step's networks run in (the sampler and the metrics stay outside).
        The grid runs at the epoch's end, outside the context Lightning puts around test_step,
        so it is entered per step: the trainer's (its precision plugin's forward context) unless
        evaluation.precision says otherwise."""
        p = self.evaluation.precision
        if p is None:
            return self.trainer.precision_plugin.forward_context()
        dtype = AUTOCAST[p]
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def on_test_epoch_end(self) -> None:
        grid, results = self.grid, self.results
        todo = [p for p in grid.points if point_key(p.name, p.label) not in self.finished]
        if self.trainer.is_global_zero and self.finished:
            tqdm.write(f"{self.out_dir()}: {len(grid.points) - len(todo)} of {len(grid.points)} "
                       "points already finished with this config; running the rest, then timing "
                       "every point (--evaluation.resume false redoes them)")
        rows = []
        # closed on a stop too, so the one line that says what was kept starts a line of its own
        with tqdm(total=len(todo) * len(self.batches), desc="quality", unit="batch",
                  disable=not (self.trainer.is_global_zero and todo)) as bar:
            for index, point in enumerate(grid.points):
                done = self.finished.get(point_key(point.name, point.label))
                if done is not None:
                    grid.restore(point, done)
                    rows.append(done)
                    continue
                bar.set_postfix_str(f"{point.name} {point.label}")
                for cond, seed in self.batches:
                    if self.trainer.received_sigterm:    # Lightning's handler only sets the flag
                        raise SIGTERMException
                    grid.update(cond.to(self.device), seed=seed, points=[point])
                    bar.update()
                row = grid.quality_row(point)               # collective: every rank, same order
                if results is not None:
                    results.add(index, row, grid.samples(point) if grid.kept[point] else None,
                                grid.sample_captions(point))
                rows.append(row)
        rows = grid.timed(rows, progress=self._ticks)
        if results is not None:
            path = results.complete(rows)
            samples, captions = {}, {}
            for index, point in enumerate(grid.points):
                key = point_key(point.name, point.label)
                kept = ((grid.samples(point), grid.sample_captions(point)) if grid.kept[point]
                        else results.samples(index))
                if kept is not None:
                    samples[key], captions[key] = kept
            publish(rows, {"results": path, **write_pictures(rows, samples, self.out_dir())},
                    self.trainer, "eval", samples, captions)

    def _ticks(self, runs):
        """The timing rounds' progress bar, which also stops them at a SIGTERM."""
        with tqdm(runs, desc="latency", unit="run", disable=not self.trainer.is_global_zero) as bar:
            for tick in bar:
                if self.trainer.received_sigterm:
                    raise SIGTERMException
                yield tick

    def teardown(self, stage: str) -> None:
        results = getattr(self, "results", None)
        if results is not None:
            results.close()
