import math

import pytest
import torch

from migm.shortcut.network import (
    ShortcutConfig,
    ShortcutNetwork,
    pack_new_tokens,
    timestep_embedding,
)


def _inputs(B=4, L=49, D=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, L, D, generator=g)
    tokens = torch.randint(0, 256, (B, L), generator=g)
    new = torch.zeros(B, L, dtype=torch.bool)
    for row, count in enumerate([5, 1, 3, 0][:B]):           # variable counts, one row with none
        new[row, torch.randperm(L, generator=g)[:count]] = True
    return f, tokens, new, torch.rand(B, generator=g)


def test_untrained_shortcut_is_the_identity():
    f, tokens, new, t = _inputs()
    out = ShortcutNetwork()(f, tokens, new, t)
    assert torch.equal(out, f)


def test_pack_new_tokens_matches_a_per_row_gather():
    _, tokens, new, _ = _inputs()
    ids, pos, valid = pack_new_tokens(tokens, new)
    assert ids.shape == pos.shape == valid.shape == (4, 5)
    for row in range(4):
        want = torch.nonzero(new[row]).flatten()
        got = pos[row][valid[row]]
        assert sorted(got.tolist()) == want.tolist()
        assert torch.equal(ids[row][valid[row]], tokens[row, got])


def _perturbed(net):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def test_padding_does_not_leak_into_other_rows_and_rows_without_tokens_are_finite():
    f, tokens, new, t = _inputs()
    net = _perturbed(ShortcutNetwork())
    batched = net(f, tokens, new, t)
    assert batched.shape == f.shape and torch.isfinite(batched).all()
    for row in range(4):        # alone, a row has no padding at all
        alone = net(f[row:row + 1], tokens[row:row + 1], new[row:row + 1], t[row:row + 1])
        torch.testing.assert_close(alone, batched[row:row + 1], atol=1e-5, rtol=1e-5)


def test_new_tokens_steer_the_prediction_only_with_cross_attention():
    f, tokens, new, t = _inputs(B=3)
    other = tokens.clone()
    other[new] = (other[new] + 1) % 256                       # different sampled tokens
    for cross, changes in ((True, True), (False, False)):
        net = _perturbed(ShortcutNetwork(ShortcutConfig(cross_attention=cross)))
        moved = not torch.allclose(net(f, tokens, new, t), net(f, other, new, t))
        assert moved == changes


def test_earlier_tokens_are_seen_only_with_grid_tokens():
    """The paper's shortcut sees the grid only through f_i and the new tokens; with grid_tokens the
    tokens decoded before step i reach it too, and the mask id is a valid input."""
    f, tokens, new, t = _inputs(B=3)
    tokens[:, :10] = 256                                      # masked positions (mask id = V)
    new[:, :10] = False
    old = ~new
    old[:, :10] = False
    other = tokens.clone()
    other[old] = (other[old] + 1) % 256                       # different earlier tokens
    for grid, changes in ((False, False), (True, True)):
        net = _perturbed(ShortcutNetwork(ShortcutConfig(grid_tokens=grid)))
        out = net(f, tokens, new, t)
        assert torch.isfinite(out).all()
        assert (not torch.allclose(out, net(f, other, new, t))) == changes


def test_time_embedding_and_config_validation():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 128)
    assert e.shape == (2, 128)
    assert torch.allclose(e[0, :64], torch.ones(64))          # cos(0) = 1
    with pytest.raises(ValueError, match="ratio"):
        ShortcutConfig(feature_dim=192, ratio=5)
    with pytest.raises(ValueError, match="heads"):
        ShortcutConfig(feature_dim=192, ratio=2, heads=7)


def test_init_from_base_copies_the_tables(small_migm):
    net = ShortcutNetwork(ShortcutConfig(feature_dim=32, vocab_size=32, num_tokens=49, heads=2))
    net.init_from_base(small_migm.token_embedding().weight, small_migm.position_embedding())
    assert torch.equal(net.token_embed.weight, small_migm.token_embedding().weight[:32])
    assert torch.equal(net.pos_embed, small_migm.position_embedding())


def test_a_base_without_a_position_table_gets_2d_sinusoids_not_noise():
    from migm.shortcut.network import ShortcutConfig, ShortcutNetwork, grid_sinusoids
    net = ShortcutNetwork(ShortcutConfig(feature_dim=16, vocab_size=10, num_tokens=16, ratio=2, heads=2))
    tokens = torch.randn(11, 16)
    net.init_from_base(tokens, None)
    table = grid_sinusoids(16, 16)
    torch.testing.assert_close(net.pos_embed.data, table * tokens[:10].std())
    # row 1, column 2 of the 4x4 grid: sin(1) in the row half, sin(2) in the column half
    assert table[1 * 4 + 2, 0] == pytest.approx(math.sin(1.0)) and table[6, 8] == pytest.approx(math.sin(2.0))
    assert len({tuple(r.tolist()) for r in table}) == 16                  # every position distinct
