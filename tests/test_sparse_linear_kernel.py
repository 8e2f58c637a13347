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


def test_freeze_lowers_sparse_wide_linears_to_the_kernel(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 32)
    options = {"family": "wide", "sparsity": 0.8, "block": (16, 16)}
    sparse = effcc.optimize(model, (x,), passes=[("sparse_ift", options)]).model
    conv = MaskedLayer(LayerSpec("conv2d", 2, 4, False, (3, 3)), (1, 1))
    holder = nn.ModuleDict({"mlp": sparse, "conv": conv})
    with caplog.at_level("INFO", logger="effcc"):
        frozen = freeze(holder)
    lowered = [m for m in frozen.modules() if isinstance(m, BlockSparseLinear)]
    assert len(lowered) == 2  # the two hidden 64×64 layers, widened and sparse
    assert not masked_layers(frozen) and isinstance(frozen["conv"], nn.Conv2d)
    assert "conv runs dense with W ⊙ M: a convolution" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(frozen["mlp"](x), sparse(x), rtol=1e-5, atol=1e-5)
        y = torch.randn(2, 2, 6, 6)
        torch.testing.assert_close(frozen["conv"](y), conv(y), rtol=1e-6, atol=1e-6)
    assert masked_layers(holder)  # the original keeps training


@pytest.mark.parametrize("family", ["parallel", "factorized", "doped"])
@pytest.mark.parametrize("case", ["mlp", "resnet18", "gpt2"])
def test_freeze_folds_structures_into_one_dense_layer_exactly(family, case):
    from conftest import build, token_ids

    from effcc.models import ResNet18

    torch.manual_seed(0)
    model, args = {
        "mlp": lambda: (nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), (torch.randn(8, 16),)),
        "resnet18": lambda: (ResNet18(width=8), (torch.randn(2, 3, 16, 16),)),
        "gpt2": lambda: (build("gpt2"), (token_ids(2, 12),)),
    }[case]()
    sparse = effcc.optimize(model, args, passes=[("sparse_ift", {"family": family})]).model.double().eval()
    frozen = freeze(sparse)
    assert not masked_layers(frozen)
    assert sum(p.numel() for p in frozen.parameters()) == sum(p.numel() for p in model.parameters())  # the original's layers again
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        expected, got = sparse(*args), frozen(*args)
    expected, got = (getattr(t, "logits", t) for t in (expected, got))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


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
