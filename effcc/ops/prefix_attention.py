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

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.library import triton_op


@dataclass(frozen=True)
class PackedLayout:
    """Where each token of a packed batch of groups sits: int32 vectors of length N (see module doc)."""

    group_start: Tensor
    prefix_end: Tensor
    segment_start: Tensor
    visible_until: Tensor

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
        return cls(*move_together(list(vectors), device))

    def op_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What effcc::prefix_attention_fwd (and the kernels' backward) take after q, k, v."""
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


def _tokens_major(t: Tensor) -> Tensor:
    """[H, N, D] laid out as [N, H, D] in memory, the layout of the kernels' results (see
    backends.triton.prefix_attention.tokens_major): every path of an op returns the same strides."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _reference_with_lse(q, k, v, group_start, prefix_end, segment_start, scale):
    out, lse = attention_with_lse(q, k, v, visible_keys(group_start, prefix_end, segment_start), scale)
    return _tokens_major(out), lse


def _reference_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, scale):
    grads = attention_backward(grad_out, q, k, v, out, lse, visible_keys(group_start, prefix_end, segment_start), scale)
    return tuple(_tokens_major(g) for g in grads)


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
    return _kernels().forward(q, k, v, group_start, prefix_end, segment_start, scale)


def _kernel_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale):
    if not _runs_kernels(q):
        return _reference_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, scale)
    return _kernels().backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)


@triton_op("effcc::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, visible_until: Tensor, scale: float,
) -> tuple[Tensor, Tensor]:
    """q [H, N, D], k and v [Hkv, N, D] → (out [H, N, D], lse [H, N]: float32, float64 for float64 inputs).
    out (and the backward's gradients) are tokens-major, [N, H, D] in memory, as SDPA's are: the model
    reads out as [N, H·D] and its q, k, v come from [N, H·D] projections, so no side copies.

    The layout is PackedLayout.op_inputs(); visible_until is only read by the backward.  CUDA runs
    effcc's Triton kernels (measured faster than FlashAttention's varlen kernels split into a prefix
    call and a suffix call, and than flex_attention: README, Shared-prefix attention)."""
    return _kernel_forward(q, k, v, group_start, prefix_end, segment_start, scale)


@triton_op("effcc::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, visible_until: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)


@prefix_attention_fwd.register_kernel("cpu")
def _(q, k, v, group_start, prefix_end, segment_start, visible_until, scale):
    forward = _kernel_forward if _interpreting() else _reference_with_lse
    return forward(q, k, v, group_start, prefix_end, segment_start, scale)


@prefix_attention_bwd.register_kernel("cpu")
def _(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale):
    if _interpreting():
        return _kernel_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, visible_until, scale)
    return _reference_backward(grad_out, q, k, v, out, lse, group_start, prefix_end, segment_start, scale)


def _save_for_backward(ctx, inputs, output):
    q, k, v, *layout, scale = inputs
    ctx.save_for_backward(q, k, v, *output, *layout)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, *layout = ctx.saved_tensors
    # grad_out as it comes (tokens-major from the model's reshape): the kernels need only unit-stride rows
    dq, dk, dv = torch.ops.effcc.prefix_attention_bwd(grad_out, q, k, v, out, lse, *layout, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("effcc::prefix_attention_fwd", _backward, setup_context=_save_for_backward)


def prefix_attention(
    q: Tensor, k: Tensor, v: Tensor, group_start: Tensor, prefix_end: Tensor, segment_start: Tensor, visible_until: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Attention of a packed layout (module doc); q [1, H, N, D], k and v [1, Hkv, N, D] as SDPA takes them,
    and the layout's tensors (PackedLayout.op_inputs())."""
    if q.shape[0] != 1:
        raise ValueError(f"prefix_attention runs on one packed sequence (batch 1), got a batch of {q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # squeeze, not q[0]: the gradient of a select is a fresh zeroed tensor that Inductor fills (a copy of
    # dq, dk or dv per layer), that of a squeeze is a view
    out, _ = torch.ops.effcc.prefix_attention_fwd(q.squeeze(0), k.squeeze(0), v.squeeze(0), group_start, prefix_end, segment_start,
                                                  visible_until, scale)
    return out.unsqueeze(0)
