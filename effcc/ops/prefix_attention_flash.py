"""Prefix attention on FlashAttention's variable-length kernels (CUDA, fp16/bf16): a split and a merge.

A suffix token's keys are its group's prefix and its own segment.  Softmax over a union of
two key sets is the two partial softmaxes merged by their log-sum-exps, so the layout's
attention is two FlashAttention calls on the packed tokens, neither of which copies the
prefix per suffix:

  own      every segment (each prefix, each suffix) causally over itself, one varlen call
           over the packed tokens as they lie (nothing gathered);
  prefix   every suffix token over its group's prefix, no mask: one varlen call whose
           "sequences" are the groups (all suffix tokens of group g against the keys of P_g).

The backward is the same two calls' backward kernels, each given the merged output and
log-sum-exp: FlashAttention's backward recomputes P = exp(S − lse) and δ = rowsum(dO ∘ O)
from them, which are then the probabilities and δ of the whole softmax, so the two parts'
gradients add up to the exact gradient (as in ring attention).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

aten = torch.ops.aten
_UNUSED_RNG = {}  # dropout is 0: the backward kernels never read the RNG state, but take one


def asked_for() -> bool:
    """EFFCC_PREFIX_ATTENTION=flash (effcc's Triton kernel is the default, measured faster)."""
    return os.environ.get("EFFCC_PREFIX_ATTENTION", "triton") == "flash"


def usable(q: Tensor, k: Tensor, plan) -> bool:
    """Asked for, CUDA fp16/bf16, a plan whose launch sizes (its last tensor) are on the CPU."""
    return (
        len(plan) == 6 and asked_for() and plan[-1].device.type == "cpu" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and q.shape[0] % k.shape[0] == 0
    )


def _tokens_first(t: Tensor) -> Tensor:
    """[H, N, D] → [N, H, D] (a view: the graph's q, k, v come from a [N, H, D] layout anyway)."""
    t = t.transpose(0, 1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _rng(device) -> Tensor:
    if device not in _UNUSED_RNG:
        _UNUSED_RNG[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return _UNUSED_RNG[device]


def _flash(q, k, v, bounds_q, bounds_k, longest_q, longest_k, causal, scale):
    out, lse, *_ = aten._flash_attention_forward(q, k, v, bounds_q, bounds_k, longest_q, longest_k, 0.0, causal, False, scale=scale)
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"FlashAttention returned a log-sum-exp of shape {tuple(lse.shape)}, expected [heads, tokens] {(q.shape[1], q.shape[0])}")
    return out, lse


def _flash_grad(grad, q, k, v, out, lse, bounds_q, bounds_k, longest_q, longest_k, causal, scale):
    rng = _rng(q.device)
    return aten._flash_attention_backward(grad, q, k, v, out, lse, bounds_q, bounds_k, longest_q, longest_k, 0.0, causal, rng, rng, scale=scale)


def forward(q: Tensor, k: Tensor, v: Tensor, plan, scale: float) -> tuple[Tensor, Tensor]:
    segment_bounds, prefix_rows, suffix_rows, prefix_bounds, group_suffix_bounds, longest = plan
    longest_segment, longest_group_suffix, longest_prefix = longest.tolist()
    qt, kt, vt = (_tokens_first(t) for t in (q, k, v))
    out, lse = _flash(qt, kt, vt, segment_bounds, segment_bounds, longest_segment, longest_segment, True, scale)
    if suffix_rows.numel():
        q_suffix = qt.index_select(0, suffix_rows)
        k_prefix, v_prefix = kt.index_select(0, prefix_rows), vt.index_select(0, prefix_rows)
        out_p, lse_p = _flash(q_suffix, k_prefix, v_prefix, group_suffix_bounds, prefix_bounds, longest_group_suffix, longest_prefix, False, scale)
        lse_own = lse.index_select(1, suffix_rows)
        merged_lse = torch.logaddexp(lse_own, lse_p)
        weight_own = torch.exp(lse_own - merged_lse).t().unsqueeze(-1)  # [Ns, H, 1]
        weight_p = torch.exp(lse_p - merged_lse).t().unsqueeze(-1)
        merged = out.index_select(0, suffix_rows).float() * weight_own + out_p.float() * weight_p
        out = out.index_copy(0, suffix_rows, merged.to(out.dtype))
        lse = lse.index_copy(1, suffix_rows, merged_lse)
    return out.transpose(0, 1).contiguous(), lse.contiguous()


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan, scale: float):
    segment_bounds, prefix_rows, suffix_rows, prefix_bounds, group_suffix_bounds, longest = plan
    longest_segment, longest_group_suffix, longest_prefix = longest.tolist()
    qt, kt, vt, ot, gt = (_tokens_first(t) for t in (q, k, v, out, grad_out))
    # the gathers of the forward are made again rather than saved: they are cheap next to the
    # attention and would otherwise hold a copy of Q (suffix rows), K and V (prefix rows) per layer
    dq, dk, dv = _flash_grad(gt, qt, kt, vt, ot, lse, segment_bounds, segment_bounds, longest_segment, longest_segment, True, scale)
    if suffix_rows.numel():
        q_suffix = qt.index_select(0, suffix_rows)
        k_prefix, v_prefix = kt.index_select(0, prefix_rows), vt.index_select(0, prefix_rows)
        dq_s, dk_p, dv_p = _flash_grad(
            gt.index_select(0, suffix_rows), q_suffix, k_prefix, v_prefix, ot.index_select(0, suffix_rows),
            lse.index_select(1, suffix_rows).contiguous(), group_suffix_bounds, prefix_bounds, longest_group_suffix, longest_prefix, False, scale,
        )
        dq = dq.index_add(0, suffix_rows, dq_s)
        dk = dk.index_add(0, prefix_rows, dk_p)
        dv = dv.index_add(0, prefix_rows, dv_p)
    return tuple(t.transpose(0, 1).contiguous() for t in (dq, dk, dv))


# Opaque ops: the split reads its launch sizes from a CPU tensor, which a traced graph cannot.
@torch.library.custom_op("effcc::prefix_attention_flash_fwd", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, plan: list[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return forward(q, k, v, plan, scale)


@forward_op.register_fake
def _(q, k, v, plan, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("effcc::prefix_attention_flash_bwd", mutates_args=())
def backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: list[Tensor],
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return backward(grad_out, q, k, v, out, lse, plan, scale)


@backward_op.register_fake
def _(grad_out, q, k, v, out, lse, plan, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
