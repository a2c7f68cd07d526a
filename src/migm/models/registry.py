"""Which base MIGM a config names, and where its weights come from.

The embedded default (`tiny`) ships inside the package. Real models are loaded from local paths
only (nothing is downloaded at run time); when a file is missing the error says which one and
how to obtain it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from migm.models.assets import CheckpointError

BaseKind = Literal["tiny", "maskgit", "dimoo"]

HOW_TO_GET = {
    "maskgit": "MaskGIT (Besnier & Chen 2023): download the ImageNet-512 transformer checkpoint and its "
               "VQGAN from the releases listed in the valeoai/Maskgit-pytorch README, then pass their "
               "local paths as --model.init_args.base and --model.init_args.tokenizer",
    "dimoo": "Lumina-DiMOO: download the checkpoint directory named in the Alpha-VLLM/Lumina-DiMOO "
             "README (it holds config.json and the safetensors shards), then pass it as "
             "--model.init_args.base",
}


# What a Lumina-DiMOO checkpoint directory holds (Alpha-VLLM/Lumina-DiMOO's release layout): the
# weights index (or one model.safetensors), the text tokenizer, and the VQ folder
DIMOO_FILES = ("config.json", "model.safetensors.index.json", "tokenizer_config.json")
DIMOO_VQ_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def check_files(kind: BaseKind, base: str | Path, tokenizer: str | Path = "",
                prompts: str | Path | None = None) -> None:
    """Raise one CheckpointError naming every file a real base needs that is not on disk (and
    what a DiMOO directory must hold), reading none: the modules call it when they are built, so
    a command stops at once, before a trainer, a GPU or a DDP launch is set up."""
    problems = []
    if kind == "maskgit":
        problems = [f"{what} {p} not found" for what, p in (("transformer checkpoint", base),
                                                            ("VQGAN checkpoint", tokenizer))
                    if p and not Path(p).is_file()]
    elif kind == "dimoo":
        root = Path(base)
        vq = Path(tokenizer) if tokenizer else root / "vqvae"
        vq_name = vq.relative_to(root) if vq.is_relative_to(root) else vq
        needs = (f"it must hold config.json, model.safetensors.index.json and its shards (or "
                 f"model.safetensors), the text tokenizer (tokenizer_config.json, tokenizer.json), "
                 f"{vq_name}/config.json and {vq_name}/diffusion_pytorch_model.safetensors")
        if not root.is_dir():
            problems.append(f"checkpoint directory {root} not found ({needs})")
        else:
            lacks = [f for f in DIMOO_FILES if not (root / f).is_file()]
            if "model.safetensors.index.json" in lacks and (root / "model.safetensors").is_file():
                lacks.remove("model.safetensors.index.json")
            lacks += [f"{vq_name}/{f}" for f in DIMOO_VQ_FILES if not (vq / f).is_file()]
            if lacks:
                problems.append(f"checkpoint directory {root} lacks {', '.join(lacks)} ({needs})")
    if prompts and not Path(prompts).is_file():
        problems.append(f"prompt file {prompts} not found (one prompt per line, or JSONL)")
    if problems:
        raise CheckpointError(f"{kind} base model: {'; '.join(problems)}. {HOW_TO_GET[kind]}.")


def load_base(kind: BaseKind, base: str | Path, tokenizer: str | Path, config=None, **options):
    """The base model behind the protocol the loop and the accelerators use (see models/tiny.py).

    `config` is the adapter's own config where it has one, or a dict of its fields (from YAML):
    maskgit: a MaskGITConfig, None meaning the released ImageNet-512 model; dimoo: a DiMOOConfig,
    None meaning the checkpoint's config.json. dimoo: `base` is the checkpoint directory,
    `tokenizer` its VQ folder ("" for base/vqvae), and `options` go to DiMOOMIGM.from_checkpoint
    (prompts, dtype, device).
    """
    if kind in ("tiny", "maskgit") and options:       # never silently dropped (a prompt file)
        raise ValueError(f"base_kind {kind}: {', '.join(sorted(options))} apply to a text-to-image "
                         "base only (dimoo); class ids need no prompt file")
    if kind == "tiny":
        from migm.models.tiny import TinyMIGM
        return TinyMIGM.from_assets(base, tokenizer)
    missing = [str(p) for p in (base, tokenizer) if p and not Path(p).exists()]
    if missing:
        raise CheckpointError(f"{kind} base model: {', '.join(missing)} not found. {HOW_TO_GET[kind]}.")
    if kind == "maskgit":
        from migm.models.maskgit import MaskGITConfig, MaskGITMIGM
        if isinstance(config, dict):                 # from a YAML config: the fields to override
            config = MaskGITConfig(**config)
        return MaskGITMIGM.from_checkpoints(base, tokenizer, config)
    if kind == "dimoo":
        from migm.models.dimoo import DiMOOConfig, DiMOOMIGM
        if isinstance(config, dict):
            config = DiMOOConfig(**config)
        return DiMOOMIGM.from_checkpoint(base, tokenizer or None, config, **options)
    raise ValueError(f"unknown base_kind {kind!r}: expected one of tiny, maskgit, dimoo")
