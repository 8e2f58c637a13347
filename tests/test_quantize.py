"""quantize_w8a8 / quantize_w4a16: stored layout, reference math, measured error, bounds."""

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.ops import quantized_linear as q

aten = torch.ops.aten


def _count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is op)


def _param_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def test_w8a8_reference_is_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 64, generator=g), torch.randn(16, 64, generator=g), torch.randn(16, generator=g)
    qweight, ws = q.quantize_weight_int8(w)
    assert qweight.dtype is torch.int8 and qweight.abs().max() <= 127 and ws.shape == (16,)
    y = torch.ops.effcc.w8a8_linear(x, qweight, ws, b)
    xq, xs = q.quantize_per_token_int8(x)
    want = (xq.long() @ qweight.long().t()).double() * xs.double() * ws.double() + b.double()  # exact int64 products
    torch.testing.assert_close(y, want.float(), rtol=1e-6, atol=1e-6)
    assert ((y - torch.nn.functional.linear(x, w, b)).abs().max() / y.abs().max()) < 3e-2  # and it approximates


def test_w4a16_layout_round_trips():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    packed, scales, zeros = q.quantize_weight_int4(w, 16)
    assert packed.dtype is torch.uint8 and packed.shape == (8, 32) and scales.shape == zeros.shape == (8, 4)
    codes = torch.stack((packed & 0xF, packed >> 4), -1).reshape(8, 64)
    assert codes.max() <= 15
    back = q.dequantize_int4(packed, scales, zeros, 16)
    step = scales.double().repeat_interleave(16, dim=1)
    assert ((back - w.double()).abs() <= step / 2 + 1e-6).all()  # within half a step of its group


def test_smoothquant_then_w8a8_on_opt():
    model = build("opt")
    ids = token_ids()
    calibration = [(token_ids(seed=s),) for s in range(3)]
    res = effcc.optimize(model, (ids,), passes=["smoothquant", "quantize_w8a8"], calibration=calibration)
    smooth, quant = res.passes
    assert smooth.comparison.max_rel < 1e-5  # exact (float32 storage)
    assert len(quant.changed) == 2 * 6 and [s.where.split(" ")[0] for s in quant.skipped] == ["lm_head"]
    assert _count(res.model, torch.ops.effcc.w8a8_linear.default) == 12 and _count(res.model, aten.linear.default) == 1
    assert 0 < quant.comparison.max_rel < 5e-2
    with torch.no_grad():
        err = ((res.model(ids).logits - model(ids).logits).abs().max() / model(ids).logits.abs().max()).item()
    assert err < 5e-2


def test_w4a16_groups_and_refusals():
    model = build("llama")
    ids = token_ids()
    res = effcc.optimize(model, (ids,), passes=[("quantize_w4a16", {"group_size": 16})])
    (quant,) = res.passes
    assert len(quant.changed) == 2 * 7 and 0 < quant.comparison.max_rel < 0.2
    assert _param_bytes(res.model) < _param_bytes(model)  # the float weights are gone, not kept beside the codes
    bad = effcc.optimize(model, (ids,), passes=[("quantize_w4a16", {"group_size": 24})])
    assert not bad.passes[0].changed and all("multiple of group_size=24" in s.detail for s in bad.passes[0].skipped if "lm_head" not in s.where)


def test_bound_turns_the_error_into_a_failure():
    with pytest.raises(effcc.VerificationError, match="quantize_w4a16"):
        effcc.optimize(build("gpt2"), (token_ids(),), passes=[("quantize_w4a16", {"group_size": 16, "bound": 1e-6})])
