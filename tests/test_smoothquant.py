"""smoothquant migration: exact in float64 before quantisation; calibration behaviour."""

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.analysis import linears_reading, match_norm
from effcc.calibrate import activation_stats
from effcc.capture import capture

F64_RTOL = 1e-10


def _calibration(n=3):
    return [(token_ids(batch=2, tokens=8, seed=100 + i),) for i in range(n)]


# (architecture, sites smoothed, sites refused): norm → linears sites, plus V → output projection
# through each attention (GPT-2's fused q/k/v projection is refused; BLOOM has no SDPA node).
# LLaMA also has up_proj → down_proj through the gate's elementwise product.
# Refusals: fused q/k/v (GPT-2), and fc1 → activation → fc2 in every MLP without a gate (BLOOM and
# GPT-2 write their GELU out op by op: those pairs are left alone without a refusal line).
CASES = [("opt", 7, 2), ("bloom", 5, 0), ("llama", 9, 0), ("gpt2", 5, 2), ("bert", 8, 2)]


@pytest.mark.parametrize("arch,smoothed,refused", CASES, ids=[c[0] for c in CASES])
def test_migration_is_exact_before_quantisation(arch, smoothed, refused):
    model = build(arch, torch.float64)
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=[("smoothquant", {"alpha": 0.5})], calibration=_calibration())
    (result,) = res.passes
    assert (len(result.changed), len(result.skipped)) == (smoothed, refused), res.report
    assert result.comparison.max_rel <= F64_RTOL
    with torch.no_grad():
        want, got = model(ids).logits, res.model(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= F64_RTOL


def test_smoothing_flattens_the_activation_channels():
    """The point of the migration: after it, max|X_j| varies much less across channels j."""
    model = build("opt", torch.float64)
    with torch.no_grad():  # plant outlier channels, as trained LLMs have
        for layer in model.model.decoder.layers:
            layer.self_attn_layer_norm.weight[:3] *= 30
    calibration = _calibration()
    before = capture(model, calibration[0])
    res = effcc.optimize(model, calibration[0], passes=[("smoothquant", {"alpha": 0.8})], calibration=calibration)

    def spread(program):
        norms = [n for n in program.graph.nodes if match_norm(n) is not None and linears_reading(n)[0]]
        stats = activation_stats(program, norms, calibration)
        return max((s.absmax.max() / s.absmax.clamp_min(1e-12).median()).item() for s in stats.values())

    assert spread(res.program) < spread(before) / 3


def test_needs_calibration_and_refuses_bad_data():
    model = build("opt")
    with pytest.raises(effcc.EffccError, match="needs calibration data"):
        effcc.optimize(model, (token_ids(),), passes=["smoothquant"])
    with pytest.raises(effcc.EffccError, match="calibration data is empty"):
        effcc.optimize(model, (token_ids(),), passes=["smoothquant"], calibration=[])
    with pytest.raises(effcc.EffccError, match="alpha must be between 0 and 1, or 'auto'"):
        effcc.optimize(model, (token_ids(),), passes=[("smoothquant", {"alpha": 2})], calibration=_calibration(1))


def test_nan_in_calibration_names_the_node_and_batch():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.norm(x))

    model = Tiny()
    good, bad = torch.randn(2, 8), torch.full((2, 8), float("nan"))
    with pytest.raises(effcc.EffccError, match=r"calibration batch 1: norm \(LayerNorm.*NaN or inf"):
        effcc.optimize(model, (good,), passes=["smoothquant"], calibration=[(good,), (bad,)])


def test_statistics_memory_does_not_grow_with_batches():
    program = capture(build("gpt2"), (token_ids(),))
    norm = next(n for n in program.graph.nodes if match_norm(n) is not None)
    few = activation_stats(program, [norm], _calibration(2))[norm]
    many = activation_stats(program, [norm], _calibration(6))[norm]
    assert few.max.shape == many.max.shape == (32,) and many.batches == 6
    assert torch.all(many.max >= few.max) and torch.all(many.min <= few.min)


@pytest.mark.parametrize("arch", ["opt", "bert", "llama"])
def test_os_plus_and_auto_alpha_are_exact_before_quantisation(arch):
    model = build(arch, torch.float64)
    ids = token_ids()
    for passes in (["os_plus"], [("smoothquant", {"alpha": "auto"})]):
        res = effcc.optimize(model, (ids,), passes=passes, calibration=_calibration())
        (result,) = res.passes
        assert result.changed and result.comparison.max_rel <= F64_RTOL, res.report


def test_os_plus_shifts_where_the_norm_has_beta_and_scales_only_without():
    calibration = _calibration()
    opt = effcc.optimize(build("opt"), (token_ids(),), passes=["os_plus"], calibration=calibration).passes[0]
    assert all(s.detail.startswith("shift and scale") for s in opt.changed)
    llama = effcc.optimize(build("llama"), (token_ids(),), passes=["os_plus"], calibration=calibration).passes[0]
    assert llama.changed and all(s.detail.startswith("scale only") for s in llama.changed)


def test_searches_do_not_lose_to_the_fixed_choice_on_w8a8_error():
    """Against naive quantisation, on a model with planted outlier channels."""
    model = build("opt")
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn_layer_norm.weight[:3] *= 30
            layer.self_attn_layer_norm.bias[:3] += 5
    ids, calibration = token_ids(), _calibration()
    errors = {}
    for name, passes in {
        "naive": ["quantize_w8a8"],
        "smoothquant": [("smoothquant", {"alpha": 0.5}), "quantize_w8a8"],
        "auto": [("smoothquant", {"alpha": "auto"}), "quantize_w8a8"],
        "os_plus": ["os_plus", "quantize_w8a8"],
    }.items():
        errors[name] = effcc.optimize(model, (ids,), passes=passes, calibration=calibration).passes[-1].comparison.max_rel
    assert errors["smoothquant"] < errors["naive"], errors
    assert errors["os_plus"] < errors["naive"], errors
    assert errors["auto"] < errors["naive"], errors


def test_value_to_output_projection_site_with_grouped_query_attention():
    model = build("llama", torch.float64)  # 4 query heads share 2 KV heads
    res = effcc.optimize(model, (token_ids(),), passes=["smoothquant"], calibration=_calibration())
    attention = [site for site in res.passes[0].changed if "self_attn (" in site.where]
    assert len(attention) == 2 and all("grouped-query" in site.detail and "o_proj" in site.detail for site in attention)
    assert res.passes[0].comparison.max_rel <= F64_RTOL


def test_channel_map_is_measured_not_assumed():
    from effcc.analysis.channel_map import attention_sites, channel_maps

    program = capture(build("llama", torch.float64), (token_ids(),))
    sites, refused = attention_sites(program.graph)
    assert len(sites) == 2 and not refused
    head_dim, kv_heads, heads = 8, 2, 4
    expected = torch.tensor([(h // (heads // kv_heads)) * head_dim + c for h in range(heads) for c in range(head_dim)])
    for measured in (channel_maps(program.gm, sites[:1], program.example_args), channel_maps(program.gm, sites, program.example_args)):
        assert all(torch.equal(mapping, expected) for mapping in measured)  # one site alone, or all in one run
    gpt2_sites, gpt2_refused = attention_sites(capture(build("gpt2"), (token_ids(),)).graph)
    assert not gpt2_sites and all("fused q/k/v" in why for _, why in gpt2_refused)


def test_smoothquant_plus_is_exact_and_helps_w4a16():
    model = build("opt")
    with torch.no_grad():  # outlier channels, as trained LLMs have
        for layer in model.model.decoder.layers:
            layer.self_attn_layer_norm.weight[:3] *= 30
            layer.final_layer_norm.weight[:3] *= 30
    ids, calibration = token_ids(), _calibration()
    plus = effcc.optimize(model.double(), (ids,), passes=[("smoothquant_plus", {"group_size": 16})], calibration=calibration).passes[0]
    assert plus.changed and plus.comparison.max_rel <= F64_RTOL and all("searched" in s.detail for s in plus.changed)
    model = model.float()
    naive = effcc.optimize(model, (ids,), passes=[("quantize_w4a16", {"group_size": 16})]).passes[-1].comparison.max_rel
    smoothed = effcc.optimize(model, (ids,), passes=[("smoothquant_plus", {"group_size": 16}), ("quantize_w4a16", {"group_size": 16})], calibration=calibration).passes[-1].comparison.max_rel
    assert smoothed < naive, (smoothed, naive)


def test_gated_mlp_up_to_down_is_a_site_and_activations_are_not():
    from effcc.analysis.channel_map import linear_pairs

    llama = capture(build("llama"), (token_ids(),))
    pairs, _ = linear_pairs(llama.graph)
    assert [(p.first.weight.target, p.second.weight.target) for p in pairs] == [
        (f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight") for i in range(2)
    ]
    opt_pairs, refused = linear_pairs(capture(build("opt"), (token_ids(),)).graph)
    assert not opt_pairs  # fc1 → ReLU → fc2 is not channel-wise linear, and that is said
    assert len(refused) == 2 and all("relu" in why for _, why in refused)
