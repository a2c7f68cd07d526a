"""What each real base's checkpoint files are, where they come from, and a check that they are on
disk that reads none of them (so a command stops at once, before a trainer or a GPU is set up).

Nothing is downloaded at run time: real models are loaded from local paths only, and a missing
file is one error naming it and how to obtain it (HOW_TO_GET).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from migm.files import CheckpointError

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


RANDOM = "random"          # model.base: random weights at the config's architecture


def random_seed(base: str | None) -> int | None:
    """`random` -> 0, `random:7` -> 7, anything else (a path) -> None."""
    text = str(base or "")
    if text == RANDOM:
        return 0
    if text.startswith(RANDOM + ":"):
        seed = text[len(RANDOM) + 1:]
        if not seed.isdigit():
            raise ValueError(f"model.base: {text!r}: random weights are `random` or `random:SEED` "
                             "with an integer seed")
        return int(seed)
    return None


def check_files(kind: BaseKind, base: str | Path, tokenizer: str | Path = "",
                prompts: str | Path | None = None) -> None:
    """Raise one CheckpointError naming every file a real base needs that is not on disk (and
    what a DiMOO directory must hold), reading none: the modules call it when they are built, so
    a command stops at once, before a trainer, a GPU or a DDP launch is set up."""
    problems = []
    if kind != "tiny" and random_seed(base) is not None:    # random weights: no file is read
        return
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
