"""The speed columns of the paper's Tables 1 and 2 (H200), keyed as our grid points are labelled,
so every row `migm speed` writes stands beside the number it reproduces.

Table 1: MaskGIT-512 (1,024 tokens), ms per image, speedup against 15-step vanilla. Table 2:
Lumina-DiMOO (4,096 image tokens), s per image, speedup against 64-step vanilla. A base of
another size (MaskGIT-256, a test-sized one) stands beside neither: its speedups are its own.
Transcribed from the paper; dLLM-Cache's rho is not in the paper (ours, swept), so every rho of
one (Kp, Kr) stands beside the paper's one row.
"""

from __future__ import annotations

import re

# label -> (latency, speedup); latency in ms for Table 1, in s for Table 2
TABLE_1 = {
    "vanilla N8": (26.1, 1.92), "vanilla N9": (29.4, 1.70), "vanilla N11": (35.9, 1.40),
    "vanilla N13": (42.5, 1.18), "vanilla N15": (50.1, 1.00), "vanilla N32": (104.6, 0.48),
    "shortcut N15/B7": (25.9, 1.94), "shortcut N15/B8": (28.8, 1.74), "shortcut N32/B8": (33.7, 1.49),
    "shortcut N32/B9": (36.8, 1.36), "shortcut N32/B12": (45.9, 1.09),
}
TABLE_2 = {
    "vanilla N64": (23.10, 1.00), "vanilla N32": (11.60, 1.99), "vanilla N16": (5.77, 4.00),
    "vanilla N14": (5.04, 4.58), "vanilla N13": (4.68, 4.94),
    "ml_cache N64/w0.1/r5/c0.9": (10.40, 2.22), "ml_cache N64/w0/r5/c0.9": (9.10, 2.54),
    "recap u0/T8/N48": (7.05, 3.28), "recap u0/T8/N32": (5.42, 4.26),
    "dllm_cache N64/Kp10/Kr5": (15.67, 1.47), "dllm_cache N64/Kp64/Kr16": (14.30, 1.62),
    "taylorseer N64/I4/O2/layers": (8.71, 2.65), "taylorseer N64/I8/O2/layers": (5.99, 3.86),
    "shortcut N64/B14": (5.76, 4.01), "shortcut N64/B11": (4.70, 4.91), "shortcut N64/B9": (3.99, 5.79),
}
# kind -> (table, rows, latency unit, the image tokens of the paper's base)
TABLES = {"maskgit": ("Table 1", TABLE_1, "ms", 1024), "dimoo": ("Table 2", TABLE_2, "s", 4096)}


def paper_row(base_kind: str, method: str, label: str, num_tokens: int | None = None) -> dict:
    """The paper's latency and speedup for this point ({} where the paper has no such row, or
    where `num_tokens`, the base's image tokens, is not the paper's base's)."""
    if base_kind not in TABLES:
        return {}
    table, rows, unit, tokens = TABLES[base_kind]
    if num_tokens is not None and num_tokens != tokens:
        return {}
    key = re.sub(r" rho[0-9.]+$", "", f"{method} {label}")       # dLLM-Cache: rho is ours
    if key not in rows:
        return {}
    latency, speedup = rows[key]
    return {"paper_table": table, f"paper_latency_{unit}": latency, "paper_speedup": speedup}
