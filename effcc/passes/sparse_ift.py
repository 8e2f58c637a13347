"""sparse_ift: dense layers → Sparse-IFT families with the same FLOPs, to train (Thangarasa et al.).

    res = effcc.optimize(model, (x,), passes=[("sparse_ift", {"family": "wide", "sparsity": 0.75})])
    res.model          # a new nn.Module to train (your model is unchanged); masks are buffers

Unlike the other passes this one changes the architecture, so it works on the modules (a
deep copy), not on the captured graph: the result keeps train/eval behaviour (dropout, batch
norm), trains with any optimizer and dynamic sparse trainer (effcc.sparsity.RigL / SET), and
is captured afterwards for export.  The graph is still what finds the structure: which layers
run first and last, how often each runs, and which widths Sparse Wide can grow
(effcc.sparsity.widen).  The guarantee is FLOPs, not function: the pipeline counts the
forward FLOPs of both models on the example inputs (torch's FlopCounterMode, masked layers by
their kept weights) and fails if they differ by more than the rounding of one block.
New weights are freshly initialised (Sparse-IFT trains from scratch); others are kept.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import fx, nn

from ..analysis import describe, match_linear
from ..capture import eval_mode, export
from ..errors import EffccError
from ..sparsity import families, masks
from ..sparsity.blocks import not_whole_blocks
from ..sparsity.families import FAMILIES, Piece
from ..sparsity.layers import LayerSpec, MaskedLayer, spec_of, why_not_a_layer
from ..sparsity.widen import Layer, WidthGroup, find_width_group
from . import register_pass
from .base import Guarantee, Pass, SiteLog

aten = torch.ops.aten


@dataclass
class Planned:
    """What one layer becomes."""

    layer: Layer
    family: str
    pieces: list[Piece]
    flops_per_weight: int
    kept: list[int] = field(default_factory=list)  # blocks kept, per sparse piece


@register_pass
@dataclass
class SparseIFT(Pass):
    name = "sparse_ift"
    summary = "Sparse-IFT: hidden linears/convs → sparse wide / parallel / factorized / doped layers with the same FLOPs"
    guarantee = Guarantee.ISO_FLOP
    rewrites_modules: ClassVar[bool] = True
    family: str = "wide"
    sparsity: float = 0.75
    include: str | None = None  # regex on module names; default: every linear/conv2d but the first and last
    exclude: str | None = None
    init: str = "uniform"  # or "erk": how kept weights are spread over layers
    block: tuple = (1, 1)  # masks constant over (out, in) blocks; e.g. (32, 32) for the GPU kernel
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            problems.append(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        if self.init not in masks.INITS:
            problems.append(f"init {self.init!r} is not one of {', '.join(masks.INITS)}")
        if not (isinstance(self.block, (tuple, list)) and len(self.block) == 2 and all(isinstance(b, int) and b > 0 for b in self.block)):
            problems.append(f"block must be two positive integers (rows, columns), got {self.block!r}")
        if problems:
            raise EffccError(f"pass 'sparse_ift': {'; '.join(problems)}")
        self.block = tuple(self.block)
        self.flop_slack = 0  # FLOPs the rounding to whole blocks may leave (set by transform)

    def apply(self, program, log: SiteLog) -> None:
        raise EffccError("sparse_ift changes the model's layers and runs on the modules: use effcc.optimize(model, ...), first in the list")

    # ---- the module rewrite ------------------------------------------------------------------
    def transform(self, model: nn.Module, args: tuple, kwargs: dict, log: SiteLog) -> nn.Module:
        """A rewritten deep copy of `model`; `log` says what each layer became or why it stayed."""
        new = copy.deepcopy(model)
        with torch.no_grad():
            graph = export(new, args, kwargs).module().graph
        layers, calls = _layers(graph, new, log)
        positions = _flops_per_weight(new, [layer.module for layer in layers], args, kwargs)
        layers = [layer for layer in layers if _once(layer, calls, log)]
        chosen = self._select(layers, graph, log)
        if self.family == "wide":
            plans, widened = self._plan_wide(layers, chosen, positions, log)
        else:
            plans, widened = self._plan_per_layer(chosen, positions, log), []
        if not plans:
            return new
        self._allocate(plans, positions)
        generator = torch.Generator().manual_seed(self.seed)
        for plan in plans:
            old = new.get_submodule(plan.layer.module)
            _replace(new, plan.layer.module, self._build(plan, old, generator).train(old.training))
            log.change(plan.layer.module, _describe_plan(plan, self.block))
        for item in widened:
            _widen(new, *item)
        return new

    def _select(self, layers: list[Layer], graph: fx.Graph, log: SiteLog) -> list[Layer]:
        chosen = []
        for layer in layers:
            if self.include is not None:
                wanted = re.search(self.include, layer.module) is not None
            else:
                edge = _edge(layer, layers)
                wanted = edge is None
                if edge:
                    log.skip(layer.module, f"the {edge} layer stays dense (Sparse-IFT's default; `include` overrides)")
            if wanted and self.exclude and re.search(self.exclude, layer.module):
                wanted = False
            if wanted:
                chosen.append(layer)
        return chosen

    def _fits_blocks(self, spec, where: str, log: SiteLog) -> bool:
        if why := not_whole_blocks(spec.out_features, spec.in_features * spec.taps, self.block):
            log.skip(where, why)
            return False
        return True

    def _plan_per_layer(self, chosen: list[Layer], positions: dict, log: SiteLog) -> list[Planned]:
        plans = []
        for layer in chosen:
            spec = positions[layer.module].spec
            parts = families.pieces(self.family, spec, self.sparsity, multiple=_multiple(self.block, spec.out_features))
            if all(self._fits_blocks(p.spec, layer.module, log) for p in parts if p.sparse):
                plans.append(Planned(layer, self.family, parts, positions[layer.module].flops_per_weight))
        return plans

    def _plan_wide(self, layers: list[Layer], chosen: list[Layer], positions: dict, log: SiteLog):
        groups = _width_groups(layers)
        selected = {layer.module for layer in chosen}
        grown = [g for g in groups if g.refusal is None and any(layer.module in selected for layer in g.layers)]
        sides: dict[str, list[WidthGroup | None]] = {}  # module → [group of its inputs, group of its outputs]
        for g in grown:
            for layer in g.readers:
                sides.setdefault(layer.module, [None, None])[0] = g
            for layer in g.writers:
                sides.setdefault(layer.module, [None, None])[1] = g
        for layer in chosen:
            if layer.module not in sides:
                why = next(g.refusal for g in groups if g.refusal and any(x.module == layer.module for x in g.layers))
                log.skip(layer.module, f"neither of its widths can grow: {why}")
        by_name = {layer.module: layer for layer in layers}
        terms = []
        for module, (g_in, g_out) in sides.items():
            density = 1 - self.sparsity if module in selected else 1.0
            terms.append((positions[module].dense_flops, (g_in is not None) + (g_out is not None), density))
        omega = families.solve_width_factor(terms, sum(f for f, _, _ in terms))
        if omega <= 1.0 + 1e-9:
            if grown:
                log.skip("model", "no width can grow at this sparsity (the dense first and last layers take the budget)")
            return [], []
        width = {id(g): families.round_width(g.channels * omega, _multiple(self.block, g.channels)) for g in grown}
        plans = []
        for module, (g_in, g_out) in sides.items():
            spec = positions[module].spec.resized(in_features=width[id(g_in)] if g_in else None, out_features=width[id(g_out)] if g_out else None)
            piece = Piece("layer", spec, module in selected)
            if piece.sparse and not self._fits_blocks(spec, module, log):
                return [], []
            plans.append(Planned(by_name[module], "wide", [piece], positions[module].flops_per_weight))
        norms = [(name, width[id(g)], None) for g in grown for name in g.norms]
        parameters = [(name, width[id(g)], fill) for g in grown for name, fill in g.parameters]
        return plans, norms + parameters

    def _allocate(self, plans: list[Planned], positions: dict) -> None:
        budget = sum(positions[p.layer.module].dense_flops for p in plans)
        budget -= sum(piece.spec.weights * p.flops_per_weight for p in plans for piece in p.pieces if not piece.sparse)
        demands = [masks.Demand(piece.spec.weight_shape, p.flops_per_weight, self.block) for p in plans for piece in p.pieces if piece.sparse]
        if budget <= 0:
            raise EffccError(f"sparse_ift: the dense parts of the {self.family} layers alone exceed the dense model's FLOPs")
        kept = iter(masks.allocate(demands, budget, self.init))
        for p in plans:
            p.kept = [next(kept) for piece in p.pieces if piece.sparse]
        self.flop_slack = max(d.block_area * d.flops_per_weight for d in demands) if demands else 0

    def _build(self, plan: Planned, old: nn.Module, generator: torch.Generator) -> nn.Module:
        weight = next(old.parameters())
        built, kept = [], iter(plan.kept)
        for piece in plan.pieces:
            module = families.make(piece, self.block, weight.device, weight.dtype)
            if isinstance(module, MaskedLayer):
                module.mask.copy_(masks.random_mask(tuple(module.weight.shape), self.block, next(kept), generator))
            built.append(module)
        return families.build(plan.family, built)


# ---- graph facts ------------------------------------------------------------------------------------
def _layers(graph: fx.Graph, model: nn.Module, log: SiteLog) -> tuple[list[Layer], Counter]:
    """Linear and conv2d calls in execution order, each tied to the module owning its weight."""
    layers, calls = [], Counter()
    for node in graph.nodes:
        lin = match_linear(node)
        if lin is not None:
            weight, x, axis = lin.weight, lin.input, -1
        elif node.op == "call_function" and node.target is aten.conv2d.default and node.args[1].op == "get_attr":
            weight, x, axis = node.args[1], node.args[0], -3
        else:
            continue
        owner, _, leaf = weight.target.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf != "weight" or spec_of(module) is None:
            why = why_not_a_layer(module) if leaf == "weight" else f"its weight is {weight.target}"
            log.skip(describe(node), f"left dense: {why}")
            continue
        calls[owner] += 1
        layers.append(Layer(node, x, owner, axis))
    return layers, calls


def _once(layer: Layer, calls: Counter, log: SiteLog) -> bool:
    if calls[layer.module] > 1:
        log.skip(layer.module, f"it runs {calls[layer.module]} times per forward (a shared layer): left as it is")
        return False
    return True


def _edge(layer: Layer, layers: list[Layer]) -> str | None:
    """'first' when the layer reads a model input through no other layer or embedding, 'last' when
    its output reaches the model's output likewise, else None."""
    barriers = {other.node for other in layers} | {n for n in layer.node.graph.nodes if n.target is aten.embedding.default}
    if _reaches(layer.input, barriers, lambda n: [a for a in n.all_input_nodes], "placeholder"):
        return "first"
    if _reaches(layer.node, barriers, lambda n: list(n.users), "output", start_is_barrier=True):
        return "last"
    return None


def _reaches(start: fx.Node, barriers: set, step, op: str, start_is_barrier: bool = False) -> bool:
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node in seen or (node in barriers and not (start_is_barrier and node is start)):
            continue
        seen.add(node)
        if node.op == op:
            return True
        todo.extend(step(node))
    return False


def _width_groups(layers: list[Layer]) -> list[WidthGroup]:
    readers = {layer.node: [layer] for layer in layers}
    by_output = {layer.node: layer for layer in layers}
    groups, placed = [], set()
    for layer in layers:
        if layer.module not in placed:
            group = find_width_group(layer, by_output, readers)
            placed.update(w.module for w in group.writers)
            groups.append(group)
    return groups


class Measured(NamedTuple):
    spec: LayerSpec
    flops_per_weight: int  # what one weight costs on the example inputs: 2 × tokens (linear) or output positions (conv)

    @property
    def dense_flops(self) -> int:
        return self.spec.weights * self.flops_per_weight


def _flops_per_weight(model: nn.Module, names: list[str], args: tuple, kwargs: dict) -> dict[str, Measured]:
    """Each named layer's spec and FLOPs per weight, by running the model once on the example inputs."""
    found = {}

    def record(name):
        def hook(module, inputs, output):
            spec = spec_of(module)
            found[name] = Measured(spec, 2 * (output.numel() // spec.out_features))

        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _multiple(block: tuple[int, int], channels: int) -> int:
    if block != (1, 1):
        return max(block)
    # Multiples of 8 suit tensor cores; below 64 channels the rounding would eat the widening.
    return 8 if channels % 8 == 0 and channels >= 64 else 1


# ---- module surgery ---------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _widen(model: nn.Module, name: str, channels: int, fill: float | None) -> None:
    """Give a per-channel parameter (filled with `fill`) or a norm module (`fill` None) `channels` channels."""
    owner, _, leaf = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, _widened_norm(old, channels) if fill is None else _widened_parameter(old, channels, fill))


def _widened_parameter(old: torch.Tensor, channels: int, fill: float) -> torch.Tensor:
    value = torch.full([channels if s > 1 else 1 for s in old.shape], fill, dtype=old.dtype, device=old.device)
    return nn.Parameter(value) if isinstance(old, nn.Parameter) else value


def _widened_norm(old: nn.Module, channels: int) -> nn.Module:
    """A fresh BatchNorm / LayerNorm like `old` over `channels` channels."""
    if isinstance(old, nn.modules.batchnorm._BatchNorm):
        new = type(old)(channels, old.eps, old.momentum, old.affine, old.track_running_stats)
    elif isinstance(old, nn.LayerNorm):
        new = nn.LayerNorm(channels, old.eps, old.elementwise_affine, bias=old.bias is not None)
    else:
        raise EffccError(f"sparse_ift: cannot widen {type(old).__name__}: only BatchNorm and LayerNorm are known")
    like = next(t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point())
    return new.to(device=like.device, dtype=like.dtype).train(old.training)


def _describe_plan(plan: Planned, block: tuple[int, int]) -> str:
    sparse = [p for p in plan.pieces if p.sparse]
    total = sum(p.spec.weights for p in sparse)
    kept = sum(k * block[0] * block[1] for k in plan.kept)
    shapes = " + ".join(f"{p.role} {p.spec.in_features}→{p.spec.out_features}{' (dense)' if not p.sparse else ''}" for p in plan.pieces)
    density = f", density {kept / total:.3f}" if total else ""
    return f"{plan.family}: {shapes}{density}"
