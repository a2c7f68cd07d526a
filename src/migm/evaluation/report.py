"""Turns an evaluation grid's rows into what people look at: a table, a Pareto plot, sample grids,
and the same things in every attached logger (W&B tables/images, CSV metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from migm.evaluation.images import image_grid
from migm.files import atomic_write_bytes


def quality_key(rows: list[dict]) -> tuple[str, bool]:
    """The headline quality column and whether lower is better: FID where it was measured,
    else ImageReward or CLIPScore (text-to-image runs without an FID reference)."""
    keys = rows[0].keys()
    fid = next((k for k in keys if k.startswith("fid_")), None)
    if fid is not None:
        return fid, True
    for k in ("image_reward", "clip_score"):
        if k in keys:
            return k, False
    raise ValueError(f"no quality column (fid_*, image_reward, clip_score) in the rows: {sorted(keys)}")


def fid_key(rows: list[dict]) -> str:
    return quality_key(rows)[0]


def pareto_front(rows: list[dict], x: str, y: str, lower_is_better: bool = True) -> list[int]:
    """Indices of rows no other row beats on both x and y (lower x is better; y as told)."""
    sign = 1 if lower_is_better else -1
    val = lambda r: sign * r[y]
    return [i for i, r in enumerate(rows)
            if not any(o[x] <= r[x] and val(o) <= val(r) and (o[x] < r[x] or val(o) < val(r)) for o in rows)]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pareto(rows: list[dict], path: Path, x: str = "latency_ms_per_image") -> Path:
    """Latency vs quality: one colour per method, one line per (method, N) (vanilla: one line over
    N), training-free methods dashed, the frontier over all rows ringed, points labelled."""
    plt = _pyplot()
    y, lower = quality_key(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["method"],) if r["method"] == "vanilla" else (r["method"], r["steps"]), []).append(r)
    for key, pts in lines.items():
        pts = sorted(pts, key=lambda r: r[x])
        name = "vanilla (N varies)" if key == ("vanilla",) else f"{key[0]} N={key[1]}"
        ax.plot([r[x] for r in pts], [r[y] for r in pts], marker="o", label=name, color=colour[key[0]],
                linestyle="-" if key[0] in ("vanilla", "shortcut") else "--", markersize=4)
        for r in pts:
            ax.annotate(r["label"], (r[x], r[y]), textcoords="offset points", xytext=(3, 3), fontsize=6)
    cap = off_chart_cap([r[y] for r in rows]) if lower else None
    if cap is not None:             # a collapsed row (FID 200 beside 60s) would flatten the rest
        ax.set_ylim(top=cap)
        for k, r in enumerate(r for r in rows if r[y] > cap):         # staggered, one line each
            ax.annotate(f"{r['label']}: {r[y]:.0f} (off the chart)", (r[x], cap), xytext=(40, -12 - 9 * k),
                        textcoords="offset points", fontsize=6, ha="left",
                        arrowprops={"arrowstyle": "->", "lw": 0.6})
    front = [rows[i] for i in pareto_front(rows, x, y, lower)]
    ax.scatter([r[x] for r in front], [r[y] for r in front], s=160, facecolors="none",
               edgecolors="black", label="Pareto frontier")
    ax.set_xlabel("latency per image (ms)")
    ax.set_ylabel(y.replace("fid_", "FID (") + " features)" if y.startswith("fid_") else y + " (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return Path(path)


def off_chart_cap(values: list[float]) -> float | None:
    """The top of the y axis when some values are outliers (more than twice the median), else
    None: 1.2x the largest value that is not one."""
    import statistics
    finite = [v for v in values if v == v]
    if not finite:
        return None
    limit = 2 * statistics.median(finite)
    kept = [v for v in finite if v <= limit]
    return 1.2 * max(kept) if len(kept) < len(finite) and kept else None


def plot_side_by_side(samples: dict[str, torch.Tensor], path: Path, per_row: int = 10) -> Path:
    """One row per configuration (same seeds and conditions in every row), labelled."""
    plt = _pyplot()
    labels = list(samples)
    grid = image_grid(torch.cat([samples[k][:per_row] for k in labels]), rows=len(labels))
    fig, ax = plt.subplots(figsize=(per_row * 0.6 + 1.2, len(labels) * 0.6 + 0.3))
    ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255)
    h = grid.shape[0] / len(labels)
    ax.set_yticks([h * (k + 0.5) for k in range(len(labels))], labels, fontsize=7)
    ax.set_xticks([])
    fig.tight_layout()
    # bbox "tight": long labels ("shortcut N16/B10") are never clipped at the left edge
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def format_table(rows: list[dict]) -> str:
    """The grid as a fixed-width table: quality, latency, speedup (median of per-round ratios,
    with its range when timed over several rounds), the call-count ideal, peak memory, calls."""
    y = fid_key(rows)
    clip = any("clip_score" in r for r in rows) and y != "clip_score"
    acc = any("class_accuracy" in r for r in rows)
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else format("-", spec.split(".")[0].rstrip("f"))
    head = (f"{'config':>24} {y:>15}" + (f" {'class acc':>9}" if acc else "") + (f" {'CLIPScore':>9}" if clip else "")
            + f" {'ms/img':>8} {'speedup':>8} {'range':>11} {'ideal':>6} {'peak MiB':>8} {'calls b/s':>9}")
    lines = [head]
    for r in rows:
        spread = (f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if r.get("speedup_min") is not None else "-")
        lines.append(f"{r['method'] + ' ' + r['label']:>24} {fmt(r[y], '>15.2f')}"
                     + (f" {fmt(r.get('class_accuracy'), '>9.3f')}" if acc else "")
                     + (f" {fmt(r.get('clip_score'), '>9.2f')}" if clip else "")
                     + f" {fmt(r['latency_ms_per_image'], '>8.2f')} {fmt(r['speedup'], '>8.2f')} {spread:>11}"
                     f" {fmt(r.get('ideal_speedup'), '>6.2f')} {fmt(r.get('peak_memory_mib'), '>8.0f')}"
                     f" {r['base_calls']:>4}/{r['shortcut_calls'] or 0:<4}")
    return "\n".join(lines)


def write_report(rows: list[dict], samples: dict[str, torch.Tensor], out_dir: Path,
                 extra_rows: list[dict] = ()) -> dict[str, Path]:
    """results.jsonl (grid rows, then `extra_rows` such as the tokenizer's reconstruction, which
    have no latency), pareto.png and samples.png under `out_dir`."""
    out_dir = Path(out_dir)
    text = "".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows])
    atomic_write_bytes(out_dir / "results.jsonl", lambda tmp: tmp.write_text(text))
    return {"results": out_dir / "results.jsonl", **write_pictures(rows, samples, out_dir)}


def write_pictures(rows: list[dict], samples: dict[str, torch.Tensor], out_dir: Path) -> dict[str, Path]:
    """pareto.png and (when any point kept images) samples.png under `out_dir`."""
    files = {"pareto": plot_pareto(rows, Path(out_dir) / "pareto.png")}
    if samples:
        files["samples"] = plot_side_by_side(samples, Path(out_dir) / "samples.png")
    return files


def log_report(rows: list[dict], files: dict[str, Path], loggers, step: int, prefix: str = "eval",
               samples: dict[str, torch.Tensor] | None = None,
               captions: dict[str, list[str]] | None = None) -> None:
    """Scalars per configuration go to the loggers that keep only scalars (CSV, TensorBoard); a
    W&B run gets the rows as one table, a Pareto chart, a samples table, the PNGs and summary
    values instead (evaluation/wandb_log.py says why)."""
    from lightning.pytorch.loggers import WandbLogger

    from migm.evaluation.wandb_log import log_to_wandb, point_scalars
    scalars = point_scalars(rows, prefix)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger, rows, files, prefix, samples=samples, captions=captions, step=step)
        else:
            logger.log_metrics(scalars, step=step)


def publish(rows: list[dict], files: dict[str, Path], trainer, prefix: str = "eval",
            samples: dict[str, torch.Tensor] | None = None,
            captions: dict[str, list[str]] | None = None) -> None:
    """Rank 0's last word on an evaluation: every logger gets the rows (W&B the `samples` too, as
    a table of images), the console the table."""
    log_report(rows, files, trainer.loggers, trainer.global_step, prefix, samples, captions)
    print(format_table(rows))
    print(f"wrote {', '.join(str(p) for p in files.values())}")


def finish_evaluation(grid, trainer, out_dir: str | Path | None, prefix: str = "eval") -> list[dict]:
    """Compute the grid's rows (collective over ranks), then write and log them on rank 0 (the
    training-time callback's evaluation; `test`'s own resumes point by point, module.py)."""
    from tqdm import tqdm
    # the latency phase takes minutes on a CPU: show it (on rank 0 only)
    rows = grid.compute(progress=lambda points: tqdm(points, desc="latency", unit="config",
                                                     disable=not trainer.is_global_zero))
    if trainer.is_global_zero:
        out = Path(out_dir) if out_dir else Path(trainer.default_root_dir) / prefix
        samples = {f"{p.name} {p.label}": grid.samples(p) for p in grid.points if grid.kept[p]}
        captions = {f"{p.name} {p.label}": grid.sample_captions(p) for p in grid.points if grid.kept[p]}
        publish(rows, write_report(rows, samples, out), trainer, prefix, samples, captions)
    return rows
