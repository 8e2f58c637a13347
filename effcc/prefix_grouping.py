"""`effcc.shared_prefix(model)`: run groups of sequences that share a prompt, computing the prompt once.

    grouped = effcc.shared_prefix(model)
    logits = grouped(prefix_ids, suffix_ids, suffix_mask)      # [G, S, vocab]
    # == model(cat(prefix, suffix_g)).logits[:, P:] for every g, and so are all gradients

The model is captured once (torch.export) and its graph rewritten by
`effcc.passes.shared_prefix`: token-wise ops run on the packed tokens [P, S_1, …, S_G],
attention is effcc's prefix attention.  The grouped module holds the caller's own
parameters (not copies), so an optimizer built on the model trains through it.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .blocks import compile_by_block
from .capture import export
from .errors import first_line
from .ops.prefix_attention import PackedLayout, move_together
from .passes.shared_prefix import PackedGraph, SharedPrefixError, pack_for_groups

SAMPLE_LENGTH = 16  # tokens in the capture's example input; any length ≥ 2 runs afterwards


@dataclass
class PackedBatch:
    """Model inputs for a packed batch of groups and where the kept rows go back."""

    input_ids: Tensor  # [1, N]
    position_ids: Tensor  # [1, N]
    layout: PackedLayout
    suffix_rows: Tensor  # packed indices of the suffix tokens (the rows `forward` returns)
    predicting_rows: Tensor  # packed indices of the tokens that predict a suffix token (the rows `token_logprobs` reads)
    suffix_tokens: Tensor  # [sum of lengths] the real suffix tokens, groups in order (targets of token_logprobs)
    suffix_places: list[Tensor]  # per group: where its real suffix tokens sit in its [G·S] grid (right padding)
    suffix_grids: list[torch.Size]  # per group: [G, S]
    longest_sequence: int  # the longest ungrouped sequence P + S_g, for the mask check
    several: bool = False  # given as lists of groups: results come back as lists


class SharedPrefixModel(nn.Module):
    """A decoder that runs groups [P; S_1 … S_G] with the prefix computed once (see module doc)."""

    def __init__(self, model: nn.Module, packed: PackedGraph):
        super().__init__()
        self.graph_module = packed.gm
        self.attention_sites = packed.sites
        self.notes = packed.notes
        self._mask_check = packed.mask_check
        self._run = self.graph_module
        object.__setattr__(self, "model", model)  # the caller's model, not a submodule: no second copy in state_dict

    def compile(self, *, by_block: bool = True, blocks_per_part: int = 1, **options) -> SharedPrefixModel:
        """torch.compile the packed graph (dynamic sizes: group shapes change every batch); options go to torch.compile.

        by_block: compile one decoder layer's code for all the layers that are alike (effcc.blocks.compile_by_block),
        as `layer.compile()` does for a Hugging Face model: a 24-layer model compiles in about the time of one
        layer.  blocks_per_part: compile runs of that many layers as one part instead, which pays the fixed CPU
        cost of a compiled call (forward and backward) once per run rather than once per layer.  by_block=False
        compiles the whole graph as one (Inductor may then fuse across layer boundaries)."""
        options.setdefault("dynamic", True)
        if by_block:
            self._run = compile_by_block(self.graph_module, blocks_per_part, **options)
        else:
            self._run = torch.compile(self.graph_module, **options)
        return self

    # ---- the public calls --------------------------------------------------------------------
    def pack(self, prefix_ids, suffix_ids, suffix_mask=None) -> PackedBatch:
        """The groups packed once, every tensor on the model's device, for `forward` and `token_logprobs`
        to take instead of the ids: a GRPO step that reads the old policy's, the reference's and the
        policy's log-probs packs once; and a step over a packed batch neither waits for the GPU nor copies
        from the CPU (once a first call has checked the model's masks up to its longest sequence), so
        after a warm-up it can be captured as a CUDA graph (benchmarks/bench_prefix_grouper.py --cuda-graph)."""
        groups, several = _as_groups(prefix_ids, suffix_ids, suffix_mask)
        return pack(groups, several)

    def forward(self, prefix_ids, suffix_ids=None, suffix_mask=None):
        """Logits [G, S, vocab] at the suffix tokens (zeros at padding); lists in, list out for several groups.
        `prefix_ids` may be a batch from `pack` instead of the ids."""
        batch = self._batch(prefix_ids, suffix_ids, suffix_mask)
        pieces = _unpack_rows(self._logits(batch, batch.suffix_rows), batch)
        return pieces if batch.several else pieces[0]

    def token_logprobs(self, prefix_ids, suffix_ids=None, suffix_mask=None):
        """log p(suffix token t | prefix, suffix tokens < t), [G, S] (zeros at padding): what GRPO's loss reads.

        The first suffix token is predicted by the prefix's last position, so only the
        rows that predict a suffix token go through the LM head."""
        batch = self._batch(prefix_ids, suffix_ids, suffix_mask)
        logits = self._logits(batch, batch.predicting_rows)
        wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        logprobs = torch.log_softmax(wide, dim=-1).gather(-1, batch.suffix_tokens[:, None]).squeeze(-1)
        pieces = _unpack_rows(logprobs, batch)
        return pieces if batch.several else pieces[0]

    def _batch(self, prefix_ids, suffix_ids, suffix_mask) -> PackedBatch:
        if not isinstance(prefix_ids, PackedBatch):
            return self.pack(prefix_ids, suffix_ids, suffix_mask)
        if suffix_ids is not None or suffix_mask is not None:
            raise ValueError("given a packed batch, give nothing else: its suffixes and mask were packed with it")
        return prefix_ids

    def _logits(self, batch: PackedBatch, rows: Tensor) -> Tensor:
        if self._mask_check is not None:
            self._mask_check.ensure(batch.longest_sequence, batch.input_ids.device)
        out = self._run(batch.input_ids, batch.position_ids, *batch.layout.op_inputs(), rows)
        return out[0]


# ---- inputs: checking and packing --------------------------------------------------------------
def _as_groups(prefix_ids, suffix_ids, suffix_mask):
    """[(prefix [P], suffixes [G, S], [real tokens per suffix])], and whether several groups were given."""
    several = isinstance(prefix_ids, (list, tuple))
    prefixes = list(prefix_ids) if several else [prefix_ids]
    suffixes = list(suffix_ids) if several else [suffix_ids]
    if suffix_mask is None:
        masks = [None] * len(prefixes)
    else:
        masks = list(suffix_mask) if several else [suffix_mask]
    if not (len(prefixes) == len(suffixes) == len(masks)):
        raise ValueError(f"{len(prefixes)} prefixes, {len(suffixes)} suffix batches and {len(masks)} masks: give one of each per group")
    groups = []
    for index, (prefix, suffix, mask) in enumerate(zip(prefixes, suffixes, masks)):
        where = f"group {index}: " if several else ""
        if not isinstance(prefix, Tensor) or prefix.dim() != 1 or prefix.numel() == 0:
            raise ValueError(f"{where}prefix_ids must be a non-empty 1-D tensor of token ids [P], got {_shape(prefix)}")
        if not isinstance(suffix, Tensor) or suffix.dim() != 2:
            raise ValueError(f"{where}suffix_ids must be a 2-D tensor [G, S], got {_shape(suffix)}")
        groups.append((prefix, suffix, _suffix_lengths(mask, suffix, where)))
    return groups, several


def _suffix_lengths(mask: Tensor | None, suffix: Tensor, where: str) -> list[int]:
    """Real tokens per suffix row.  Without a mask every row is full and nothing waits for the GPU;
    a mask is read once on the CPU (the layout is built there)."""
    if mask is None:
        return [suffix.shape[1]] * suffix.shape[0]
    if not isinstance(mask, Tensor) or mask.shape != suffix.shape or mask.dtype != torch.bool:
        raise ValueError(f"{where}suffix_mask must be a bool tensor of suffix_ids' shape {tuple(suffix.shape)}, got {_shape(mask)} "
                         f"{getattr(mask, 'dtype', '')}".rstrip())
    mask = mask.cpu()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{where}suffix_mask must be right-padded (True for real tokens, then False)")
    return mask.sum(1).tolist()


def _shape(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def pack(groups, several: bool = False) -> PackedBatch:
    """Pack groups (from `_as_groups`) into one sequence [P, S_1 … S_G, P', …]."""
    ids, positions, suffix_rows, predicting_rows, layout_groups, suffix_tokens, places = [], [], [], [], [], [], []
    at, longest = 0, 0
    for prefix, suffix, lengths in groups:
        layout_groups.append((prefix.numel(), lengths))
        places.append(_places_in_grid(lengths, suffix.shape[1]))
        ids.append(prefix)
        positions.append(torch.arange(prefix.numel()))
        last_prefix_token = at + prefix.numel() - 1
        at += prefix.numel()
        for row, length in zip(suffix, lengths):
            ids.append(row[:length])
            suffix_tokens.append(row[:length])
            positions.append(torch.arange(prefix.numel(), prefix.numel() + length))
            suffix_rows.append(torch.arange(at, at + length))
            if length:  # the prefix's last token predicts the first suffix token
                predicting_rows.append(torch.tensor([last_prefix_token]))
                predicting_rows.append(torch.arange(at, at + length - 1))
            at += length
            longest = max(longest, prefix.numel() + length)
    device = groups[0][0].device
    positions, suffix_rows, predicting_rows, *places = move_together(
        [torch.cat(positions)[None], _cat_indices(suffix_rows), _cat_indices(predicting_rows), *places], device)
    return PackedBatch(
        input_ids=torch.cat([t.to(device) for t in ids])[None],
        position_ids=positions,
        layout=PackedLayout.build(layout_groups, device=device),
        suffix_rows=suffix_rows,
        predicting_rows=predicting_rows,
        suffix_tokens=torch.cat([t.to(device) for t in suffix_tokens]),
        suffix_places=places,
        suffix_grids=[suffix.shape for _, suffix, _ in groups],
        longest_sequence=max(longest, 2),
        several=several,
    )


def _cat_indices(pieces: list[Tensor]) -> Tensor:
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _places_in_grid(lengths: list[int], width: int) -> Tensor:
    """Flat indices into a [G, width] grid of the first lengths[g] entries of each row g."""
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).flatten().nonzero()[:, 0]


def _unpack_rows(rows: Tensor, batch: PackedBatch) -> list[Tensor]:
    """Kept rows [K, …] (groups in order, suffix tokens row-major) → one [G, S, …] per group, zeros at padding.
    Scattered by indices made on the CPU: a boolean-mask scatter would wait for the GPU to finish the
    forward before the CPU could queue the backward."""
    pieces, at = [], 0
    for shape, places in zip(batch.suffix_grids, batch.suffix_places):
        count = places.numel()  # real suffix tokens of the group
        grid = rows.new_zeros(shape.numel(), *rows.shape[1:])
        pieces.append(grid.index_copy(0, places, rows[at : at + count]).view(*shape, *rows.shape[1:]))
        at += count
    return pieces


# ---- capture ------------------------------------------------------------------------------------
def shared_prefix(model: nn.Module, *, compile: bool = False) -> SharedPrefixModel:
    """Capture `model` (a causal LM: forward(input_ids[, position_ids]) → logits) and rewrite it for shared prompts.

    Raises SharedPrefixError naming the attention that cannot be split and why (bidirectional,
    a token-dependent mask or bias, dropout in attention...).  The model runs with dropout off,
    as grouped and ungrouped runs can only agree then."""
    parameters = inspect.signature(model.forward).parameters
    ids_name = "input_ids" if "input_ids" in parameters else next(iter(parameters))
    positions_name = "position_ids" if "position_ids" in parameters else None
    device = next(model.parameters()).device
    kwargs = {ids_name: torch.zeros(1, SAMPLE_LENGTH, dtype=torch.long, device=device)}
    dynamic = {ids_name: {1: Dim.AUTO}}  # as capture.py: export decides; checked symbolic below
    if positions_name:
        kwargs[positions_name] = torch.arange(SAMPLE_LENGTH, device=device)[None]
        dynamic[positions_name] = {1: Dim.AUTO}
    if "use_cache" in parameters:
        kwargs["use_cache"], dynamic["use_cache"] = False, None
    _refuse_soft_capped_scores(model)
    with _sdpa_attention(model):
        exported = _export_any_length(model, kwargs, dynamic, ids_name)
    gm = exported.module()
    logits_index = _logits_leaf(gm, kwargs)
    _share_callers_tensors(gm, model)
    grouped = SharedPrefixModel(model, pack_for_groups(gm, logits_index, ids_name, positions_name))
    return grouped.compile() if compile else grouped


def _export_any_length(model, kwargs, dynamic, ids_name):
    """torch.export with the token count left to export (Dim.AUTO: a named Dim fails where export
    cannot prove a guard for every length, seen on CUDA: min(8·T, 16·T) == 8·T); the capture is
    kept only if the length stayed symbolic."""
    try:
        exported = export(model, (), kwargs, dynamic)
    except Exception as error:
        raise SharedPrefixError(
            f"could not capture {type(model).__name__} for grouped runs: {type(error).__name__}: {first_line(error)}"
        ) from error
    ids = next(n for n in exported.graph.find_nodes(op="placeholder") if n.name == ids_name)
    if isinstance(ids.meta["val"].shape[1], int):
        raise SharedPrefixError(f"{type(model).__name__} specialises on its sequence length; a grouped run needs any length")
    return exported


def _refuse_soft_capped_scores(model: nn.Module) -> None:
    """Soft-capped attention scores (Gemma 2) have no SDPA form, though some transformers versions give
    such models an SDPA path that drops the cap: grouping that path would not be the model's attention."""
    soft_cap = getattr(getattr(model, "config", None), "attn_logit_softcapping", None)
    if soft_cap:
        raise SharedPrefixError(
            f"{type(model).__name__} has no scaled_dot_product_attention form: it soft-caps its attention scores "
            f"(attn_logit_softcapping={soft_cap}), which grouped runs, splitting that op, cannot reproduce"
        )


@contextlib.contextmanager
def _sdpa_attention(model: nn.Module):
    """Hugging Face models choose their attention code by name: capture them with SDPA, then restore the choice."""
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = previous not in (None, "sdpa") and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError) as error:  # transformers has no SDPA form of this model's attention
            raise _no_sdpa_form(model, first_line(error, 160)) from error
        if model.config._attn_implementation == previous:  # some models (BLOOM) only log a warning and keep theirs
            raise _no_sdpa_form(model, f"it keeps attn_implementation={previous!r}")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def _no_sdpa_form(model: nn.Module, why: str) -> SharedPrefixError:
    return SharedPrefixError(
        f"{type(model).__name__} has no scaled_dot_product_attention form in transformers ({why}); grouped runs split "
        "that op, so attention computed another way (BLOOM's ALiBi bias, Gemma 2's soft-capped scores) cannot be grouped"
    )


def _logits_leaf(gm, kwargs) -> int:
    """Which output leaf is the logits: the tensor itself, or a model output's `.logits`."""
    with torch.no_grad():
        out = gm(**kwargs)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    leaves = pytree.tree_leaves(out)
    for index, leaf in enumerate(leaves):
        if leaf is logits:
            return index
    raise SharedPrefixError(f"the model returns {type(out).__name__}; expected logits, a tuple starting with logits, or an output with .logits")


def _share_callers_tensors(gm: nn.Module, model: nn.Module) -> None:
    """Point the captured graph at the caller's parameters and buffers: weights shared, gradients land on the model."""
    for name, value in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        path, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(path)
        except AttributeError:
            continue
        if leaf in owner._parameters:
            owner._parameters[leaf] = value
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value


__all__ = ["PackedBatch", "SharedPrefixError", "SharedPrefixModel", "shared_prefix"]
