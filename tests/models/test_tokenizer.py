import pytest
import torch

from migm.data.images import load_fashion_mnist, to_model_range
from migm.models.tiny import load_tokenizer
from migm.models.tokenizer import TokenizerConfig, VQTokenizer
from migm.models.tokenizer import psnr


def test_shapes_and_straight_through_gradient():
    tok = VQTokenizer(TokenizerConfig(channels=8, code_dim=8, codebook_size=16)).train()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    recon, commit, ids = tok(x)
    assert recon.shape == x.shape and ids.shape == (4, 49) and commit.ndim == 0
    (recon.pow(2).mean() + commit).backward()
    assert tok.encoder[0].weight.grad is not None and tok.encoder[0].weight.grad.abs().sum() > 0


def test_decode_rejects_out_of_vocabulary_ids():
    tok = VQTokenizer(TokenizerConfig(channels=8, code_dim=8, codebook_size=16)).eval()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        tok.decode(torch.full((1, 49), 16))


def test_shipped_tokenizer_round_trip_on_test_images():
    tok = load_tokenizer()
    images, _ = load_fashion_mnist("test")
    x = to_model_range(images[:500])
    ids = tok.encode(x)
    recon = tok.decode(ids)
    assert ids.shape == (500, 49)
    assert psnr(recon, x).mean() > 20.0                       # dB, measured ~23 at export
    assert (tok.encode(recon) == ids).float().mean() > 0.8    # codes are (mostly) a fixed point
    assert ids.unique().numel() > 128                         # the codebook is broadly used
