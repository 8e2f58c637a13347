"""ln_to_crmsnorm: the residual stream in d − 1 features, exact in float64."""

import pytest
import torch
from conftest import build, randomize_norms, token_ids
from test_ln_to_rmsnorm import PlainPreLN, _eager_error

import effcc
from effcc.analysis import residual_streams

aten = torch.ops.aten
F64_RTOL = 1e-10


def _stream_width(gm) -> int:
    (stream,) = residual_streams(gm.graph)
    return stream.hidden_size


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bloom", "gpt_neox", "phi"])
def test_stream_shrinks_by_one_and_outputs_stay(arch):
    model = build(arch, torch.float64)
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=["ln_to_crmsnorm"])
    (result,) = res.passes
    assert len(result.changed) == 1 and not result.skipped, res.report
    assert "32 → 31 features" in result.changed[0].detail
    assert result.comparison.max_rel <= F64_RTOL
    assert _stream_width(res.model) == 31
    assert _ops(res.model, aten.layer_norm.default) == 0
    other = token_ids(batch=3, tokens=5, seed=4)  # dynamic shapes survive the narrowing
    assert _eager_error(model, res, other) <= (1e-7 if arch in ("gpt_neox", "phi") else F64_RTOL)


def _ops(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def test_linear_readers_fold_the_expansion_and_others_get_the_full_vector():
    torch.manual_seed(0)
    model = randomize_norms(PlainPreLN()).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    res = effcc.optimize(model, (x,), passes=["ln_to_crmsnorm"])
    assert len(res.passes[0].changed) == 1, res.report
    assert _eager_error(model, res, x) <= F64_RTOL
    # ln2 (MLP) and the final norm (head) are read only by linears: the expansion folds into them.
    # ln1 feeds nn.MultiheadAttention through a transpose: the 32-wide vector is rebuilt (one cat each).
    assert "5 LayerNorm(s) → CRMSNorm, 3 with the expansion folded" in res.passes[0].changed[0].detail
    assert _ops(res.model, aten.cat.default) == 2


def test_after_fold_norm_affine():
    model = build("gpt2", torch.float64)
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=["fold_norm_affine", "ln_to_crmsnorm"])
    assert res.passes[1].comparison.max_rel <= F64_RTOL
    assert _eager_error(model, res, ids) <= F64_RTOL


def test_refuses_post_ln():
    res = effcc.optimize(build("bert"), (token_ids(),), passes=["ln_to_crmsnorm"])
    encoder = [s for s in res.passes[0].skipped if s.where.startswith("bert.encoder")]
    assert len(encoder) == 4 and all("Post-LN" in s.detail for s in encoder)


def test_exports_to_onnx(tmp_path):
    model = build("gpt2")
    ids = token_ids()
    path = effcc.export_onnx(effcc.optimize(model, (ids,), passes=["ln_to_crmsnorm"]), tmp_path / "crms.onnx")
    assert effcc.check_onnx(path, model, (ids,)).max_rel < 1e-4


def test_vit_patch_embedding_narrows_through_conv_flatten_transpose_cat():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5)
    model = randomize_norms(ViTForImageClassification(cfg)).double().eval()
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_()
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    res = effcc.optimize(model, (pixels,), passes=["ln_to_crmsnorm"])
    assert len(res.passes[0].changed) == 1, res.report
    assert _stream_width(res.model) == 31
    assert _eager_error(model, res, pixels) <= F64_RTOL
