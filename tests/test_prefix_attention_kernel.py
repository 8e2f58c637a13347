"""effcc's prefix attention Triton kernels (forward and backward) against the PyTorch reference.

On the CPU the kernels run in Triton's interpreter (small shapes, fp32 and fp16: the interpreter
has no bf16); the reference runs in float64 on the same (rounded) inputs.  On CUDA one more test
takes bf16 at realistic sizes against the float32 reference.

Errors are measured relative to the largest magnitude of the reference tensor (at least 1):
max |kernel − reference| / max(max |reference|, 1).
"""

import pytest
import torch
import triton

from effcc.backends.triton import prefix_attention as kernels
from effcc.ops.prefix_attention import PackedLayout, prefix_attention_reference, visible_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}

# (prefix length, [suffix lengths]) per group.  The interpreter's blocks are 16 and 32 rows, so
# these put block edges inside segments and groups; the last two also have spans of whole blocks
# that the kernels take without a mask.
LAYOUTS = {
    "one-group": [(20, [13, 7, 5])],
    "two-groups-ragged": [(7, [3, 5, 1]), (4, [6, 2])],
    "prefix-of-one": [(1, [9, 4]), (1, [1]), (3, [12])],
    "long-spans": [(40, [20, 9]), (8, [40, 3])],
}


def _close(actual, expected, dtype, what):
    scale = expected.abs().max().clamp_min(1.0)
    err = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: {err:.2e} > {TOL[dtype]:.0e}"


def _inputs(groups, heads, kv_heads, dim, dtype, device=DEVICE, seed=0, strided=False):
    layout = PackedLayout.build(groups, device=device)
    n = layout.group_start.shape[0]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n, dim, generator=g)
    k = torch.randn(kv_heads, n, dim, generator=g)
    v = torch.randn(kv_heads, n, dim, generator=g)
    grad_out = torch.randn(heads, n, dim, generator=g)
    q, k, v, grad_out = (t.to(device, dtype) for t in (q, k, v, grad_out))
    if strided:  # [N, H, D] storage seen as [H, N, D], the layout a projection leaves behind
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        k = k.transpose(0, 1).contiguous().transpose(0, 1)
    return layout, q, k, v, grad_out


def _reference(layout, q, k, v, grad_out, scale, ref_dtype):
    """(out, lse, dq, dk, dv) of the PyTorch reference in ref_dtype."""
    qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
    out = prefix_attention_reference(qr, kr, vr, layout.group_start, layout.prefix_end, layout.segment_start, scale)
    out.backward(grad_out.to(ref_dtype))
    repeat = q.shape[0] // k.shape[0]
    scores = qr.detach() @ kr.detach().repeat_interleave(repeat, dim=0).transpose(-1, -2) * scale
    mask = visible_keys(layout.group_start, layout.prefix_end, layout.segment_start)
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return out.detach(), lse, qr.grad, kr.grad, vr.grad


def _check_against_reference(layout, q, k, v, grad_out, dtype, ref_dtype):
    scale = q.shape[-1] ** -0.5
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(layout, q, k, v, grad_out, scale, ref_dtype)

    out, lse = kernels.forward(q, k, v, layout.group_start, layout.prefix_end, layout.segment_start, scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    _close(out, ref_out, dtype, "out")
    _close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")

    dq, dk, dv = kernels.backward(grad_out, q, k, v, out, lse, *layout.op_inputs(), scale)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3 and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    _close(dq, ref_dq, dtype, "dq")
    _close(dk, ref_dk, dtype, "dk")
    _close(dv, ref_dv, dtype, "dv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_matches_reference(layout_name, heads, dtype):
    # D = 16 for GQA (a power of two), 24 for MHA (BLOCK_D 32 with the last 8 columns masked)
    dim = 16 if heads[0] != heads[1] else 24
    layout, q, k, v, grad_out = _inputs(LAYOUTS[layout_name], *heads, dim, dtype)
    _check_against_reference(layout, q, k, v, grad_out, dtype, torch.float64)


@pytest.mark.parametrize("tile", [(32, 16), (16, 32)], ids=["block_m32-block_n16", "block_m16-block_n32"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "gqa"])
def test_backward_programs_pair_then_run_out(tile, heads, monkeypatch):
    """The backward's one grid alternates dK/dV and dQ programs, then runs the rest of the longer list:
    query blocks (BLOCK_M) and key blocks (BLOCK_N) of other sizes, and GQA (fewer kv heads), leave
    either list the longer one."""
    block_m, block_n = tile
    tuner = triton.autotune(configs=[triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)],
                            key=kernels._KEY)(kernels._backward_kernel)
    monkeypatch.setattr(kernels, "_BACKWARD", dict.fromkeys(kernels._BACKWARD, tuner))
    layout, q, k, v, grad_out = _inputs(LAYOUTS["long-spans"], *heads, 16, torch.float32, seed=11)
    _check_against_reference(layout, q, k, v, grad_out, torch.float32, torch.float64)


@pytest.mark.parametrize("dim", [16, 24, 80, 160])
def test_strided_inputs_and_head_dims(dim):
    """[N, H, D] storage seen as [H, N, D]; head dims padded to BLOCK_D (80 → 128), and one past 128
    (the autotuner with the larger-head tiles)."""
    # fp16 past 128 on CUDA: fp32 tiles that wide compile for minutes (see the kernels' _TILES)
    dtype = torch.float16 if DEVICE == "cuda" and dim > 128 else torch.float32
    layout, q, k, v, grad_out = _inputs(LAYOUTS["two-groups-ragged"], 4, 2, dim, dtype, seed=3, strided=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check_against_reference(layout, q, k, v, grad_out, dtype, torch.float64)


def test_single_token_segments():
    """Every suffix one token long: each suffix row sees the prefix and itself only."""
    layout, q, k, v, grad_out = _inputs([(5, [1] * 12), (2, [1, 1])], 2, 1, 16, torch.float32, seed=5)
    _check_against_reference(layout, q, k, v, grad_out, torch.float32, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernels", "float64-reference"])
def test_results_are_tokens_major(dtype):
    """The op's output and gradients lie in memory as [N, H, D], as SDPA's do, on every path: the model
    reads them back as [N, H·D] (o_proj, the q/k/v projections' backward) with no copy."""
    import effcc.ops.prefix_attention  # noqa: F401 -- registers torch.ops.effcc

    layout, q, k, v, grad_out = _inputs(LAYOUTS["two-groups-ragged"], 4, 2, 16, dtype, seed=7, strided=True)
    grad_out = grad_out.transpose(0, 1).contiguous().transpose(0, 1)  # as the model's reshape hands it back
    out, lse = torch.ops.effcc.prefix_attention_fwd(q, k, v, *layout.op_inputs(), 0.25)
    grads = torch.ops.effcc.prefix_attention_bwd(grad_out, q, k, v, out, lse, *layout.op_inputs(), 0.25)
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert t.transpose(0, 1).is_contiguous(), f"{name} strides {t.stride()}"
    ref_out, _, ref_dq, ref_dk, ref_dv = _reference(layout, q, k, v, grad_out, 0.25, torch.float64)
    for name, t, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, ref_dq, ref_dk, ref_dv)):
        _close(t, ref, torch.float32, name)


def test_rejects_mismatched_shapes():
    layout, q, k, v, _ = _inputs(LAYOUTS["one-group"], 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernels.forward(q, k, v, layout.group_start, layout.prefix_end, layout.segment_start, 0.25)
    too_long = kernels.MAX_TOKENS + 1  # shapes are checked before anything is allocated: meta tensors suffice
    q, k, v = (torch.empty(2, too_long, 16, device="meta") for _ in range(3))
    layout_vector = torch.empty(too_long, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=f"{too_long} tokens is past"):
        kernels.forward(q, k, v, layout_vector, layout_vector, layout_vector, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 at realistic sizes)")
@pytest.mark.parametrize("groups,heads", [([(1024, [256] * 4)], (16, 16)), ([(1024, [256] * 4), (300, [100, 77, 1])], (16, 4))],
                         ids=["one-group-mha", "two-groups-gqa"])
def test_bf16_realistic_sizes_on_cuda(groups, heads):
    layout, q, k, v, grad_out = _inputs(groups, *heads, 64, torch.bfloat16)
    _check_against_reference(layout, q, k, v, grad_out, torch.bfloat16, torch.float32)
