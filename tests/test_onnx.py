"""ONNX export of rewritten models, run in ONNX Runtime."""

import pytest
import torch
from conftest import build, token_ids

import effcc


def test_rewritten_gpt2_runs_in_onnxruntime(tmp_path):
    model = build("gpt2")
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=["fold_norm_affine"])
    assert res.passes[0].changed
    path = effcc.export_onnx(res, tmp_path / "gpt2.onnx")
    assert path.exists()
    assert effcc.check_onnx(path, model, (ids,)).max_rel < 1e-4
    # Exported with symbolic batch and sequence: other shapes run too.
    assert effcc.check_onnx(path, model, (token_ids(batch=3, tokens=11, seed=5),)).max_rel < 1e-4


def test_check_onnx_fails_for_a_different_model(tmp_path):
    ids = token_ids()
    path = effcc.export_onnx(effcc.optimize(build("gpt2", seed=0), (ids,)), tmp_path / "a.onnx")
    with pytest.raises(effcc.VerificationError, match="differ from PyTorch"):
        effcc.check_onnx(path, build("gpt2", seed=1), (ids,))


def test_llama_export(tmp_path):
    model = build("llama")
    ids = token_ids()
    path = effcc.export_onnx(effcc.optimize(model, (ids,)), tmp_path / "llama.onnx")
    assert effcc.check_onnx(path, model, (ids,)).max_rel < 1e-4


def test_plain_model_export_needs_inputs(tmp_path):
    model = build("gpt2")
    with pytest.raises(TypeError, match="example_inputs"):
        effcc.export_onnx(model, tmp_path / "x.onnx")
    path = effcc.export_onnx(model, tmp_path / "plain.onnx", (token_ids(),))
    assert effcc.check_onnx(path, model, (token_ids(),)).max_rel < 1e-4


def test_pre_rmsnorm_exports_real_rms_norm_nodes(tmp_path):
    import onnx

    model = build("gpt2")
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=["fold_norm_affine", "ln_to_rmsnorm"])
    path = effcc.export_onnx(res, tmp_path / "gpt2_rms.onnx", opset=23)  # RMSNormalization is opset 23, asked for
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("RMSNormalization") == 5 and "LayerNormalization" not in ops
    assert effcc.check_onnx(path, model, (ids,)).max_rel < 1e-4


@torch.library.custom_op("effcc_tests::no_onnx_form", mutates_args=())
def _no_onnx_form(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_no_onnx_form.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_with_no_onnx_form_is_named_with_its_layer(tmp_path):
    """As Mixtral's grouped matmul (a transformers custom op) is: the error says which node, op and layer,
    not the exporter's generic next steps."""

    class Expert(torch.nn.Module):
        def forward(self, x):
            return torch.ops.effcc_tests.no_onnx_form(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.expert = torch.nn.Linear(8, 8), Expert()

        def forward(self, x):
            return self.expert(self.proj(x))

    res = effcc.optimize(Model(), (torch.randn(2, 8),), passes=[])
    with pytest.raises(effcc.EffccError, match=r"ONNX export of Model failed: node \w+ \(torch\.ops\.effcc_tests\.no_onnx_form\.default\) "
                                               r"in expert: No ONNX function found"):
        effcc.export_onnx(res, tmp_path / "model.onnx")


@pytest.mark.parametrize("arch", ["falcon", "gpt_neox", "phi"])
def test_pre_rmsnorm_with_mqa_or_partial_rotary_runs_in_onnxruntime(arch, tmp_path):
    """After ln_to_rmsnorm, at the default opset: at opset 23 torch.onnx refuses Falcon's one-kv-head
    attention, and ONNX Runtime 1.32 rejects the RotaryEmbedding nodes of GPT-NeoX's and Phi's partial rotary."""
    model = build(arch)
    res = effcc.optimize(model, (token_ids(),))
    assert any(p.name == "ln_to_rmsnorm" and p.changed for p in res.passes)
    path = effcc.export_onnx(res, tmp_path / f"{arch}.onnx")
    assert effcc.check_onnx(path, model, (token_ids(batch=3, tokens=11, seed=5),)).max_rel < 1e-4


def test_an_rms_norm_with_a_tiny_epsilon_keeps_it(tmp_path):
    """ViT/DeiT keep LayerNorm's ε = 1e-12 through ln_to_rmsnorm; torch.onnx's optimizer drops `x + c` for
    |c| ≤ 1e-8, which gave inf on a row of zeros (DeiT's zero-initialised class and distillation tokens)."""

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, [8], self.weight, 1e-12)

    x = torch.randn(3, 8)
    x[0] = 0  # mean(x²) = 0: only ε keeps rsqrt finite
    res = effcc.optimize(Norm(), (x,), passes=[])
    path = effcc.export_onnx(res, tmp_path / "norm.onnx")
    assert effcc.check_onnx(path, Norm(), (x,)).max_rel < 1e-4
