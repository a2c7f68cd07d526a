"""Which base MIGM a config names: `load_base` builds its adapter from local files.

The embedded default (`tiny`) ships inside the package; MaskGIT and Lumina-DiMOO load from the
paths a config gives (models/checkpoints.py says which files, and where to get them).
"""

from __future__ import annotations

from pathlib import Path

from migm.files import CheckpointError
from migm.models.checkpoints import HOW_TO_GET, BaseKind, check_files, random_seed
from migm.models.dimoo import DiMOOConfig, DiMOOMIGM
from migm.models.maskgit import MaskGITConfig, MaskGITMIGM
from migm.models.random_weights import random_base
from migm.models.tiny import TinyMIGM

__all__ = ["BaseKind", "check_files", "load_base", "load_spec"]


def load_base(kind: BaseKind, base: str | Path, tokenizer: str | Path, config=None, **options):
    """The base model behind the protocol the loop and the accelerators use (see models/tiny.py).

    `config` is the adapter's own config where it has one, or a dict of its fields (from YAML):
    maskgit: a MaskGITConfig, None meaning the released ImageNet-512 model; dimoo: a DiMOOConfig,
    None meaning the checkpoint's config.json. dimoo: `base` is the checkpoint directory,
    `tokenizer` its VQ folder ("" for base/vqvae), and `options` go to DiMOOMIGM.from_checkpoint
    (prompts, dtype, device). `base: random` or `random:SEED` builds the architecture `config`
    names with seeded random weights instead (models/random_weights.py; `tokenizer` unused): for
    speed and memory only.
    """
    seed = random_seed(base) if kind != "tiny" else None
    if seed is not None:
        return random_base(kind, config, seed, **_random_options(kind, options))
    if kind in ("tiny", "maskgit") and options:       # never silently dropped (a prompt file)
        raise ValueError(f"base_kind {kind}: {', '.join(sorted(options))} apply to a text-to-image "
                         "base only (dimoo); class ids need no prompt file")
    if kind == "tiny":
        return TinyMIGM.from_assets(base, tokenizer)
    missing = [str(p) for p in (base, tokenizer) if p and not Path(p).exists()]
    if missing:
        raise CheckpointError(f"{kind} base model: {', '.join(missing)} not found. {HOW_TO_GET[kind]}.")
    if kind == "maskgit":
        if isinstance(config, dict):                 # from a YAML config: the fields to override
            config = MaskGITConfig(**config)
        return MaskGITMIGM.from_checkpoints(base, tokenizer, config)
    if kind == "dimoo":
        if isinstance(config, dict):
            config = DiMOOConfig(**config)
        return DiMOOMIGM.from_checkpoint(base, tokenizer or None, config, **options)
    raise ValueError(f"unknown base_kind {kind!r}: expected one of tiny, maskgit, dimoo")


def _random_options(kind: str, options: dict) -> dict:
    """A random DiMOO has as many conditions as the prompt file has prompts (their text needs
    the released tokenizer, so each is a fixed run of random text ids); dtype/device pass on."""
    options = dict(options)
    prompts = options.pop("prompts", None)
    if kind == "dimoo" and prompts is not None:
        if isinstance(prompts, (str, Path)):
            if not Path(prompts).is_file():
                raise CheckpointError(f"prompt file {prompts} not found (a random DiMOO has one "
                                      "condition per prompt)")
            from migm.models.prompts import read_prompt_file
            options["prompts"] = len(read_prompt_file(prompts).prompts)
        else:
            options["prompts"] = len(prompts)
    return options


def load_spec(spec: dict):
    """`load_base` from a module's base fields (base_kind, base, tokenizer, base_config, prompts)."""
    options = {"prompts": spec["prompts"]} if spec.get("prompts") else {}
    return load_base(spec["base_kind"], spec["base"], spec["tokenizer"], spec.get("base_config"), **options)
