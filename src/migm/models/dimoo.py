"""Lumina-DiMOO (Alpha-VLLM 2025) text-to-image behind the base-model protocol.

The accelerators need the last hidden state at the image positions and the image-code rows of the
output layer, and the released 8B checkpoint has to load unchanged without its remote code, so
the LLaDA transformer is re-written here with the reference's parameter names. The aMUSEd VQ
tokenizer is diffusers' own VQModel, loaded as the reference loads it (a re-write of its decoder
matched it to ~2e-5 on random weights, so the maintained one is used). Inference only: no
KV/ML-cache, no text generation.

Reference facts this relies on (Alpha-VLLM/Lumina-DiMOO at 81344e6: model/modeling_llada.py,
model/modeling_xllmx_dimoo.py, config.py, inference/inference_t2i.py, utils/prompt_utils.py,
utils/image_utils.py, generators/image_generation_generator.py):
- the network is LLaDA-8B's LLaDALlamaBlock stack: x += attn_out(SDPA(rope(q), rope(k), v)) with
  q/k/v_proj of RMSNorm(x), then x += ff_out(silu(ff_proj(h)) * up_proj(h)), h = RMSNorm(x);
  RMSNorm has a weight only and normalises in fp32 before casting back; RoPE rotates halves, in
  fp32, positions 0..T-1; attention is bidirectional and the wrapper's padding mask never reaches
  SDPA (t2i runs one prompt at a time); then ln_f and ff_out (wte when weight_tying) give logits;
- keys: model.transformer.{wte,ln_f,ff_out}.weight and model.transformer.blocks.{i}.{attn_norm,
  ff_norm,q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out}.weight (LLaDAModelLM keeps
  LLaDAModel as `model`), in HF safetensors shards named by model.safetensors.index.json;
- one vocabulary: image code k is token id 126356 + k (K = 8192), so image logits are the columns
  [126356, 126356 + K); mask 126336, newline 126084, <boi>/<eoi> 126349/126350, answer start/end
  126354/126355 (config.py, not config.json);
- the t2i sequence is tokenizer("<system>Generate an image according to the text prompt.</system>"
  "<user>" + prompt + "</user>") + [BOA, BOI] + H rows of (W tokens, NEWLINE) + [EOI, EOA]; CFG's
  unconditional branch is the same with the prompt "<uncondition>" and the same image part, mixed
  as (1 + w) cond - w uncond (the loop's `guide`); 64 steps, w = 4, cosine schedule;
- 1024x1024 images are 64x64 tokens (VQ scale 16), decoded by aMUSEd's VQ-GAN from vqvae/:
  VQModel.from_pretrained(ckpt, subfolder="vqvae"), then (utils/image_utils.py decode_vq_to_image)
  vqvae.decode(ids (1, h, w), force_not_quantize=True, shape=(1, h, w, latent_channels))
  .sample.clip(0, 1), i.e. codebook rows -> post_quant_conv -> Decoder, clipped to [0, 1].
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from migm.models.assets import CheckpointError
from migm.models.conditions import IdConditions
from migm.models.layers import LayerShape, Stream
from migm.models.registry import HOW_TO_GET

if TYPE_CHECKING:
    from diffusers import VQModel

# The condition table when none is given: placeholders so that the class-style callers
# (cond = arange(B) % num_classes) run; real runs pass their prompt file.
DEFAULT_PROMPTS = (
    "A photograph of a red fox sitting in fresh snow at sunrise.",
    "A bowl of ramen on a wooden table, steam rising, soft window light.",
    "An old lighthouse on a rocky coast under a stormy sky.",
    "A watercolor painting of a hot air balloon over green hills.",
)

# config.json options whose other values change the network; only the LLaDA-8B ones are written
_SUPPORTED = {"block_type": {"llama"}, "activation_type": {"silu"}, "layer_norm_type": {"rms"},
              "rope": {True}, "alibi": {False}, "attention_layer_norm": {False},
              "input_emb_norm": {False}, "scale_logits": {False}, "block_group_size": {1},
              "layer_norm_with_affine": {True}, "include_bias": {False},
              "include_qkv_bias": {False, None}, "bias_for_layer_norm": {False, None},
              "multi_query_attention": {False, None}}


@dataclass
class DiMOOConfig:
    """LLaDA fields named as in config.json, then the DiMOO token layout (config.py), then the grid.

    `from_json` reads every field the file has; a real config.json lacks the layout and grid
    fields, which keep the reference's values.
    """

    d_model: int = 4096            # D
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    vocab_size: int = 134548       # 126356 text ids + 8192 codes, as generate_image infers it
    embedding_size: int | None = None   # rows of wte / ff_out when set (padded vocabularies)
    weight_tying: bool = False
    mask_token_id: int = 126336
    newline_token_id: int = 126084
    boi_token_id: int = 126349
    eoi_token_id: int = 126350
    boa_token_id: int = 126354
    eoa_token_id: int = 126355
    image_token_offset: int = 126356
    codebook_size: int = 8192      # K
    grid_height: int = 64          # 1024 px / 16
    grid_width: int = 64
    system_prompt: str = "Generate an image according to the text prompt."

    def __post_init__(self) -> None:
        need = self.image_token_offset + self.codebook_size
        if self.rows < need:
            raise ValueError(f"{self.rows} vocabulary rows cannot hold the image codes "
                             f"{self.image_token_offset} + [0, {self.codebook_size})")
        if self.rows != need:       # the reference slices image logits at rows - K
            warnings.warn(f"{self.rows} vocabulary rows != image offset + K = {need}")

    @property
    def rows(self) -> int:
        return self.embedding_size or self.vocab_size

    @property
    def num_tokens(self) -> int:
        return self.grid_height * self.grid_width

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> DiMOOConfig:
        raw = json.loads(Path(path).read_text())
        bad = {k: raw[k] for k, ok in _SUPPORTED.items() if k in raw and raw[k] not in ok}
        if bad:
            raise CheckpointError(f"{path}: unsupported LLaDA options {bad}: this adapter implements "
                                  f"the LLaDA-8B block only, {_SUPPORTED}")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw} | overrides)


# --- the LLaDA transformer (model/modeling_llada.py: LLaDAModel with LLaDALlamaBlock) -----------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(T: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(2, T, head_dim) fp32 cos and sin of positions 0..T-1, frequencies repeated over halves."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float), inv).repeat(1, 2)
    return torch.stack([freqs.cos(), freqs.sin()])


def rope_at(rows: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(2, B, 1, M, head_dim) cos and sin at sequence rows (B, M): `rope_tables` gathered at any
    rows (the same fp32 products), shaped to broadcast over heads."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=rows.device, dtype=torch.float) / head_dim)
    freqs = (rows.float()[..., None] * inv).repeat(1, 1, 2)                         # (B, M, d)
    return torch.stack([freqs.cos(), freqs.sin()]).unsqueeze(2)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, d): RoPE in fp32 over (first half, second half) pairs, back in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos_sin[0] + torch.cat([-x2, x1], -1) * cos_sin[1]).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, c: DiMOOConfig) -> None:
        super().__init__()
        D, M = c.d_model, c.mlp_hidden_size
        self.heads, self.kv_heads = c.n_heads, c.n_kv_heads or c.n_heads
        kv = D // c.n_heads * self.kv_heads
        self.attn_norm, self.ff_norm = RMSNorm(D, c.rms_norm_eps), RMSNorm(D, c.rms_norm_eps)
        self.q_proj, self.k_proj = nn.Linear(D, D, bias=False), nn.Linear(D, kv, bias=False)
        self.v_proj, self.attn_out = nn.Linear(D, kv, bias=False), nn.Linear(D, D, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(D, M, bias=False), nn.Linear(D, M, bias=False)
        self.ff_out = nn.Linear(M, D, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D), cos_sin (2, T, d), mask (B, 1, 1, T) bool (True: a real key) or None."""
        h = self.attn_norm(x)
        q = rearrange(self.q_proj(h), "b t (h d) -> b h t d", h=self.heads)
        k, v = (rearrange(p(h), "b t (h d) -> b h t d", h=self.kv_heads)
                for p in (self.k_proj, self.v_proj))
        if self.kv_heads != self.heads:     # grouped-query: kv head j serves q heads j*r .. j*r + r-1
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(rotate(q, cos_sin), rotate(k, cos_sin), v, attn_mask=mask)
        x = x + self.attn_out(rearrange(a, "b h t d -> b t (h d)"))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    # --- per-layer access (models/layers.py: LayerAccess); forward above is these in order ---
    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_norm(h)

    def project(self, x: torch.Tensor, pe: torch.Tensor, which: str = "qkv") -> tuple[torch.Tensor, ...]:
        """x (B, M, D), pe (2, B, 1, M, d) from `rope_at` -> q (B, H, M, d) and k (B, Hkv, M, d)
        rotated at their rows, v (B, Hkv, M, d); k and v keep the kv heads (cache them small)."""
        maps = {"q": (self.q_proj, self.heads), "k": (self.k_proj, self.kv_heads),
                "v": (self.v_proj, self.kv_heads)}
        out = []
        for part in which:
            proj, heads = maps[part]
            y = rearrange(proj(x), "b t (h d) -> b h t d", h=heads)
            out.append(y if part == "v" else rotate(y, pe))
        return tuple(out)

    def project_attn(self, a: torch.Tensor) -> torch.Tensor:
        return self.attn_out(a)

    def mlp_branch(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ff_norm(h)
        return self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    """State-dict keys are the checkpoint's without its leading "model."."""

    def __init__(self, c: DiMOOConfig) -> None:
        super().__init__()
        self.config = c
        parts = {"wte": nn.Embedding(c.rows, c.d_model), "ln_f": RMSNorm(c.d_model, c.rms_norm_eps),
                 "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers))}
        if not c.weight_tying:
            parts["ff_out"] = nn.Linear(c.d_model, c.rows, bias=False)
        self.transformer = nn.ModuleDict(parts)

    def output_weight(self) -> torch.Tensor:
        t = self.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight

    def hidden(self, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """ids (B, T), valid (B, T) bool or None (all real) -> last block's output (B, T, D)."""
        c, x = self.config, self.transformer.wte(ids)
        cos_sin = rope_tables(ids.shape[1], c.d_model // c.n_heads, c.rope_theta, ids.device)
        mask = None if valid is None else valid[:, None, None, :]
        for block in self.transformer.blocks:
            x = block(x, cos_sin, mask)
        return x


# --- reading the reference files ------------------------------------------------------------------
def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"Lumina-DiMOO {what} not found at {path}. {HOW_TO_GET['dimoo']}.")
    return path


def _shard_map(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (sharded with an index, or one file)."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        for f in sorted(set(files.values())):
            _need(f, f"weight shard listed in {index.name}")
        return files
    return dict.fromkeys(_keys(_need(single, "model.safetensors.index.json (or model.safetensors)")),
                         single)


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return list(f.keys())


def _read(files: dict[str, tuple[Path, str]], shapes_only: bool = False,
          dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    """{our key: (file, its key there)} -> shapes from the headers, or tensors read and cast one
    at a time (an 8B checkpoint never sits in memory twice)."""
    from safetensors import safe_open

    out, by_file = {}, {}
    for ours, (f, theirs) in files.items():
        by_file.setdefault(f, []).append((ours, theirs))
    for f, pairs in by_file.items():
        with safe_open(f, "pt") as h:
            for ours, theirs in pairs:
                out[ours] = (tuple(h.get_slice(theirs).get_shape()) if shapes_only
                             else h.get_tensor(theirs).to(device=device, dtype=dtype))
    return out


def _check_fit(where: Path, what: str, found: dict, expected: dict, summary: str) -> None:
    """Raise naming the first keys that are missing, unexpected, or of the wrong shape."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file {tuple(found[k])}, expected {tuple(s)}"
              for k, s in expected.items() if k in found and tuple(found[k]) != tuple(s)]
    problems = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}"
                for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise CheckpointError(f"{where}: does not fit the {what} of this config ({summary}): "
                              + "; ".join(problems) + ".")


def _load(model: nn.Module, files: dict, where: Path, what: str, summary: str,
          dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """`model` built on the meta device: check names and shapes from the file headers, then read."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_fit(where, what, _read(files, shapes_only=True), expected, summary)
    model.load_state_dict(_read(files, dtype=dtype, device=device), assign=True)
    return model.eval().requires_grad_(False)


def load_llada(path: str | Path, c: DiMOOConfig, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu") -> LLaDA:
    with torch.device("meta"):
        model = LLaDA(c)
    files = {k.removeprefix("model."): (f, k) for k, f in _shard_map(Path(path)).items()}
    summary = (f"D={c.d_model}, {c.n_layers} layers, {c.n_heads} heads, MLP {c.mlp_hidden_size}, "
               f"{c.rows} vocabulary rows, weight_tying={c.weight_tying}")
    return _load(model, files, Path(path), "LLaDA transformer", summary, dtype, device)


def _vq_model_class() -> type:
    """diffusers' VQModel, imported on first use: only the DiMOO base needs it."""
    try:
        from diffusers import VQModel
    except ImportError as err:
        raise ImportError("Lumina-DiMOO's VQ tokenizer is loaded with diffusers' VQModel and "
                          "diffusers is missing: pip install 'diffusers>=0.39,<0.40'") from err
    return VQModel


def load_vq_decoder(path: str | Path, device: str | torch.device = "cpu") -> VQModel:
    """vqvae/ (a diffusers VQModel folder: config.json + diffusion_pytorch_model.safetensors) ->
    diffusers' VQModel in fp32, as the reference loads it. Names and shapes are checked against
    the file header first, because diffusers fills missing weights with random ones and only logs
    it; keys VQModel lacks are ignored, as diffusers ignores them, and named in a warning."""
    path = Path(path)
    config_file = _need(path / "config.json", "VQ tokenizer config")
    weights = _need(path / "diffusion_pytorch_model.safetensors", "VQ tokenizer weights")
    VQModel = _vq_model_class()
    try:
        with torch.device("meta"):
            empty = VQModel.from_config(VQModel.load_config(str(path)))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_file}: not a diffusers VQModel config ({err})") from err
    c, expected = empty.config, {k: v.shape for k, v in empty.state_dict().items()}
    if not c.lookup_from_codebook:       # decode(ids, force_not_quantize=True) needs the lookup
        raise CheckpointError(f"{config_file}: lookup_from_codebook is false; Lumina-DiMOO's VQ "
                              "(aMUSEd's) decodes code ids, which needs it true")
    found = _read({k: (weights, k) for k in _keys(weights)}, shapes_only=True)
    extra = sorted(k for k in found if k not in expected)
    summary = (f"channels {tuple(c.block_out_channels)}, {c.num_vq_embeddings} codes, latent "
               f"{c.latent_channels}, mid attention {c.mid_block_add_attention}")
    _check_fit(weights, "VQ tokenizer", {k: v for k, v in found.items() if k in expected}, expected,
               summary)
    if extra:
        warnings.warn(f"{weights}: {len(extra)} keys that diffusers' VQModel does not have are "
                      f"ignored: {extra[:4]}{' ...' if len(extra) > 4 else ''}", stacklevel=2)
    model = VQModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False,
                                    torch_dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def tokenize_prompts(tokenizer_dir: str | Path, prompts: Sequence[str],
                     system_prompt: str) -> list[list[int]]:
    """The reference's t2i templates, tokenised once: prompts' ids, then the unconditional one."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as err:
        raise CheckpointError(f"Lumina-DiMOO text tokenizer: cannot load it from {tokenizer_dir} "
                              f"({err}). {HOW_TO_GET['dimoo']}.") from err
    head = f"<system>{system_prompt}</system><user>"
    return [tok(head + p + "</user>")["input_ids"] for p in [*prompts, "<uncondition>"]]


def read_prompts(prompts: Sequence[str] | str | Path | None) -> list[str]:
    """None: DEFAULT_PROMPTS; a str or Path: a prompt file (plain text, one prompt per non-blank
    line, or JSONL; data/prompts.py)."""
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, (str, Path)):
        from migm.data.prompts import read_prompt_file
        prompts = read_prompt_file(prompts).prompts
    if not prompts:
        raise ValueError("the prompt table is empty: give at least one prompt")
    return list(prompts)


# --- the adapter ------------------------------------------------------------------------------------
class DiMOOMIGM(IdConditions, nn.Module):
    """Lumina-DiMOO text-to-image over a grid_height x grid_width token grid (64x64 -> 1024 px).

    Conditions: cond (B,) indexes a prompt table fixed at load time (num_classes = its size);
    id num_classes is the reference's unconditional prompt, the null class of the class-style
    loop. Image codes are 0..K-1 and the mask is id K here; `features` maps them to the joint
    vocabulary (126356 + k, 126336).
    """

    condition_name = ("prompt index", "prompt indices")   # cond indexes the prompt table

    def __init__(self, llm: LLaDA, vq: VQModel, prompt_ids: Sequence[Sequence[int]],
                 prompts: Sequence[str] = ()) -> None:
        super().__init__()
        c = llm.config
        if vq.config.num_vq_embeddings != c.codebook_size:
            raise CheckpointError(f"VQ tokenizer has {vq.config.num_vq_embeddings} codes, the "
                                  f"transformer expects K = {c.codebook_size}")
        self.llm, self.vq, self.config, self.prompts = llm, vq, c, list(prompts)
        lengths = torch.tensor([len(p) for p in prompt_ids])
        table = torch.zeros(len(prompt_ids), int(lengths.max()), dtype=torch.long)  # 0-padded
        for i, p in enumerate(prompt_ids):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.register_buffer("prompt_table", table, persistent=False)        # (C + 1, P)
        self.register_buffer("prompt_lengths", lengths, persistent=False)    # (C + 1,)
        # grid cell (r, w) sits 2 + r (W + 1) + w after the prompt: <answer><boi>, rows + newline
        H, W = c.grid_height, c.grid_width
        offsets = 2 + torch.arange(H)[:, None] * (W + 1) + torch.arange(W)
        self.register_buffer("grid_offsets", offsets.flatten(), persistent=False)   # (L,)

    @classmethod
    def from_checkpoint(cls, path: str | Path, vqvae: str | Path | None = None,
                        config: DiMOOConfig | None = None,
                        prompts: Sequence[str] | str | Path | None = None,
                        dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> DiMOOMIGM:
        """`path`: the HF checkpoint directory; `vqvae`: its VQ folder (default path/vqvae);
        `config`: default read from path/config.json; the VQ decoder stays fp32."""
        path = _need(Path(path), "checkpoint directory")
        config = config or DiMOOConfig.from_json(_need(path / "config.json", "config.json"))
        prompts = read_prompts(prompts)
        ids = tokenize_prompts(path, prompts, config.system_prompt)
        return cls(load_llada(path, config, dtype, device),
                   load_vq_decoder(Path(vqvae) if vqvae else path / "vqvae", device), ids, prompts)

    # --- geometry -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def mask_id(self) -> int:
        return self.config.codebook_size

    @property
    def feature_dim(self) -> int:
        return self.config.d_model

    @property
    def num_classes(self) -> int:
        """The number of prompts in the table (not counting the unconditional one)."""
        return len(self.prompt_lengths) - 1

    def config_dict(self) -> dict:
        """JSON-able settings that, with (tokens, cond), fix the features (see TinyMIGM): the
        config and a digest of the tokenised prompt table, since cond j means prompt j."""
        import hashlib
        from dataclasses import asdict
        table = torch.cat([self.prompt_lengths[:, None], self.prompt_table], 1).cpu().numpy()
        return asdict(self.config) | {"prompt_table_sha256": hashlib.sha256(table.tobytes()).hexdigest()}

    # --- conditions -----------------------------------------------------------------------------
    # --- the protocol the loop and the accelerators use -----------------------------------------
    def sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tokens (B, L) with mask id K, cond (B,) in [0, C] -> ids (B, T), valid (B, T) or None,
        image positions (B, L). Rows are right-padded: positions start at 0 as for one prompt."""
        c, B = self.config, tokens.shape[0]
        ids = torch.where(tokens == self.mask_id, c.mask_token_id, tokens + c.image_token_offset)
        rows = F.pad(ids.view(B, c.grid_height, c.grid_width), (0, 1), value=c.newline_token_id)
        start = tokens.new_tensor([c.boa_token_id, c.boi_token_id]).expand(B, 2)
        end = tokens.new_tensor([c.eoi_token_id, c.eoa_token_id]).expand(B, 2)
        image = torch.cat([start, rows.flatten(1), end], 1)                      # (B, G)
        lengths, G = self.prompt_lengths[cond], image.shape[1]                    # (B,), G
        P = int(lengths.max())
        seq = F.pad(self.prompt_table[cond, :P], (0, G))                          # (B, P + G)
        seq.scatter_(1, lengths[:, None] + torch.arange(G, device=seq.device), image)
        valid = torch.arange(P + G, device=seq.device) < (lengths + G)[:, None]
        return seq, (None if bool(valid.all()) else valid), lengths[:, None] + self.grid_offsets

    def features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with mask ids, cond (B,) -> ln_f(last hidden state) at the grid (B, L, D)."""
        seq, valid, pos = self.sequence(tokens, cond)
        h = self.llm.hidden(seq, valid)                                           # (B, T, D)
        return self.llm.transformer.ln_f(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))

    def sequence_features(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L), cond (B,) -> ln_f(last hidden state) at EVERY position of `sequence`'s
        rows (B, T, D): prompt, markers, grid, newlines (padding rows meaningless). What the
        official DiMOO shortcut reads (MIGM-Shortcut modeling_llada.py ret_last_feat); gathered at
        `sequence`'s grid indices it is `features(tokens, cond)`."""
        seq, valid, _ = self.sequence(tokens, cond)
        return self.llm.transformer.ln_f(self.llm.hidden(seq, valid))

    def input_embedding(self) -> nn.Embedding:
        """The whole input token table (text ids and image codes 126356 + k) that `sequence`'s ids
        index: the official DiMOO shortcut embeds the tokens it is fed with it."""
        return self.llm.transformer.wte

    def head(self, features: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, M, D) -> fp32 logits over the K codes (B, M, K). One linear map for every
        position, so `positions` is not needed."""
        off = self.config.image_token_offset
        w = self.llm.output_weight()[off: off + self.config.codebook_size]      # (K, D)
        return F.linear(features.to(w.dtype), w).float()

    def token_embedding(self) -> nn.Embedding:
        """(K, D): the input rows of the K image codes (a view; the mask row is a text id)."""
        off = self.config.image_token_offset
        return nn.Embedding.from_pretrained(self.llm.transformer.wte.weight[off: off + self.vocab_size])

    def position_embedding(self) -> None:
        """None: positions enter through RoPE in every attention layer, no table to copy."""

    def layers(self) -> nn.ModuleList:
        """LLaDA blocks acting on the whole (B, T, D) sequence: prompt, markers, grid, newlines."""
        return self.llm.transformer.blocks

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> images (B, 3, s H, s W) in [-1, 1], s = 16: the reference's decode
        (VQModel.decode of the codebook rows, clipped to [0, 1]), rescaled."""
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")
        codebook, c = self.vq.quantize.embedding, self.config
        ids = tokens.to(codebook.weight.device).view(-1, c.grid_height, c.grid_width)   # (B, h, w)
        # shape (B, h, w, row width): the reference passes latent_channels, the same for aMUSEd
        images = self.vq.decode(ids, force_not_quantize=True,
                                shape=(*ids.shape, codebook.embedding_dim)).sample  # (B, 3, H, W)
        return images.clip(0, 1) * 2 - 1

    # --- per-layer access (models/layers.py: LayeredBase) ----------------------------------------
    def embed_sequence(self, tokens: torch.Tensor, cond: torch.Tensor) -> Stream:
        """`sequence`'s rows embedded: prompt, then the generated part (<answer><boi>, H rows of
        W codes + newline, <eoi><eoa>), then right padding (masked as keys)."""
        c = self.config
        seq, valid, grid = self.sequence(tokens, cond)
        B, T = seq.shape
        G = 4 + c.grid_height * (c.grid_width + 1)
        start = self.prompt_lengths[cond][:, None]                                 # (B, 1)
        generated = start + torch.arange(G, device=seq.device)                     # (B, G)
        rows = torch.arange(T, device=seq.device).expand(B, T)
        in_context = (rows < start) | (rows >= start + G)
        context = rows[in_context].view(B, T - G)                                  # (B, P)
        return Stream(self.llm.transformer.wte(seq), grid, generated, context, valid)

    def position_encoding(self, rows: torch.Tensor) -> torch.Tensor:
        """RoPE at the rows' sequence positions (rows start at 0 in every right-padded row)."""
        c = self.config
        return rope_at(rows, c.d_model // c.n_heads, c.rope_theta)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.llm.transformer.ln_f(h)

    def row_logits(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def layer_shape(self) -> LayerShape:
        c = self.config
        kv = c.d_model // c.n_heads * (c.n_kv_heads or c.n_heads)
        return LayerShape(width=c.d_model, kv_width=kv, mlp_hidden=c.mlp_hidden_size,
                          mlp_matrices=3, depth=c.n_layers, vocab=c.codebook_size)
