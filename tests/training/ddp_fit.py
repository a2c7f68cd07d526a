"""Run as a script (never under pytest): a 2-process DDP fit; each rank writes what it saw."""

import json
import sys

import torch

from migm.cli import lightning_main

config, out = sys.argv[1], sys.argv[2]
cli = lightning_main(["fit", "--config", config, "--trainer.devices", "2", "--trainer.strategy", "ddp"])
trainer = cli.trainer
sampler = trainer.train_dataloader.sampler
sampler.set_epoch(0)
weights = torch.cat([p.detach().flatten() for p in cli.model.network.parameters()])
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"rank": trainer.global_rank, "world": trainer.world_size, "step": trainer.global_step,
               "epoch0_indices": list(iter(sampler)), "weights_sum": float(weights.double().sum()),
               "weights_head": weights[:50].tolist()}, f)
