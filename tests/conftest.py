"""Shared fixtures: small real networks with random weights, and the shipped embedded default."""

from __future__ import annotations

import os

import pytest
import torch

from migm.models.tiny import TinyMIGM
from migm.models.tokenizer import TokenizerConfig, VQTokenizer
from migm.models.transformer import MaskedTransformer, TransformerConfig


# `make test` runs two pytest workers (pytest-xdist) on this project's 2-core machines: one
# thread each keeps them from fighting over the cores; a lone pytest uses both.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture
def small_migm() -> TinyMIGM:
    """The real TinyMIGM classes at a small size, random weights: for loop invariants."""
    torch.manual_seed(0)
    transformer = MaskedTransformer(TransformerConfig(vocab_size=32, num_tokens=49, width=32,
                                                      depth=2, heads=2, dropout=0.0))
    tokenizer = VQTokenizer(TokenizerConfig(channels=8, code_dim=8, codebook_size=32))
    return TinyMIGM(transformer.eval(), tokenizer.eval())


@pytest.fixture(scope="session")
def shipped_migm() -> TinyMIGM:
    return TinyMIGM.from_assets()


def record_steps(source) -> list:
    """Every StepOutput the source hands the loop, in order (wraps the instance's `step`)."""
    outputs, step = [], source.step

    def recorded(ctx):
        outputs.append(step(ctx))
        return outputs[-1]
    source.step = recorded
    return outputs


@pytest.fixture
def applied_temperatures(monkeypatch) -> list:
    """What the loop divides each step's guided logits by (1 on full steps), as it applies it."""
    from migm.sampling import loop
    seen, real = [], loop.skipped_step_temperature

    def spy(out, tau):
        seen.append(real(out, tau))
        return seen[-1]
    monkeypatch.setattr(loop, "skipped_step_temperature", spy)
    return seen


def filling_file(path, mode: str, room: int):
    """A file on a disk with `room` bytes left: writes beyond fail with ENOSPC, after the first
    ones landed, as a real full disk does (the writer then holds half a file)."""
    import errno
    import io
    buffered = io.BufferedWriter if mode == "w" else io.BufferedRandom

    class Full(buffered):
        def write(self, data):
            nonlocal room
            if len(data) > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            room -= len(data)
            return super().write(data)
    return Full(io.FileIO(path, mode))


@pytest.fixture
def full_disk():
    """`filling_file`, for tests that fake a full disk at a writer's `open`."""
    return filling_file


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """A command that fails inside a test (the CLI would close its W&B run on the way out) must
    not leave that run active for the next test, whose WandbLogger would reuse it."""
    yield
    import sys
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
