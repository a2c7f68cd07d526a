"""Trains the shortcut on recorded trajectories (paper Sec. 3.4).

loss = MSE(f_i + S(f_i, new tokens, t_i), f_{i+1}) with the base model frozen (only its head is
used, for diagnostics and the optional KL term). An EMA copy of the shortcut is what validation,
`test` (evaluation/module.py, which reads its `ema.` weights from the checkpoint) and export use.
The checkpoint's hyperparameters are plain data (the network as class_path + init_args), so a
renamed config class never breaks a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from migm.models.registry import BaseKind, check_files, load_spec
from migm.shortcut.network import NetworkConfig, ShortcutConfig, time_input
from migm.training.diagnostics import StepwiseMeans, relative_error, step_diagnostics
from migm.training.schedule import configure


class ShortcutModule(L.LightningModule):
    def __init__(self, network: NetworkConfig | None = None, base_kind: BaseKind = "tiny",
                 base: str = "base.pt", tokenizer: str = "tokenizer.pt", base_config: dict | None = None,
                 prompts: str | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 100, ema_decay: float = 0.995,
                 loss_on: Literal["all", "masked"] = "masked", kl_weight: float = 0.0,
                 init_embeddings: bool = True) -> None:
        """
        Args:
            network: the shortcut's architecture, by class_path: ours (ShortcutConfig: bottleneck
                ratio, blocks, heads, ablations; the default) or an official one
                (MaskGITShortcutConfig, DiMOOShortcutConfig) whose released weights `test` loads.
            base_kind: which base MIGM adapter (tiny = the embedded default).
            base: base model weights (asset name or path); frozen, never trained here.
            tokenizer: tokenizer weights, for decoding images in `test`.
            base_config: the base adapter's config fields, where they differ from the released model.
            prompts: a text-to-image base's prompt file (plain text or JSONL, models/prompts.py):
                condition j is prompt j, for the fit-time evaluation and `test`.
            lr: AdamW peak learning rate (linear warm-up, cosine decay over the planned steps).
            weight_decay: AdamW weight decay on matrices.
            warmup_steps: warm-up length in optimizer steps.
            ema_decay: decay of the weight average used by validation, test and export.
            loss_on: positions the MSE covers: all, or those still masked after the step (the
                only ones whose logits are sampled again).
            kl_weight: adds kl_weight x KL(base head on f_{i+1} || base head on f_hat) at the
                positions still masked after the step (paper App. B): MSE alone predicts the mean
                of the next features, whose logits are sharper than the base's.
            init_embeddings: start the shortcut's token/position tables from the base model's.
        """
        super().__init__()
        network = network or ShortcutConfig()
        # plain data only: the checkpoint never pickles a class (ckpt.py)
        self.save_hyperparameters(ignore=["network"])
        self.hparams["network"] = {"class_path": f"{type(network).__module__}.{type(network).__qualname__}",
                                   "init_args": dataclasses.asdict(network)}    # plain data
        check_files(base_kind, base, tokenizer, prompts)   # a missing file stops us before any trainer
        self.network_config = network
        self.network = network.build()
        self.ema = copy.deepcopy(self.network).eval().requires_grad_(False)
        self.spec = {"base_kind": base_kind, "base": base, "tokenizer": tokenizer,
                     "base_config": base_config, "prompts": prompts}
        self._base = None            # loaded on first use: building the module reads no file

    # --- the frozen base model ------------------------------------------------------------------
    @property
    def base(self):
        if self._base is None:
            base = load_spec(self.spec)
            # set past nn.Module's __setattr__: not a submodule, so it stays out of checkpoints
            object.__setattr__(self, "_base", base.requires_grad_(False).eval())
        if next(self._base.parameters()).device != self.device:     # follows the module to a GPU
            self._base.to(self.device)
        return self._base

    def setup(self, stage: str) -> None:
        schema = getattr(self.trainer.datamodule, "schema", None) if self.trainer else None
        if schema is not None:
            self._check_schema(schema)
        if stage == "fit" and self.hparams.init_embeddings and hasattr(self.network, "init_from_base"):
            self.network.init_from_base(self.base.token_embedding().weight, self.base.position_embedding())
            self.ema.load_state_dict(self.network.state_dict())

    def _check_schema(self, schema) -> None:
        c, base = self.network.config, self.base
        # A whole-sequence network (the official ones) must learn from the state it will be run
        # on at test (accel/sequence.py), and a grid network from grid rows only: either mix
        # trains without an error and is wrong at test.
        sequence_net = getattr(self.network, "positions", "grid") == "sequence" \
            and hasattr(base, "sequence_features")
        if sequence_net and not schema.sequence_length:
            raise ValueError(f"trajectory shards hold grid features (L = {schema.num_tokens}), but "
                             f"{type(self.network).__name__} evolves the base's whole sequence state: "
                             "collect with --model.init_args.positions sequence (a base whose sequence "
                             "length varies with the prompt, DiMOO, cannot be recorded so: train ours there)")
        if schema.sequence_length and not sequence_net:
            raise ValueError(f"trajectory shards hold sequence features (T = {schema.sequence_length}), "
                             f"but {type(self.network).__name__} maps the L = {schema.num_tokens} grid "
                             "features: collect with positions: grid, or train a sequence network")
        wanted = {"feature_dim": (c.feature_dim, base.feature_dim), "num_tokens": (c.num_tokens, base.num_tokens),
                  "vocab_size": (c.vocab_size, base.vocab_size), "mask_id": (base.mask_id, base.mask_id)}
        bad = [f"{k}: shards have {getattr(schema, k)}, network/base expect {v[0]}"
               for k, v in wanted.items() if getattr(schema, k) != v[0] or v[0] != v[1]]
        if bad:
            raise ValueError("trajectory shards do not fit this shortcut: " + "; ".join(bad))

    # --- training -------------------------------------------------------------------------------
    def _scope(self, batch) -> torch.Tensor:
        if self.hparams.loss_on == "all":
            return torch.ones_like(batch["new"])
        return batch["tokens"] == self.base.mask_id                 # still masked after step i

    def _loss(self, pred: torch.Tensor, batch) -> torch.Tensor:
        scope = self._scope(batch).unsqueeze(-1).float()
        sq = F.mse_loss(pred, batch["target"], reduction="none") * scope
        return sq.sum() / (scope.sum() * pred.shape[-1]).clamp_min(1)

    def _kl(self, pred: torch.Tensor, batch) -> torch.Tensor:
        """Mean KL(p_base(f_{i+1}) || p_base(f_hat)) over the positions still masked after step i."""
        masked = (batch["tokens"] == self.base.mask_id).float()                      # (B, L)
        target = F.log_softmax(self.base.head(batch["target"]).float(), -1)          # (B, L, K)
        pred = F.log_softmax(self.base.head(pred).float(), -1)
        kl = (target.exp() * (target - pred)).sum(-1)                                 # (B, L)
        return (kl * masked).sum() / masked.sum().clamp_min(1)

    def _predict(self, net: torch.nn.Module, batch) -> torch.Tensor:
        """f_hat of x_i over the grid (B, L, D); a network over a longer sequence (the grid first,
        e.g. MaskGIT's class slot last) is scored on its grid rows."""
        mask_ratio = (batch["tokens"] == self.base.mask_id).float().mean(1)
        pred = net(batch["features"], batch["tokens"], batch["new"], time_input(net, batch["t"], mask_ratio))
        return pred[:, : batch["tokens"].shape[1]]

    @staticmethod
    def _on_grid(batch) -> dict:
        """The batch with features and target at the L grid positions (shards of sequence
        features hold the grid first); the network itself reads the whole sequence."""
        L = batch["tokens"].shape[1]
        return {**batch, "features": batch["features"][:, :L], "target": batch["target"][:, :L]}

    def training_step(self, batch, batch_idx):
        pred = self._predict(self.network, batch)
        batch = self._on_grid(batch)
        loss = self._objective(pred, batch)
        if "next_target" in batch:              # rollout: later steps start from our prediction
            loss = loss + sum(self._objective(p, b, log=False) for p, b in self._rollout(pred, batch))
            loss = loss / (1 + batch["next_target"].shape[1])
            self.log("train/first_step_loss", self._loss(pred, batch))
        # Stop before a non-finite loss reaches the weights (they and the EMA would all turn NaN and
        # be checkpointed); decided over all ranks at once, so no DDP rank waits on the others.
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise FloatingPointError(
                f"train/loss is not finite ({float(loss)} on this rank) at global step "
                f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}): training "
                "diverged; lower the learning rate or check the trajectories")
        with torch.no_grad():
            rel_err = relative_error(pred, batch["target"], batch["features"], self._scope(batch))
        self.log_dict({"train/loss": loss, "train/rel_err": rel_err.mean()}, prog_bar=True)
        return loss

    def _objective(self, pred: torch.Tensor, batch, log: bool = True) -> torch.Tensor:
        """Masked MSE, plus the weighted KL term; `train/kl` is the first step's."""
        loss = self._loss(pred, batch)
        if self.hparams.kl_weight:
            kl = self._kl(pred, batch)
            if log:
                self.log("train/kl", kl)
            loss = loss + self.hparams.kl_weight * kl
        return loss

    def _rollout(self, pred: torch.Tensor, batch):
        """(f_hat, step batch) for steps i+1 .. i+r-1 of a rollout window (data `rollout`): each
        step's input features are the previous prediction, gradients flow through the chain."""
        if getattr(self.network, "positions", "grid") == "sequence":
            raise ValueError("data rollout > 1 trains grid-feature shortcuts only: a sequence network "
                             "would need its whole predicted state, which the loss does not keep")
        for j in range(batch["next_target"].shape[1]):
            step = {"features": pred, "target": batch["next_target"][:, j], "tokens": batch["next_tokens"][:, j],
                    "new": batch["next_new"][:, j], "t": batch["next_t"][:, j]}
            pred = self._predict(self.network, step)
            yield pred, step

    def _logits(self, pred, batch):
        return self.base.head(pred), self.base.head(batch["target"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.network.parameters()):
                e.lerp_(p, 1 - decay)

    def on_validation_epoch_start(self) -> None:
        self._val = StepwiseMeans(self.trainer.datamodule.schema.steps)

    def validation_step(self, batch, batch_idx):
        pred = self._predict(self.ema, batch)
        batch = self._on_grid(batch)
        loss = self._loss(pred, batch)
        self.log("val/kl", self._kl(pred, batch), sync_dist=True)
        d = step_diagnostics(pred, batch["target"], batch["features"], self._scope(batch),
                             *self._logits(pred, batch), batch["tokens"] == self.base.mask_id)
        self._val.update({"mse": torch.full_like(d["rel_err"], float(loss)), **d}, batch["step"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        reduce = lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum").cpu()
        values = {k: v for k, v in self._val.compute(reduce).items() if not k.startswith("mse")}
        self.log("val/rel_err", values.pop("rel_err"), prog_bar=True, rank_zero_only=True)
        self.log_dict({f"val/{k}": v for k, v in values.items()}, rank_zero_only=True)

    def configure_optimizers(self):
        return configure(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)
