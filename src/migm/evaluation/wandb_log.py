"""An evaluation grid as a W&B run shows it: one table row per grid point, a Pareto chart W&B's
own line panel draws (one colour per method, the frontier as a series of its own, axes named
after the measured metric), a browsable samples table, and the headline points in the summary.

Why rows and not history: a test run evaluates every point once, at one step, so per-point
history keys gave one single-point line panel each and nothing to compare across a group. A
table row per point is what W&B filters, sorts and plots; the summary holds the few numbers a
group's run table should show side by side. During `fit` (prefix `fit_eval`) the per-point
scalars are kept in the history too, since there they are curves over training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from migm.evaluation.images import image_grid

# how a quality column reads on an axis (FID keys carry their feature extractor)
METRIC_NAMES = {"clip_score": "CLIPScore", "image_reward": "ImageReward", "class_accuracy": "class accuracy"}
FRONTIER = "Pareto frontier"
# the columns every results row starts with, in this order; the rest follow as the rows have them
LEADING = ("method", "label", "steps", "budget")


def quality_columns(rows: list[dict]) -> tuple[str, bool]:
    """The headline quality column and whether lower is better (FID, else ImageReward, else
    CLIPScore): the axis the Pareto chart and the summary are about."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fid = next((k for k in keys if k.startswith("fid_")), None)
    if fid is not None:
        return fid, True
    for k in ("image_reward", "clip_score"):
        if k in keys:
            return k, False
    raise ValueError(f"no quality column (fid_*, image_reward, clip_score) in the rows: {sorted(keys)}")


def metric_name(key: str) -> str:
    """`fid_classifier` -> `FID (classifier)`, `clip_score` -> `CLIPScore`: the axis title."""
    if key.startswith("fid_"):
        return f"FID ({key[4:]})"
    return METRIC_NAMES.get(key, key)


def columns(rows: list[dict]) -> list[str]:
    """Every key any row has (methods report different counters), leading columns first."""
    seen = dict.fromkeys(LEADING)
    for r in rows:
        seen.update(dict.fromkeys(r))
    return [c for c in seen if any(c in r for r in rows)]


def cell(value: Any) -> Any:
    """A W&B table column keeps one type: nested values (a calibration's {step: temperature}, its
    keys differing row to row) go in as their JSON text."""
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def results_table(rows: list[dict]):
    """The grid as a wandb.Table: one row per point, every column the rows have."""
    import wandb
    cols = columns(rows)
    return wandb.Table(columns=cols, data=[[cell(r.get(c)) for c in cols] for r in rows])


def frontier(rows: list[dict], y: str, lower_is_better: bool) -> list[dict]:
    """The rows no other row beats on both speedup (higher is better) and `y`, by speedup."""
    sign = 1 if lower_is_better else -1
    usable = [r for r in rows if r.get("speedup") is not None and r.get(y) is not None]
    beats = lambda o, r: (o["speedup"] >= r["speedup"] and sign * o[y] <= sign * r[y]
                          and (o["speedup"] > r["speedup"] or sign * o[y] < sign * r[y]))
    return sorted((r for r in usable if not any(beats(o, r) for o in usable)), key=lambda r: r["speedup"])


def pareto_chart(rows: list[dict], reference_steps: int | None = None):
    """W&B's built-in line panel (`wandb/line/v0`) over a chart table: x = speedup, y = the
    quality metric (its column named after it, so the axis reads "FID (classifier)"), one stroke
    (colour) per method through its points by speedup, and the frontier as its own stroke."""
    import wandb
    y, lower = quality_columns(rows)
    name = metric_name(y)
    x = f"speedup vs vanilla N{reference_steps}" if reference_steps else "speedup"
    data = [[r["method"], r["label"], r["speedup"], r[y], r.get("latency_ms_per_image")]
            for r in sorted(rows, key=lambda r: (r["method"], r.get("speedup") or 0))
            if r.get("speedup") is not None and r.get(y) is not None]
    data += [[FRONTIER, f"{r['method']} {r['label']}", r["speedup"], r[y], r.get("latency_ms_per_image")]
             for r in frontier(rows, y, lower)]
    table = wandb.Table(columns=["method", "label", x, name, "latency ms/image"], data=data)
    better = "lower" if lower else "higher"
    return wandb.plot_table("wandb/line/v0", table, {"x": x, "y": name, "stroke": "method"},
                            {"title": f"{name} ({better} is better) vs {x}"})


def samples_table(rows: list[dict], samples: dict[str, torch.Tensor], seed: int | None = None,
                  per_row: int = 10, captions: dict[str, list[str]] | None = None, shown: int = 8):
    """One row per grid point: its kept samples as one wandb.Image grid, then the first `shown`
    one by one, each captioned with the method, label, condition (class or prompt) and seed it
    was drawn with (the same seeds and conditions in every row, so rows compare image by image)."""
    import wandb
    data = []
    for r in rows:
        key = f"{r['method']} {r['label']}"
        images = samples.get(key)
        if images is None or not len(images):
            continue
        n = len(images) - len(images) % per_row if len(images) >= per_row else len(images)
        grid = image_grid(images[:n], rows=max(1, n // per_row) if n >= per_row else 1)
        grid = grid[..., 0] if grid.shape[-1] == 1 else grid          # grey: (H, W)
        caption = f"{key}: {n} samples" + (f", seeds from {seed}" if seed is not None else "")
        said = (captions or {}).get(key, [])
        singles = []
        for j in range(shown):
            if j >= len(images):
                singles.append(None)
                continue
            one = image_grid(images[j:j + 1], rows=1, pad=0)
            one = one[..., 0] if one.shape[-1] == 1 else one
            singles.append(wandb.Image(one, caption=f"{key}: {said[j]}" if j < len(said) else key))
        data.append([r["method"], r["label"], wandb.Image(grid, caption=caption), n, seed, *singles])
    return wandb.Table(columns=["method", "label", "samples", "num_shown", "seed",
                                *(f"sample_{j}" for j in range(shown))], data=data)


def headline(rows: list[dict], prefix: str) -> dict[str, Any]:
    """Summary values a group's run table shows side by side: per method its best point
    (quality, label, speedup) and its fastest point on the frontier, and the frontier's size."""
    y, lower = quality_columns(rows)
    pick = min if lower else max
    out: dict[str, Any] = {}
    front = frontier(rows, y, lower)
    out[f"{prefix}/frontier_points"] = len(front)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get(y) is not None]
        if not mine:
            continue
        best = pick(mine, key=lambda r: r[y])
        out.update({f"{prefix}/{method}/best_{y}": best[y], f"{prefix}/{method}/best_label": best["label"],
                    f"{prefix}/{method}/best_speedup": best.get("speedup")})
        on_front = [r for r in front if r["method"] == method]
        if on_front:
            fast = on_front[-1]
            out.update({f"{prefix}/{method}/fastest_frontier_speedup": fast["speedup"],
                        f"{prefix}/{method}/fastest_frontier_{y}": fast[y],
                        f"{prefix}/{method}/fastest_frontier_label": fast["label"]})
    return out


def point_scalars(rows: list[dict], prefix: str) -> dict[str, float]:
    """`<prefix>/<method>_<label>/<metric>` for the loggers that keep only scalars (CSV), and for
    W&B during fit, where each is a curve over training."""
    y, _ = quality_columns(rows)
    out = {}
    for r in rows:
        key = f"{prefix}/{r['method']}_{r['label'].replace('/', '_')}"
        for name in (y, "class_accuracy", "clip_score", "image_reward", "latency_ms_per_image", "speedup"):
            if r.get(name) is not None:
                out[f"{key}/{name}"] = r[name]
    return out


def log_to_wandb(logger, rows: list[dict], files: dict[str, Path], prefix: str,
                 samples: dict[str, torch.Tensor] | None = None, seed: int | None = None,
                 step: int = 0, captions: dict[str, list[str]] | None = None) -> None:
    """Everything above into a WandbLogger's run, in one history record (at the logger's
    `trainer/global_step`, as Lightning logs every metric): the results table (once), the Pareto
    chart, the samples table, the static PNGs (for offline viewing), and the summary."""
    import wandb
    reference = next((r.get("reference_steps") for r in rows if r.get("reference_steps")), None)
    record = {f"{prefix}/results": results_table(rows), f"{prefix}/pareto_chart": pareto_chart(rows, reference)}
    if files.get("pareto"):
        record[f"{prefix}/pareto"] = wandb.Image(str(files["pareto"]), caption="Pareto plot (static)")
    if files.get("samples"):
        record[f"{prefix}/samples_grid"] = wandb.Image(str(files["samples"]), caption="one row per grid point")
    if samples:
        record[f"{prefix}/samples"] = samples_table(rows, samples, seed, captions=captions)
    if prefix == "fit_eval":
        record.update(point_scalars(rows, prefix))
    logger.log_metrics(record, step=step)
    summary = logger.experiment.summary
    for key, value in headline(rows, prefix).items():
        summary[key] = value


def log_bench(results: dict, out_dir: Path, config: dict, group: str | None = None) -> Path:
    """`migm bench` as a W&B run of job type `bench` (offline unless logged in), in `group` so a
    study's speed numbers sit beside its collect, fit and test runs: the arguments as flat config
    keys, each section as a table, every number of a one-row section in the summary."""
    import wandb
    run = wandb.init(project="migm", dir=str(out_dir), name="bench", job_type="bench",
                     group=group or "bench", config=dict(config))
    for section, values in results.items():
        rows = values if isinstance(values, list) else [values]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        run.log({f"bench/{section}": wandb.Table(columns=keys, data=[[cell(r.get(k)) for k in keys] for r in rows])})
        if len(rows) == 1:
            for k, v in rows[0].items():
                if isinstance(v, (int, float)):
                    run.summary[f"bench/{section}/{k}"] = v
    path = Path(run.dir).parent
    run.finish()
    return path

