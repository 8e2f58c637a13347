"""effcc's rewritten models under PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`).

    model = effcc.distributed.fully_shard_blocks(result.model)      # or a SharedPrefixModel, a Sparse-IFT model
    optimizer = torch.optim.AdamW(model.parameters())               # DTensor parameters, as with any FSDP2 model

FSDP2 gathers a group's parameters when the module that owns them is *called*.  An nn.Module
model (Sparse-IFT's result, a Hugging Face model) calls its blocks, so each block becomes a
group.  A captured graph (a pass's `result.model`, the graph of `effcc.shared_prefix`) is one
flat function that reads every tensor of the model, so it is first cut into one submodule per
block (`effcc.blocks.split_into_blocks`): each owns the tensors only its block reads, and the
root keeps the ones read across blocks (a tied embedding and LM head).  Then every block and
the root are sharded, which is how FSDP2 is meant to be used on a decoder.
"""

from __future__ import annotations

import hashlib

import torch
from torch import fx, nn

from .blocks import block_of, repeated_blocks, split_into_blocks
from .errors import EffccError


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
