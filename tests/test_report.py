"""The report as a file: HTML and Markdown with the pass table, sites, reasons and plots; site figures; JSON round trip."""

import json
import re
import sys
import urllib.parse

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.passes import Guarantee, Site
from effcc.report import PassResult, Report
from effcc.verify import Comparison


def _calibration(n=2):
    return [(token_ids(batch=2, tokens=8, seed=100 + i),) for i in range(n)]


def _opt_with_outliers():
    """OPT with planted outlier channels in the attention norms, as trained LLMs have."""
    model = build("opt")
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn_layer_norm.weight[:3] *= 30
    return model


@pytest.fixture(scope="module")
def opt():
    return _opt_with_outliers()


@pytest.fixture(scope="module")
def quantized(opt):
    return effcc.optimize(opt, (token_ids(),), passes=["smoothquant", "quantize_w8a8"], calibration=_calibration())


@pytest.fixture(scope="module")
def fairy2i():
    model = build("gpt2").double()
    return effcc.optimize(model, (token_ids(),), passes=["real_to_complex", ("fairy2i", {"stages": 3})])


def _site(result, pass_name: str, where: str) -> Site:
    (p,) = [p for p in result.passes if p.name == pass_name]
    return next(s for s in p.changed if s.where.startswith(where))


def test_smoothquant_figures_are_the_calibration_maxima_and_the_scale_it_applied(opt, quantized):
    site = _site(quantized, "smoothquant", "model.decoder.layers.0.self_attn_layer_norm")
    before = torch.tensor(site.figures["act_absmax_before"], dtype=torch.float64)
    after = torch.tensor(site.figures["act_absmax_after"], dtype=torch.float64)
    # before: max |x| per channel of the norm's output over the calibration batches, as the eager model computes it
    seen = []
    norm = opt.model.decoder.layers[0].self_attn_layer_norm
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(out.detach().abs().amax(dim=(0, 1))))
    with torch.no_grad():
        for (ids,) in _calibration():
            opt(ids)
    handle.remove()
    torch.testing.assert_close(before, torch.stack(seen).amax(0).double(), rtol=1e-6, atol=0)
    # after = before / s, where s is what the pass divided γ by
    gamma = quantized.model.state_dict()["model.decoder.layers.0.self_attn_layer_norm.weight"].double()
    torch.testing.assert_close(after / before, gamma / norm.weight.detach().double(), rtol=1e-5, atol=0)
    # and the point of it: the planted outlier channels stand out much less (α = 0.5: about the square root)
    assert (after.max() / after.median()) < (before.max() / before.median()) / 4


def test_every_smoothquant_site_records_the_scale_its_detail_states(quantized):
    """after = before / s at every kind of site (norm, attention V → O): the ratio spans the logged s range."""
    (smoothquant,) = [p for p in quantized.passes if p.name == "smoothquant"]
    assert any("OPTAttention" in s.where for s in smoothquant.changed)
    for site in smoothquant.changed:
        before = torch.tensor(site.figures["act_absmax_before"], dtype=torch.float64)
        s = before / torch.tensor(site.figures["act_absmax_after"], dtype=torch.float64)
        low, high = map(float, re.search(r"s ∈ \[([^,]+), ([^\]]+)\]", site.detail).groups())
        assert s.min().item() == pytest.approx(low, rel=5e-3) and s.max().item() == pytest.approx(high, rel=5e-3), site


def test_quantize_records_the_weight_error_it_states(quantized):
    (w8a8,) = [p for p in quantized.passes if p.name == "quantize_w8a8"]
    for site in w8a8.changed:
        error = site.figures["weight_rel_error"]
        assert 0 < error < 1e-2 and f"{error:.1e}" in site.detail


def test_os_plus_shrinks_every_channel_it_shifts_and_scales(opt):
    result = effcc.optimize(opt, (token_ids(),), passes=["os_plus"], calibration=_calibration())
    (p,) = result.passes
    assert p.changed
    for site in p.changed:
        before, after = (torch.tensor(site.figures[k]) for k in ("act_absmax_before", "act_absmax_after"))
        assert (after <= before * (1 + 1e-12)).all(), site  # max |x − z| ≤ max |x| and s ≥ 1
        assert (after < before).any()


def test_html_has_the_table_the_reasons_and_the_plots(quantized):
    page = quantized.report.to_html()
    for row in (
        "<td>smoothquant</td><td>exact</td><td>7</td><td>2</td>",
        "<td>quantize_w8a8</td><td>lossy</td><td>12</td><td>1</td>",
    ):
        assert row in page
    assert "which a 1/s cannot pass exactly" in page and "writes a model output (LM head / classifier)" in page
    assert "<details open><summary>Skipped (2)</summary>" in page
    figures = re.findall(r"<figure>(.*?)<figcaption>(.*?)</figcaption></figure>", page, re.DOTALL)
    captions = [caption for _, caption in figures]
    assert captions == [
        "smoothquant: per-channel activation max before / after smoothing",
        "quantize_w8a8: per-layer weight error",
    ]
    activations, layer_error = (svg for svg, _ in figures)
    assert activations.startswith("<svg") and "self_attn_layer_norm" in activations and "before" in activations
    assert layer_error.startswith("<svg") and "layers.1.fc2" in layer_error  # a bar label per layer
    assert not re.search(r"<script|<link|src=['\"]?http", page)  # self-contained


def test_html_escapes_what_it_did_not_write(quantized):
    report = Report("<b>Model & co</b>", None, [PassResult("p", Guarantee.EXACT, [], [Site("<x>", "a < b")], None, None, 0.0)])
    page = report.to_html()
    assert "&lt;b&gt;Model &amp; co&lt;/b&gt;" in page and "<code>&lt;x&gt;</code>: a &lt; b" in page and "<b>" not in page


def test_markdown_links_plot_files_written_beside_it(quantized, tmp_path):
    path = quantized.report.save(tmp_path / "run.md")
    text = path.read_text()
    assert text.startswith("# effcc report: OPTForCausalLM")
    assert "| smoothquant | exact | 7 | 2 |" in text and "| quantize_w8a8 | lossy | 12 | 1 |" in text
    assert "- `lm_head (Linear, node linear_12)`: writes a model output" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["run_files/00-smoothquant-activations.svg", "run_files/01-quantize_w8a8-layer-error.svg"]
    for link in links:
        assert "<svg" in (tmp_path / urllib.parse.unquote(link)).read_text()
    assert "![" not in quantized.report.to_markdown()  # without a path there is nowhere to put the images


def test_save_by_suffix(quantized, tmp_path):
    assert quantized.report.save(tmp_path / "run.HTML").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(effcc.EffccError, match=r"as '\.pdf'.*\.html/\.htm or \.md/\.markdown"):
        quantized.report.save(tmp_path / "run.pdf")
    assert not (tmp_path / "run.pdf").exists()


def test_without_matplotlib_the_error_says_what_to_install(quantized, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(effcc.EffccError, match=r"pip install 'effcc\[report\]'"):
        quantized.report.to_html()


def test_dict_round_trip_through_json(quantized, fairy2i):
    def figures(report):  # not part of Site's ==
        return [s.figures for p in report.passes for s in p.changed + p.skipped]

    for report in (quantized.report, fairy2i.report):
        back = Report.from_dict(json.loads(json.dumps(report.to_dict())))
        assert back == report and figures(back) == figures(report)
        assert all(type(p.guarantee) is Guarantee for p in back.passes)


def test_table_shows_flops_beside_the_error():
    sparse = PassResult("sparse_ift", Guarantee.ISO_FLOP, [], [], None, None, 0.1, flops=(1_234_000_000, 1_229_000_000))
    lossy = PassResult("quantize_w8a8", Guarantee.LOSSY, [], [], None, None, 0.1)
    exact = PassResult("fold_norm_affine", Guarantee.EXACT, [], [], Comparison(1e-7, 2e-7, 1), 1e-4, 0.1, flops=(10, 10))
    rows = {line.split()[1]: line for line in str(Report("M", None, [sparse, lossy, exact])).splitlines() if "│" in line}
    assert re.search(r"│\s+—\s+│\s+│\s+1\.23G → 1\.23G\s+│", rows["sparse_ift"])
    assert "unverified" in rows["quantize_w8a8"]
    assert re.search(r"2\.0e-07\s+│\s+1e-04\s+│\s+10 → 10\s+│", rows["fold_norm_affine"])


def test_fairy2i_plots_the_error_of_each_stage(fairy2i):
    (p,) = [p for p in fairy2i.passes if p.name == "fairy2i"]
    assert len(p.changed) == 8
    for site in p.changed:
        stages = site.figures["weight_error_by_stage"]
        assert len(stages) == 3 and stages[0] > stages[1] > stages[2] > 0
        assert site.detail.endswith(", ".join(f"{e:.3f}" for e in stages))
    page = fairy2i.report.to_html()
    (svg,) = re.findall(r"<figure>(.*?)<figcaption>fairy2i: weight error per stage</figcaption>", page, re.DOTALL)
    assert all(f"stage {i}" in svg for i in (1, 2, 3)) and "transformer.h.1.mlp.c_proj" in svg
