"""effcc's quantised-linear Triton kernels against the ops' float64 reference (interpreter on the CPU,
real shapes on CUDA), and the backend's W8A8 lowering."""

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.backends.triton import quantized_linear as kernels
from effcc.backends.triton.lowering import lower_quantized_linears
from effcc.ops import quantized_linear as q

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Relative to max|ref|: float32 sums in another order; a 16-bit output is rounded once (half a
# unit in the last place: up to 2⁻⁸ of the element for bfloat16, 2⁻¹¹ for float16).  Triton's
# interpreter truncates float32 → bfloat16 instead of rounding: up to a whole unit, 2⁻⁷.
TOL = {torch.float32: 1e-5, torch.float16: 6e-4, torch.bfloat16: 4.5e-3 if CUDA else 8e-3}


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(DEVICE, dtype)


def _rel(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (33, 4096) if CUDA else (9, 384)], ids=str)
def test_row_quantisation_matches_reference(shape):
    x = _randn(*shape, seed=0, scale=3.0)
    x[0, :5] = 0.0  # zeros and a row with a tiny range must not divide by zero
    codes, scales = kernels.quantize_rows(x)
    want_codes, want_scales = q.quantize_per_token_int8_f32(x)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(scales, want_scales.squeeze(-1), rtol=0, atol=0)
    ref_codes, _ = q.quantize_per_token_int8(x)  # the float64 definition: a code may differ by one at a tie
    assert (codes.int() - ref_codes.int()).abs().max() <= 1


SHAPES_W8A8 = [(1, 40, 96), (17, 48, 64), (70, 33, 160)] + ([(4096, 4096, 4096), (5, 11008, 4096)] if CUDA else [])


@pytest.mark.parametrize("m,n,k", SHAPES_W8A8, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32], ids=str)
def test_int8_gemm_matches_integer_reference(m, n, k, with_bias, dtype):
    x = _randn(m, k, seed=1, dtype=dtype)
    qweight, wscale = (t.to(DEVICE) for t in q.quantize_weight_int8(_randn(n, k, seed=2)))
    bias = _randn(n, seed=3, dtype=dtype) if with_bias else None
    codes, scales = kernels.quantize_rows(x)
    out = kernels.int8_linear(codes, scales, qweight, wscale, bias, dtype)
    assert out.dtype == dtype and out.shape == (m, n)
    want = q.int8_linear_reference(codes, scales[:, None], qweight, wscale, bias, torch.float64)
    assert _rel(out, want) <= TOL[dtype]


SHAPES_W4A16 = [(1, 48, 128, 64), (1, 37, 384, 32), (3, 40, 320, 32), (5, 40, 256, 32), (16, 24, 192, 64), (40, 48, 128, 128)]
if CUDA:
    SHAPES_W4A16 += [(m, n, k, 128) for m in (1, 4, 16, 2048) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))]


@pytest.mark.parametrize("m,n,k,group", SHAPES_W4A16, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int4_gemm_matches_reference(m, n, k, group, dtype):
    x = _randn(m, k, seed=4, dtype=dtype)
    packed, scales, zeros = (t.to(DEVICE) for t in q.quantize_weight_int4(_randn(n, k, seed=5), group))
    scales = scales.to(dtype)
    bias = _randn(n, seed=6, dtype=dtype) if m % 2 else None
    out = kernels.int4_linear(x, packed, scales, zeros, group, bias)
    assert out.dtype == dtype and out.shape == (m, n) and not out.isnan().any()
    want = q.w4a16_linear_reference(x.double(), packed, scales.double(), zeros, group, None if bias is None else bias.double())
    assert _rel(out, want) <= TOL[dtype]


@pytest.mark.parametrize("weights_as_a", [False, True], ids=["codes-as-B", "codes-as-A"])
@pytest.mark.parametrize("m,n,k,group", [(1, 40, 320, 32), (3, 40, 320, 32), (16, 24, 192, 64)] + ([(1, 4096, 4096, 128), (5, 11008, 4096, 128)] if CUDA else []), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int4_tensor_core_kernel_in_both_operand_orders(m, n, k, group, dtype, weights_as_a):
    """The decode kernel (1-16 tokens) with the codes as the first operand (its output tile transposed) or
    the second."""
    x = _randn(m, k, seed=4, dtype=dtype)
    packed, scales, zeros = (t.to(DEVICE) for t in q.quantize_weight_int4(_randn(n, k, seed=5), group))
    bias = _randn(n, seed=6, dtype=dtype)
    config = {"BLOCK_M": 16, "BLOCK_N": 64 if CUDA else 16, "SPLIT_K": 2, "WEIGHTS_AS_A": weights_as_a}
    out = kernels.int4_linear(x, packed, scales.to(dtype), zeros, group, bias, config=config)
    want = q.w4a16_linear_reference(x.double(), packed, scales.to(dtype).double(), zeros, group, bias.double())
    assert out.shape == (m, n) and _rel(out, want) <= TOL[dtype]


@pytest.mark.parametrize("weights_as_a", [False, True], ids=["codes-as-B", "codes-as-A"])
def test_int4_splits_that_do_not_divide_the_groups(weights_as_a):
    """Ten groups over three splits (4, 4, 2): the last program of each tile adds the partial sums."""
    x = _randn(1, 640, seed=4)
    packed, scales, zeros = (t.to(DEVICE) for t in q.quantize_weight_int4(_randn(72, 640, seed=5), 64))
    config = {"BLOCK_M": 16, "BLOCK_N": 64 if CUDA else 16, "SPLIT_K": 3, "WEIGHTS_AS_A": weights_as_a}
    out = kernels.int4_linear(x, packed, scales, zeros, 64, None, config=config)
    want = q.w4a16_linear_reference(x.double(), packed, scales.double(), zeros, 64, None)
    assert _rel(out, want) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype,offset", [(torch.bfloat16, 128), (torch.float16, 1024)], ids=str)
def test_int4_decoder_ptx_gives_codes_minus_zero_points(dtype, offset):
    """The decode kernel's PTX, run by an emulator of its instructions (no GPU here): four bytes and the
    four elements' zero points (offset + z, two a register) → low and high codes minus z, exact."""
    from ptx_emulator import floats_to_halves, halves_to_floats, run

    asm = (kernels._BFLOAT16_CENTRED_PTX if dtype == torch.bfloat16 else kernels._FLOAT16_CENTRED_PTX).value
    g = torch.Generator().manual_seed(0)
    for _ in range(64):
        packed = torch.randint(0, 256, (4,), generator=g).tolist()
        zeros = torch.randint(0, 16, (4,), generator=g).tolist()
        word = packed[0] | packed[1] << 8 | packed[2] << 16 | packed[3] << 24
        operands = {4: word, 5: floats_to_halves([offset + zeros[0], offset + zeros[1]], dtype),
                    6: floats_to_halves([offset + zeros[2], offset + zeros[3]], dtype)}
        out = run(asm, operands)
        for e in range(4):
            assert halves_to_floats(out[e // 2], dtype)[e % 2] == (packed[e] & 0xF) - zeros[e]
            assert halves_to_floats(out[2 + e // 2], dtype)[e % 2] == (packed[e] >> 4) - zeros[e]


def test_int4_strided_activations_and_weight_rows():
    """Activations seen through a transpose (column stride 2·…), packed rows inside a wider buffer."""
    x = _randn(320, 2, seed=4).t()  # [2, 320], stride (1, 2)
    packed, scales, zeros = (t.to(DEVICE) for t in q.quantize_weight_int4(_randn(24, 320, seed=5), 32))
    wide = torch.zeros(24, 200, dtype=torch.uint8, device=DEVICE)
    wide[:, :160] = packed
    out = kernels.int4_linear(x, wide[:, :160], scales, zeros, 32, None)
    want = q.w4a16_linear_reference(x.double(), packed, scales.double(), zeros, 32, None)
    assert _rel(out, want) <= TOL[torch.float32]


def test_int4_kernel_refuses_group_sizes_it_cannot_run():
    packed, scales, zeros = q.quantize_weight_int4(torch.randn(8, 48), 24)
    with pytest.raises(ValueError, match="group sizes"):
        kernels.int4_linear(torch.randn(2, 48), packed, scales, zeros, 24, None)


def test_w8a8_lowering_quantises_each_activation_once_and_matches():
    model = build("llama")
    ids = token_ids(2, 8)
    result = effcc.optimize(model, (ids,), passes=["quantize_w8a8"])
    gm = result.program.gm
    w8a8 = sum(1 for n in gm.graph.nodes if n.target is torch.ops.effcc.w8a8_linear.default)
    distinct_inputs = len({n.args[0] for n in gm.graph.nodes if n.target is torch.ops.effcc.w8a8_linear.default})
    assert w8a8 > distinct_inputs  # q, k, v (and gate, up) read one activation
    with torch.no_grad():
        before = gm(ids)[0]
        assert lower_quantized_linears(gm, device_types=("cpu",)) == w8a8
        after = gm(ids)[0]
    assert sum(1 for n in gm.graph.nodes if n.target is torch.ops.effcc.int8_linear.default) == w8a8
    assert sum(1 for n in gm.graph.nodes if n.target is q.quantize_per_token_int8_f32) == distinct_inputs
    # float32 vs float64 scaling may move a code by one where x / s sits on a rounding tie
    assert _rel(after, before) < 1e-3


@pytest.mark.skipif(not CUDA, reason="the ops dispatch to the Triton kernels on CUDA")
def test_ops_on_cuda_run_the_kernels_and_match_reference():
    x = _randn(3, 5, 256, seed=7, dtype=torch.bfloat16)
    w = _randn(96, 256, seed=8)
    qweight, wscale = (t.cuda() for t in q.quantize_weight_int8(w))
    got = torch.ops.effcc.w8a8_linear(x, qweight, wscale, None)
    assert got.shape == (3, 5, 96) and _rel(got, q.w8a8_linear_reference(x.double(), qweight, wscale, None)) < 1e-2
    packed, scales, zeros = (t.cuda() for t in q.quantize_weight_int4(w, 64))
    got = torch.ops.effcc.w4a16_linear(x, packed, scales.bfloat16(), zeros, 64, None)
    want = q.w4a16_linear_reference(x.double(), packed, scales.bfloat16().double(), zeros, 64, None)
    assert got.shape == (3, 5, 96) and _rel(got, want) <= TOL[torch.bfloat16]
