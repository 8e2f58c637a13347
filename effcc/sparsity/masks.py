"""How many weights each sparse layer keeps (uniform or ERK), and the random masks that start training.

The budget is in FLOPs, not weights: a kept weight of a conv costs one multiply-add per output
position, a linear's one per token, so layers are weighed by `flops_per_weight` (measured on the
example inputs).  Counts are whole blocks; the rounding is spread so the total misses the budget
by less than one block of one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import blocks

INITS = ("uniform", "erk")


@dataclass(frozen=True)
class Demand:
    """One sparse weight to be given a share of the budget."""

    shape: tuple[int, ...]  # the weight's shape: [out, in] or [out, in, kh, kw]
    flops_per_weight: int  # FLOPs one kept weight costs on the example inputs (2 × positions)
    block: tuple[int, int]

    @property
    def block_area(self) -> int:
        return self.block[0] * self.block[1]

    @property
    def blocks(self) -> int:
        rows, cols = blocks.grid(self.shape, self.block)
        return rows * cols

    @property
    def dense_flops(self) -> int:
        return math.prod(self.shape) * self.flops_per_weight

    @property
    def erk_score(self) -> float:
        """Erdős–Rényi-kernel density, up to the common factor: Σ dims / Π dims (Evci et al.)."""
        return sum(self.shape) / math.prod(self.shape)


def densities(demands: list[Demand], budget: float, init: str) -> list[float]:
    """Each weight's density so that Σ density · dense FLOPs = budget (capped at 1)."""
    total = sum(d.dense_flops for d in demands)
    if budget >= total:
        return [1.0] * len(demands)
    if init == "uniform":
        return [budget / total] * len(demands)
    if init != "erk":
        raise ValueError(f"mask init {init!r} is not one of {INITS}")
    # ERK: density ∝ score, capped at 1; the factor is found by bisection (the capped sum is monotone).
    low, high = 0.0, max(1.0 / d.erk_score for d in demands)
    for _ in range(200):
        mid = (low + high) / 2
        spent = sum(min(1.0, mid * d.erk_score) * d.dense_flops for d in demands)
        low, high = (mid, high) if spent < budget else (low, mid)
    return [min(1.0, low * d.erk_score) for d in demands]


def allocate(demands: list[Demand], budget: float, init: str = "uniform") -> list[int]:
    """Kept blocks per weight, spending `budget` FLOPs (to within one block of one layer)."""
    wanted = [p * d.blocks for p, d in zip(densities(demands, budget, init), demands)]
    kept = [min(d.blocks, max(1, round(w))) for w, d in zip(wanted, demands)]
    # Spend what rounding left over, one block at a time, on the layers whose rounding lost most.
    cost = [d.block_area * d.flops_per_weight for d in demands]
    for _ in range(sum(d.blocks for d in demands)):
        left = budget - sum(k * c for k, c in zip(kept, cost))
        order = sorted(range(len(demands)), key=lambda i: kept[i] - wanted[i], reverse=left < 0)
        step = next((i for i in order if abs(left) >= cost[i] / 2 and (kept[i] < demands[i].blocks if left > 0 else kept[i] > 1)), None)
        if step is None:
            break
        kept[step] += 1 if left > 0 else -1
    return kept


def random_mask(shape: tuple[int, ...], block: tuple[int, int], kept_blocks: int, generator: torch.Generator) -> Tensor:
    """A bool mask of `shape` keeping `kept_blocks` blocks chosen uniformly at random."""
    rows, cols = blocks.grid(shape, block)
    chosen = torch.randperm(rows * cols, generator=generator)[:kept_blocks]
    block_mask = torch.zeros(rows * cols, dtype=torch.bool)
    block_mask[chosen] = True
    return blocks.expand(block_mask.reshape(rows, cols), shape, block)
