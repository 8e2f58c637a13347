"""torch.compile(model, backend="effcc") on CPU, against eager."""

import inspect
import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build, randomize_norms, token_ids

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


class PreLNBlock(torch.nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class BlocksAroundAGraphBreak(torch.nn.Module):
    """Two Pre-LN blocks and, between them, a call Dynamo stops at."""

    def __init__(self):
        super().__init__()
        self.first, self.second = PreLNBlock(), PreLNBlock()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


class BlocksAroundABranch(BlocksAroundAGraphBreak):
    """The same with a Python branch on a tensor's value, which Dynamo cannot trace either."""

    def forward(self, x):
        x = self.first(x)
        if x.abs().amax() > 1e4:
            x = x.clamp(-1e4, 1e4)
        return self.second(x)


def pre_ln_blocks(cls=BlocksAroundAGraphBreak, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(cls(), seed).eval()


def line_of(cls, statement: str) -> int:
    lines, first = inspect.getsourcelines(cls.forward)
    return first + next(i for i, line in enumerate(lines) if statement in line)


def effcc_messages(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "effcc" and r.levelno == level]


@pytest.mark.parametrize(
    ("cls", "statement", "cause"),
    [
        (BlocksAroundAGraphBreak, "torch._dynamo.graph_break()", "torch._dynamo.graph_break()"),
        (BlocksAroundABranch, "if x.abs()", "data-dependent branching"),
    ],
    ids=["graph_break", "branch"],
)
def test_graph_break_compiles_each_graph_with_the_passes_and_warns_once_naming_it(cls, statement, cause, caplog):
    model = pre_ln_blocks(cls)
    compiled = torch.compile(model, backend="effcc", options={"passes": ["fold_norm_affine"]})
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        for shape in ((2, 5, 16), (3, 7, 16)):  # the second recompiles both graphs (dynamic) and meets the break again
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=COMPILE_ATOL)
    applied = [m for m in effcc_messages(caplog) if "applied fold_norm_affine: 1 changed" in m]
    assert len(applied) == 4, applied  # each block's norm folded, in its own graph, at both shapes
    first, second = applied[:2]
    assert first.startswith("effcc: graph 0/0 (forward at test_backend.py") and "ops in first.norm … first;" in first, first
    assert (
        second.startswith("effcc: graph 1/0 (forward resumed at test_backend.py") and "ops in second.norm … second;" in second
    ), second
    (warning,) = effcc_messages(caplog, logging.WARNING)
    assert f"graph break at test_backend.py:{line_of(cls, statement)} in forward" in warning, warning
    assert cause in warning and "graph 0/0 ends there" in warning and "torch._dynamo.explain(model)(*inputs)" in warning, warning
    assert "\n" not in warning
    (repeat,) = [m for m in effcc_messages(caplog) if "graph break at" in m]  # the recompile meets it again
    assert "graph 0/1 ends there" in repeat, repeat


def test_graph_break_in_a_forward_hook_of_a_hugging_face_model(caplog):
    """A hook that records a statistic with .item() splits GPT-2 into graphs; layers then share the block's graph."""
    model = build("gpt2")
    ids = token_ids(2, 8)
    with torch.no_grad():
        want = model(ids).logits
    recorded = []
    model.transformer.h[0].register_forward_hook(lambda module, args, out: recorded.append(out[0].abs().amax().item()))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        got = torch.compile(model, backend="effcc", options={"passes": ["fold_norm_affine"]})(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=COMPILE_ATOL)
    assert len(recorded) == 1 and recorded[0] > 0  # the hook ran, eagerly
    messages = effcc_messages(caplog)
    blocks = [m for m in messages if "applied fold_norm_affine: 2 changed" in m]  # ln_1 and ln_2 of one block
    assert len(blocks) == 2 and all("in ln_1 … mlp" in m for m in blocks), messages  # one compile per layer's weights
    assert any("is called with other weights" in m for m in messages), messages
    (warning,) = effcc_messages(caplog, logging.WARNING)
    assert "Tensor.item()" in warning and "test_backend.py" in warning and "in <lambda>" in warning, warning


def test_models_sharing_code_each_run_their_own_weights(caplog):
    """Dynamo reuses the first model's graph for the second (same code, no guard on weights)."""
    first, second = pre_ln_blocks(BlocksAroundABranch, seed=0), pre_ln_blocks(BlocksAroundABranch, seed=1)
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"):
        for model in (first, second):
            out = torch.compile(model, backend="effcc", options={"passes": ["fold_norm_affine"]})(x)
            torch.testing.assert_close(out, model(x), rtol=0, atol=COMPILE_ATOL)
    assert sum("is called with other weights" in m for m in effcc_messages(caplog)) == 2  # each graph, once


def test_new_shapes_recompile_and_past_the_recompile_limit_run_eagerly(caplog):
    """With dynamic=False each new batch size or length is a recompile; past Dynamo's limit the model runs eagerly, and Dynamo says why."""
    model = pre_ln_blocks(BlocksAroundABranch)
    # cache_size_limit in older torch
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    compiled = torch.compile(model, backend="effcc", dynamic=False, options={"passes": ["fold_norm_affine"]})
    dynamo_log = logging.getLogger("torch._dynamo")  # torch's loggers may not propagate to the root, where caplog listens
    dynamo_log.addHandler(caplog.handler)
    try:
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="effcc"), torch._dynamo.config.patch(**{limit: 2}):
            for batch, tokens in ((2, 8), (3, 5), (4, 7)):
                x = torch.randn(batch, tokens, 16)
                torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=COMPILE_ATOL)
    finally:
        dynamo_log.removeHandler(caplog.handler)
    applied = [m for m in effcc_messages(caplog) if "applied fold_norm_affine" in m and m.startswith("effcc: graph 0/")]
    assert len(applied) == 2 and "input 2×8×16" in applied[0] and "input 3×5×16" in applied[1], applied  # not 4×7: eager
    (shown,) = {r.getMessage() for r in caplog.records if r.name.startswith("torch._dynamo") and r.levelno == logging.WARNING}
    assert re.match(r"torch._dynamo hit config\.(recompile|cache_size)_limit \(2\)\n", shown) and "size mismatch" in shown, shown


def test_new_shapes_under_fail_on_recompile_raise_naming_the_guard():
    model = pre_ln_blocks(BlocksAroundABranch)
    compiled = torch.compile(model, backend="effcc", dynamic=False, options={"passes": ["fold_norm_affine"]})
    with torch.no_grad():
        compiled(torch.randn(2, 8, 16))
        with (
            torch.compiler.set_stance("fail_on_recompile"),
            pytest.raises(RuntimeError, match=r"(?s)Detected recompile.*size mismatch"),
        ):
            compiled(torch.randn(3, 5, 16))


def test_a_model_whose_blocks_dynamo_reads_through_their_dict_compiles():
    """Swin's second stage reaches its blocks' weights through a module's __dict__ in Dynamo's sources;
    the weights' dotted names leave that out (they named a dict, and building the graph failed).
    The names are the model's own, which name-based selections (real_to_complex's include) rely on."""
    from transformers import SwinConfig, SwinForImageClassification

    from effcc.backend import _path_in_model

    assert _path_in_model("L['self'].swin.encoder.layers[1].blocks[0].__dict__['layernorm_before']") == "swin.encoder.layers.1.blocks.0.layernorm_before"
    # the model as the first argument (how this torch names it), not as `self`: no "args." in front
    assert _path_in_model("L['args'][0]._modules['model']._modules['layers']._modules['0']._parameters['weight']") == "model.layers.0.weight"
    torch.manual_seed(0)
    model = randomize_norms(SwinForImageClassification(SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                                                   window_size=4, num_labels=3))).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="effcc")(images).logits, model(images).logits, rtol=0, atol=COMPILE_ATOL)
