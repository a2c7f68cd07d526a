"""Lumina-DiMOO (Alpha-VLLM 2025) text-to-image behind the base-model protocol.

The accelerators need the last hidden state at the image positions and the image-code rows of the
output layer, and the released 8B checkpoint has to load unchanged without its remote code, so
the LLaDA transformer is re-written with the reference's parameter names (models/llada.py). The aMUSEd VQ
tokenizer is diffusers' own VQModel, loaded as the reference loads it (a re-write of its decoder
matched it to ~2e-5 on random weights, so the maintained one is used). Inference only: no
KV/ML-cache, no text generation.

Reference facts this relies on (Alpha-VLLM/Lumina-DiMOO at 81344e6: model/modeling_llada.py,
model/modeling_xllmx_dimoo.py, config.py, inference/inference_t2i.py, utils/prompt_utils.py,
utils/image_utils.py, generators/image_generation_generator.py):
- the transformer is LLaDA-8B (models/llada.py holds it, its config and its checkpoint reader);
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

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from migm.files import CheckpointError
from migm.models.conditions import IdConditions
from migm.models.layers import LayerShape, Stream
from migm.models.checkpoints import HOW_TO_GET
from migm.models.llada import LLaDA, DiMOOConfig, load_llada, rope_at
from migm.models.prompts import read_prompt_file
from migm.models.safetensors_files import check_fit, need_file, read_tensors, tensor_keys

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
    config_file = need_file(path / "config.json", "VQ tokenizer config")
    weights = need_file(path / "diffusion_pytorch_model.safetensors", "VQ tokenizer weights")
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
    found = read_tensors({k: (weights, k) for k in tensor_keys(weights)}, shapes_only=True)
    extra = sorted(k for k in found if k not in expected)
    summary = (f"channels {tuple(c.block_out_channels)}, {c.num_vq_embeddings} codes, latent "
               f"{c.latent_channels}, mid attention {c.mid_block_add_attention}")
    check_fit(weights, "VQ tokenizer", {k: v for k, v in found.items() if k in expected}, expected,
               summary)
    if extra:
        warnings.warn(f"{weights}: {len(extra)} keys that diffusers' VQModel does not have are "
                      f"ignored: {extra[:4]}{' ...' if len(extra) > 4 else ''}", stacklevel=2)
    model = VQModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False,
                                    torch_dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def tokenize_prompts(tokenizer_dir: str | Path, prompts: Sequence[str],
                     system_prompt: str) -> list[list[int]]:
    """The reference's t2i templates, tokenised once: prompts' ids, then the unconditional one.

    Loaded as the reference loads it (inference/inference_t2i.py l.64, MIGM-Shortcut infer.py
    l.43: AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)), because the ids fix
    the features: where the folder's tokenizer_config.json maps AutoTokenizer to a class of its
    own (auto_map), trust_remote_code=True runs that class, and without it transformers would
    either refuse or fall back to its built-in class, which may tokenise differently. It executes
    Python from the checkpoint folder only in that case, and reads local files only.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=True,
                                            local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"Lumina-DiMOO text tokenizer: cannot load it from {tokenizer_dir} "
                              f"({err}). {HOW_TO_GET['dimoo']}.") from err
    head = f"<system>{system_prompt}</system><user>"
    return [tok(head + p + "</user>")["input_ids"] for p in [*prompts, "<uncondition>"]]


def read_prompts(prompts: Sequence[str] | str | Path | None) -> list[str]:
    """None: DEFAULT_PROMPTS; a str or Path: a prompt file (plain text, one prompt per non-blank
    line, or JSONL; models/prompts.py)."""
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, (str, Path)):
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
        path = need_file(Path(path), "checkpoint directory")
        config = config or DiMOOConfig.from_json(need_file(path / "config.json", "config.json"))
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
