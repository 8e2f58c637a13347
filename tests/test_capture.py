"""Capture of real architectures: the captured graph computes what the model computes."""

import pytest
import torch
from conftest import build, token_ids
from torch import nn

import effcc
from effcc.capture import capture
from effcc.verify import compare, reference_outputs, run_float64


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "bert", "gpt_neox"])
def test_hf_capture_matches_eager_in_float64(arch):
    model = build(arch)
    program = capture(model, (token_ids(),))
    got = run_float64(program.gm, program.example_args)
    assert compare(got, reference_outputs(model, program.example_args)).max_rel < 1e-6
    assert program.dynamic_shapes is not None  # batch and sequence stay symbolic


def test_parameters_are_reachable_by_dotted_name():
    program = capture(build("gpt2"), (token_ids(),))
    weight = program.tensor("transformer.h.0.ln_1.weight")
    assert weight.shape == (32,)
    assert {n.target for n in program.readers("transformer.h.0.ln_1.weight")} == {torch.ops.aten.layer_norm.default}


def test_vit_from_config():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5)
    model = ViTForImageClassification(cfg).eval()
    from conftest import randomize_norms

    randomize_norms(model)
    pixels = torch.randn(2, 3, 16, 16)
    res = effcc.optimize(model.double(), (pixels.double(),), passes=["fold_norm_affine"])
    # Pre-LN blocks: layernorm_before → q/k/v, layernorm_after → intermediate; final norm → classifier.
    assert len(res.passes[0].changed) == 2 * 2 + 1, res.report
    assert res.passes[0].comparison.max_rel < 1e-10


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(nn.Module):
    """A torchvision-style ResNet: stem, two basic blocks, pooling, classifier."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16), BasicBlock(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_cnn_capture_in_eval_mode_and_default_passes():
    torch.manual_seed(0)
    model = SmallResNet()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 8, 8)
    res = effcc.optimize(model, (images,))
    assert res.report.capture.max_rel < 1e-9
    assert all(not p.changed for p in res.passes)  # nothing to fold: no LayerNorm/RMSNorm
    with torch.no_grad():
        torch.testing.assert_close(res.model(images), model.eval()(images))


def test_example_inputs_that_are_views_do_not_tie_the_capture_to_their_base():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=64, use_cache=False)).eval()
    ids = torch.randint(0, 50, (8, 32))
    res = effcc.optimize(model, (ids[:2, :16],), passes=[])  # a slice of a larger batch
    torch.testing.assert_close(res.model(ids[:3]).logits, model(ids[:3]).logits)


class InPlaceResidual(nn.Module):
    """`h += branch` on a value the model computed (as Falcon's decoder does), a later reader of it,
    and in-place adds that must stay: a view of the value was taken before the write, or the value
    has another dtype than what it adds."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        h += self.b(x)  # fresh value, no views: becomes add
        doubled = h * 2  # reads the value after the write
        g = self.b(h)
        first_half = g[:, :4]  # a view of g ...
        g += 1  # ... sees this write: stays in place
        counts = x.new_zeros(3, 8, dtype=torch.float16) + 1
        counts += h  # a float16 value: `counts + h` would be float32, so it stays in place
        return doubled, first_half, counts


def test_in_place_arithmetic_on_fresh_values_becomes_out_of_place():
    from effcc.capture import out_of_place_arithmetic

    x = torch.randn(3, 8)
    program = capture(InPlaceResidual().eval(), (x,))
    targets = [node.target for node in program.gm.graph.nodes]
    assert targets.count(torch.ops.aten.add_.Tensor) == 2  # behind a view, and into another dtype: they stay
    assert targets.count(torch.ops.aten.add.Tensor) == 2  # h += b(x), and counts' + 1
    assert out_of_place_arithmetic(program.gm) == 0  # nothing left that is safe to rewrite
    model = InPlaceResidual().eval()
    program = capture(model, (x,))
    with torch.no_grad():  # as the model runs: same ops, same dtypes (float16 stays float16), same values
        for got, want in zip(program.gm(x), model(x), strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_falcon_linears_and_in_place_residual_are_rewritten():
    """Falcon writes its linears as `x @ W.T` and adds its MLP output in place: both are found."""
    model = build("falcon")
    result = effcc.optimize(model, (token_ids(),))  # verified in float64 against the model after every pass
    changed = {p.name: len(p.changed) for p in result.passes}
    assert changed["ln_to_rmsnorm"] == 1 and changed["fold_norm_affine"] >= 3
    calibration = [(token_ids(seed=s),) for s in range(2)]
    quantised = effcc.optimize(model, (token_ids(),), passes=["quantize_w8a8"], calibration=calibration)
    assert len(quantised.passes[0].changed) == 8  # 4 linears per layer; the LM head stays in full precision


def test_quoted_library_errors_keep_their_first_line_only():
    from effcc.errors import first_line

    coloured = RuntimeError("\x1b[31mshape mismatch\x1b[0m in aten.mm\n  full traceback text\n")
    assert first_line(coloured) == "shape mismatch in aten.mm"
    assert first_line(ValueError("")) == "ValueError"  # no message: the type says what happened
    assert first_line("x" * 500, limit=40) == "x" * 40


    class BranchesOnValues(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(effcc.errors.CaptureError, match="could not capture BranchesOnValues with torch.export") as caught:
        effcc.optimize(BranchesOnValues(), (torch.randn(2, 4),))
    assert "\n" not in str(caught.value)  # the exporter's several-line message, quoted by its first line
    assert "torch.cond" in str(caught.value) and "backend='effcc'" in str(caught.value)  # what to do instead


def test_images_keep_their_resolution_and_only_the_batch_varies():
    from torch.export import Dim

    from effcc.capture import automatic_dynamic_shapes

    model = SmallResNet().eval()
    spec = automatic_dynamic_shapes(model, (torch.randn(2, 3, 8, 8),), {})
    assert spec == {"x": {0: Dim.AUTO}}  # height, width and channels static
    res = effcc.optimize(model, (torch.randn(2, 3, 8, 8),))
    bigger_batch = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(res.model(bigger_batch), model(bigger_batch))
    ids_spec = automatic_dynamic_shapes(nn.Embedding(10, 4), (torch.zeros(2, 7, dtype=torch.long),), {})
    assert ids_spec == {"input": {0: Dim.AUTO, 1: Dim.AUTO}}  # token ids: batch and sequence

    class WithFloatMask(nn.Module):  # a 4-D float attention mask [batch, 1, query, key] is no image
        def forward(self, hidden, attention_mask):
            return hidden + attention_mask.sum(dim=(1, 3))[..., None]

    mask_spec = automatic_dynamic_shapes(WithFloatMask(), (torch.randn(2, 5, 4), torch.zeros(2, 1, 5, 5)), {})
    assert mask_spec == {"hidden": {0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO}, "attention_mask": {a: Dim.AUTO for a in range(4)}}
