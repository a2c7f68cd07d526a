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
the steps (seconds, exit status) to docs/gpu/check_<device>.json. Without a CUDA device it stops
at once with one line. `--small` is the CPU-sized dry run the tests run: the same steps and
commands at test sizes, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
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
    seconds: float | None = None
    returncode: int | None = None


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
    steps = [
        Step("device tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests" / "test_device.py")]),
        Step("collect (embedded default)", [*migm, "collect", "--config", str(configs / "collect_tiny.yaml"),
                                            "--config", str(experiments / "collect.yaml"),
                                            *on_cpu[:2], *collect_sizes]),
        Step(f"fit (embedded default, {'bf16-mixed' if device == 'cuda' else '32-true'})",
             [*migm, "fit", *tiny, *fit_sizes]),
        Step("test (embedded default)", [*migm, "test", *tiny, *fit_sizes,
                                         "--ckpt_path", "runs/gpu_check/checkpoints/last.ckpt"]),
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


def run(steps: list[Step], log=print) -> bool:
    """Each step in turn, its output passed through; stops at the first that fails."""
    for i, step in enumerate(steps, 1):
        log(f"[gpu-check {i}/{len(steps)}] {step.name}: {' '.join(step.argv[1:])}")
        start = time.perf_counter()
        done = subprocess.run(step.argv, env={**os.environ, **step.env})
        step.seconds, step.returncode = round(time.perf_counter() - start, 1), done.returncode
        log(f"[gpu-check {i}/{len(steps)}] {step.name}: "
            f"{'ok' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} in {step.seconds} s")
        if done.returncode != 0:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migm.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="test sizes (the CPU dry run)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("docs/gpu"))
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout (configs/, tests/)")
    args = parser.parse_args(argv)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False): run it on a machine "
              "with a GPU, or `python -m migm.gpu_check --small --device cpu` for the dry run",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    tag = device_tag(name)
    steps = plan(args.device, args.small, args.out, tag, args.root)
    ok = run(steps)
    summary = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "small": args.small,
               "ok": ok, "steps": [{"name": s.name, "command": " ".join(s.argv[1:]), "seconds": s.seconds,
                                    "returncode": s.returncode} for s in steps]}
    from migm.files import atomic_write_bytes
    path = args.out / f"check_{'small_' if args.small else ''}{tag}.json"
    atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    total = sum(s.seconds or 0 for s in steps)
    print(f"gpu-check: {'passed' if ok else 'FAILED'} on {name} in {total:.0f} s; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
