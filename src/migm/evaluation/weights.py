"""The shortcut weights `test` evaluates: from a fit checkpoint, an exported asset or a release.

A fit checkpoint says which network it trained and on which base; both are checked against the
ones the config builds before any tensor is loaded, so a mismatch is one line naming both sides
(not a wall of size mismatches). Exported assets and released files go through the network
config's own importer (`NetworkConfig.load_weights`), which checks their key layout strictly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from migm.ckpt import ZIP_MAGIC, load_lightning_checkpoint
from migm.files import CheckpointError
from migm.shortcut.network import NetworkConfig

BASE_FIELDS = ("base_kind", "base_config")


def is_fit_checkpoint(path: str | Path) -> bool:
    """A Lightning .ckpt (a zip written by `migm fit`), as opposed to an asset or a release."""
    p = Path(path)
    return p.suffix == ".ckpt" or (p.is_file() and p.read_bytes()[:4] == ZIP_MAGIC and
                                   b"pytorch-lightning_version" in p.read_bytes()[:1 << 16])


def network_of(hparams: dict) -> tuple[str, dict]:
    """(class path, fields) of the network a checkpoint's hyperparameters describe."""
    net = hparams.get("network") or {}
    if "class_path" in net:
        return net["class_path"], dict(net.get("init_args") or {})
    return "migm.shortcut.network.ShortcutConfig", dict(net)


def describe(config: NetworkConfig) -> tuple[str, dict]:
    return f"{type(config).__module__}.{type(config).__qualname__}", dataclasses.asdict(config)


def check_trained_for(path: str | Path, hparams: dict, config: NetworkConfig, spec: dict) -> None:
    """One CheckpointError naming the network and base the checkpoint was trained for and those
    the config builds, if they differ in a field that fixes a weight's shape or meaning."""
    want_cls, want = describe(config)
    got_cls, got = network_of(hparams)
    problems = []
    if got_cls.rsplit(".", 1)[-1] != want_cls.rsplit(".", 1)[-1]:
        problems.append(f"network {got_cls.rsplit('.', 1)[-1]} (config: {want_cls.rsplit('.', 1)[-1]})")
    else:
        differ = {k: (got[k], want[k]) for k in want if k in got and got[k] != want[k] and k != "gelu"}
        if differ:
            problems.append("network " + ", ".join(f"{k}={a!r} (config: {b!r})" for k, (a, b) in differ.items()))
    for field in BASE_FIELDS:
        trained = hparams.get(field, "tiny" if field == "base_kind" else None)
        if trained != spec.get(field):
            problems.append(f"{field}={trained!r} (config: {spec.get(field)!r})")
    if problems:
        raise CheckpointError(f"{path}: trained for {'; '.join(problems)}: test it with the config "
                              "it was fitted with, or fit a shortcut for this one")


def load_test_weights(weights: str | Path, config: NetworkConfig, spec: dict, base) -> dict[str, torch.Tensor]:
    """The state dict of the shortcut under test (its EMA weights for a fit checkpoint)."""
    if is_fit_checkpoint(weights):
        ckpt = load_lightning_checkpoint(weights)
        check_trained_for(weights, ckpt.get("hyper_parameters", {}), config, spec)
        state = {k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
        if not state:
            raise CheckpointError(f"{weights}: holds no shortcut weights (no 'ema.' entries): is it "
                                  "a shortcut fit checkpoint?")
        return state
    return config.load_weights(str(weights), base)
