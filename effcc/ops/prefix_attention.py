"""effcc::prefix_attention: attention over a packed layout of shared prefixes and their suffixes.

The tokens of one or more groups lie in one sequence of N tokens:

    [P_1, S_11, S_12, …, S_1G, P_2, S_21, …]

A prefix token attends causally to its own prefix; a suffix token attends to the whole
prefix of its group and causally to its own suffix (the mask aligned bottom-right, as
attention over [K_P; K_S] in the ungrouped sequence [P; S]).  Three int32 vectors of
length N describe the layout, for each query i:

    group_start[i]    first token of i's group (its prefix's first token)
    prefix_end[i]     one past the last prefix token of i's group
    segment_start[i]  first token of i's own segment (== group_start for prefix tokens)

Key j is visible to query i iff  group_start[i] ≤ j ≤ i  and  (j < prefix_end[i] or j ≥ segment_start[i]).

For the backward pass, `visible_until[j]` (one past the last query that sees key j) makes
the queries of a key one contiguous range [j, visible_until[j]): the whole rest of the
group for a prefix key, the rest of its own suffix for a suffix key.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.library import triton_op

from . import prefix_attention_flash as _flash


@dataclass(frozen=True)
class PackedLayout:
    """Where each token of a packed batch of groups sits; int32 vectors of length N (see module doc),
    and the same layout as cumulative lengths for the FlashAttention split (`flash_plan`)."""

    group_start: Tensor
    prefix_end: Tensor
    segment_start: Tensor
    visible_until: Tensor
    flash_plan: tuple[Tensor, ...]

    @classmethod
    def build(cls, groups: list[tuple[int, list[int]]], device=None) -> PackedLayout:
        """`groups`: (prefix length, [suffix lengths]) per group, in packing order."""
        lengths, per_segment = [], []  # per segment: (group start, prefix end, segment start, visible until)
        at = 0
        for prefix_len, suffix_lens in groups:
            start, p_end = at, at + prefix_len
            lengths.append(prefix_len)
            per_segment.append((start, p_end, start, p_end + sum(suffix_lens)))  # a prefix token is seen by its whole group
            at = p_end
            for length in suffix_lens:
                lengths.append(length)
                per_segment.append((start, p_end, at, at + length))
                at += length
        # one value per segment, repeated over its tokens (a Python list per token took ms at N ~ 10⁴)
        vectors = torch.tensor(per_segment, dtype=torch.int32).repeat_interleave(torch.tensor(lengths), dim=0).t().contiguous()
        plan = flash_plan(groups)
        on_device = move_together([*vectors, *plan], device)
        # The split reads its launch sizes (plan[-1]) without waiting for the GPU: they stay on the CPU
        # when it is asked for; else nothing reads them, and a graph with no CPU input can be a CUDA graph.
        launch_sizes = plan[-1] if _flash.asked_for() else on_device[-1]
        return cls(*on_device[:4], (*on_device[4:-1], launch_sizes))

    def op_inputs(self) -> tuple[Tensor, ...]:
        """What effcc::prefix_attention_fwd takes after q, k, v."""
        return self.group_start, self.prefix_end, self.segment_start, self.visible_until, *self.flash_plan

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.group_start, self.prefix_end, self.segment_start, self.visible_until


def move_together(tensors: list[Tensor], device) -> list[Tensor]:
    """Copy small CPU integer tensors to `device` in one transfer from pinned memory, which does
    not wait for the GPU (a copy from pageable memory would stop the CPU until the queue drains)."""
    if device is None or torch.device(device).type == "cpu":
        return tensors
    flat = torch.cat([t.to(torch.int64).flatten() for t in tensors])
    flat = flat.pin_memory().to(device, non_blocking=True)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()].view(t.shape).to(t.dtype))
        at += t.numel()
    return out


def flash_plan(groups: list[tuple[int, list[int]]]) -> tuple[Tensor, ...]:
    """The packed layout as the FlashAttention split reads it (prefix_attention_flash: every prefix
    causally over itself in one varlen call, every suffix over [its prefix; itself] in another).
    Fields (prefix_attention_flash.FLASH_PLAN_FIELDS):
      prefix_rows     int64 packed indices of the prefix tokens, group after group
      prefix_bounds   int32 cumulative prefix lengths (into prefix_rows)
      suffix_rows     int64 packed indices of the suffix tokens, suffix after suffix
      suffix_bounds   int32 cumulative lengths of the non-empty suffixes (into suffix_rows)
      context_rows    int64 per non-empty suffix: its group's prefix tokens, then its own tokens
      context_bounds  int32 cumulative context lengths (into context_rows)
      longest         int64 [longest prefix, suffix, context] (on the CPU when the split is asked
                      for: its kernel launch sizes, read without waiting for the GPU)"""
    prefix_rows, suffix_rows, context_rows = [], [], []
    prefix_lengths, suffix_lengths, context_lengths = [], [], []
    at = 0
    for prefix_len, suffix_lens in groups:
        prefix = torch.arange(at, at + prefix_len)
        prefix_rows.append(prefix)
        prefix_lengths.append(prefix_len)
        at += prefix_len
        for length in suffix_lens:
            if length:
                suffix = torch.arange(at, at + length)
                suffix_rows.append(suffix)
                context_rows += [prefix, suffix]
                suffix_lengths.append(length)
                context_lengths.append(prefix_len + length)
            at += length

    def rows(pieces):
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

    def bounds(lengths):
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)

    longest = torch.tensor([max(prefix_lengths), max(suffix_lengths, default=0), max(context_lengths, default=0)], dtype=torch.int64)
    return (rows(prefix_rows), bounds(prefix_lengths), rows(suffix_rows), bounds(suffix_lengths), rows(context_rows),
            bounds(context_lengths), longest)


def visible_keys(group_start: Tensor, prefix_end: Tensor, segment_start: Tensor) -> Tensor:
    """Bool [N, N]: entry (i, j) says whether query i sees key j."""
    n = group_start.shape[0]
    i = torch.arange(n, device=group_start.device)[:, None]
    j = torch.arange(n, device=group_start.device)[None, :]
    return (j >= group_start[:, None]) & (j <= i) & ((j < prefix_end[:, None]) | (j >= segment_start[:, None]))


def prefix_attention_reference(q: Tensor, k: Tensor, v: Tensor, group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale, masked by the layout) v, in PyTorch; q [..., H, N, D], k and v [..., Hkv, N, D].

    Grouped-query attention: query head h reads key/value head h // (H / Hkv).  Every
    query sees at least itself, so no row of the softmax is empty."""
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=-3)
        v = v.repeat_interleave(heads // kv_heads, dim=-3)
    mask = visible_keys(group_start, prefix_end, segment_start)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---- the ops: Triton kernels on CUDA (CPU: the reference, or the kernels under TRITON_INTERPRET=1) --
# triton_op rather than custom_op: Inductor sees the kernel launches and emits them in its own
# generated code, with no Python op dispatch per call (which cost more than the kernels' GPU time
# at training sizes: 24 layers × forward and backward).
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _runs_kernels(q: Tensor) -> bool:
    """float64 takes the reference: the kernels accumulate in float32 and float64 runs must stay exact.
    So does a CPU tensor that reaches the op's body, which is torch.compile tracing on the CPU (real CPU
    tensors go to the "cpu" kernel below): the interpreter cannot run on traced tensors, and
    wrap_triton hands interpreted kernels back unwrapped, so the compiled graph holds the reference."""
    return q.dtype != torch.float64 and (q.is_cuda or not _is_traced(q))


def _is_traced(t: Tensor) -> bool:
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (torch._subclasses.FakeTensor, FunctionalTensor))


def _kernels():
    from ..backends.triton import prefix_attention  # Triton loads only when a kernel runs

    return prefix_attention


def _reference_with_lse(q, k, v, group_start, prefix_end, segment_start, scale):
    return attention_with_lse(q, k, v, visible_keys(group_start, prefix_end, segment_start), scale)


def _reference_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, scale):
    return attention_backward(grad_out, q, k, v, out, lse, visible_keys(group_start, prefix_end, segment_start), scale)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ · scale, where mask) v and its log-sum-exp; q [H, Lq, D], k and v [Hkv, Lk, D], mask [Lq, Lk]
    (every row sees a key)."""
    heads, kv_heads = q.shape[0], k.shape[0]
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    v = v.repeat_interleave(heads // kv_heads, dim=0)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.to(_lse_dtype(q)), dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    return out.contiguous(), lse.contiguous()


def _lse_dtype(q: Tensor) -> torch.dtype:
    """float32 as the kernels keep it, float64 for float64 runs (their gradients must stay exact)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_backward(grad_out, q, k, v, out, lse, mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `attention_with_lse` written out (an op's body runs below autograd, so no autograd here):
    P = exp(S − lse), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K · scale, dK = dSᵀ Q · scale."""
    heads, kv_heads = q.shape[0], k.shape[0]
    repeat = heads // kv_heads
    k_wide, v_wide = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
    scores = (q @ k_wide.transpose(-1, -2)) * scale
    probs = torch.exp(scores - lse.to(scores.dtype)[..., None])
    probs = probs.masked_fill(~mask, 0)
    dv = probs.transpose(-1, -2) @ grad_out
    delta = (grad_out * out).sum(-1, keepdim=True)
    dscores = probs * (grad_out @ v_wide.transpose(-1, -2) - delta)
    dq = (dscores @ k_wide) * scale
    dk = (dscores.transpose(-1, -2) @ q) * scale
    fold = lambda t: t.view(kv_heads, repeat, *t.shape[1:]).sum(1)
    return dq.contiguous(), fold(dk).contiguous(), fold(dv).contiguous()


def _kernel_forward(q, k, v, group_start, prefix_end, segment_start, scale):
    if not _runs_kernels(q):
        return _reference_with_lse(q, k, v, group_start, prefix_end, segment_start, scale)
    out, lse = _kernels().forward(q, k, v, group_start, prefix_end, segment_start, scale)
    return out.contiguous(), lse.contiguous()


def _kernel_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale):
    if not _runs_kernels(q):
        return _reference_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, scale)
    grads = _kernels().backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)
    return tuple(g.contiguous() for g in grads)


@triton_op("effcc::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, visible_until: Tensor,
    plan: list[Tensor], scale: float,
) -> tuple[Tensor, Tensor]:
    """q [H, N, D], k and v [Hkv, N, D] → (out [H, N, D], lse [H, N]: float32, float64 for float64 inputs).

    The layout is PackedLayout.op_inputs(): visible_until is only read by the backward, `plan`
    (the flash plan, or empty) only by the FlashAttention split.
    CUDA: effcc's Triton kernels, or with EFFCC_PREFIX_ATTENTION=flash (fp16/bf16, a flash plan)
    two FlashAttention variable-length calls, prefixes and suffixes (an opaque op of its own)."""
    if _flash.usable(q, k, plan):
        return torch.ops.effcc.prefix_attention_flash_fwd(q, k, v, plan, scale)
    return _kernel_forward(q, k, v, group_start, prefix_end, segment_start, scale)


@triton_op("effcc::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, visible_until: Tensor, plan: list[Tensor], scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if _flash.usable(q, k, plan):
        return torch.ops.effcc.prefix_attention_flash_bwd(grad_out, q, k, v, out, lse, plan, scale)
    return _kernel_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)


@prefix_attention_fwd.register_kernel("cpu")
def _(q, k, v, group_start, prefix_end, segment_start, visible_until, plan, scale):
    forward = _kernel_forward if _interpreting() else _reference_with_lse
    return forward(q, k, v, group_start, prefix_end, segment_start, scale)


@prefix_attention_bwd.register_kernel("cpu")
def _(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, plan, scale):
    if _interpreting():
        return _kernel_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)
    return _reference_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, scale)


def _save_for_backward(ctx, inputs, output):
    q, k, v, *layout, plan, scale = inputs
    ctx.save_for_backward(q, k, v, *output, *layout, *plan)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, *plan = ctx.saved_tensors
    dq, dk, dv = torch.ops.effcc.prefix_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, plan, ctx.scale)
    return dq, dk, dv, None, None, None, None, [None] * len(plan), None


torch.library.register_autograd("effcc::prefix_attention_fwd", _backward, setup_context=_save_for_backward)


def prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, visible_until: Tensor,
    *plan: Tensor, scale: float | None = None,
) -> Tensor:
    """Attention of a packed layout (module doc); q [1, H, N, D], k and v [1, Hkv, N, D] as SDPA takes them.

    The layout tensors are PackedLayout.op_inputs(); without the flash plan CUDA runs effcc's Triton kernel."""
    if q.shape[0] != 1:
        raise ValueError(f"prefix_attention runs on one packed sequence (batch 1), got a batch of {q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = torch.ops.effcc.prefix_attention_fwd(q[0], k[0], v[0], group_start, prefix_end, segment_start, visible_until, list(plan), scale)
    return out.unsqueeze(0)
