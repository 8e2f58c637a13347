"""Dynamic sparse training: RigL and SET, for any ordinary training loop.

    updater = effcc.sparsity.RigL(model, optimizer, total_steps=T)
    for step in range(T):
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        updater.step()                     # after optimizer.step(), before the next zero_grad()

Every `update_every` steps while step < stop_fraction·T, each masked layer drops the n = round(f(t)·kept)
kept blocks whose weights are smallest (Σ|W| over the block) and grows n blocks where the mask is off:
RigL (Evci et al. 2020) where the dense gradient is largest (Σ|∂L/∂(W⊙M)| over the block; effcc's masked
ops leave that dense gradient in weight.grad, see effcc/ops/sparse.py), SET (Mocanu et al. 2018) at random.
f(t) = drop_fraction/2 · (1 + cos(π t / (stop_fraction·T))) is the cosine decay RigL and Sparse-IFT use.

The number of kept blocks never changes, so neither do the active FLOPs (exactly so when the block divides
the weight; a partial edge block counts as one block like any other).  Grown blocks start at zero with
zeroed optimizer state; dropped blocks are zeroed too.  Masks change in place (mask.copy_), so anything
holding them (state_dict, a captured graph) follows.  Not calling an updater at all trains static masks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..distributed import full, local, local_part
from ..errors import EffccError
from . import blocks
from .layers import MaskedLayer, masked_layers


class MaskUpdate(NamedTuple):
    """One layer's change at one update step, counted in blocks (dropped == grown: counts are kept)."""

    step: int
    layer: str
    dropped: int
    grown: int


class _Updater:
    """The schedule, drop rule, bookkeeping and resuming that RigL and SET share; they differ in where they grow."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int, *,
        update_every: int = 100, drop_fraction: float = 0.3, stop_fraction: float = 0.8,
    ):  # fmt: skip
        who = type(self).__name__
        self.layers = masked_layers(model)
        if not self.layers:
            raise EffccError(
                f"{who}: {type(model).__name__} has no MaskedLayer; apply the sparse_ift pass (or build MaskedLayers) first"
            )
        for arg, value in (("total_steps", total_steps), ("update_every", update_every)):
            if not isinstance(value, int) or value < 1:
                raise EffccError(f"{who}: {arg} must be an integer ≥ 1, got {value!r}")
        if not 0 <= drop_fraction <= 1:
            raise EffccError(f"{who}: drop_fraction must be in [0, 1], got {drop_fraction!r}")
        if not 0 < stop_fraction <= 1:
            raise EffccError(f"{who}: stop_fraction must be in (0, 1], got {stop_fraction!r}")
        self.optimizer = optimizer  # None: no optimizer state to reset (e.g. plain SGD without momentum)
        self.total_steps, self.update_every = total_steps, update_every
        self.drop_fraction, self.stop_fraction = drop_fraction, stop_fraction
        self.steps = 0
        self.history: list[MaskUpdate] = []

    def drop_fraction_at(self, step: int) -> float:
        """f(step): the fraction of each layer's kept blocks that move at an update at `step` (0 from the stop on)."""
        end = self.stop_fraction * self.total_steps
        return 0.0 if step >= end else self.drop_fraction / 2 * (1 + math.cos(math.pi * step / end))

    def step(self) -> list[MaskUpdate]:
        """Count one training step; at an update step move blocks in every masked layer.  Returns what moved (or [])."""
        self.steps += 1
        if self.steps % self.update_every or self.steps >= self.stop_fraction * self.total_steps:
            return []
        for name, layer in self.layers:  # check every layer before changing any, so an error leaves masks consistent
            self._check(name, layer)
        fraction = self.drop_fraction_at(self.steps)
        with torch.no_grad():
            updates = [self._update(name, layer, fraction) for name, layer in self.layers]
        self.history.extend(updates)
        return updates

    def _update(self, name: str, layer: MaskedLayer, fraction: float) -> MaskUpdate:
        kept = blocks.collapse(layer.mask, layer.block)
        # Grow only where the mask is off *before* this update: a just-dropped block is not grown back
        # at once (as in RigL), so every update really moves n blocks.  Fewer candidates than n (a nearly
        # dense layer) → move only as many; none (a dense layer) → nothing to do.
        candidates = ~kept
        n = min(round(fraction * int(kept.sum())), int(candidates.sum()))
        if n == 0:
            return MaskUpdate(self.steps, name, 0, 0)
        # Block sums, not means: a partial edge block has fewer weights, so it ranks lower on both sides.
        # Under FSDP2 the weight is sharded: every rank scores the whole weight, so all choose the same blocks.
        dropped = top_blocks(-blocks.block_sums(full(layer.weight).abs(), layer.block), kept, n)
        grown = top_blocks(self._grow_score(layer), candidates, n)
        new = (kept & ~dropped) | grown
        shape = layer.mask.shape
        grown_weights = blocks.expand(grown, shape, layer.block)
        # A grown connection starts from zero (RigL); a dropped one is zeroed so that regrowing it later starts there too.
        zeroed = grown_weights | blocks.expand(dropped, shape, layer.block)
        local(layer.weight)[local_part(layer.weight, zeroed)] = 0
        self._reset_optimizer_state(layer.weight, grown_weights)
        layer.mask.copy_(blocks.expand(new, shape, layer.block))
        return MaskUpdate(self.steps, name, n, n)

    def _check(self, name: str, layer: MaskedLayer) -> None:
        """Raise before any mask changes if `layer` cannot be updated now."""

    def _grow_score(self, layer: MaskedLayer) -> Tensor:
        """[block rows, block columns]: the candidates with the largest scores grow."""
        raise NotImplementedError

    def _reset_optimizer_state(self, weight: Tensor, where: Tensor) -> None:
        # Per-weight state (Adam's exp_avg / exp_avg_sq, SGD's momentum_buffer, ...) has the weight's shape;
        # it holds history of the dense gradient at masked positions, which a fresh connection should not inherit.
        state = self.optimizer.state.get(weight, {}) if self.optimizer is not None else {}
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == weight.shape:
                local(value)[local_part(value, where)] = 0

    def state_dict(self) -> dict:
        # Plain tuples, so torch.load(weights_only=True) reads it back.
        return {"steps": self.steps, "history": [tuple(u) for u in self.history]}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise EffccError(
                f"{type(self).__name__}.load_state_dict: the state has no {', '.join(missing)}; was it saved by {type(self).__name__}?"
            )
        self.steps, self.history = int(state["steps"]), [MaskUpdate(*u) for u in state["history"]]


def top_blocks(score: Tensor, eligible: Tensor, n: int) -> Tensor:
    """A bool mask over blocks: the n eligible blocks with the largest scores (all eligible ones if fewer)."""
    flat = score.reshape(-1).masked_fill(~eligible.reshape(-1), -math.inf)
    n = min(n, int(eligible.sum()))
    chosen = torch.zeros_like(eligible).reshape(-1)
    chosen[flat.topk(n).indices] = True
    return chosen.reshape(eligible.shape)


class RigL(_Updater):
    """Rigging the Lottery: drop the smallest weights, grow where the dense gradient is largest.

    Needs weight.grad of every masked layer at update steps: call step() after backward()/optimizer.step()
    and before the next zero_grad()."""

    def _check(self, name: str, layer: MaskedLayer) -> None:
        if layer.weight.grad is None:
            raise EffccError(
                f"RigL: {name}.weight has no gradient at step {self.steps}; call updater.step() after loss.backward() "
                "and optimizer.step(), before the next zero_grad() (zero_grad(set_to_none=True) clears it)"
            )

    def _grow_score(self, layer: MaskedLayer) -> Tensor:
        return blocks.block_sums(full(layer.weight.grad).abs(), layer.block)


class SET(_Updater):
    """Sparse Evolutionary Training: drop the smallest weights, grow at random (reproducible from `seed`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int, *, seed: int = 0, **schedule):
        super().__init__(model, optimizer, total_steps, **schedule)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whatever the model's device

    def _grow_score(self, layer: MaskedLayer) -> Tensor:
        rows, cols = blocks.grid(layer.mask.shape, layer.block)
        return torch.rand(rows, cols, generator=self.generator, dtype=torch.float64).to(layer.mask.device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["rng"])
