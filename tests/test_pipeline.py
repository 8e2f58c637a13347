"""The pass contract and pipeline: choosing passes, errors, verification that can fail."""

from dataclasses import dataclass

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.passes import REGISTRY, Guarantee, Pass, SiteLog, register_pass


def test_caller_model_and_parameters_are_unchanged():
    model = build("gpt2").train()  # train mode too: capture must not leave it in eval
    before = {name: p.detach().clone() for name, p in model.state_dict(keep_vars=True).items()}
    identities = {name: id(p) for name, p in model.state_dict(keep_vars=True).items()}
    res = effcc.optimize(model, (token_ids(),), passes=["fold_norm_affine"])
    assert res.passes[0].changed
    after = model.state_dict(keep_vars=True)
    assert {name: id(p) for name, p in after.items()} == identities
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model.training and all(m.training for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_result_calls_like_the_original_and_reports():
    model = build("llama")
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=["fold_norm_affine"])
    with torch.no_grad():
        out, want = res(ids), model(ids)
    assert type(out) is type(want)  # same output structure (a ModelOutput)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-5)
    text = str(res.report)
    assert "fold_norm_affine" in text and "exact" in text and "model.layers.0.input_layernorm" in text
    assert effcc.verify(model, res, (ids,)).max_rel < 1e-5


def test_default_passes_are_the_exact_ones_marked_default():
    res = effcc.optimize(build("gpt2"), (token_ids(),))
    assert [p.name for p in res.passes] == [n for n, cls in REGISTRY.items() if cls.default]
    assert all(p.guarantee is Guarantee.EXACT for p in res.passes)


def test_no_passes_still_captures_and_verifies():
    res = effcc.optimize(build("opt"), (token_ids(),), passes=[])
    assert res.passes == [] and res.report.capture.max_rel < 1e-9


def test_unknown_pass_and_option_and_repeats_are_clear_errors():
    model, ids = build("gpt2"), token_ids()
    with pytest.raises(effcc.UnknownPassError, match="unknown pass 'fold_norms'.*fold_norm_affine"):
        effcc.optimize(model, (ids,), passes=["fold_norms"])
    with pytest.raises(effcc.UnknownPassError, match="has no option 'alpha'"):
        effcc.optimize(model, (ids,), passes=[("fold_norm_affine", {"alpha": 0.5})])
    with pytest.raises(effcc.EffccError, match="more than once"):
        effcc.optimize(model, (ids,), passes=["fold_norm_affine", "fold_norm_affine"])
    with pytest.raises(effcc.EffccError, match="'name' or \\('name'"):
        effcc.optimize(model, (ids,), passes=[42])


def test_capture_errors_name_the_model_and_the_fix():
    with pytest.raises(effcc.CaptureError, match="expected a torch.nn.Module"):
        effcc.optimize(lambda x: x, (torch.ones(1),))
    with pytest.raises(effcc.CaptureError, match="must be a tuple"):
        effcc.optimize(build("gpt2"), token_ids())
    with pytest.raises(effcc.CaptureError, match="does not take these example inputs"):
        effcc.optimize(
            build("gpt2"),
            (
                token_ids(),
                token_ids(),
                token_ids(),
                token_ids(),
                token_ids(),
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                10,
                11,
                12,
                13,
                14,
                15,
                16,
                17,
            ),
        )
    # Float ids: the embedding refuses them, at capture (torch 2.13) or when run (torch 2.11).
    with pytest.raises(
        effcc.CaptureError, match="could not (capture|run) GPT2LMHeadModel|could not run the captured graph of GPT2LMHeadModel"
    ):
        effcc.optimize(build("gpt2"), (token_ids().float(),))


class SingleOnly(torch.nn.Module):
    """A model whose code, like some Hugging Face ones (Mixtral's grouped matmul, XGLM's mask fill), has no float64 path."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
        return self.proj(self.norm(x))


def test_a_model_that_cannot_run_in_float64_is_told_how_to_go_on():
    with pytest.raises(effcc.CaptureError, match=r"runs in its own dtype.*no float64 form.*verify=False"):
        effcc.optimize(SingleOnly(), (torch.randn(2, 8),))
    result = effcc.optimize(SingleOnly(), (torch.randn(2, 8),), verify=False)  # the way the message gives: rewritten, unchecked
    assert all(p.comparison is None for p in result.passes)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_model_that_cannot_be_captured():
    with pytest.raises(effcc.CaptureError, match="could not capture DataDependent"):
        effcc.optimize(DataDependent(), (torch.ones(3),))


@dataclass
class _ScaleAWeight(Pass):
    """A wrong 'exact' pass: the pipeline must catch it."""

    name = "test_wrong_pass"
    summary = "doubles the first linear weight (deliberately wrong)"
    guarantee = Guarantee.EXACT

    def apply(self, program, log: SiteLog) -> None:
        for node in program.graph.find_nodes(op="get_attr"):
            if node.target.endswith("c_fc.weight"):
                program.set_tensor(node.target, program.tensor(node.target) * 2)
                log.change(node.target, "doubled")
                return


@pytest.fixture
def wrong_pass():
    register_pass(_ScaleAWeight)
    yield
    del REGISTRY[_ScaleAWeight.name]


def test_verification_fails_loudly_naming_the_pass(wrong_pass):
    with pytest.raises(effcc.VerificationError, match="pass 'test_wrong_pass' changed what GPT2LMHeadModel computes"):
        effcc.optimize(build("gpt2"), (token_ids(),), passes=["test_wrong_pass"])
    res = effcc.optimize(build("gpt2"), (token_ids(),), passes=["test_wrong_pass"], verify=False)
    assert res.passes[0].comparison is None and "unverified" in str(res.report)


def test_verify_reports_float64_error_between_models():
    a, b = build("gpt2", seed=0), build("gpt2", seed=1)
    ids = token_ids()
    assert effcc.verify(a, a, (ids,)).max_rel == 0
    assert effcc.verify(a, b, (ids,)).max_rel > 1e-2


@pytest.mark.parametrize(
    ("passes", "cause"),
    [
        (["ln_to_rmsnorm", "ln_to_crmsnorm"], "already includes the Pre-RMSNorm step"),
        (["quantize_w8a8", "quantize_w4a16"], "one weight format"),
        (["real_to_complex", "fairy2i", "quantize_w8a8"], "complex layers"),
        ([("smoothquant", {"alpha": 0.5}), "smoothquant_plus"], "choose your quantiser's"),
    ],
)
def test_contradictory_passes_are_refused_before_anything_runs(passes, cause):
    model = build("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(effcc.EffccError, match=f"contradict each other: .*{cause}.*keep one of them"):
        effcc.optimize(model, (token_ids(),), passes=passes)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_on_the_meta_device_points_to_optimize_checkpoint():
    from conftest import HF_MODELS

    with effcc.offload.empty_weights():
        model = HF_MODELS["gpt2"]().eval()
    with pytest.raises(effcc.CaptureError, match=r"transformer\.wte\.weight is on the meta device.*optimize_checkpoint"):
        effcc.optimize(model, (token_ids(),), passes=["fold_norm_affine"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_rewritten_and_checked_at_their_own_tolerance(dtype):
    model = build("llama", dtype)
    calibration = [(token_ids(batch=2, tokens=16, seed=s),) for s in range(2)]
    res = effcc.optimize(
        model,
        (token_ids(),),
        passes=["fold_norm_affine", ("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
        calibration=calibration,
    )
    fold, smooth, quant = res.passes
    assert fold.changed and smooth.changed and quant.changed
    for exact in (fold, smooth):  # the re-rounding of rewritten weights to the model's dtype, no more
        assert exact.comparison.max_rel <= exact.rtol
    assert res.model(token_ids()).logits.dtype == dtype  # runs in the model's dtype


def test_each_pass_reports_the_bytes_of_stored_tensors_before_and_after():
    model = build("llama")
    res = effcc.optimize(model, (token_ids(),), passes=["fold_norm_affine", ("quantize_w4a16", {"group_size": 16})])
    fold, quant = res.passes
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fold.tensor_bytes[0] <= dense + sum(b.numel() * b.element_size() for b in model.buffers())
    assert fold.tensor_bytes[1] <= fold.tensor_bytes[0]  # γ moved into the linears: nothing added
    assert quant.tensor_bytes[0] == fold.tensor_bytes[1] and quant.tensor_bytes[1] < 0.6 * quant.tensor_bytes[0]  # int4 codes + scales
    assert "weights MiB" in str(res.report)
