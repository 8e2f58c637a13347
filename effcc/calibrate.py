"""Activation statistics from calibration data, recorded inside the captured graph.

The program runs the user's batches through an FX Interpreter that, at each watched node,
folds the values into running per-channel statistics (last axis): max, min and max |x|.
Memory is one vector per statistic per node, whatever the number of batches.  A
non-finite value stops the run with an error naming the node and the batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import fx
from torch.utils._pytree import tree_flatten

from .analysis import describe
from .errors import EffccError
from .program import Program


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation, over every token of every batch."""

    max: torch.Tensor
    min: torch.Tensor
    batches: int = 1

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())

    def update(self, value: torch.Tensor) -> None:
        self.max = torch.maximum(self.max, value.amax(dim=tuple(range(value.dim() - 1))))
        self.min = torch.minimum(self.min, value.amin(dim=tuple(range(value.dim() - 1))))
        self.batches += 1


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node], stats: dict, batch: int):
        super().__init__(gm)
        self.watched, self.stats, self.batch = watched, stats, batch

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node in self.watched:
            record(self.stats, node, value.detach(), self.batch)
        return value


def record(stats: dict, node: fx.Node, value: torch.Tensor, batch: int) -> None:
    wide = value.double()
    if not torch.isfinite(wide).all():
        raise EffccError(f"calibration batch {batch}: {describe(node)} produced NaN or inf; check that batch's inputs")
    if node in stats:
        stats[node].update(wide)
    else:
        axes = tuple(range(wide.dim() - 1))
        stats[node] = ChannelStats(wide.amax(dim=axes), wide.amin(dim=axes))


@torch.no_grad()
def activation_stats(program: Program, nodes: Iterable[fx.Node], batches: Iterable, *, description: str = "calibrating") -> dict[fx.Node, ChannelStats]:
    """Run `batches` (each a tuple of the model's positional inputs) and return stats of `nodes`' values."""
    watched = set(nodes)
    stats: dict[fx.Node, ChannelStats] = {}
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise EffccError("calibration data is empty: give at least one batch, e.g. calibration=[(ids,)]")
    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=len(batches))
        for i, batch in enumerate(batches):
            batch = batch if isinstance(batch, tuple) else (batch,)
            flat, _ = tree_flatten(batch)
            _Recorder(program.gm, watched, stats, i).run(*flat)
            progress.advance(task)
    return stats
