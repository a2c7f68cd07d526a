"""The shortcut weights `test` evaluates: fit checkpoints old and new, checked against the config."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from migm.accel.method import Vanilla
from migm.ckpt import load_lightning_checkpoint
from migm.evaluation.grid import GridConfig
from migm.evaluation.weights import load_test_weights
from migm.files import CheckpointError
from migm.shortcut.network import load_shortcut

SPEC = {"base_kind": "tiny", "base": "base.pt", "tokenizer": "tokenizer.pt", "base_config": None, "prompts": None}


@dataclasses.dataclass
class Retired:                       # a config class a later version renamed away
    x: int = 1


def old_checkpoint(path, shipped) -> None:
    """A fit checkpoint as earlier versions wrote it: config dataclasses pickled into its
    hyperparameters, one of them a class that no longer exists."""
    module = types.ModuleType("migm.accel.retired")
    Retired.__module__, Retired.__qualname__ = "migm.accel.retired", "Retired"
    module.Retired = Retired
    sys.modules["migm.accel.retired"] = module
    try:
        torch.save({"pytorch-lightning_version": "2.6.6", "global_step": 5, "epoch": 0,
                    "hyper_parameters": {"network": shipped.config, "base_kind": "tiny", "base_config": None,
                                         "evaluation": GridConfig(methods=[Vanilla(steps=[8])], reference_steps=8),
                                         "retired": Retired(x=3)},
                    "state_dict": {**{f"ema.{k}": v for k, v in shipped.state_dict().items()},
                                   **{f"network.{k}": v * 0 for k, v in shipped.state_dict().items()}}}, path)
    finally:
        del sys.modules["migm.accel.retired"]


def test_an_old_checkpoint_with_pickled_configs_still_loads_its_ema_weights(tmp_path):
    shipped = load_shortcut("shortcut.pt")
    path = tmp_path / "old.ckpt"
    old_checkpoint(path, shipped)
    hparams = load_lightning_checkpoint(path)["hyper_parameters"]
    assert hparams["retired"] == {"class_path": "migm.accel.retired.Retired", "init_args": {"x": 3}}
    assert hparams["network"]["class_path"] == "migm.shortcut.network.ShortcutConfig"
    state = load_test_weights(path, shipped.config, SPEC, base=None)
    assert state.keys() == shipped.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in shipped.state_dict().items())     # ema, not network


def test_a_checkpoint_of_another_network_or_base_is_one_line_naming_both(tmp_path):
    shipped = load_shortcut("shortcut.pt")
    path = tmp_path / "old.ckpt"
    old_checkpoint(path, shipped)
    with pytest.raises(CheckpointError) as err:
        load_test_weights(path, dataclasses.replace(shipped.config, heads=2), SPEC, base=None)
    assert "trained for network heads=4 (config: 2)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"base_kind='tiny' \(config: 'maskgit'\)"):
        load_test_weights(path, shipped.config, {**SPEC, "base_kind": "maskgit"}, base=None)


def test_a_new_fit_checkpoint_holds_plain_config_only(tmp_path):
    """ShortcutModule's hyperparameters are plain data: torch's weights_only loader reads them
    with no class allowed."""
    from migm.training.shortcut import ShortcutModule
    module = ShortcutModule()
    path = tmp_path / "new.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": dict(module.hparams),
                "state_dict": module.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    assert blob["hyper_parameters"]["network"]["class_path"] == "migm.shortcut.network.ShortcutConfig"
    assert load_test_weights(path, module.network_config, SPEC, base=None).keys() == module.ema.state_dict().keys()
