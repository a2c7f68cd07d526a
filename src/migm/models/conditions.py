"""Integer conditions shared by every adapter: class ids, or rows of a prompt table.

The loop only ever sees `cond` as int64 ids in [0, num_classes) and asks for the CFG branch's
null condition, which every adapter places at id num_classes; one definition keeps them alike.
"""

from __future__ import annotations

import torch


class IdConditions:
    """Mixin: needs a `num_classes` property on the adapter."""

    num_classes: int
    condition_name: tuple[str, str] = ("class id", "class ids")     # singular, plural, for errors

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional branch of CFG: id num_classes, same batch shape."""
        return torch.full_like(cond, self.num_classes)

    def check_condition(self, cond: torch.Tensor) -> None:
        if cond.dtype != torch.long or cond.ndim != 1:
            raise ValueError(f"cond must be int64 {self.condition_name[1]} of shape (B,), "
                             f"got {cond.dtype} {tuple(cond.shape)}")
        if len(cond) and (cond.min() < 0 or cond.max() >= self.num_classes):
            raise ValueError(f"{self.condition_name[0]} out of range: cond must lie in [0, {self.num_classes}), "
                             f"got [{int(cond.min())}, {int(cond.max())}]")
