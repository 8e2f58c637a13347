"""Prefix attention on FlashAttention's variable-length kernels (CUDA, fp16/bf16): two calls, no merge.

Every query's keys are one contiguous sequence once the prefix is gathered for each suffix, so the
layout's attention is two FlashAttention calls whose queries split the packed tokens between them:

  prefix   every prefix token causally over its own prefix: one varlen call over the prefixes;
  suffix   every suffix token over [its group's prefix; its own suffix], causal aligned bottom-right
           (FlashAttention's own convention for fewer queries than keys: the last query sees every
           key): one varlen call whose key sequences are gathered, the prefix once per suffix.

No softmax is split, so each call's output and log-sum-exp are final, and the backward is the two
calls' backward kernels; the gradients of a prefix key or value from each of its group's suffixes
are added up in float32.  The cost over the Triton kernel's layout: the gathered keys and values,
G copies of the prefix per layer (G·P rows), read once forward and once backward.

The two primitives (a varlen call and its backward) have a PyTorch reference on the CPU, so the
gathering and scattering around them is tested without a GPU (tests/test_prefix_attention_kernel.py).
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import Tensor

aten = torch.ops.aten
FLASH_PLAN_FIELDS = ("prefix_rows", "prefix_bounds", "suffix_rows", "suffix_bounds", "context_rows", "context_bounds", "longest")
_UNUSED_RNG = {}  # dropout is 0: the backward kernels never read the RNG state, but take one


def asked_for() -> bool:
    """EFFCC_PREFIX_ATTENTION=flash (effcc's Triton kernel is the default, measured faster)."""
    return os.environ.get("EFFCC_PREFIX_ATTENTION", "triton") == "flash"


def usable(q: Tensor, k: Tensor, plan) -> bool:
    """Asked for, CUDA fp16/bf16, a plan whose launch sizes (its last tensor) are on the CPU."""
    return (
        len(plan) == len(FLASH_PLAN_FIELDS) and asked_for() and plan[-1].device.type == "cpu" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
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


def varlen_attention(q, k, v, bounds_q, bounds_k, longest_q, longest_k, causal, scale) -> tuple[Tensor, Tensor]:
    """Attention of each sequence [bounds_q[i], bounds_q[i+1]) of q over [bounds_k[i], bounds_k[i+1]) of k, v;
    q [Nq, H, D], k and v [Nk, Hkv, D] → (out [Nq, H, D], lse [H, Nq]).  CUDA: FlashAttention's kernel."""
    if not q.is_cuda:
        return _varlen_reference(q, k, v, bounds_q, bounds_k, causal, scale)
    out, lse, *_ = aten._flash_attention_forward(q, k, v, bounds_q, bounds_k, longest_q, longest_k, 0.0, causal, False, scale=scale)
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"FlashAttention returned a log-sum-exp of shape {tuple(lse.shape)}, expected [heads, tokens] {(q.shape[1], q.shape[0])}")
    return out, lse


def varlen_attention_backward(grad, q, k, v, out, lse, bounds_q, bounds_k, longest_q, longest_k, causal, scale):
    """(dq, dk, dv) of `varlen_attention`, from its output and log-sum-exp."""
    if not q.is_cuda:
        return _varlen_reference_backward(grad, q, k, v, out, lse, bounds_q, bounds_k, causal, scale)
    rng = _rng(q.device)
    dq, dk, dv, *_ = aten._flash_attention_backward(grad, q, k, v, out, lse, bounds_q, bounds_k, longest_q, longest_k, 0.0, causal, rng, rng,
                                                    scale=scale)
    return dq, dk, dv


def _sequences(bounds_q: Tensor, bounds_k: Tensor):
    starts_q, starts_k = bounds_q.tolist(), bounds_k.tolist()
    return zip(itertools.pairwise(starts_q), itertools.pairwise(starts_k))


def _visible(length_q: int, length_k: int, causal: bool) -> Tensor:
    """Bool [Lq, Lk]: every key, or if causal j ≤ i + (Lk − Lq) (FlashAttention's mask, aligned bottom-right)."""
    everything = torch.ones(length_q, length_k, dtype=torch.bool)
    return everything.tril(length_k - length_q) if causal else everything


def _varlen_reference(q, k, v, bounds_q, bounds_k, causal, scale):
    from .prefix_attention import attention_with_lse

    out, lse = q.new_zeros(q.shape), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    for (q0, q1), (k0, k1) in _sequences(bounds_q, bounds_k):
        mask = _visible(q1 - q0, k1 - k0, causal)
        o, l = attention_with_lse(*(t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1])), mask.to(q.device), scale)
        out[q0:q1], lse[:, q0:q1] = o.transpose(0, 1), l
    return out, lse


def _varlen_reference_backward(grad, q, k, v, out, lse, bounds_q, bounds_k, causal, scale):
    from .prefix_attention import attention_backward

    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for (q0, q1), (k0, k1) in _sequences(bounds_q, bounds_k):
        mask = _visible(q1 - q0, k1 - k0, causal)
        heads_first = (t.transpose(0, 1) for t in (grad[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1]))
        grads = attention_backward(*heads_first, lse[:, q0:q1], mask.to(q.device), scale)
        for target, g, (lo, hi) in zip((dq, dk, dv), grads, ((q0, q1), (k0, k1), (k0, k1))):
            target[lo:hi] = g.transpose(0, 1)
    return dq, dk, dv


def _gathered(qt, kt, vt, plan):
    """Each call's queries, keys and values: the prefix tokens (q, k, v), the suffix tokens (q) and
    the gathered contexts [prefix; own suffix] (k, v)."""
    prefix_rows, _, suffix_rows, _, context_rows, _, _ = plan
    prefix = tuple(t.index_select(0, prefix_rows) for t in (qt, kt, vt))
    return prefix, qt.index_select(0, suffix_rows), kt.index_select(0, context_rows), vt.index_select(0, context_rows)


def forward(q: Tensor, k: Tensor, v: Tensor, plan, scale: float) -> tuple[Tensor, Tensor]:
    prefix_rows, prefix_bounds, suffix_rows, suffix_bounds, _, context_bounds, longest = plan
    longest_prefix, longest_suffix, longest_context = longest.tolist()
    qt, kt, vt = (_tokens_first(t) for t in (q, k, v))
    (q_p, k_p, v_p), q_s, k_c, v_c = _gathered(qt, kt, vt, plan)
    out_p, lse_p = varlen_attention(q_p, k_p, v_p, prefix_bounds, prefix_bounds, longest_prefix, longest_prefix, True, scale)
    out = qt.new_empty(qt.shape).index_copy(0, prefix_rows, out_p)
    lse = lse_p.new_empty(qt.shape[1], qt.shape[0]).index_copy(1, prefix_rows, lse_p)
    if suffix_rows.numel():
        out_s, lse_s = varlen_attention(q_s, k_c, v_c, suffix_bounds, context_bounds, longest_suffix, longest_context, True, scale)
        out, lse = out.index_copy(0, suffix_rows, out_s), lse.index_copy(1, suffix_rows, lse_s)
    return out.transpose(0, 1).contiguous(), lse.contiguous()


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan, scale: float):
    prefix_rows, prefix_bounds, suffix_rows, suffix_bounds, context_rows, context_bounds, longest = plan
    longest_prefix, longest_suffix, longest_context = longest.tolist()
    qt, kt, vt, ot, gt = (_tokens_first(t) for t in (q, k, v, out, grad_out))
    # the gathers of the forward are made again rather than saved: they are cheap next to the
    # attention and would otherwise hold G copies of each prefix's keys and values per layer
    (q_p, k_p, v_p), q_s, k_c, v_c = _gathered(qt, kt, vt, plan)
    rows_of = lambda t, rows: t.index_select(0, rows)
    dq_p, dk_p, dv_p = varlen_attention_backward(rows_of(gt, prefix_rows), q_p, k_p, v_p, rows_of(ot, prefix_rows), lse.index_select(1, prefix_rows),
                                                 prefix_bounds, prefix_bounds, longest_prefix, longest_prefix, True, scale)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32  # a prefix key gathers G suffixes' gradients
    dq = qt.new_empty(qt.shape).index_copy(0, prefix_rows, dq_p)
    dk = kt.new_zeros(kt.shape, dtype=wide).index_copy(0, prefix_rows, dk_p.to(wide))
    dv = vt.new_zeros(vt.shape, dtype=wide).index_copy(0, prefix_rows, dv_p.to(wide))
    if suffix_rows.numel():
        dq_s, dk_c, dv_c = varlen_attention_backward(rows_of(gt, suffix_rows), q_s, k_c, v_c, rows_of(ot, suffix_rows), lse.index_select(1, suffix_rows),
                                                     suffix_bounds, context_bounds, longest_suffix, longest_context, True, scale)
        dq = dq.index_copy(0, suffix_rows, dq_s)
        dk, dv = dk.index_add(0, context_rows, dk_c.to(wide)), dv.index_add(0, context_rows, dv_c.to(wide))
    return tuple(t.to(q.dtype).transpose(0, 1).contiguous() for t in (dq, dk, dv))


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
