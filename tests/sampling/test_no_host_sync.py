"""The loop never waits on the device inside its steps (a GPU would idle at every one).

On the CPU, the operators that force a host synchronisation on a GPU are caught at torch's
dispatcher: `_local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`), `nonzero` and `masked_select`
(shapes that depend on values). Their count must not grow with the number of steps: whatever a
generation syncs, it syncs once, not per step.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from migm.accel.refresh import RefreshPlan
from migm.accel.reuse import ReuseSource
from migm.accel.shortcut import ShortcutSource
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"}


class HostSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNCING:
            self.seen.append(name)
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for a in args[1:] for i in (a if isinstance(a, (list, tuple)) else [a])):
            self.seen.append("boolean index")
        return func(*args, **(kwargs or {}))


def syncs(model, make_source, steps: int) -> list[str]:
    cond = torch.arange(4) % model.num_classes
    with HostSyncs() as mode:
        generate(model, make_source(steps), cond, steps, sampler=SamplerConfig(cfg_weight=2.0), seed=0)
    return mode.seen


def test_the_loop_makes_no_host_sync_per_step(small_migm):
    net = ShortcutNetwork(ShortcutConfig(feature_dim=small_migm.feature_dim, vocab_size=small_migm.vocab_size,
                                         num_tokens=small_migm.num_tokens)).eval()
    sources = {
        "vanilla": lambda n: VanillaSource(small_migm),
        "shortcut": lambda n: ShortcutSource(small_migm, net, RefreshPlan.uniform(n, 2), temperature=1.2),
        "reuse": lambda n: ReuseSource(small_migm, RefreshPlan.uniform(n, 2), temperature=1.2),
    }
    for name, make in sources.items():
        short, long = syncs(small_migm, make, 4), syncs(small_migm, make, 12)
        assert len(long) == len(short), (name, short, long)


def test_the_spy_sees_a_per_step_sync(small_migm):
    """The check can fail: a source that asks the device a question at every step is caught."""
    class Asking(VanillaSource):
        def step(self, ctx):
            out = super().step(ctx)
            if bool(out.features.isfinite().all()):          # a host sync
                return out
            raise AssertionError

    assert len(syncs(small_migm, lambda n: Asking(small_migm), 12)) > \
        len(syncs(small_migm, lambda n: Asking(small_migm), 4))
