"""causal_attention: a causal mask held as a tensor → scaled_dot_product_attention(is_causal=True).

A model traced by torch.export or torch.compile builds its causal mask as a [B, 1, T, T] tensor
(Hugging Face does whenever it is traced), and SDPA given a mask cannot use its flash kernel.
If the mask is exactly the causal pattern, SDPA with is_causal=True computes the same thing
(masked scores get exp(−∞) = 0 either way) without reading or even building it.

"Exactly" is checked, not assumed, for each mask:
- it must depend on the inputs' sizes only, never their values (a padding mask depends on data:
  refused), so it can be evaluated for any sequence length;
- it is evaluated at the example length, at that length + 3, and just past every integer constant
  its graph compares against (a sliding window of 4096 shows itself at 4097), and must be the
  causal pattern, with as many queries as keys, at every one.
A bool mask keeps (i, j) iff j ≤ i; a float mask is 0 there and −∞ or ≤ finfo.min/2 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from ..analysis import describe
from ..program import Program, stored
from . import register_pass
from .base import Guarantee, Pass, SiteLog

aten = torch.ops.aten
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
LONGEST_CHECKED = 8192  # a threshold above this is not evaluated past: the site is refused instead


@register_pass
@dataclass
class CausalAttention(Pass):
    name = "causal_attention"
    summary = "SDPA with a causal mask tensor → is_causal=True (flash kernels); the mask is evaluated, not assumed"
    guarantee = Guarantee.EXACT
    default = True
    rewrites_tensors = False  # no weight changes: applies to training graphs too
    pays_in_training = True  # GPT-2-medium on an H100: training step 1.12x over Inductor (README)

    def apply(self, program: Program, log: SiteLog) -> None:
        sites = [
            (node, _arguments(node))
            for node in program.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
        ]
        sites = [(node, bound) for node, bound in sites if isinstance(bound.get("attn_mask"), fx.Node)]
        verdicts: dict[fx.Node, str | None] = {}
        for node, bound in sites:
            mask = bound["attn_mask"]
            if mask not in verdicts:
                verdicts[mask] = why_not_causal(program, mask)
            problem = verdicts[mask]
            if problem:
                log.skip(describe(node), problem)
                continue
            node.args = (bound["query"], bound["key"], bound["value"])
            node.kwargs = {**{k: v for k, v in bound.items() if k not in SDPA_ARGS[:3]}, "attn_mask": None, "is_causal": True}
            log.change(
                describe(node), f"mask {mask.name} is causal at every length checked: is_causal=True, the mask is no longer built"
            )


def _arguments(node: fx.Node) -> dict:
    return {**dict(zip(SDPA_ARGS, node.args)), **node.kwargs}


# ---- what the mask is computed from --------------------------------------------------------------------
def mask_sources(mask: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """(the nodes the mask is computed from, in graph order; an input it reads by value, or None).

    An input read only through its sizes (sym_size) does not count as read."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return [], node
        if node.op != "call_function" or node.target is not aten.sym_size.int:
            stack.extend(node.all_input_nodes)  # a sym_size needs its input to run, not its values
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__), None


def thresholds(nodes: list[fx.Node], program: Program) -> set[int]:
    """Integers the mask's computation compares with or is cut by: literals ≥ 2, sizes of stored tensors."""
    found = set()
    for node in nodes:
        for arg in tree_flatten((node.args, node.kwargs))[0]:
            if isinstance(arg, int) and not isinstance(arg, bool) and 2 <= abs(arg) < 2**62:  # not slice(…, end=2^63−1)
                found.add(abs(arg))
        value = stored(program.gm, node.target) if node.op == "get_attr" else None  # its shape only: nothing loaded
        if isinstance(value, torch.Tensor):
            found.update(int(s) for s in value.shape if s >= 2)
    return found


def mask_program(program: Program, nodes: list[fx.Node], mask: fx.Node) -> fx.GraphModule:
    """A graph that computes only `mask`, taking the model's flat inputs."""
    graph, env = fx.Graph(), {}
    keep = set(nodes)
    for node in program.graph.nodes:
        if node.op == "placeholder" or node in keep:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[mask])
    return fx.GraphModule(program.gm, graph)


# ---- is it causal? -----------------------------------------------------------------------------------------
def why_not_causal(program: Program, mask: fx.Node) -> str | None:
    nodes, read = mask_sources(mask)
    if read is not None:
        return f"the mask reads the values of input {read.name} (a padding mask?): it is not the same for every batch"
    val = mask.meta.get("val")
    if val is None or val.dim() < 2:
        return "the mask's shape is unknown"
    length_symbol = val.shape[-1]
    lengths = [None]  # the example inputs as they are
    if not isinstance(length_symbol, int):
        example = _example_length(program, length_symbol)
        if example is None:
            return "could not tell which input dimension is the sequence"
        cuts = thresholds(nodes, program)
        too_long = sorted(t for t in cuts if t + 1 > LONGEST_CHECKED and t > example)
        if too_long:
            return (
                f"its computation holds the constant {too_long[0]} (a window?), longer than effcc evaluates ({LONGEST_CHECKED})"
            )
        lengths += sorted({example + 3} | {t + 1 for t in cuts if t >= example})
    compute = mask_program(program, nodes, mask)
    for length in lengths:
        inputs = _inputs_of_length(program, length_symbol, length)
        with torch.no_grad():
            value = compute(*inputs)
        problem = _not_causal(value)
        if problem:
            at = "on the example inputs" if length is None else f"at length {length}"
            return f"the mask is not causal {at}: {problem}"
    return None


def _not_causal(mask: torch.Tensor) -> str | None:
    queries, keys = mask.shape[-2:]
    if queries != keys:
        return f"{queries} queries against {keys} keys (is_causal aligns them top-left)"
    causal = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        kept = mask
    elif mask.is_floating_point():
        kept = mask == 0
        blocked = (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool((kept | blocked).all()):
            return "it adds values other than 0 and −∞ (a bias, not a mask)"
    else:
        return f"it is a {mask.dtype} tensor"
    if not bool((kept == causal).all()):
        return "it keeps other positions than j ≤ i"
    return None


def _flat_example(program: Program) -> list:
    return tree_flatten((program.example_args, program.example_kwargs))[0]


def _example_length(program: Program, symbol) -> int | None:
    for placeholder, value in zip(program.graph.find_nodes(op="placeholder"), _flat_example(program)):
        fake = placeholder.meta.get("val")
        if isinstance(fake, torch.Tensor) and isinstance(value, torch.Tensor):
            for size, real in zip(fake.shape, value.shape):
                if not isinstance(size, int) and str(size) == str(symbol):
                    return int(real)
    return None


def _inputs_of_length(program: Program, symbol, length: int | None) -> list:
    """The flat example inputs, with every dimension that is the sequence length resized to `length`.

    The mask reads sizes only, so the new inputs' values do not matter (zeros)."""
    inputs = []
    for placeholder, value in zip(program.graph.find_nodes(op="placeholder"), _flat_example(program)):
        fake = placeholder.meta.get("val")
        if length is not None and isinstance(value, torch.Tensor) and isinstance(fake, torch.Tensor):
            shape = [
                length if not isinstance(s, int) and str(s) == str(symbol) else int(r) for s, r in zip(fake.shape, value.shape)
            ]
            value = torch.zeros(shape, dtype=value.dtype, device=value.device)
        inputs.append(value)
    return inputs
