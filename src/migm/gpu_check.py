"""`make gpu-check` (python -m migm.gpu_check): everything migm has never run on CUDA, in one
command, ready before a GPU arrives. About 8 minutes on one H200.

1. the test suite's device tests on CUDA (generation, the loop's host syncs, fit, collect and
   test, parametrized by device: tests/test_device.py);
2. collect -> fit -> test of the embedded default on one GPU in bf16-mixed
   (experiments/gpu_check/);
3. `migm speed` at full size, random weights, bf16: MaskGIT-512 (Table 1's grid, every point
   also run whole, each eager and under torch.compile in the same rounds) and Lumina-DiMOO-8B (Table 2's grid composed from depths 1 and 2, the
   headline points also run whole at 32 layers).

Rows go to docs/gpu/<base>_<device>.jsonl with the device's name in every row, and a summary of
the steps (seconds, exit status) to docs/gpu/check_<device>.json, rewritten after every step.
GPU time is scarce, so a failed step does not stop the others: only a step that needs its output
(fit needs collect's shards, test fit's checkpoint) is skipped. `--steps speed` (names or their
first words) reruns just those. Without a CUDA device it stops at once with one line. `--small`
is the CPU-sized dry run the tests run: the same steps and commands at test sizes, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The reference architectures at test sizes (--small): every layer type, few channels and tokens
SMALL = {
    "maskgit": {"base_config": {"codebook_size": 16, "grid_size": 8, "num_classes": 5, "width": 32,
                                "depth": 4, "heads": 4, "mlp_dim": 64, "embed_dim": 8, "z_channels": 8,
                                "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                "attn_resolutions": [8], "resolution": 16},
                "network": {"feature_dim": 32, "vocab_size": 16, "num_tokens": 64, "heads": 4}},
    "dimoo": {"base_config": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 3,
                              "mlp_hidden_size": 48, "vocab_size": 64, "mask_token_id": 40,
                              "reference_mask_id": 40, "newline_token_id": 41, "boi_token_id": 42,
                              "eoi_token_id": 43, "boa_token_id": 44, "eoa_token_id": 45,
                              "image_token_offset": 48, "codebook_size": 16, "grid_height": 8,
                              "grid_width": 8},
              "network": {"feature_dim": 32, "vocab_size": 16, "num_tokens": 64, "heads": 4}},
}
DIMOO_WHOLE = ["vanilla N64", "vanilla N14", "shortcut N64/B14"]


@dataclass
class Step:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None            # the step whose output this one reads, if it runs too
    seconds: float | None = None
    returncode: int | None = None       # None: not run (skipped, or not reached)
    skipped: str | None = None          # why it did not run


def device_tag(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200': the file-name form of a device's name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def plan(device: str, small: bool, out: Path, tag: str, root: Path = Path(".")) -> list[Step]:
    """The commands, in order. `small`: test sizes on `device` (the CPU dry run). `root`: the
    checkout the configs and tests are read from (outputs go under the working directory)."""
    py, migm = sys.executable, [sys.executable, "-m", "migm"]
    configs, experiments = root / "configs", root / "experiments" / "gpu_check"
    on_cpu = [] if device == "cuda" else ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    tiny = ["--config", str(configs / "tiny.yaml"), "--config", str(experiments / "fit.yaml"), *on_cpu]
    collect_sizes = ["--data.init_args.num_trajectories", "40"] if small else []
    fit_sizes = (["--trainer.max_epochs", "1", "--data.init_args.test_samples", "20",
                  "--data.init_args.test_batch_size", "10", "--evaluation.latency_repeats", "1",
                  "--metrics.reference_samples", "200"]
                 if small else [])
    fit = f"fit (embedded default, {'bf16-mixed' if device == 'cuda' else '32-true'})"
    steps = [
        Step("device tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests" / "test_device.py")]),
        Step("collect (embedded default)", [*migm, "collect", "--config", str(configs / "collect_tiny.yaml"),
                                            "--config", str(experiments / "collect.yaml"),
                                            *on_cpu[:2], *collect_sizes]),
        Step(fit, [*migm, "fit", *tiny, *fit_sizes], needs="collect (embedded default)"),
        Step("test (embedded default)", [*migm, "test", *tiny, *fit_sizes,
                                         "--ckpt_path", "runs/gpu_check/checkpoints/last.ckpt"], needs=fit),
    ]
    for kind, study, whole, rounds in (("maskgit", configs / "maskgit.yaml", "all", 3),
                                       ("dimoo", configs / "dimoo.yaml", json.dumps(DIMOO_WHOLE), 2)):
        sizes = []
        if small:                   # test sizes, and one point beside the reference
            headline = {"maskgit": "shortcut N32/B9", "dimoo": "shortcut N64/B14"}[kind]
            sizes = ["--base_config", json.dumps(SMALL[kind]["base_config"]),
                     "--network", json.dumps(SMALL[kind]["network"]), "--batch", "1", "--warmup", "0",
                     "--points", json.dumps([headline])]
            whole, rounds = json.dumps([headline]), 1
        compile_both = ["--compile", "true"] if kind == "maskgit" and not small else []   # with and without
        steps.append(Step(f"speed {kind} (full size, random weights)",
                          [*migm, "speed", "--study", str(study), "--device", device, "--whole", whole,
                           "--rounds", str(rounds), *compile_both, *sizes,
                           "--out", str(out / f"{kind}{'_small' if small else ''}_{tag}.jsonl")]))
    return steps


def select(steps: list[Step], names: list[str] | None) -> list[Step]:
    """The steps `names` picks, each a step's name or its first words ("speed", "fit"), in plan
    order; None: all. An unknown name is refused, listing the steps."""
    if not names:
        return steps
    picks = {n: [s for s in steps if s.name == n or s.name.startswith(n + " ")] for n in names}
    if unknown := [n for n, found in picks.items() if not found]:
        raise ValueError(f"gpu-check --steps: no step {unknown[0]!r}; the steps: "
                         f"{', '.join(s.name for s in steps)}")
    chosen = {id(s) for found in picks.values() for s in found}
    return [s for s in steps if id(s) in chosen]                     # in plan order


def run(steps: list[Step], log=print, after: Callable[[], None] = lambda: None) -> bool:
    """Each step in turn, its output passed through. A failure does not stop the others; a step
    whose `needs` ran here and did not pass is skipped. `after` runs after every step (the
    summary is rewritten there, so a run killed at its time limit still says what it did)."""
    failed: set[str] = set()
    for i, step in enumerate(steps, 1):
        head = f"[gpu-check {i}/{len(steps)}] {step.name}"
        if step.needs in failed:
            step.skipped = f"needs {step.needs}, which did not pass"
            failed.add(step.name)
            log(f"{head}: skipped ({step.skipped})")
            after()
            continue
        log(f"{head}: {' '.join(step.argv[1:])}")
        start = time.perf_counter()
        done = subprocess.run(step.argv, env={**os.environ, **step.env})
        step.seconds, step.returncode = round(time.perf_counter() - start, 1), done.returncode
        if done.returncode != 0:
            failed.add(step.name)
        log(f"{head}: {'ok' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} "
            f"in {step.seconds} s")
        after()
    return not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migm.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="test sizes (the CPU dry run)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("docs/gpu"))
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout (configs/, tests/)")
    parser.add_argument("--steps", nargs="+", metavar="NAME",
                        help="run only these steps (a name or its first words: 'speed', 'fit')")
    args = parser.parse_args(argv)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False): run it on a machine "
              "with a GPU, or `python -m migm.gpu_check --small --device cpu` for the dry run",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    tag = device_tag(name)
    try:
        steps = select(plan(args.device, args.small, args.out, tag, args.root), args.steps)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    path = args.out / f"check_{'small_' if args.small else ''}{tag}.json"
    ok = run(steps, after=lambda: write_summary(path, name, args.small, steps))
    write_summary(path, name, args.small, steps, ok)
    total = sum(s.seconds or 0 for s in steps)
    bad = [s.name for s in steps if s.returncode != 0]
    print(f"gpu-check: {'passed' if ok else 'FAILED (' + '; '.join(bad) + ')'} on {name} in "
          f"{total:.0f} s; wrote {path}")
    return 0 if ok else 1


def write_summary(path: Path, device: str, small: bool, steps: list[Step], ok: bool | None = None) -> None:
    """The steps so far (seconds, exit status, why skipped), atomically; `ok` None: still running."""
    import torch

    from migm.files import atomic_write_bytes
    summary = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "small": small,
               "ok": ok, "steps": [{"name": s.name, "command": " ".join(s.argv[1:]), "seconds": s.seconds,
                                    "returncode": s.returncode, "skipped": s.skipped} for s in steps]}
    atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


if __name__ == "__main__":
    sys.exit(main())
