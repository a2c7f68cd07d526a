"""The project's own subcommands (see cli.py): plain functions with typed, documented arguments."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch

from migm.ckpt import load_lightning_checkpoint
from migm.data.collection import CollectionModule
from migm.data.throughput import (
    bytes_per_trajectory,
    collection_rate,
    loader_rate,
    recompress,
    shortcut_step_rate,
)
from migm.evaluation.bench import end_to_end, shortcut_costs, step_costs
from migm.evaluation.curves import plot_step_curves, read_step_curves
from migm.evaluation.grid import GridConfig
from migm.evaluation.images import save_grid
from migm.evaluation.report import format_table, write_report
from migm.evaluation.setup import MetricsConfig, build_metrics
from migm.evaluation.vanilla import reconstruction_row, score_steps
from migm.files import CheckpointError, atomic_write_bytes
from migm.models.assets import ASSET_DIR, save_checkpoint
from migm.models.tiny import TinyMIGM
from migm.sampling.loop import VanillaSource
from migm.sampling.loop import generate as run_loop
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork, load_shortcut
from migm.training.shortcut import ShortcutModule

# Which submodule of each training LightningModule holds the weights that ship.
_EXPORT_PREFIX = {"tokenizer": "tokenizer.", "base": "ema.", "classifier": "net.", "shortcut": "ema."}


def export(kind: Literal["tokenizer", "base", "classifier", "shortcut"], checkpoint: Path,
           out: Path | None = None, trained_with: str = "") -> Path:
    """Turn a Lightning training checkpoint into a small fp16 asset recorded in the manifest.

    Args:
        kind: which part of the embedded default it is.
        checkpoint: a `.ckpt` written by `python -m migm fit` (configs/base/*.yaml, or a
            shortcut config such as configs/tiny.yaml).
        out: destination; defaults to src/migm/assets/<kind>.pt.
        trained_with: the command that produced `checkpoint`, recorded in the manifest.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_lightning_checkpoint(checkpoint)
    prefix = _EXPORT_PREFIX[kind]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{checkpoint}: no weights under '{prefix}', is it a {kind} checkpoint?")
    config = ckpt["hyper_parameters"].get("network" if kind == "shortcut" else "config")
    if isinstance(config, dict) and "class_path" in config:      # LightningCLI saved the choice
        if kind == "shortcut" and config["class_path"] != "migm.shortcut.network.ShortcutConfig":
            raise CheckpointError(f"{checkpoint}: export ships the embedded ShortcutNetwork; this "
                                  f"checkpoint's network is {config['class_path']}")
        config = config.get("init_args", {})
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    out = Path(out) if out is not None else ASSET_DIR / f"{kind}.pt"
    exported_with = "python -m migm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    digest = save_checkpoint(out, kind, config, state, command=trained_with or exported_with,
                             metrics={"train_step": int(ckpt.get("global_step", 0)),
                                      **_monitored(ckpt)})
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:16]}...)")
    return out


def _monitored(ckpt: dict) -> dict:
    """The ModelCheckpoint's monitored value (e.g. val/rel_err of the best shortcut), if any."""
    out = {}
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            monitor = key.split("'monitor': '")[1].split("'")[0] if "'monitor': '" in key else "best"
            out[monitor.replace("/", "_")] = round(float(state["best_model_score"]), 4)
    return out


def _load_base(base: str, tokenizer: str):
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
             metrics: MetricsConfig = MetricsConfig(), latency_batch: int = 64, latency_repeats: int = 3,
             base: str = "base.pt", tokenizer: str = "tokenizer.pt",
             out_dir: Path = Path("runs/eval/vanilla")) -> list[dict]:
    """Score vanilla generation at several N: FID, class accuracy, latency per image.

    Writes results.jsonl (one row per N) and a sample grid per N under `out_dir`.

    Args:
        steps: the step counts N to evaluate.
        num_samples: generated images per N (balanced over classes).
        batch_size: generation batch size.
        seed: batch b uses seed + b, identically for every N.
        schedule: mask schedule.
        sampler: temperatures and CFG weight.
        metrics: what samples are measured against (evaluation/setup.py MetricsConfig; e.g.
            --metrics.fid inception, --metrics.reference_samples 1000, --metrics.clip_path DIR
            for CLIPScore against the class names, --metrics.cache_dir for the reference cache).
        latency_batch: batch size for the latency measurement.
        latency_repeats: timed repeats (median) after one warm-up.
        base: base model weights.
        tokenizer: tokenizer weights.
        out_dir: output directory.
    """

    model = _load_base(base, tokenizer)
    quality = build_metrics(metrics, model, "tiny")
    recon = reconstruction_row(model, quality, num_samples)
    config = GridConfig(schedule=schedule, sampler=sampler, latency_batch=latency_batch,
                        latency_repeats=latency_repeats, seed=seed)
    rows, grid = score_steps(model, quality, steps, num_samples=num_samples, batch_size=batch_size,
                             config=config)
    files = write_report(rows, {f"vanilla {p.label}": grid.samples(p) for p in grid.points},
                         Path(out_dir), extra_rows=[recon])
    print(format_table(rows))
    summary = ", ".join(f"{k} {v:.3f}" for k, v in recon.items() if k not in ("method", "label", "num_samples"))
    print(f"tokenizer reconstruction: {summary}")
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return rows + [recon]


def bench(batch_size: int = 64, repeats: int = 5, steps: int = 32, budgets: list[int] = [4, 8],
          trajectories: Path | None = Path("runs/trajectories/tiny"), base: str = "base.pt",
          tokenizer: str = "tokenizer.pt", shortcut: str = "shortcut.pt",
          out: Path = Path("runs/bench/bench.json"), wandb: bool = True, group: str | None = None) -> dict:
    """Speed and size numbers: per-call costs, end-to-end speedup, collection and loader rates.

    Args:
        batch_size: images per generation call (the networks see 2x rows with CFG).
        repeats: timed repeats after one warm-up; medians are reported.
        steps: N for the end-to-end table (vanilla N vs shortcut N/B).
        budgets: the budgets B of the end-to-end table.
        trajectories: a recorded shard directory for the data numbers (skipped if absent).
        base: base model weights.
        tokenizer: tokenizer weights.
        shortcut: shortcut weights (an untrained network of the default shape if absent: same cost).
        out: where the JSON is written.
        wandb: also log the numbers as a W&B run of job type `bench` (offline unless logged in),
            its files beside `out`.
        group: that run's W&B group (a study's name, to sit beside its collect, fit and test).
    """
    import json

    config = {"batch_size": batch_size, "repeats": repeats, "steps": steps, "budgets": budgets,
              "trajectories": str(trajectories), "base": base, "tokenizer": tokenizer,
              "shortcut": shortcut}

    model = _load_base(base, tokenizer)
    net = _shortcut_or_default(shortcut, model)
    results = {"step_costs": step_costs(model, batch_size=batch_size, repeats=repeats),
               "shortcut_vs_base": shortcut_costs(model, net, batch_size=batch_size, repeats=repeats),
               "end_to_end": end_to_end(model, net, steps, budgets, batch_size=batch_size, repeats=repeats)}
    if trajectories is not None and (Path(trajectories) / "manifest.json").exists():
        results["data"] = _data_bench(Path(trajectories), Path(out).parent, base, tokenizer)
    atomic_write_bytes(Path(out), lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    for section, values in results.items():
        print(f"[{section}]")
        for row in values if isinstance(values, list) else [values]:
            print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"wrote {out}")
    if wandb:
        from migm.evaluation.wandb_log import log_bench
        from migm.run import default_wandb_mode
        default_wandb_mode()
        print(f"W&B run: {log_bench(results, Path(out).parent, config, group)}")
    return results


def curves(logs: list[Path], metric: str = "rel_err", out: Path = Path("step_curves.png")) -> Path:
    """Plot a shortcut run's held-out per-step curves (one line per validation epoch).

    Args:
        logs: the run's CSVLogger files, e.g. runs/tiny/csv/version_*/metrics.csv (a resumed run
            has one per version).
        metric: rel_err, cosine or argmax_agree.
        out: the PNG to write.
    """
    path = plot_step_curves(read_step_curves([Path(p) for p in logs], metric), Path(out), metric)
    print(f"wrote {path}")
    return path


def _shortcut_or_default(name: str, model):
    if (ASSET_DIR / name).exists() or Path(name).exists():
        return load_shortcut(name).eval()
    return ShortcutNetwork(ShortcutConfig(feature_dim=model.feature_dim, vocab_size=model.vocab_size,
                                          num_tokens=model.num_tokens)).eval()


def _data_bench(source: Path, work: Path, base: str, tokenizer: str) -> list[dict]:
    """Collection rate, then size and loader rate (0 and 2 workers) per compression."""
    import json


    manifest_steps = json.loads((source / "manifest.json").read_text())["schema"]["steps"]
    rows = [{"collection_trajectories_per_s": collection_rate(
        CollectionModule(base=base, tokenizer=tokenizer, steps=manifest_steps)), "steps": manifest_steps}]
    module = ShortcutModule(base=base, tokenizer=tokenizer)
    rows.append({"shortcut_train_step_samples_per_s": shortcut_step_rate(module, [source])})
    for compression in (None, "lzf", "gzip"):
        d = recompress(source, work / f"shards_{compression or 'none'}", compression)
        rows.append({"compression": compression or "none", "bytes_per_trajectory": bytes_per_trajectory([d]),
                     "loader_samples_per_s_0_workers": loader_rate([d], num_workers=0),
                     "loader_samples_per_s_2_workers": loader_rate([d], num_workers=2)})
    return rows


def speed(study: str | None = None, overrides: list[str] = [], batch: int | None = None, depths: list[int] = [1, 2],
          whole: list[str] = [], check_depth: int | None = None, points: list[str] | None = None,
          rounds: int = 3, warmup: int = 1, compile: bool = False, compile_backend: str = "inductor",
          base_config: dict | None = None, network: dict | None = None, device: str = "cpu",
          precision: Literal["16-mixed", "bf16-mixed", "32-true"] | None = None, seed: int = 0,
          out: Path = Path("runs/speed/speed.jsonl")) -> list[dict]:
    """Latency, speedup and memory of every grid point of a study config at its base's real size,
    random weights (speed and memory do not depend on them), composed from two shallow copies of
    the base (evaluation/speed.py): one row per point to `out` (JSON lines).

    Args:
        study: the study's config, as `test` takes it (configs/maskgit.yaml): its model section
            names the base and the shortcut network, its evaluation section the grid, schedule,
            sampler, reference steps and latency batch.
        overrides: config files merged over it in order, as `test --config A --config B` does.
        batch: images per generation call (default: the config's evaluation.latency_batch).
        depths: the two depths d1 < d2 of the base every point runs at; [0, 1] (no layer, one
            real layer) is the `one_layer` composition, for a base too big to run whole here.
        whole: points ("vanilla N8", "shortcut N15/B7"; [all]: every one) also run whole at the
            check depth, so their rows say how far the composition is from the measurement.
        check_depth: the depth `whole` points run at (default the base's own; smaller where the
            whole base is too slow here, e.g. 2 for DiMOO-8B on a CPU).
        points: run only these points (and the reference vanilla); default every point.
        rounds: timed rounds (every point and depth once per round).
        warmup: untimed calls of each before the rounds.
        compile: also time every run with the base's blocks and the shortcut under torch.compile
            (sampling/compiled.py), in the same rounds: rows gain compiled latency and speedup.
        compile_backend: torch.compile's backend (inductor; aot_eager traces without generating
            code, a quick check that every block and the shortcut compile whole).
        base_config: fields of the base's config to override (a smaller grid, fewer heads).
        network: fields of the shortcut network's config to override (its init_args).
        device: cpu or cuda.
        precision: the autocast generation runs under (default: the config's on cuda, none on cpu).
        seed: the random weights' seed and the generation's.
        out: where the rows go (JSON lines, replaced atomically); beside it the same name as a
            Markdown table (.md) and a picture of our speedups beside the paper's (.png).
    """
    import json

    from migm.evaluation.speed import SpeedStudy, build_models, random_shortcut
    from migm.evaluation.speed_report import plot_speedups, speed_table

    if not study:
        raise ValueError("speed: give the study's config, e.g. --study configs/maskgit.yaml")
    configs = [study, *overrides]
    sections = study_sections(configs, network)
    spec, grid = sections["model"], sections["evaluation"]
    kind = spec.get("base_kind", "tiny")
    if kind not in ("maskgit", "dimoo"):
        raise ValueError(f"speed: {configs[0]} has base_kind {kind!r}; real sizes exist for the "
                         "maskgit and dimoo bases (the embedded default is timed by `test` itself)")
    config = _base_config(kind, {**(spec.get("base_config") or {}), **(base_config or {})})
    precision = precision or (sections["precision"] if device.startswith("cuda") else None)
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision or "")
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if dtype else nullcontext
    options = {"device": device} | ({"dtype": torch.float32} if kind == "dimoo" and dtype is None else {})
    models = build_models(kind, config, tuple(depths), whole=bool(whole), seed=seed,
                          check_depth=check_depth, **options)
    any_model = models.models[depths[0]]
    shortcut = None
    if any(m.needs_shortcut for m in grid.methods):
        shortcut = random_shortcut(sections["network"], seed, device)
    study = SpeedStudy(models, shortcut, grid, batch or grid.latency_batch, whole=whole,
                       rounds=rounds, warmup=warmup, seed=seed, autocast=autocast, only=points,
                       compile=compile, compile_backend=compile_backend)
    print(f"speed: {kind} at depth {models.depth} composed from {models.composed_from}, "
          f"{any_model.num_tokens} tokens, batch {study.batch}, {len(study.points)} points, "
          f"{rounds} rounds on {device}")
    rows = study.rows(study.measure(progress=_progress("timing")))
    rows = [{**r, "precision": precision or "32-true", "config": [str(c) for c in configs]} for r in rows]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(Path(out), lambda tmp: tmp.write_text(text))
    table = speed_table(rows)
    atomic_write_bytes(Path(out).with_suffix(".md"), lambda tmp: tmp.write_text(table))
    plot_speedups(rows, Path(out).with_suffix(".png"))
    for r in rows:
        check = (f", composed/measured {r['composed_over_measured']:.3f}"
                 if "composed_over_measured" in r else "")
        print(f"  {r['method']} {r['label']}: {r['latency_ms_per_image']:.0f} ms/image, speedup "
              f"{r['speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x){check}")
    print(f"wrote {out} and its table and picture ({Path(out).with_suffix('.md').name}, "
          f"{Path(out).with_suffix('.png').name})")
    return rows


def study_sections(configs: list[str], network: dict | None = None) -> dict:
    """The model spec, the grid (an EvaluationConfig), the shortcut network config (`network`:
    init_args to override) and the generation precision of a study's config files, merged in
    order as `test` merges them."""
    from jsonargparse import ArgumentParser

    from migm.files import read_yaml
    from migm.run import enable_method_classes
    from migm.evaluation.module import EvaluationConfig
    from migm.shortcut.network import NetworkConfig, ShortcutConfig

    merged: dict = {}
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"speed: config {path} not found")
        merged = _merge(merged, read_yaml(Path(path)) or {})
    if network:
        merged = _merge(merged, {"model": {"init_args": {"network": {"init_args": network}}}})
    model = (merged.get("model") or {}).get("init_args") or {}
    enable_method_classes()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EvaluationConfig, "evaluation", fail_untyped=False)
    parser.add_argument("--network", type=NetworkConfig | None, default=None)
    parsed = parser.parse_object({"evaluation": merged.get("evaluation") or {},
                                  "network": model.get("network")})
    init = parser.instantiate_classes(parsed)
    precision = init.evaluation.precision or (merged.get("trainer") or {}).get("precision")
    return {"model": model, "evaluation": init.evaluation, "network": init.network or ShortcutConfig(),
            "precision": precision}


def _merge(a: dict, b: dict) -> dict:
    """b over a, dicts merged key by key (as jsonargparse merges a second --config)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _base_config(kind: str, fields_: dict):
    from migm.models.random_weights import config_from
    from migm.models.registry import DiMOOConfig, MaskGITConfig
    return config_from(MaskGITConfig if kind == "maskgit" else DiMOOConfig, fields_)


def _progress(desc: str):
    from tqdm.auto import tqdm
    return lambda it: tqdm(it, desc=desc, unit="call", leave=False)
