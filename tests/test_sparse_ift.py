"""Sparse-IFT: every family keeps the dense model's FLOPs on real architectures, masks are state,
training sees dense gradients, and what cannot be transformed is left alone with a reason."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build, token_ids
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import effcc
from effcc.errors import EffccError
from effcc.models import ResNet18
from effcc.sparsity import MaskedLayer, blocks, masked_layers
from effcc.sparsity.layers import LayerSpec

FAMILIES = ["wide", "parallel", "factorized", "doped"]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4, num_labels=5)
    return ViTForImageClassification(config)


CASES = {
    "mlp": lambda: (mlp(), (torch.randn(8, 16),)),
    "gpt2": lambda: (build("gpt2"), (token_ids(2, 12),)),
    "vit": lambda: (vit(), (torch.randn(2, 3, 16, 16),)),
    "resnet18": lambda: (ResNet18(width=8), (torch.randn(2, 3, 16, 16),)),
}


def flops(model: nn.Module, args: tuple) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(*args)
    return counter.get_total_flops()


def sparse_ift(model, args, **options):
    options = {"family": "wide", "sparsity": 0.75, **options}
    return effcc.optimize(model, args, passes=[("sparse_ift", options)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_family_keeps_the_dense_flops(case, family):
    torch.manual_seed(0)
    model, args = CASES[case]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sparse_ift(model, args, family=family)
    dense, sparse = flops(model, args), flops(res.model, args)
    [result] = res.passes
    assert result.flops == (dense, sparse)
    # Integer widths and whole masks: the pass may miss by one weight per position, no more.
    assert abs(sparse - dense) <= max(1, result.flops[0] * 1e-5), (dense, sparse)
    layers = masked_layers(res.model)
    assert layers, "no layer was made sparse"
    kept = sum(int(m.mask.sum()) for _, m in layers)
    total = sum(m.mask.numel() for _, m in layers)
    if family != "wide":  # wide spends part of the budget on the wider dense first/last layers
        assert abs(kept / total - 0.25) < 0.01
    assert res.model(*args) is not None
    # The caller's model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not masked_layers(model)


def test_active_flops_are_kept_weights_times_positions():
    layer = MaskedLayer(LayerSpec("conv2d", 3, 8, True, (3, 3), (2, 2), (1, 1)), (1, 1))
    layer.mask.view(-1)[torch.randperm(layer.mask.numel())[:100]] = False
    x = torch.randn(2, 3, 9, 9)
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
    assert counter.get_total_flops() == 2 * int(layer.mask.sum()) * y.shape[0] * y.shape[2] * y.shape[3]


def test_wide_widens_a_resnet_consistently():
    torch.manual_seed(0)
    model, args = CASES["resnet18"]()
    res = sparse_ift(model, args, family="wide", sparsity=0.5)
    new = res.model
    assert isinstance(new.stem[0], nn.Conv2d) and new.stem[0].out_channels > 8  # first layer: dense, wider
    assert isinstance(new.fc, nn.Linear) and new.fc.in_features == new.stages[3][1].conv2.spec.out_features
    block = new.stages[1][0]
    assert block.bn1.num_features == block.conv1.spec.out_features == block.conv2.spec.in_features
    assert block.bn2.num_features == block.conv2.spec.out_features == block.shortcut[1].num_features
    assert all(isinstance(m, MaskedLayer) for n, m in new.named_modules() if n.endswith(("conv1", "conv2")))
    new.train()
    loss = new(torch.randn(4, 3, 16, 16)).logsumexp(-1).mean()  # batch statistics in train mode
    loss.backward()
    assert all(p.grad is not None for p in new.parameters())


def test_wide_leaves_attention_widths_and_says_why():
    res = sparse_ift(build("gpt2"), (token_ids(2, 12),), family="wide")
    changed = {site.where for site in res.passes[0].changed}
    assert changed == {f"transformer.h.{i}.mlp.{name}" for i in range(2) for name in ("c_fc", "c_proj")}
    skipped = {site.where: site.detail for site in res.passes[0].skipped}
    assert "split" in skipped["transformer.h.0.attn.c_attn"]
    assert "embedding" in skipped["transformer.h.0.attn.c_proj"]
    assert "last layer stays dense" in skipped["lm_head"]
    mlp_in = res.model.transformer.h[0].mlp.c_fc
    assert mlp_in.spec.out_features == 4 * 128  # ×k = 4 at sparsity 0.75: only one side of each grows
    assert "sparse_ift" in str(res.report) and "FLOPs" in str(res.report)


def test_block_masks_and_erk():
    torch.manual_seed(0)
    model, args = CASES["mlp"]()
    res = sparse_ift(model, args, family="parallel", block=(8, 8), init="erk", include=r".")
    layers = masked_layers(res.model)
    for _, layer in layers:
        blocks.collapse(layer.mask, (8, 8))  # raises unless constant over 8×8 blocks
    densities = {round(layer.density, 2) for _, layer in layers}
    assert len(densities) > 1  # ERK gives small layers more
    assert abs(flops(res.model, args) - flops(model, args)) <= res.passes[0].flops[0] * 0.01


def test_masked_weights_are_ignored_but_get_dense_gradients():
    torch.manual_seed(0)
    model, args = CASES["mlp"]()
    res = sparse_ift(model, args, family="parallel")
    _, layer = masked_layers(res.model)[0]
    y = res.model(*args)
    y.square().sum().backward()
    assert layer.weight.grad[~layer.mask].abs().sum() > 0  # RigL reads these to grow connections
    with torch.no_grad():
        layer.weight[~layer.mask] += 1.0
        assert torch.equal(res.model(*args), y)


def test_sparse_ops_gradients_match_masked_dense_math():
    torch.manual_seed(0)
    for spec, x in [(LayerSpec("linear", 6, 5, True), torch.randn(3, 4, 6)), (LayerSpec("conv2d", 3, 4, True, (3, 3), (1, 2), (1, 0)), torch.randn(2, 3, 7, 6))]:
        layer = MaskedLayer(spec, (1, 1), dtype=torch.float64)
        layer.mask.copy_(torch.rand(layer.mask.shape) > 0.5)
        x = x.double().requires_grad_()
        layer(x).sin().sum().backward()
        effective = (layer.weight * layer.mask).detach().requires_grad_()
        x_ref = x.detach().requires_grad_()
        if spec.kind == "linear":
            out = nn.functional.linear(x_ref, effective, layer.bias)
        else:
            out = nn.functional.conv2d(x_ref, effective, layer.bias, spec.stride, spec.padding)
        out.sin().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, effective.grad, rtol=1e-12, atol=1e-12)


def test_masks_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model, args = CASES["resnet18"]()
    trained = sparse_ift(model, args, family="doped", seed=1).model
    torch.save(trained.state_dict(), tmp_path / "sparse.pt")
    fresh = sparse_ift(model, args, family="doped", seed=2).model  # other masks and weights
    assert any(not torch.equal(a.mask, b.mask) for (_, a), (_, b) in zip(masked_layers(trained), masked_layers(fresh)))
    fresh.load_state_dict(torch.load(tmp_path / "sparse.pt"))
    assert all(torch.equal(a.mask, b.mask) for (_, a), (_, b) in zip(masked_layers(trained), masked_layers(fresh)))
    torch.testing.assert_close(fresh.eval()(*args), trained.eval()(*args), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["gpt2", "resnet18"])
def test_onnx_export_matches_pytorch(tmp_path, case):
    torch.manual_seed(0)
    model, args = CASES[case]()
    res = sparse_ift(model, args, family="factorized" if case == "resnet18" else "wide")
    def logits(out):
        return out.logits if hasattr(out, "logits") else out

    with torch.no_grad():
        before = logits(res.model.eval()(*args))
        for _, layer in masked_layers(res.model):  # "training": the export must follow res.model's weights
            layer.weight.mul_(1.5)
        assert not torch.allclose(before, logits(res.model(*args)))
    path = effcc.export_onnx(res, tmp_path / f"{case}.onnx")
    assert effcc.check_onnx(path, res.model, args).within(1e-4)


def test_ids_of_another_shape_run_after_the_rewrite():
    res = sparse_ift(build("gpt2"), (token_ids(2, 12),), family="parallel")
    assert res.model(torch.randint(0, VOCAB, (3, 5))).logits.shape == (3, 5, VOCAB)


def test_bad_options_and_misuse_are_refused():
    model, args = CASES["mlp"]()
    for options, words in [({"family": "narrow"}, "family 'narrow'"), ({"sparsity": 1.5}, "sparsity"), ({"block": (0, 4)}, "block"), ({"init": "normal"}, "init")]:
        with pytest.raises(EffccError, match=words):
            sparse_ift(model, args, **options)
    with pytest.raises(EffccError, match="must come before"):
        effcc.optimize(model, args, passes=["fold_norm_affine", "sparse_ift"])
    with pytest.raises(Exception, match="changes the model's layers"):
        torch.compile(model, backend="effcc", options={"passes": ["sparse_ift"]})(*args)


def test_layers_that_do_not_fit_blocks_are_left_dense():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 60), nn.ReLU(), nn.Linear(60, 10))
    res = sparse_ift(model, (torch.randn(4, 16),), family="parallel", block=(8, 8))
    skipped = {site.where: site.detail for site in res.passes[0].skipped}
    assert "not a whole number of 8×8 blocks" in skipped["2"]
    assert isinstance(res.model[2], nn.Linear)


def test_sparse_model_trains_under_torch_compile():
    torch.manual_seed(0)
    model, args = CASES["mlp"]()
    sparse = sparse_ift(model, args, family="parallel").model
    compiled = torch.compile(sparse)
    compiled(*args).square().sum().backward()
    _, layer = masked_layers(sparse)[0]
    compiled_grad, layer.weight.grad = layer.weight.grad.clone(), None
    sparse(*args).square().sum().backward()
    torch.testing.assert_close(compiled_grad, layer.weight.grad)


class ShiftedMLP(nn.Module):
    """A hidden width with a hand-written per-channel shift and a LayerNorm on it."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64, bias=False)
        self.shift = nn.Parameter(torch.zeros(64))
        self.norm = nn.LayerNorm(64)
        self.mid = nn.Linear(64, 64)
        self.down = nn.Linear(64, 4)

    def forward(self, x):
        return self.down(torch.relu(self.mid(self.norm(self.up(x) + self.shift))))


def test_wide_widens_per_channel_parameters_and_norms():
    model, x = ShiftedMLP(), torch.randn(5, 16)
    res = sparse_ift(model, (x,), family="wide", sparsity=0.5)
    new = res.model
    width = new.mid.spec.in_features
    assert width > 64 and new.shift.shape == (width,) and new.norm.normalized_shape == (width,)
    assert new.up.out_features == width and new.down.in_features == new.mid.spec.out_features
    assert new(x).shape == (5, 4)
