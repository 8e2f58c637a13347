"""Value projection → output projection through attention, and which channel goes where.

Attention is linear in V with weights that do not depend on V, and the reshapes and transposes
around it only move data: so scaling V's output channel k by 1/s_k and the output projection's
matching input channels by s_k changes nothing.  Which input channel of the output projection
carries V's channel k is *measured*, not assumed: the graph runs once (float64, example
inputs) with V replaced by its channel numbers, identical for every token, so attention passes
them through unchanged and they arrive at the output projection as a map.  Grouped-query
attention (one V channel feeding several heads) shows up as a channel used several times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map

from ..offload import StoreInterpreter
from ..verify import default_dtype, promote_graph_module, to_float64
from .graph import reads_values
from .patterns import Linear, match_linear

aten = torch.ops.aten
_MOVES_DATA = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.expand.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.alias.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.slice.Tensor,
    aten.select.int,
}


@dataclass
class AttentionSite:
    value: Linear  # the V projection
    output: Linear  # the output projection
    attention: fx.Node


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if reads_values(u)]


def attention_sites(graph: fx.Graph) -> tuple[list[AttentionSite], list[tuple[fx.Node, str]]]:
    """(sites, refusals) for every scaled_dot_product_attention in the graph."""
    sites, refused = [], []
    for attn in graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        node = attn.args[2]
        while isinstance(node, fx.Node) and node.target in _MOVES_DATA and len(_users(node)) == 1:
            node = node.args[0]
        value = match_linear(node) if isinstance(node, fx.Node) else None
        if value is None or len(_users(node)) != 1:
            refused.append((attn, "its V is not the output of a linear read by this attention alone (a fused q/k/v projection?)"))
            continue
        node = attn
        while len(_users(node)) == 1 and _users(node)[0].target in _MOVES_DATA:
            node = _users(node)[0]
        readers = _users(node)
        output = match_linear(readers[0]) if len(readers) == 1 else None
        if output is None:
            refused.append((attn, "its output reaches something other than one linear"))
            continue
        sites.append(AttentionSite(value, output, attn))
    return sites, refused


class _ChannelNumbers(StoreInterpreter):
    """Runs the graph with every watched V replaced by its channel numbers; keeps what reaches each output projection."""

    def __init__(self, gm, sites: list[AttentionSite], store=None):
        super().__init__(gm, store, float64=store is not None)
        self.values = {site.value.node.name for site in sites}
        self.outputs = {site.output.node.name for site in sites}
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, node):
        if node.name in self.outputs:
            self.seen[node.name] = self.env[node.args[0]] if node.target is not aten.addmm.default else self.env[node.args[1]]
        result = super().run_node(node)
        if node.name in self.values:  # every token carries its channel numbers: 0, 1, …, out − 1
            result = torch.arange(result.shape[-1], dtype=torch.float64, device=result.device).expand_as(result).contiguous()
        return result


@torch.no_grad()
def channel_maps(gm: fx.GraphModule, sites: list[AttentionSite], args: tuple, kwargs: dict | None = None, store=None) -> list:
    """For each site, m with o_in[j] = v_out[m[j]] for every input channel j of its output projection, or None.

    One run measures every site: a replaced V does not depend on what comes before it, and
    attention averages identical rows into themselves whatever its weights.
    store: where the graph's tensors are when they are not in it (offload.TensorStore)."""
    promoted = promote_graph_module(gm) if store is None else gm  # a store promotes weights as it loads them
    runner = _ChannelNumbers(promoted, sites, store)
    inputs = (to_float64(args), to_float64(kwargs or {}))
    if store is not None:
        inputs = tree_map(lambda t: t.to(store.device) if isinstance(t, torch.Tensor) else t, inputs)
    flat, _ = tree_flatten(inputs)
    with default_dtype(torch.float64):
        runner.run(*[a for a in flat if isinstance(a, torch.Tensor)])
    return [_as_map(runner.seen.get(site.output.node.name)) for site in sites]


def _as_map(seen: torch.Tensor | None) -> torch.Tensor | None:
    if seen is None:
        return None
    rows = seen.reshape(-1, seen.shape[-1])
    mapping = rows[0].round()
    if not torch.allclose(rows, mapping.expand_as(rows), atol=1e-6) or mapping.min() < 0:
        return None
    return mapping.long().cpu()


@dataclass
class LinearPair:
    """`first`'s output reaches `second`'s input channel for channel, through views and
    elementwise products only (a gated MLP's up → down): scaling first's output channel j by
    1/s_j and second's input channel j by s_j changes nothing."""

    first: Linear
    second: Linear


def linear_pairs(graph: fx.Graph) -> tuple[list[LinearPair], list[tuple[fx.Node, str]]]:
    """(pairs, refusals): a refusal is a linear fed by another through a non-linear function."""
    from .graph import source_of

    pairs, refused = [], []
    for node in graph.nodes:
        second = match_linear(node)
        if second is None or not isinstance(second.input, fx.Node):
            continue
        first = _channelwise_source(second.input, second.node)
        if first is not None:
            pairs.append(LinearPair(first, second))
            continue
        between = source_of(second.input)
        if (
            between.op == "call_function"
            and between.args
            and isinstance(between.args[0], fx.Node)
            and match_linear(source_of(between.args[0]))
        ):
            op = getattr(between.target, "__name__", str(between.target))
            refused.append((node, f"its input comes from a linear through {op}, which a 1/s cannot pass exactly"))
    return pairs, refused


def _channelwise_source(node: fx.Node, reader: fx.Node) -> Linear | None:
    """The linear whose output reaches `reader` through views and elementwise products alone."""
    from .graph import is_transparent, value_of

    if _users(node) != [reader]:
        return None  # someone else reads this value: scaling it would change them
    lin = match_linear(node)
    if lin is not None:
        return lin
    if is_transparent(node):
        return _channelwise_source(node.args[0], node)
    if node.target is aten.mul.Tensor:
        out = value_of(node)
        for operand in node.args:
            val = value_of(operand) if isinstance(operand, fx.Node) else None
            if val is not None and out is not None and tuple(val.shape) == tuple(out.shape):
                found = _channelwise_source(operand, node)
                if found is not None:
                    return found
    return None
