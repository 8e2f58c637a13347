"""Rewrite a captured decoder so that one call runs a packed batch of prompt groups (Prefix Grouper).

The captured graph computes logits of one sequence.  Every op except attention works
token by token, so it may run on the packed tokens [P_1, S_11, …, S_1G, P_2, …] as they
are; each causal self-attention (an `aten.scaled_dot_product_attention` node) becomes
`effcc.ops.prefix_attention` over that packed layout, and the positions the model reads
restart at |P| for every suffix.  What the rewrite needs of each attention, checked
before anything changes:

- no dropout, self-attention (queries, keys and values over the same tokens);
- causal: `is_causal=True` with no mask, or a mask that is the causal mask.  A mask is
  a function of the sequence (length, positions); it must not read the tokens' values
  (padding masks, ALiBi-style biases are refused).  Its values are checked by running
  the mask's own subgraph at the lengths being used (`CausalMaskCheck`), so a sliding
  window shorter than a sequence is caught too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import EffccError
from ..ops.prefix_attention import prefix_attention

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SHAPE_ONLY = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}
LAYOUT_INPUTS = ("group_start", "prefix_end", "segment_start", "visible_until")  # PackedLayout.op_inputs()


class SharedPrefixError(EffccError):
    """The model's attention cannot be split into a shared prefix and suffixes; the message says where and why."""


@dataclass
class AttentionSite:
    node: fx.Node  # the SDPA node
    mask: fx.Node | None  # the mask node to check, None for is_causal=True


@dataclass
class PackedGraph:
    """The rewritten graph: inputs (input_ids [1, N], position_ids [1, N], the layout vectors, rows to keep)."""

    gm: fx.GraphModule
    sites: list[str]
    mask_check: CausalMaskCheck | None
    notes: list[str] = field(default_factory=list)


def sequence_inputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {node.target: node for node in gm.graph.find_nodes(op="placeholder")}


def attention_sites(gm: fx.GraphModule, ids_name: str) -> list[AttentionSite]:
    """Every SDPA node, each checked for what the split needs; raises naming the first that fails."""
    sites = []
    for node in gm.graph.find_nodes(op="call_function", target=SDPA):
        q, k, v, *rest = node.args
        options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), rest)) | node.kwargs
        where = _describe(node)
        if options.get("dropout_p", 0.0):
            raise SharedPrefixError(f"{where}: attention dropout p={options['dropout_p']}; grouped and ungrouped runs can only agree without dropout")
        lengths = [str(_length(t)) for t in (q, k, v)]
        if len(set(lengths)) != 1:
            raise SharedPrefixError(f"{where}: queries, keys and values have lengths {lengths}: not self-attention over one sequence")
        mask = options.get("attn_mask")
        if mask is None and not options.get("is_causal", False):
            raise SharedPrefixError(f"{where}: attention is bidirectional (no mask, is_causal=False); a shared prefix needs causal attention")
        if mask is not None and options.get("is_causal", False):
            raise SharedPrefixError(f"{where}: both a mask and is_causal=True; only one causal description is supported")
        if mask is not None:
            _refuse_token_dependent_mask(mask, ids_name, where)
        sites.append(AttentionSite(node, mask))
    if not sites:
        raise SharedPrefixError(
            "no scaled_dot_product_attention in the captured graph: the model's attention is written out by hand "
            "(matmuls and a softmax), which cannot be split; write it with torch.nn.functional.scaled_dot_product_attention"
        )
    return sites


def _describe(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    layer = next(reversed(stack.values()))[0] if stack else ""
    return f"attention '{layer or node.name}' (node {node.name})"


def _length(node) -> object:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape[-2] if value is not None else None


def _refuse_token_dependent_mask(mask: fx.Node, ids_name: str, where: str) -> None:
    """A mask may read the sequence's length and positions, never the tokens' values."""
    seen, todo = set(), [mask]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent in node.all_input_nodes:
            if parent.op == "placeholder" and parent.target == ids_name and node.target not in SHAPE_ONLY:
                raise SharedPrefixError(
                    f"{where}: its mask reads the token values (node {node.name}), e.g. a padding mask or a bias; "
                    "only causal masks that depend on the sequence length and positions can be split"
                )
            todo.append(parent)


class CausalMaskCheck:
    """Runs only the mask subgraphs, at a given length and positions 0…T−1, and checks they are causal.

    The model computes its masks from the sequence (length, positions); the values at one
    length say nothing about another (a sliding window shows only beyond its width), so
    every length in use is checked, each once."""

    def __init__(self, gm: fx.GraphModule, masks: dict[str, fx.Node], ids_name: str, positions_name: str | None):
        self.names = list(masks)
        self.ids_name, self.positions_name = ids_name, positions_name
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        needed = _ancestors(masks.values())
        for node in gm.graph.nodes:
            if node in needed:
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[m] for m in masks.values()))
        self.gm = fx.GraphModule(gm, graph)
        self.checked_up_to = 0

    def ensure(self, length: int, device) -> None:
        """Check the masks at `length` unless a longer length passed already (causality of a prefix of a mask is that of the mask)."""
        if length <= self.checked_up_to:
            return
        inputs = {}
        for node in self.gm.graph.find_nodes(op="placeholder"):
            if node.target == self.ids_name:
                inputs[node.target] = torch.zeros(1, length, dtype=torch.long, device=device)
            elif node.target == self.positions_name:
                inputs[node.target] = torch.arange(length, device=device)[None]
            else:
                inputs[node.target] = None
        with torch.no_grad():
            masks = self.gm(**inputs)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        for name, mask in zip(self.names, masks):
            if mask.dtype == torch.bool:
                visible, additive_only = mask, True
            else:  # an additive mask: 0 where visible, −inf (or the dtype's lowest) where not, nothing in between
                visible = mask == 0
                additive_only = bool((visible | torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min)).all())
            if not (additive_only and bool((visible == causal).all())):
                raise SharedPrefixError(
                    f"attention node {name}: its mask at length {length} is not the causal mask "
                    "(a sliding window, a bias or a non-causal pattern); this attention cannot be split"
                )
        self.checked_up_to = length


def _ancestors(nodes) -> set[fx.Node]:
    seen, todo = set(), list(nodes)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def pack_for_groups(gm: fx.GraphModule, logits_index: int, ids_name: str, positions_name: str | None) -> PackedGraph:
    """Rewrite `gm` (an unlifted torch.export graph of one sequence, batch 1) for packed groups.

    New signature: (input_ids [1, N], position_ids [1, N], *PackedLayout.op_inputs(),
    keep [K] int64) → logits [1, K, vocab] of the kept tokens."""
    graph = gm.graph
    sites = attention_sites(gm, ids_name)
    masks = {site.node.name: site.mask for site in sites if site.mask is not None}
    mask_check = CausalMaskCheck(gm, masks, ids_name, positions_name) if masks else None
    inputs = sequence_inputs(gm)
    notes = []

    for node in list(graph.nodes):
        # torch.export's input guards describe the old signature; metadata asserts would keep
        # the (now unused, N×N) mask computations alive through dead-code elimination
        if (node.op == "call_module" and node.target == "_guards_fn") or node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    new_inputs = [list(inputs.values())[-1]]
    for name in (*LAYOUT_INPUTS, "keep"):  # one after another, in signature order
        with graph.inserting_after(new_inputs[-1]):
            new_inputs.append(graph.placeholder(name))
    *layout, keep = new_inputs[1:]
    for name in [name for name in inputs if name not in (ids_name, positions_name)]:  # e.g. use_cache: fixed at capture
        placeholder = inputs[name]
        if placeholder.users:
            raise SharedPrefixError(f"the captured graph reads input '{name}'; grouped runs pass only token ids and positions")
        graph.erase_node(placeholder)

    names = [site.node.name for site in sites]  # before the nodes are replaced
    for site in sites:
        node = site.node
        q, k, v = node.args[:3]
        scale = node.kwargs.get("scale")  # keyword-only in SDPA's schema
        with graph.inserting_before(node):
            packed = graph.call_function(prefix_attention, (q, k, v, *layout), {"scale": scale})
        packed.meta = dict(node.meta)
        node.replace_all_uses_with(packed)
        graph.erase_node(node)

    positions = inputs.get(positions_name) if positions_name else None
    if positions is None:
        positions = _positions_from_arange(graph, inputs[ids_name], notes)
    _keep_rows_before_head(graph, logits_index, keep, notes)
    graph.eliminate_dead_code()
    graph._codegen = fx.graph.CodeGen()  # plain positional signature, plain tensor output
    graph.lint()
    packed_gm = fx.GraphModule(gm, graph)
    return PackedGraph(packed_gm, names, mask_check, notes)


def _positions_from_arange(graph: fx.Graph, ids: fx.Node, notes: list[str]) -> fx.Node:
    """A model that takes no positions makes them with arange(T): give it the packed positions instead."""
    with graph.inserting_after(ids):
        positions = graph.placeholder("position_ids")
    flat = None
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.arange.default)):
        end = node.args[0] if node.args else None
        if isinstance(end, fx.Node) and end.target == torch.ops.aten.sym_size.int and end.args == (ids, 1):
            if flat is None:
                with graph.inserting_after(positions):
                    flat = graph.call_function(torch.ops.aten.select.int, (positions, 0, 0))
            node.replace_all_uses_with(flat)
            graph.erase_node(node)
            notes.append(f"{node.name}: arange over the sequence read as token positions")
    return positions


POINTWISE_AFTER_HEAD = {
    torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.tanh.default,
    torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.add.Tensor,
}


def _keep_rows_before_head(graph: fx.Graph, logits_index: int, keep: fx.Node, notes: list[str]) -> None:
    """Output only the logits of the kept tokens, and compute only those: select the rows
    before the LM head (a token-wise linear, possibly followed by soft-capping), not after."""
    output = graph.output_node()
    results = output.args[0]
    leaves = list(results) if isinstance(results, (tuple, list)) else [results]
    logits = leaves[logits_index]
    head = logits
    while head.target in POINTWISE_AFTER_HEAD and len([a for a in head.args if isinstance(a, fx.Node)]) == 1 and len(head.users) == 1:
        head = next(a for a in head.args if isinstance(a, fx.Node))
    if head.target == torch.ops.aten.linear.default and len(head.users) == 1:
        source = head.args[0]
        with graph.inserting_before(head):
            rows = graph.call_function(torch.ops.aten.index_select.default, (source, 1, keep))
        head.replace_input_with(source, rows)
        final = logits
    else:
        with graph.inserting_before(output):
            final = graph.call_function(torch.ops.aten.index_select.default, (logits, 1, keep))
        notes.append("logits are not produced by a linear head: all token logits are computed, then the kept ones selected")
    output.args = (final,)
