"""Loading what the releases contain: a Lightning 1.x VQGAN `last.ckpt`, Lumina-DiMOO's config.json
mask id and its text tokenizer as the reference loads it.

The Lightning file is built as PL 1.0's dump_checkpoint writes it: epoch, global_step, the
version string, `callbacks` keyed by the callback's class (Trainer.on_save_checkpoint:
callback_states[type(callback)] = state), optimizer_states, lr_schedulers, hyper_parameters and
the state_dict. The class is a stand-in created here under ModelCheckpoint's import path, so the
file pickles that global exactly as a real one does, and Lightning 1.x need not be installed.
"""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from migm.files import CheckpointError
from migm.models.dimoo import tokenize_prompts
from migm.models.llada import DiMOOConfig
from migm.models.maskgit import MaskGITMIGM, _read

sys.path.insert(0, str(Path(__file__).parent))
import test_dimoo  # noqa: E402  (the tiny DiMOO layout and tokenizer)
import test_maskgit  # noqa: E402  (the tiny MaskGIT layout)

PL_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def lightning_1x_class(monkeypatch):
    """A class named pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, importable
    by that name while the file is written (pickle checks that the name resolves to it)."""
    module = types.ModuleType(PL_MODULE)
    cls = type("ModelCheckpoint", (), {"__module__": PL_MODULE})
    module.ModelCheckpoint = cls
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, PL_MODULE, module)
    return cls


def save_lightning_1x(path: Path, state_dict: dict, monkeypatch) -> None:
    ModelCheckpoint = lightning_1x_class(monkeypatch)
    first = next(iter(state_dict.values()))
    checkpoint = {
        "epoch": 3, "global_step": 12345, "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.31),
                                        "best_model_path": "logs/ckpts/epoch=3.ckpt",
                                        "current_score": torch.tensor(0.33), "dirpath": "logs/ckpts"}},
        "optimizer_states": [{"state": {0: {"step": 12345, "exp_avg": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8,
                                                "weight_decay": 0, "amsgrad": False, "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"embed_dim": 256, "n_embed": 1024, "ddconfig": {"ch_mult": [1, 1, 2, 2, 4],
                             "attn_resolutions": [16], "dropout": 0.0},
                             "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                            "params": {"disc_start": 0, "disc_weight": 0.75}}},
        "state_dict": state_dict,
    }
    torch.save(checkpoint, path)
    monkeypatch.delitem(sys.modules, PL_MODULE)            # reading must not need it


def test_a_lightning_1x_vqgan_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    tpath, vpath, t, v = test_maskgit.save_reference(tmp_path)
    save_lightning_1x(vpath, v, monkeypatch)
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):   # what weights_only says
        torch.load(vpath, weights_only=True)
    found = _read(vpath, "VQGAN")
    assert set(found) == set(v) and all(torch.equal(found[k], v[k]) for k in v)
    model = MaskGITMIGM.from_checkpoints(tpath, vpath, test_maskgit.TINY)
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = test_maskgit.reference_decode(v, tokens).clamp(-1, 1)
    assert torch.allclose(model.decode(tokens), expected, atol=1e-5)


def test_only_the_callback_name_is_let_through(tmp_path, monkeypatch):
    """The stand-in is a key only: a pickle that builds it, or any other global, is refused."""
    _, vpath, _, v = test_maskgit.save_reference(tmp_path)
    ModelCheckpoint = lightning_1x_class(monkeypatch)
    ModelCheckpoint.__reduce__ = lambda self: (ModelCheckpoint, ())
    torch.save({"state_dict": v, "callbacks": {"x": ModelCheckpoint()}}, vpath)
    with pytest.raises(CheckpointError, match="cannot be read as plain tensors"):
        _read(vpath, "VQGAN")
    other = type("EarlyStopping", (), {"__module__": PL_MODULE})
    sys.modules[PL_MODULE].EarlyStopping = other
    torch.save({"state_dict": v, "callbacks": {other: {}}}, vpath)
    with pytest.raises(CheckpointError, match="EarlyStopping"):
        _read(vpath, "VQGAN")


def test_the_decoded_images_are_raw_when_asked(tmp_path):
    tpath, vpath, _, _ = test_maskgit.save_reference(tmp_path)
    model = MaskGITMIGM.from_checkpoints(tpath, vpath, test_maskgit.TINY)
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    clamped = model.decode(tokens)
    model.clamp_decoded = False
    raw = model.decode(tokens)
    assert torch.equal(raw.clamp(-1, 1), clamped) and raw.abs().max() > 1    # random weights overshoot


# --- Lumina-DiMOO: the mask id, the tokenizer -----------------------------------------------------
def test_a_config_json_mask_id_other_than_the_generators_is_one_line_naming_both(tmp_path):
    raw = {"d_model": 4096, "n_heads": 32, "mask_token_id": 126337}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: mask_token_id is 126337, .*hard-codes 126336") as err:
        DiMOOConfig.from_json(tmp_path / "config.json")
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps(raw | {"mask_token_id": 126336}))
    assert DiMOOConfig.from_json(tmp_path / "config.json").mask_token_id == 126336


CUSTOM_TOKENIZER = '''
from transformers import PreTrainedTokenizerFast


class MarkedTokenizer(PreTrainedTokenizerFast):
    """A checkpoint's own tokenizer class: ends every sequence with the <unk> id."""

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return super().build_inputs_with_special_tokens(token_ids_0, token_ids_1) + [0]

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        out["input_ids"] = out["input_ids"] + [0]
        return out
'''


def test_the_text_tokenizer_is_loaded_with_the_checkpoints_own_code_as_the_reference(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    path = tmp_path / "Lumina-DiMOO"
    test_dimoo.save_tokenizer(path)
    plain = tokenize_prompts(path, ["a red cat"], "Generate an image according to the text prompt.")
    (path / "tokenization_marked.py").write_text(CUSTOM_TOKENIZER)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "MarkedTokenizer",
               "auto_map": {"AutoTokenizer": [None, "tokenization_marked.MarkedTokenizer"]}}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    marked = tokenize_prompts(path, ["a red cat"], "Generate an image according to the text prompt.")
    assert [ids + [0] for ids in plain] == marked            # the folder's class, as trust_remote_code=True
