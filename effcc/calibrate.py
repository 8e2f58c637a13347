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
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map

from .analysis import describe
from .errors import EffccError
from .offload import StoreInterpreter
from .program import Program
from .progress import steps


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation, over every token of every batch."""

    max: torch.Tensor
    min: torch.Tensor
    batches: int = 1
    sample: torch.Tensor | None = None  # the first rows seen (tokens × channels), for searches; bounded

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())

    def update(self, value: torch.Tensor, keep_rows: int = 0) -> None:
        self.max = torch.maximum(self.max, value.amax(dim=tuple(range(value.dim() - 1))).cpu())
        self.min = torch.minimum(self.min, value.amin(dim=tuple(range(value.dim() - 1))).cpu())
        self.batches += 1
        self.keep(value, keep_rows)

    def keep(self, value: torch.Tensor, keep_rows: int) -> None:
        have = 0 if self.sample is None else self.sample.shape[0]
        if have < keep_rows:
            rows = value.reshape(-1, value.shape[-1])[: keep_rows - have].cpu()
            self.sample = rows if self.sample is None else torch.cat([self.sample, rows])


class _Recorder(StoreInterpreter):
    def __init__(self, program: Program, watched: set[fx.Node], stats: dict, batch: int, keep_rows: int):
        super().__init__(program.gm, program.store)  # weights streamed from disk when the program has a store
        self.watched, self.stats, self.batch, self.keep_rows = watched, stats, batch, keep_rows

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node in self.watched:
            record(self.stats, node, value.detach(), self.batch, self.keep_rows)
        return value


def record(stats: dict, node: fx.Node, value: torch.Tensor, batch: int, keep_rows: int = 0) -> None:
    wide = value.double()
    if not torch.isfinite(wide).all():
        raise EffccError(f"calibration batch {batch}: {describe(node)} produced NaN or inf; check that batch's inputs")
    if node in stats:
        stats[node].update(wide, keep_rows)
    else:
        axes = tuple(range(wide.dim() - 1))
        stats[node] = ChannelStats(wide.amax(dim=axes).cpu(), wide.amin(dim=axes).cpu())  # passes work on the host
        stats[node].keep(wide, keep_rows)


@torch.no_grad()
def activation_stats(
    program: Program, nodes: Iterable[fx.Node], batches: Iterable, *, description: str = "calibrating", keep_rows: int = 0
) -> dict[fx.Node, ChannelStats]:
    """Run `batches` (each a tuple of the model's positional inputs) and return stats of `nodes`' values.

    keep_rows: also keep the first that many rows (tokens) of each value, for error searches."""
    watched = set(nodes)
    stats: dict[fx.Node, ChannelStats] = {}
    batches = list(batches)
    if not batches:
        raise EffccError("calibration data is empty: give at least one batch, e.g. calibration=[(ids,)]")
    with steps(description, total=len(batches)) as advance:
        for i, batch in enumerate(batches):
            batch = batch if isinstance(batch, tuple) else (batch,)
            if program.store is not None:
                batch = tree_map(lambda t: t.to(program.store.device) if isinstance(t, torch.Tensor) else t, batch)
            flat, _ = tree_flatten(batch)
            _Recorder(program, watched, stats, i, keep_rows).run(*flat)
            advance()
    return stats
