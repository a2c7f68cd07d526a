"""Each trainer of the embedded default runs real steps on real data and lowers its loss."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from migm.commands import export
from migm.data.images import load_fashion_mnist, to_model_range
from migm.models.tiny import load_tokenizer, load_transformer
from migm.models.transformer import TransformerConfig
from migm.training.base import EmbeddedBaseModule, random_mask


def test_random_mask_masks_between_one_and_all_positions():
    tokens = torch.randint(0, 10, (512, 49))
    masked, mask = random_mask(tokens, mask_id=10, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 49
    assert counts.float().mean() > 49 * 0.5                          # cosine: E[cos(pi u/2)] = 2/pi
    assert torch.equal(masked[~mask], tokens[~mask]) and (masked[mask] == 10).all()


def test_maskgit_objective_learns_real_tokens(tmp_path):
    torch.manual_seed(0)
    images, labels = load_fashion_mnist("train")
    tokens = load_tokenizer().encode(to_model_range(images[:512]))
    loader = DataLoader(TensorDataset(tokens, labels[:512]), batch_size=64, shuffle=True)
    module = EmbeddedBaseModule(TransformerConfig(width=64, depth=2, heads=2, dropout=0.0),
                           lr=3e-3, warmup_steps=5)
    first = [module._loss(module.model, t, y)[0].item() for t, y in list(loader)[:2]]
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    after = [module._loss(module.model, t, y)[0].item() for t, y in list(loader)[:2]]
    assert sum(after) < sum(first) - 0.5                             # nats, from ~ln(256)=5.5
    # The EMA copy tracks the trained weights, not the initial ones.
    drift = sum((e - p).abs().sum() for e, p in zip(module.ema.parameters(), module.model.parameters()))
    assert torch.isfinite(drift)

    # Export keeps the EMA weights (fp16) and the config; the loader rebuilds the same network.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export("base", tmp_path / "last.ckpt", out=tmp_path / "assets" / "base.pt")
    loaded = load_transformer("base.pt", tmp_path / "assets")
    assert loaded.config == module.config
    for (name, a), b in zip(module.ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-2), name
    assert out.exists()
