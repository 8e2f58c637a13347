"""Block-sparse linear (effcc::block_sparse_linear): packing, the reference, the Triton kernel
(interpreter on the CPU, real shapes on a GPU) and `effcc.sparsity.freeze`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import effcc
from effcc.backends.triton.sparse_linear import block_sparse_linear as triton_block_sparse_linear
from effcc.ops.sparse import block_sparse_linear_reference, pack_blocks, unpack_blocks
from effcc.sparsity import BlockSparseLinear, MaskedLayer, blocks, freeze, masked_layers
from effcc.sparsity.layers import LayerSpec


def block_mask(out_features, in_features, block, density, seed=0, empty_row_block=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(out_features // block[0], in_features // block[1], generator=g) < density
    if empty_row_block:
        kept[1] = False
    return blocks.expand(kept, (out_features, in_features), block)


def test_pack_unpack_round_trip_and_reference():
    w = torch.randn(64, 96, dtype=torch.float64)
    mask = block_mask(64, 96, (16, 32), 0.4, empty_row_block=True)
    packed = pack_blocks(w * mask, mask, (16, 32))
    assert packed.values.shape[1:] == (32, 16) and int(packed.row_offsets[-1]) == packed.values.shape[0]
    torch.testing.assert_close(unpack_blocks(packed), w * mask, rtol=0, atol=0)
    x, b = torch.randn(3, 5, 96, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    y = block_sparse_linear_reference(x, packed.values, packed.row_offsets, packed.col_blocks, b, 64)
    torch.testing.assert_close(y, nn.functional.linear(x, w * mask, b), rtol=1e-12, atol=1e-12)


def test_pack_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="whole number of 16×16 blocks"):
        pack_blocks(torch.randn(40, 32), torch.ones(40, 32, dtype=torch.bool), (16, 16))
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="not constant over blocks"):
        pack_blocks(torch.randn(32, 32), mask, (16, 16))


@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_kernel_matches_the_reference(tokens, block, with_bias):
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    mask = block_mask(64, 96, block, 0.5, seed=tokens, empty_row_block=True)
    packed = pack_blocks(w * mask, mask, block)
    x = torch.randn(2, tokens, 96)
    b = torch.randn(64) if with_bias else None
    args = (packed.values, packed.row_offsets, packed.col_blocks, b, 64)
    expected = block_sparse_linear_reference(x.double(), packed.values.double(), *args[1:3], b.double() if with_bias else None, 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest)
    on = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (x, *args)]
    got = triton_block_sparse_linear(*on).cpu()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_freeze_lowers_block_masked_linears_and_leaves_the_rest(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 32)
    sparse = effcc.optimize(model, (x,), passes=[("sparse_ift", {"family": "parallel", "block": (16, 16)})]).model
    conv = MaskedLayer(LayerSpec("conv2d", 2, 4, False, (3, 3)), (1, 1))
    holder = nn.ModuleDict({"mlp": sparse, "conv": conv})
    frozen = freeze(holder)
    assert sum(isinstance(m, BlockSparseLinear) for m in frozen.modules()) == 2 * 4  # parallel: 4 branches, 2 layers
    assert [name for name, _ in masked_layers(frozen)] == ["conv"]
    assert "conv stays masked dense: a convolution" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(frozen["mlp"](x), sparse(x), rtol=1e-5, atol=1e-5)
    assert masked_layers(holder)  # the original keeps training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_kernel_on_the_gpu_bf16(tokens):
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda") / 64
    mask = block_mask(4096, 4096, (64, 64), 0.25).cuda()
    packed = pack_blocks((w * mask).bfloat16(), mask, (64, 64))
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    got = torch.ops.effcc.block_sparse_linear(x, packed.values, packed.row_offsets, packed.col_blocks, b, 4096)
    expected = nn.functional.linear(x.float(), (w * mask).bfloat16().float(), b.float())
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
