"""What `migm speed` writes beside its rows: a Markdown table (ours beside the paper's, for
docs/real_sizes.md) and a picture of the two speedups per point."""

from __future__ import annotations

from pathlib import Path

from migm.evaluation.report import _pyplot
from migm.files import atomic_write_bytes


def _num(value, fmt: str = "{:.2f}") -> str:
    return "" if value is None else fmt.format(value)


def speed_table(rows: list[dict]) -> str:
    """One line per point: our latency and speedup (with its range over rounds), the call-count
    ideal and measured/ideal (with the decode every point pays, and less it: the ideal counts the
    generation's calls only), the paper's speedup and ours over it, composed/measured where the
    point also ran whole, the composed peak memory and the estimate from tensor sizes."""
    head = ("| point | ms / image | speedup (range) | ideal | measured / ideal | less decode | paper | ours / paper "
            "| composed / measured | peak MiB | estimated MiB |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        spread = f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        lines.append(
            f"| {r['method']} {r['label']} | {r['latency_ms_per_image']:.0f} | {spread} "
            f"| {_num(r.get('ideal_speedup'), '{:.2f}x')} | {_num(r.get('measured_over_ideal'))} "
            f"| {_num(r.get('generation_over_ideal'))} "
            f"| {_num(r.get('paper_speedup'), '{:.2f}x')} | {_num(r.get('ours_over_paper'))} "
            f"| {_num(r.get('composed_over_measured'), '{:.3f}')} | {_num(r.get('peak_memory_mib'), '{:.0f}')} "
            f"| {_num(r.get('estimated_peak_memory_mib'), '{:.0f}')} |")
    return head + "\n".join(lines) + "\n"


def plot_speedups(rows: list[dict], path: Path) -> Path:
    """Our speedup (with its range) beside the paper's, one pair of bars per point."""
    plt = _pyplot()
    labels = [f"{r['method']} {r['label']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4))
    ours = [r["speedup"] for r in rows]
    err = [[r["speedup"] - r["speedup_min"] for r in rows], [r["speedup_max"] - r["speedup"] for r in rows]]
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=err, capsize=2, label=f"ours ({rows[0]['device_name']}, "
           f"{rows[0]['composed_from']})")
    paper = [r.get("paper_speedup") or 0 for r in rows]
    if any(paper):                    # a base of another size than the paper's has none
        ax.bar([i + 0.2 for i in x], paper, 0.4, label="paper (H200)")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"speedup over vanilla N{rows[0]['reference_steps']}")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return Path(path)
