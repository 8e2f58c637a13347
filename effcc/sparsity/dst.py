"""Dynamic sparse training: RigL and SET, for any ordinary training loop.

    updater = effcc.sparsity.RigL(model, optimizer, total_steps=T)
    for step in range(T):
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        updater.step()                     # after optimizer.step(), before the next zero_grad()

Every `update_every` steps until `stop_fraction`·T, each masked layer drops the f(t)·kept blocks
whose weights are smallest (Σ|W| over the block) and grows as many where the mask is off:
RigL (Evci et al. 2020) where the dense gradient is largest (Σ|∂L/∂W| — effcc's masked ops
give the dense gradient, see effcc/ops/sparse.py), SET (Mocanu et al. 2018) at random.
f(t) = drop_fraction/2 · (1 + cos(π t / (stop_fraction·T))) is the cosine decay Sparse-IFT uses.
The number of kept blocks never changes, so neither do the active FLOPs.  Grown blocks start
at zero with fresh optimizer state; a just-dropped block is not grown back in the same update.
Masks change in place, so anything holding them (state_dict, a captured graph) follows.
Not calling an updater trains static masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import EffccError
from . import blocks
from .layers import MaskedLayer, masked_layers


class _Updater:
    grows_by: str = ""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int, *, update_every: int = 100,
                 drop_fraction: float = 0.3, stop_fraction: float = 0.8):  # fmt: skip
        self.layers = masked_layers(model)
        if not self.layers:
            raise EffccError(f"{type(self).__name__}: {type(model).__name__} has no masked layers; apply the sparse_ift pass first")
        if total_steps < 1 or update_every < 1:
            raise EffccError(f"{type(self).__name__}: total_steps and update_every must be ≥ 1 (got {total_steps}, {update_every})")
        if not 0 <= drop_fraction <= 1 or not 0 < stop_fraction <= 1:
            raise EffccError(f"{type(self).__name__}: drop_fraction must be in [0, 1] and stop_fraction in (0, 1]")
        self.optimizer, self.total_steps, self.update_every = optimizer, total_steps, update_every
        self.drop_fraction, self.stop_fraction = drop_fraction, stop_fraction
        self.steps = 0
        self.history: list[tuple[int, str, int]] = []  # (step, layer, blocks moved)

    def drop_fraction_at(self, step: int) -> float:
        end = self.stop_fraction * self.total_steps
        return 0.0 if step >= end else self.drop_fraction / 2 * (1 + math.cos(math.pi * step / end))

    def step(self) -> None:
        """Count one training step; at an update step, move blocks in every masked layer."""
        self.steps += 1
        if self.steps % self.update_every or self.steps >= self.stop_fraction * self.total_steps:
            return
        fraction = self.drop_fraction_at(self.steps)
        with torch.no_grad():
            for name, layer in self.layers:
                moved = self._update(name, layer, fraction)
                self.history.append((self.steps, name, moved))

    def _update(self, name: str, layer: MaskedLayer, fraction: float) -> int:
        kept = blocks.collapse(layer.mask, layer.block)
        n = min(round(fraction * int(kept.sum())), int((~kept).sum()))
        if n == 0:
            return 0
        magnitude = blocks.block_sums(layer.weight.abs(), layer.block)
        dropped = _largest((-magnitude).masked_fill(~kept, -math.inf), n)  # the smallest kept
        candidates = ~kept
        score = self._grow_score(name, layer).masked_fill(~candidates, -math.inf)
        grown = _largest(score, n)
        new = kept.clone()
        new.view(-1)[dropped] = False
        new.view(-1)[grown] = True
        grown_mask = blocks.expand(new & ~kept, layer.mask.shape, layer.block)
        dropped_mask = blocks.expand(kept & ~new, layer.mask.shape, layer.block)
        layer.weight[grown_mask | dropped_mask] = 0
        self._reset_optimizer_state(layer.weight, grown_mask)
        layer.mask.copy_(blocks.expand(new, layer.mask.shape, layer.block))
        return n

    def _grow_score(self, name: str, layer: MaskedLayer) -> Tensor:
        raise NotImplementedError

    def _reset_optimizer_state(self, weight: Tensor, where: Tensor) -> None:
        state = self.optimizer.state.get(weight, {}) if self.optimizer is not None else {}
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == weight.shape:
                value[where] = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.history = state["steps"], list(state["history"])


def _largest(score: Tensor, n: int) -> Tensor:
    """Flat indices of the n largest finite entries (fewer if there are fewer)."""
    flat = score.reshape(-1)
    n = min(n, int(torch.isfinite(flat).sum()))
    return flat.topk(n).indices


class RigL(_Updater):
    """Grow where the dense gradient is largest (needs weight.grad at update steps)."""

    def _grow_score(self, name: str, layer: MaskedLayer) -> Tensor:
        if layer.weight.grad is None:
            raise EffccError(
                f"RigL: {name}.weight has no gradient at step {self.steps}; call updater.step() after loss.backward() "
                "and optimizer.step(), before the next zero_grad()"
            )
        return blocks.block_sums(layer.weight.grad.abs(), layer.block)


class SET(_Updater):
    """Grow at random (reproducible with `seed`)."""

    def __init__(self, model, optimizer, total_steps, *, seed: int = 0, **schedule):
        super().__init__(model, optimizer, total_steps, **schedule)
        self.generator = torch.Generator().manual_seed(seed)

    def _grow_score(self, name: str, layer: MaskedLayer) -> Tensor:
        rows, cols = blocks.grid(layer.mask.shape, layer.block)
        return torch.rand(rows, cols, generator=self.generator, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["rng"])
