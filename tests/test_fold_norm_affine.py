"""fold_norm_affine on real architectures, in float64, against the original model."""

import pytest
import torch
from conftest import build, token_ids
from torch import nn

import effcc
from effcc.analysis import match_norm

# Float64 model, float64 rewrite: only float64 rounding separates the two.
F64_RTOL = 1e-10


def _norms_with_affine(gm) -> int:
    count = 0
    for node in gm.graph.nodes:
        norm = match_norm(node)
        if norm is not None and (norm.gamma is not None or norm.beta is not None):
            count += 1
    return count


# (architecture, norms folded, norms refused) for 2-layer configs.
CASES = [
    ("gpt2", 5, 0),  # 2×(ln_1, ln_2) + ln_f (into the tied LM head, which gets its own copy)
    ("opt", 5, 0),
    ("llama", 5, 0),  # hand-written RMSNorm (γ·x̂ with casts), q/k/v share one norm
    ("gemma", 5, 0),  # RMSNorm with γ = 1 + w
    ("bert", 2, 4),  # Post-LN: every encoder norm also feeds a residual add
]


@pytest.mark.parametrize("arch,folded,refused", CASES, ids=[c[0] for c in CASES])
def test_fold_is_exact_in_float64(arch, folded, refused):
    model = build(arch, torch.float64)
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=["fold_norm_affine"])
    (result,) = res.passes
    assert (len(result.changed), len(result.skipped)) == (folded, refused), res.report
    assert result.comparison.max_rel <= F64_RTOL
    # Independently of the pipeline's own check: the original eager model vs the result.
    # Gemma's norm runs x.float() even in a float64 model, so eager rounds there in float32.
    eager_rtol = 1e-6 if arch == "gemma" else F64_RTOL
    with torch.no_grad():
        want = model(ids).logits
        got = res.model(ids).logits
    assert (got - want).abs().max().item() <= eager_rtol * want.abs().max().item()
    # The folded norms really lost their affine in the graph.
    before = _norms_with_affine(effcc.optimize(model, (ids,), passes=[]).model)
    assert _norms_with_affine(res.model) == before - folded


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fold_in_float32_within_tolerance_and_other_shapes(arch):
    model = build(arch)
    res = effcc.optimize(model, (token_ids(),), passes=["fold_norm_affine"])
    assert res.passes[0].comparison.max_rel < 1e-5
    other = token_ids(batch=3, tokens=5, seed=7)  # captured with dynamic batch and sequence
    with torch.no_grad():
        torch.testing.assert_close(res.model(other).logits, model(other).logits, rtol=1e-4, atol=1e-5)


def test_bert_refusals_name_the_residual_add():
    res = effcc.optimize(build("bert"), (token_ids(),), passes=["fold_norm_affine"])
    skipped = res.passes[0].skipped
    assert skipped and all("residual" in s.detail or "add" in s.detail for s in skipped)
    assert any(s.where.startswith("bert.embeddings.LayerNorm") for s in skipped)
    assert "add.Tensor" in str(res.report)


def test_post_ln_opt_is_refused_where_norms_feed_the_residual():
    res = effcc.optimize(build("opt_post_ln"), (token_ids(),), passes=["fold_norm_affine"])
    skipped = {s.where.split(" ")[0] for s in res.passes[0].skipped}
    assert "model.decoder.layers.0.self_attn_layer_norm" in skipped
    assert "model.decoder.layers.0.final_layer_norm" in skipped


class NormFeedsLinearAndActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4, bias=False)
        self.head_norm = nn.LayerNorm(16)

    def forward(self, x):
        h = self.norm(x)
        y = self.proj(h) + torch.nn.functional.gelu(h)
        return self.head(self.head_norm(y))


def test_norm_with_a_non_linear_reader_is_left_alone_and_named():
    torch.manual_seed(0)
    model = NormFeedsLinearAndActivation().double()
    with torch.no_grad():
        for ln in (model.norm, model.head_norm):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    res = effcc.optimize(model, (x,), passes=["fold_norm_affine"])
    (result,) = res.passes
    assert [s.where.split(" ")[0] for s in result.skipped] == ["norm"]
    assert "gelu" in result.skipped[0].detail
    # head_norm folds into a bias-free linear: β must become a new bias.
    assert [s.where.split(" ")[0] for s in result.changed] == ["head_norm"]
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-12, atol=1e-12)


def test_tied_embedding_is_not_changed_by_folding_into_the_lm_head():
    from effcc.models import tiny_gpt

    model, (ids,) = tiny_gpt()
    res = effcc.optimize(model.double(), (ids,), passes=["fold_norm_affine"])
    head_site = [s for s in res.passes[0].changed if s.where.startswith("ln_f")]
    assert head_site and "copied" in head_site[0].detail
    gm = res.model
    embedding = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    head = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and n.meta["val"].shape[-1] == model.tokens.num_embeddings)
    table_name, head_name = embedding.args[0].target, head.args[1].target
    assert table_name != head_name  # the LM head reads its own folded copy
    torch.testing.assert_close(gm.get_parameter(table_name), model.tokens.weight, rtol=0, atol=0)  # embedding untouched
    torch.testing.assert_close(res.model(ids), model(ids), rtol=1e-10, atol=1e-10)
