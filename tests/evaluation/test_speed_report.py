"""The results page shows the benchmark's own rows: every table of docs/real_sizes.md is what
`speed_table` makes of the raw rows beside it, so a number in the docs cannot drift from its
measurement (a rerun that rewrites the rows must rewrite the page)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from migm.evaluation.speed_report import speed_table

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("rows", ["table1_maskgit512_cpu.jsonl", "maskgit256_cpu_check.jsonl",
                                  "table2_dimoo8b_cpu.jsonl"])
def test_the_results_page_shows_the_rows_own_table(rows):
    path = DOCS / "real_sizes" / rows
    table = speed_table([json.loads(line) for line in path.read_text().splitlines()])
    page = (DOCS / "real_sizes.md").read_text()
    assert table in page, f"docs/real_sizes.md: the table of {path.name} is not the one its rows make"
    assert path.with_suffix(".md").read_text() == table


def test_rows_taken_from_another_run_are_that_runs_rows():
    """Table 2's ML-Cache rows come from a run of their own (`from` names its file): each is
    that file's row as written, nothing recomputed."""
    table = [json.loads(line) for line in (DOCS / "real_sizes" / "table2_dimoo8b_cpu.jsonl").read_text().splitlines()]
    taken = [r for r in table if "from" in r]
    assert {r["method"] for r in taken} == {"ml_cache"} and len(taken) == 2
    for r in taken:
        source = {f"{s['method']} {s['label']}": s for s in
                  map(json.loads, (DOCS / "real_sizes" / r["from"]).read_text().splitlines())}
        assert {k: v for k, v in r.items() if k != "from"} == source[f"{r['method']} {r['label']}"]


RUNS = ["table2_dimoo8b_cpu_run1.jsonl", "table2_dimoo8b_cpu.jsonl", "table2_dimoo8b_cpu_run3_drift.jsonl",
        "table2_dimoo8b_cpu_run4_caches_drift.jsonl"]


def test_the_run_to_run_table_is_the_raw_rows():
    """Each cache row of Table 2's run-to-run table: its speedup in every run (a drift run's
    `uncorrected_speedup`, the page's own method), their spread and median, and the median over
    the paper's, recomputed from the raw rows."""
    runs = [{f"{r['method']} {r['label']}": r for r in map(json.loads, (DOCS / "real_sizes" / f).read_text().splitlines())}
            for f in RUNS]
    page = (DOCS / "real_sizes.md").read_text()
    lines = [line for line in page.splitlines() if line.strip().startswith("| ") and " / " in line
             and line.count("|") == 7 and not line.strip().startswith("| point")]
    assert len(lines) == 6                  # the cache rows but ML-Cache's (composed since)
    for line in lines:
        point, readings, spread, median, paper, ratio = [c.strip() for c in line.strip().strip("|").split("|")]
        rows = [run.get(point) for run in runs]
        values = [r.get("uncorrected_speedup", r["speedup"]) for r in rows if r]
        assert readings == " / ".join(f"{r.get('uncorrected_speedup', r['speedup']):.2f}" if r else "-" for r in rows)
        m = statistics.median(values)
        assert float(spread) == pytest.approx(max(values) / min(values), abs=0.006)
        assert float(median.rstrip("x")) == pytest.approx(m, abs=0.006)
        assert float(paper.rstrip("x")) == rows[1]["paper_speedup"]
        assert float(ratio) == pytest.approx(m / rows[1]["paper_speedup"], abs=0.006)
