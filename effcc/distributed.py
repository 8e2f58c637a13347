"""effcc's rewritten models under PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`).

    model = effcc.distributed.fully_shard_blocks(result.model)      # or a SharedPrefixModel, a Sparse-IFT model
    optimizer = torch.optim.AdamW(model.parameters())               # DTensor parameters, as with any FSDP2 model

FSDP2 gathers a group's parameters when the module that owns them is *called*.  An nn.Module
model (Sparse-IFT's result, a Hugging Face model) calls its blocks, so each block becomes a
group.  A captured graph (a pass's `result.model`, the graph of `effcc.shared_prefix`) is one
flat function that reads every tensor of the model, so it is first cut into one submodule per
block (`split_into_blocks`): each owns the tensors only its block reads, and the root keeps
the ones read across blocks (a tied embedding and LM head).  Then every block and the root
are sharded, which is how FSDP2 is meant to be used on a decoder.

A block is a path with a number in it, `transformer.h.3`, `model.layers.11`, found from the
names of the model's tensors and of the modules its graph nodes came from (no per-model table).
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from .errors import EffccError

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


def block_partition(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], list[str]]:
    """Each computing node → a partition: 0 before the blocks, i for the i-th block, last after them.

    Nodes a pass added carry no module path: they go with the block of the node that reads
    them (a re-centred weight with its linear), or else with the latest block they read."""
    computing = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    order: dict[str, int] = {}
    for node in computing:
        block = _node_block(node)
        if block:
            order.setdefault(block, len(order) + 1)
    if not order:
        raise EffccError(f"{type(gm).__name__}: found no numbered blocks (transformer.h.0, model.layers.0, ...) to shard by")
    part: dict[fx.Node, int | None] = {}
    for node in reversed(computing):  # users first: a node without a path takes its reader's block
        block = _node_block(node)
        if block is None:
            readers = [part[u] for u in node.users if part.get(u) is not None]
            part[node] = min(readers) if readers else None
        else:
            part[node] = order.get(block)  # "" (outside every block) is settled below
    after = len(order) + 1
    for node in computing:  # then the rest in order: after the last block, or with the latest block read
        if part[node] is None:
            latest = max((part[a] for a in node.all_input_nodes if part.get(a) is not None), default=0)
            part[node] = after if latest == len(order) else latest
    return part, list(order)


def split_into_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` cut into submodules `submod_0` (before), one per block, and a last one (after), same results.

    Each submodule owns the tensors only it reads (same Parameter objects: nothing is copied);
    tensors read by several stay on the root and are passed in.  `effcc_original_names` maps
    the moved tensors' new names (submod_1.model_layers_0_mlp_up_proj_weight) to the model's."""
    part, blocks = block_partition(gm)
    split = split_module(gm, None, lambda node: part[node], keep_original_order=True)
    split.graph._codegen = gm.graph._codegen  # the caller's input/output structure (a ModelOutput, kwargs)
    _move_private_tensors_into_partitions(split)
    split.recompile()
    split.effcc_blocks = blocks
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
        if isinstance(tensor, nn.Parameter):
            sub.register_parameter(leaf, tensor)
        else:
            sub.register_buffer(leaf, tensor)
        with sub.graph.inserting_before(placeholder):
            inner = sub.graph.get_attr(leaf)
        placeholder.replace_all_uses_with(inner)
        sub.graph.erase_node(placeholder)
        sub.recompile()
        call.args = call.args[:index] + call.args[index + 1 :]
        split.graph.erase_node(attr)
    _drop_unread(split)


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


# ---- FSDP2 ------------------------------------------------------------------------------------------
def fully_shard_blocks(model, *, mesh=None, **fsdp_options):
    """Shard `model` with FSDP2, one group per block plus the root; returns the model to train.

    model: an nn.Module (Sparse-IFT's result, any decoder), a captured graph (`result.model` of
    a graph pass), an `effcc.OptimizeResult`, or an `effcc.SharedPrefixModel`.  A graph is cut
    into blocks first (a new module; the one given is not changed).  For a SharedPrefixModel,
    the grouped model then owns the sharded parameters: build the optimizer on it, not on the
    Hugging Face model it was made from.  fsdp_options go to fully_shard (mp_policy, ...)."""
    from torch.distributed.fsdp import fully_shard

    from .api import OptimizeResult
    from .prefix_grouping import SharedPrefixModel

    if isinstance(model, OptimizeResult):
        model = model.model
    if isinstance(model, SharedPrefixModel):
        model.graph_module = fully_shard_blocks(model.graph_module, mesh=mesh, **fsdp_options)
        model._run = model.graph_module
        return model
    if isinstance(model, fx.GraphModule):
        model = split_into_blocks(model)
        groups = [(name, module) for name, module in model.named_children() if _owns_parameters(module)]
        groups = groups[1:-1] if len(groups) > 2 else groups  # before/after stay in the root's group
    else:
        groups = repeated_blocks(model)
        if not groups:
            raise EffccError(f"{type(model).__name__}: found no numbered blocks (model.layers.0, ...) to shard by")
    for _, module in groups:
        fully_shard(module, mesh=mesh, **fsdp_options)
    fully_shard(model, mesh=mesh, **fsdp_options)
    return model


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=True))


def shards_agree(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the replicated tensors (masks, say) that are not bit-identical on every rank; [] when all agree.

    Collective: call it on every rank with the same names."""
    import torch.distributed as dist

    digests = {
        name: hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, t in tensors.items()
    }
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    return [name for name in tensors if len({rank[name] for rank in gathered}) > 1]


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank (an all-gather); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The part of `whole` (a full-size tensor every rank holds) that lines up with `t`'s local shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(t, DTensor):
        return whole
    return distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None).to_local()


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank stores of `t` (its shard for a DTensor), to modify in place."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


__all__ = ["block_of", "fully_shard_blocks", "repeated_blocks", "shards_agree", "split_into_blocks"]
