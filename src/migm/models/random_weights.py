"""Base models at their reference architectures with seeded random weights: speed and memory only.

Latency and memory do not depend on the values of the weights, only on their shapes, so the
speed half of the paper's tables can be measured without the released checkpoints: a config's
`base: random` (or `random:SEED`) builds the adapter the config names at the architecture its
`base_config` gives (None: the reference's, MaskGIT-512 or Lumina-DiMOO-8B as its config.json
sets LLaDA-8B up) and fills every weight from one seeded generator. Such a model marks itself
`weights = "random"`, and every quality metric on it is refused (evaluation/setup.py): its images
are noise by construction.

What stands in for files the released model reads:
- DiMOO's text tokenizer: each condition is a fixed run of `prompt_tokens` text ids (the
  unconditional one `uncond_tokens`), drawn from the text part of the vocabulary. What matters
  for cost is the length of the sequence, prompt + 4 + H (W + 1) image-part rows;
- DiMOO's VQ decoder: diffusers' VQModel at aMUSEd's VQ-GAN configuration (16x down, 64 latent
  channels, 8,192 codes), as diffusers' aMUSEd conversion builds it.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from migm.models.checkpoints import RANDOM


# aMUSEd's VQ-GAN as a diffusers VQModel config (the shape Lumina-DiMOO's vqvae/config.json has)
AMUSED_VQ = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 5,
             "up_block_types": ["UpDecoderBlock2D"] * 5, "block_out_channels": [128, 256, 256, 512, 768],
             "layers_per_block": 2, "act_fn": "silu", "latent_channels": 64, "sample_size": 32,
             "num_vq_embeddings": 8192, "norm_num_groups": 32, "vq_embed_dim": None,
             "scaling_factor": 0.18215, "norm_type": "group", "mid_block_add_attention": False,
             "lookup_from_codebook": True, "force_upcast": False}


@torch.no_grad()
def fill_random(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Every parameter from one generator, in parameter order: N(0, std) for matrices and tables,
    1 for norm scales and 0 for biases (the usual init, so activations keep their scale and no
    step overflows in bf16). Drawn where the weights live, so an 8B model fills in seconds on a
    GPU: the same seed gives the same weights on every device of one type."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        if p.dim() < 2:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        g = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(std))
    return module


def _materialise(build, seed: int, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """`build()` on the meta device, then allocated on `device` in `dtype` and filled: no time
    is spent on an init whose values are overwritten, and an 8B model never exists in fp32."""
    with torch.device("meta"):
        module = build().to(dtype)                 # shapes and dtypes only: nothing allocated yet
    module = module.to_empty(device=device)
    for buf_name, buf in list(module.named_buffers()):     # meta buffers have no values: none here
        if buf.is_meta:
            raise RuntimeError(f"{type(module).__name__}.{buf_name}: a buffer cannot be rebuilt randomly")
    return fill_random(module, seed)


def random_maskgit(config=None, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """MaskGIT (MaskGITConfig(); grid_size 16 is the ImageNet-256 model) with random weights."""
    from migm.models.maskgit import MaskGITConfig, MaskGITMIGM, MaskGITTransformer, VQGANDecoder

    config = config_from(MaskGITConfig, config)
    model = MaskGITMIGM(_materialise(lambda: MaskGITTransformer(config), seed, dtype, device),
                        _materialise(lambda: VQGANDecoder(config), seed + 1, torch.float32, device))
    model.weights = RANDOM
    return model.eval()


def random_dimoo(config=None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", prompts: int = 4, prompt_tokens: int = 64,
                 uncond_tokens: int = 20, vq: dict | None = None):
    """Lumina-DiMOO (DiMOOConfig(): LLaDA-8B, 64x64 grid) with random weights, `prompts`
    conditions of `prompt_tokens` text ids each; `vq`: the VQModel config (default aMUSEd's, with
    the transformer's codebook size)."""
    from diffusers import VQModel

    from migm.models.dimoo import DiMOOMIGM
    from migm.models.llada import LLaDA, DiMOOConfig

    config = config_from(DiMOOConfig, config)
    llm = _materialise(lambda: LLaDA(config), seed, dtype, device)
    vq = vq or {**AMUSED_VQ, "num_vq_embeddings": config.codebook_size}    # a smaller K: fewer codes
    vq_model = _materialise(lambda: VQModel(**vq), seed + 1, torch.float32, device)
    if vq_model.config.num_vq_embeddings != config.codebook_size:
        raise ValueError(f"random DiMOO: the VQ config has {vq_model.config.num_vq_embeddings} codes, "
                         f"the transformer expects K = {config.codebook_size}")
    g = torch.Generator().manual_seed(seed + 2)
    text = min(config.mask_token_id, config.image_token_offset)        # ids below are text
    ids = [torch.randint(0, text, (prompt_tokens,), generator=g).tolist() for _ in range(prompts)]
    ids.append(torch.randint(0, text, (uncond_tokens,), generator=g).tolist())
    names = [f"random prompt {i} ({prompt_tokens} tokens)" for i in range(prompts)]
    model = DiMOOMIGM(llm, vq_model.eval().requires_grad_(False), ids, names).to(device)
    model.weights = RANDOM
    return model.eval()


def random_base(kind: str, config=None, seed: int = 0, **options):
    """The adapter of `kind` (maskgit, dimoo) at `config` (a config object, a dict of its
    fields, None: the reference's) with random weights. options: dtype, device, and for dimoo
    the prompt table's shape (random_dimoo)."""
    if kind == "maskgit":
        return random_maskgit(config, seed, **options)
    if kind == "dimoo":
        return random_dimoo(config, seed, **options)
    raise ValueError(f"model.base: random weights exist for the maskgit and dimoo bases, not {kind!r}")


def config_from(cls, config):
    """`config` as a `cls` (MaskGITConfig, DiMOOConfig): itself, a dict of its fields (an
    unknown one named as model.base_config's), or None for the reference's."""
    if config is None:
        return cls()
    if isinstance(config, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"model.base_config: {unknown[0]} is not a {cls.__name__} field")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return config


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
