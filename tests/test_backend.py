"""torch.compile(model, backend="effcc") on CPU, against eager."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build, token_ids

import effcc

# Inductor on CPU vs eager, float32: kernel order differs, nothing else.
COMPILE_ATOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_compile_equals_eager_and_applies_the_default_passes(arch, caplog):
    model = build(arch)
    compiled = torch.compile(model, backend="effcc")
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        for batch, tokens in ((2, 8), (3, 5), (4, 7)):  # the third call runs a dynamic-shape graph
            ids = token_ids(batch, tokens, seed=batch)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=COMPILE_ATOL)
    applied = [r.getMessage() for r in caplog.records if "applied fold_norm_affine" in r.getMessage()]
    assert applied and all("5 changed" in m for m in applied), applied


def test_explicit_passes_option_and_empty_list(caplog):
    model = build("gpt2")
    ids = token_ids()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        out = torch.compile(model, backend="effcc", options={"passes": ["fold_norm_affine"]})(ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=COMPILE_ATOL)
        assert any("applied fold_norm_affine" in r.getMessage() for r in caplog.records)
        torch._dynamo.reset()
        caplog.clear()
        out = torch.compile(model, backend="effcc", options={"passes": []})(ids)
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=COMPILE_ATOL)
        assert not any("applied" in r.getMessage() for r in caplog.records)


def test_weight_baking_pass_is_not_applied_to_a_training_graph_and_says_so(caplog):
    model = build("gpt2")
    ids = token_ids()
    with caplog.at_level(logging.WARNING, logger="effcc"):
        out = torch.compile(model, backend="effcc", options={"passes": ["fold_norm_affine"]})(ids)
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=COMPILE_ATOL)
    out.logits.sum().backward()  # still trains
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "grad enabled" in warning and "fold_norm_affine" in warning


def test_training_graph_runs_pre_rmsnorm_with_the_original_parameters(caplog):
    """Asked for under grad, ln_to_rmsnorm runs in its trainable form: same loss, same gradients."""
    eager, compiled_model = build("gpt2"), build("gpt2")
    ids = token_ids(4, 12)

    def loss_and_grads(module, model):
        logits = module(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    with caplog.at_level(logging.INFO, logger="effcc"):
        compiled = torch.compile(compiled_model, backend="effcc", options={"passes": ["fold_norm_affine", "ln_to_rmsnorm"]})
        loss_c, grads_c = loss_and_grads(compiled, compiled_model)
    loss_e, grads_e = loss_and_grads(eager, eager)
    assert any("applied ln_to_rmsnorm: 1 changed" in r.getMessage() for r in caplog.records)
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e)
    for name, g in grads_e.items():
        assert grads_c[name] is not None, name
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-8)


def test_default_pipeline_gives_training_graphs_only_the_passes_that_pay(caplog):
    model = build("gpt2")
    ids = token_ids()
    with caplog.at_level(logging.INFO, logger="effcc"):
        out = torch.compile(model, backend="effcc")(ids)
    out.logits.sum().backward()
    messages = [r.getMessage() for r in caplog.records]
    assert any("applied causal_attention: 2 changed" in m for m in messages), messages
    assert not any("fold_norm_affine" in m or "ln_to_rmsnorm" in m for m in messages)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=COMPILE_ATOL)


def test_bad_options_are_clear_errors():
    with pytest.raises(Exception, match="unknown torch.compile option.*speed"):
        torch.compile(build("gpt2"), backend="effcc", options={"speed": 11})(token_ids())
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown pass 'nope'"):
        torch.compile(build("gpt2"), backend="effcc", options={"passes": ["nope"]})(token_ids())


def test_backend_is_found_without_importing_effcc():
    script = textwrap.dedent(
        """
        import sys, torch
        model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).eval()
        with torch.no_grad():
            torch.nn.init.uniform_(model[0].weight, 0.5, 1.5); torch.nn.init.uniform_(model[0].bias, -1, 1)
        x = torch.randn(3, 8)
        assert "effcc" not in sys.modules
        with torch.no_grad():
            out = torch.compile(model, backend="effcc")(x)
        assert "effcc" in sys.modules
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_crmsnorm_through_torch_compile_with_dynamic_shapes(caplog):
    model = build("gpt2")
    compiled = torch.compile(model, backend="effcc", options={"passes": ["ln_to_crmsnorm"]})
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        for batch, tokens in ((2, 8), (3, 5), (4, 7)):
            ids = token_ids(batch, tokens, seed=batch)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=COMPILE_ATOL)
    assert any("applied ln_to_crmsnorm: 1 changed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "passes",
    [["quantize_w8a8"], [("quantize_w4a16", {"group_size": 32})], ["real_to_complex", ("fairy2i", {"stages": 2})]],
    ids=["w8a8", "w4a16", "fairy2i"],
)
def test_quantised_model_compiles_around_the_ops_and_equals_optimize(passes, caplog):
    model = build("llama")
    ids = token_ids(2, 8)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        want = effcc.optimize(model, (ids,), passes=passes).model(ids).logits
        got = torch.compile(model, backend="effcc", options={"passes": passes})(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=COMPILE_ATOL)
    last = passes[-1] if isinstance(passes[-1], str) else passes[-1][0]
    assert any(f"{last}: 14 changed" in r.getMessage() for r in caplog.records)  # 2 layers × 7 linears
    assert (got - model(ids).logits).abs().max() > 0  # lossy: it really runs the quantised ops
