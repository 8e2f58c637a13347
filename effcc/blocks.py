"""A model's numbered blocks (decoder layers), and a captured graph cut into one submodule per block.

A block is a path with a number in it, `transformer.h.3`, `model.layers.11`, found from the
names of the model's tensors and of the modules its graph nodes came from (no per-model table).

A captured graph (a pass's `result.model`, the graph of `effcc.shared_prefix`) is one flat
function.  `split_into_blocks` cuts it into `submod_0` (before the blocks), one submodule per
block and a last one (after), each owning the tensors only it reads.  Two users:

- FSDP2 (effcc.distributed) shards each block's submodule as a group of its own.
- `compile_by_block` compiles a block's code once for all the blocks that are alike
  (`share_block_code`), as `layer.compile()` does for a Hugging Face model's layers: a
  24-layer model compiles one layer, not a 24-layer graph, at the same speed when it runs.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from .analysis.graph import is_input_guard
from .errors import EffccError

log = logging.getLogger("effcc")

_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")


def block_of(path: str) -> str | None:
    """`transformer.h.3.attn.c_attn` → `transformer.h.3`; a path outside any numbered block → None."""
    match = _NUMBERED.match(path)
    return match.group(1) if match else None


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's numbered blocks that hold parameters (decoder layers), in order."""
    found = {}
    for name, _ in model.named_parameters():
        block = block_of(name)
        if block is not None and block not in found:
            found[block] = model.get_submodule(block)
    return list(found.items())


# ---- cutting a flat graph into one submodule per block --------------------------------------------
def _node_block(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return block_of(path) or ""


def block_partition(gm: fx.GraphModule, blocks_per_part: int = 1) -> tuple[dict[fx.Node, int], list[str]]:
    """Each computing node → a partition: 0 before the blocks, i for the i-th run of `blocks_per_part`
    consecutive blocks, last after them; and the blocks in order.

    Nodes a pass added carry no module path: they go with the block of the node that reads
    them (a re-centred weight with its linear), or else with the latest block they read."""
    if blocks_per_part < 1:
        raise ValueError(f"blocks_per_part must be at least 1, got {blocks_per_part}")
    computing = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    order: dict[str, int] = {}
    for node in computing:
        block = _node_block(node)
        if block:
            order.setdefault(block, len(order) + 1)
    if not order:
        raise EffccError(f"{type(gm).__name__}: found no numbered blocks (transformer.h.0, model.layers.0, ...) to cut the graph by")
    part: dict[fx.Node, int | None] = {}
    for node in reversed(computing):  # users first: a node without a path takes its reader's block
        block = _node_block(node)
        if is_input_guard(node):  # export's check of the inputs' shapes comes before everything
            part[node] = 0
        elif block is None:
            readers = [part[u] for u in node.users if part.get(u) is not None]
            part[node] = min(readers) if readers else None
        else:
            part[node] = order.get(block)  # "" (outside every block) is settled below
    after = len(order) + 1
    for node in computing:  # then the rest in order: after the last block, or with the latest block read
        if part[node] is None:
            latest = max((part[a] for a in node.all_input_nodes if part.get(a) is not None), default=0)
            part[node] = after if latest == len(order) else latest
    runs = -(-len(order) // blocks_per_part)  # blocks 1…B in runs of blocks_per_part: parts 1…runs, after → runs + 1
    as_run = {i: (i - 1) // blocks_per_part + 1 for i in range(1, len(order) + 1)} | {0: 0, after: runs + 1}
    return {node: as_run[index] for node, index in part.items()}, list(order)


def split_into_blocks(gm: fx.GraphModule, blocks_per_part: int = 1) -> fx.GraphModule:
    """`gm` cut into submodules `submod_0` (before), one per block (or per run of `blocks_per_part`
    blocks), and a last one (after), same results.

    Each submodule owns the tensors only it reads (same Parameter objects: nothing is copied);
    tensors read by several stay on the root and are passed in.  `effcc_original_names` maps
    the moved tensors' new names (submod_1.model_layers_0_mlp_up_proj_weight) to the model's;
    `effcc_blocks` lists the blocks, `effcc_parts` the blocks of each submod_1, submod_2, …"""
    part, blocks = block_partition(gm, blocks_per_part)
    split = split_module(gm, None, lambda node: part[node], keep_original_order=True)
    split.graph._codegen = gm.graph._codegen  # the caller's input/output structure (a ModelOutput, kwargs)
    _move_private_tensors_into_partitions(split)
    split.recompile()
    split.effcc_blocks = blocks
    split.effcc_parts = [blocks[i : i + blocks_per_part] for i in range(0, len(blocks), blocks_per_part)]
    return split


def _move_private_tensors_into_partitions(split: fx.GraphModule) -> None:
    """split_module passes every tensor in as an argument; move each one read by one partition into it.

    `split.effcc_original_names` maps each moved tensor's new name to the model's (for checkpoints)."""
    split.effcc_original_names = {}
    for attr in list(split.graph.find_nodes(op="get_attr")):
        calls = list(attr.users)
        if len(calls) != 1 or calls[0].op != "call_module":
            continue
        call = calls[0]
        sub: fx.GraphModule = split.get_submodule(call.target)
        index = call.args.index(attr)
        placeholder = [n for n in sub.graph.nodes if n.op == "placeholder"][index]
        tensor = split.get_parameter(attr.target) if _is_parameter(split, attr.target) else split.get_buffer(attr.target)
        leaf = attr.target.replace(".", "_")
        split.effcc_original_names[f"{call.target}.{leaf}"] = attr.target
        _register(sub, leaf, tensor)
        with sub.graph.inserting_before(placeholder):
            inner = sub.graph.get_attr(leaf)
        placeholder.replace_all_uses_with(inner)
        sub.graph.erase_node(placeholder)
        sub.recompile()
        call.args = call.args[:index] + call.args[index + 1 :]
        split.graph.erase_node(attr)
    _drop_unread(split)


def _register(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """`tensor` as `module.name`, a parameter if it is one, else a buffer."""
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


def _is_parameter(module: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(path)._parameters


def _drop_unread(split: fx.GraphModule) -> None:
    """The root still registers the moved tensors under their old names; drop those no root node reads."""
    read = {n.target for n in split.graph.find_nodes(op="get_attr")}
    for name, _ in list(split.named_parameters(remove_duplicate=False)) + list(split.named_buffers(remove_duplicate=False)):
        if name.startswith("submod_") or name in read:
            continue
        path, _, leaf = name.rpartition(".")
        owner = split.get_submodule(path)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)


# ---- one compiled code for the blocks that are alike ------------------------------------------------
def share_block_code(split: fx.GraphModule) -> list[list[str]]:
    """Give the blocks of a `split_into_blocks` result that compute alike one class (one `forward`), so
    that torch.compile traces and compiles that code once.  Returns the groups of submodule names
    that share.

    A block's tensors are renamed relative to it (`model_layers_3_mlp_up_proj_weight` → `mlp_up_proj_weight`;
    in a part of several blocks, relative to the block's place in it: `block1_mlp_up_proj_weight`),
    then parts are compared node by node (operator, constant arguments, which earlier node each
    argument is, which tensor each get_attr reads); only identical ones share.  A part with a
    tensor not named after its blocks (a tensor a pass added) keeps its own code."""
    groups: dict[tuple, list[str]] = {}
    for index, blocks in enumerate(split.effcc_parts, start=1):
        name = f"submod_{index}"
        sub = split.get_submodule(name)
        places = {block.replace(".", "_") + "_": "" if len(blocks) == 1 else f"block{j}_" for j, block in enumerate(blocks)}
        if not isinstance(sub, fx.GraphModule) or not _name_tensors_relative_to(split, name, places):
            continue
        groups.setdefault(_structure(sub), []).append(name)
    shared = [names for names in groups.values() if len(names) > 1]
    for names in shared:
        first = type(split.get_submodule(names[0]))
        for name in names[1:]:
            split.get_submodule(name).__class__ = first  # the same forward code: Dynamo's cache serves them all
    return shared


def _name_tensors_relative_to(split: fx.GraphModule, name: str, places: dict[str, str]) -> bool:
    """Rename the tensors of part `name` by `places` (a block's prefix → its place's); False, and
    nothing renamed, if one is not named after a block of the part."""
    sub: fx.GraphModule = split.get_submodule(name)
    reads = list(sub.graph.find_nodes(op="get_attr"))
    prefix_of = {node: next((p for p in places if node.target.startswith(p)), None) for node in reads}
    if any(prefix is None or "." in node.target for node, prefix in prefix_of.items()):
        return False
    originals = getattr(split, "effcc_original_names", {})
    for node in reads:
        prefix = prefix_of[node]
        old, new = node.target, places[prefix] + node.target[len(prefix) :]
        tensor = getattr(sub, old)
        delattr(sub, old)
        _register(sub, new, tensor)
        node.target = new
        if f"{name}.{old}" in originals:
            originals[f"{name}.{new}"] = originals.pop(f"{name}.{old}")
    sub.recompile()
    return True


def _structure(gm: fx.GraphModule) -> tuple:
    """What a graph computes, without its node names: per node its op, target and arguments, nodes as positions."""
    position: dict[fx.Node, int] = {}
    rows = []
    for i, node in enumerate(gm.graph.nodes):
        position[node] = i
        target = None if node.op == "placeholder" else node.target
        arguments = fx.node.map_arg((node.args, node.kwargs), lambda n: ("node", position[n]))
        rows.append((node.op, target, repr(arguments)))
    return tuple(rows)


def compile_by_block(gm: fx.GraphModule, blocks_per_part: int = 1, **compile_options) -> fx.GraphModule:
    """`gm` cut into blocks (or runs of `blocks_per_part` blocks), each part torch.compiled, alike parts
    sharing one compiled code (a graph cut already is compiled part by part as it is).  Same results,
    same Parameter objects (gradients reach the model's).  A graph without numbered blocks is compiled
    whole, and the log says so.

    Each compiled part costs a fixed CPU time per call, forward and backward (Dynamo's guards,
    AOTAutograd's wrappers); several blocks per part pay it once for all of them, for a longer compile."""
    if hasattr(gm, "effcc_blocks"):  # cut already, perhaps sharded by FSDP2, whose parameter names must stay
        split, shared = gm, []
    else:
        try:
            split = split_into_blocks(gm, blocks_per_part)
        except EffccError as why:
            log.info("effcc: compiling the graph whole: %s", why)
            return torch.compile(gm, **compile_options)
        shared = share_block_code(split)
    alike = ", ".join(f"{len(names)} alike share one code" for names in shared) or "none alike, each compiled on its own"
    log.info("effcc: compiling by block: %d blocks in %d parts, %s", len(split.effcc_blocks),
             len(split.effcc_parts), alike)
    for _, part in split.named_children():
        part.compile(**compile_options)
    return split
