"""Per-step validation curves of a shortcut training run, read back from its CSV logs.

The shortcut's error is not uniform over the N steps (early steps reveal few tokens into an
almost empty grid, late ones refine), so the one scalar `val/rel_err` hides where it fails. This
draws `val/<metric>/step_XX` against the step, one line per validation epoch.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from migm.evaluation.report import _pyplot
from migm.files import atomic_write_bytes


def read_step_curves(csv_paths: list[Path], metric: str = "rel_err") -> dict[int, dict[int, float]]:
    """{epoch: {step: value}} from Lightning CSVLogger files (a resumed run has several versions;
    later files win for the same epoch)."""
    pattern = re.compile(rf"^val/{re.escape(metric)}/step_(\d+)$")
    curves: dict[int, dict[int, float]] = {}
    for path in csv_paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                steps = {int(m.group(1)): float(v) for k, v in row.items()
                         if v and (m := pattern.match(k))}
                if steps:
                    curves[int(row["epoch"])] = steps
    if not curves:
        raise ValueError(f"no val/{metric}/step_XX columns in {[str(p) for p in csv_paths]}: "
                         "are these the CSV logs of a shortcut `fit`?")
    return dict(sorted(curves.items()))


def plot_step_curves(curves: dict[int, dict[int, float]], path: Path, metric: str = "rel_err") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    epochs = list(curves)
    for k, epoch in enumerate(epochs):
        steps = sorted(curves[epoch])
        ax.plot(steps, [curves[epoch][s] for s in steps], color=cmap(k / max(len(epochs) - 1, 1)),
                label=f"epoch {epoch + 1}" if k in (0, len(epochs) - 1) else None)
    ax.set_xlabel("step i (prediction of f_{i+1})")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"shortcut {metric} per step over training")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
