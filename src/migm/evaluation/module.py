"""`test`: the evaluation grid on Lightning's test loop, for any base, with or without a shortcut.

EvaluationModule owns everything `migm test` does: it loads the frozen base, the shortcut weights
a grid point needs (a fit checkpoint, an exported asset or a released file), builds the quality
metrics, feeds every rank's share of the test conditions through the grid (FID states summed
over ranks by torchmetrics), then times the points in interleaved rounds and writes the report.
A training-free study (vanilla, reuse, the caches) needs no shortcut at all.

The CLI builds it from the config: the `model` section names the base and the shortcut network
(a ShortcutModule's fields, or this module's own), the top-level `evaluation` and `metrics`
sections say what is run and what it is measured against (cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from migm.evaluation.grid import EvaluationGrid, GridConfig
from migm.evaluation.report import finish_evaluation
from migm.evaluation.setup import MetricsConfig, build_metrics
from migm.evaluation.weights import load_test_weights
from migm.files import CheckpointError
from migm.models.registry import BaseKind, check_files, load_spec
from migm.shortcut.network import NetworkConfig, ShortcutConfig


@dataclass
class EvaluationConfig(GridConfig):
    """The grid `test` runs (GridConfig's fields), and:

    Args:
        weights: the shortcut weights the grid's shortcut points use when no --ckpt_path is
            given: an exported asset (`shortcut.pt`, the embedded default's shipped one), a
            released file (`maskgit-shortcut.pth`, read by the network's importer) or a fit
            checkpoint. A real base needs its own (never the embedded default's).
        out_dir: where results.jsonl, pareto.png and samples.png go (default: <run dir>/eval).
    """

    weights: str | None = "shortcut.pt"
    out_dir: str | None = None


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
        return network.eval().requires_grad_(False)

    def on_test_start(self) -> None:
        weights = self.weights()
        base = self.base
        metrics = build_metrics(self.metrics, base, self.spec["base_kind"], self.device)
        grid = EvaluationGrid(base, self.shortcut(weights), metrics, self.evaluation).to(self.device)
        object.__setattr__(self, "grid", grid)        # holds the base: kept out of state_dict

    def test_step(self, batch, batch_idx):
        cond, index = batch
        progress = partial(tqdm, desc=f"batch {batch_idx + 1}: grid points", leave=False,
                           disable=not self.trainer.is_global_zero)
        self.grid.update(cond.to(self.device), seed=self.evaluation.seed + int(index[0]), progress=progress)

    def on_test_epoch_end(self) -> None:
        out = self.evaluation.out_dir or Path(self.trainer.default_root_dir) / "eval"
        finish_evaluation(self.grid, self.trainer, out)
