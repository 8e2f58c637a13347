"""effcc's RMSNorm Triton kernels against their PyTorch reference (interpreter on the CPU)."""

import pytest
import torch
from conftest import build, token_ids

import effcc
from effcc.backends.triton.lowering import lower_rms_norms
from effcc.ops import add_rms_norm, rms_norm, rms_norm_reference

aten = torch.ops.aten
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(DEVICE, dtype).requires_grad_()
    d = shape[-1]
    return make(*shape), make(*shape, scale=0.5), (1 + 0.3 * torch.randn(d, generator=g)).to(DEVICE, dtype).requires_grad_(), make(d, scale=0.2)


def _close(a, b, dtype, what):
    scale = b.float().abs().max().clamp_min(1.0)
    err = ((a.float() - b.float()).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 64), (7, 100), (1, 5, 768)], ids=str)
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
def test_forward_and_backward_match_reference(dtype, shape, affine, fused):
    x, r, w, b = _inputs(shape, dtype)
    w, b = (w if affine != "none" else None), (b if affine == "weight+bias" else None)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    ds = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    leaves = [t for t in (x, r if fused else None, w, b) if t is not None]

    def run(fn_fused, fn_plain):
        for t in leaves:
            t.grad = None
        if fused:
            y, s = fn_fused()
            torch.autograd.backward([y, s], [dy, ds])
        else:
            y, s = fn_plain(), None
            y.backward(dy)
        return y, s, [t.grad.clone() for t in leaves]

    got = run(lambda: add_rms_norm(x, r, w, b, 1e-5), lambda: rms_norm(x, w, b, 1e-5))
    want = run(lambda: rms_norm_reference(x, r, w, b, 1e-5)[:2], lambda: rms_norm_reference(x, None, w, b, 1e-5)[0])
    _close(got[0], want[0], dtype, "y")
    if fused:
        _close(got[1], want[1], dtype, "stream")
    for name, a, e in zip(("dx", "dr", "dw", "db")[: len(leaves)] if fused else ("dx", "dw", "db"), got[2], want[2]):
        _close(a, e, dtype, name)


def test_reference_is_rms_norm_in_float64():
    x = torch.randn(4, 33, dtype=torch.float64)
    w, b = torch.rand(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    y = rms_norm_reference(x, None, w, b, 1e-6)[0]
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, [33], w, 1e-6) + b)


def test_lowering_fuses_residual_adds_and_keeps_outputs():
    model = build("gpt2").to(DEVICE)
    ids = token_ids().to(DEVICE)
    res = effcc.optimize(model, (ids,), passes=["ln_to_rmsnorm"])
    gm = res.model
    lowered = lower_rms_norms(gm, device_types=(DEVICE,))
    assert lowered == 5
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.effcc.add_rms_norm_fwd.default) == 4  # every block norm reads a residual add
    # The first norm reads token + position embeddings, whose position operand broadcasts: not fused.
    assert targets.count(torch.ops.effcc.rms_norm_fwd.default) == 1
    assert aten.rms_norm.default not in targets
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "partials"])
@pytest.mark.parametrize("sum_at_end", [False, True], ids=["sum-each-step", "sum-at-end"])
def test_backward_sums_over_programs(atomic, sum_at_end):
    """dγ, dβ gathered from several programs (each a slice of rows), added by atomics or as partials."""
    from effcc.backends.triton import rms_norm as kernels

    g = torch.Generator().manual_seed(3)
    x, dy, ds = (torch.randn(37, 48, generator=g).to(DEVICE) for _ in range(3))
    w = (1 + 0.3 * torch.randn(48, generator=g)).to(DEVICE)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)
    # 3 "SMs" × 2 programs, 4 rows per step: 7 rows per program, so the last step of each is partly masked.
    dx, dw, db = kernels.backward(dy, x, w, rstd, ds, True, 3, per_sm=2, tile=4 * 64, stages=1, sum_at_end=sum_at_end, atomic=atomic)
    want_dx, want_dw, want_db = (t.double() for t in _reference_grads(dy, x, w, rstd, ds))
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-5)
    assert dw.shape == db.shape == (48,)


def _reference_grads(dy, x, w, rstd, ds):
    from effcc.ops.norms import _reference_backward

    return _reference_backward(dy.double(), x.double(), w.double(), rstd.double(), ds.double(), True)


def test_deterministic_mode_sums_partials_in_a_fixed_order():
    from effcc.backends.triton import rms_norm as kernels

    g = torch.Generator().manual_seed(4)
    x, dy = (torch.randn(64, 32, generator=g).to(DEVICE) for _ in range(2))
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)
    w = torch.ones(32, device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not kernels.adds_atomically()
        runs = [kernels.backward(dy, x, w, rstd, None, True, 4, per_sm=4)[1:] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    assert kernels.adds_atomically() == (not before)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    torch.testing.assert_close(runs[0][1], dy.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a GPU (the interpreter runs them above)")
def test_compiled_training_on_the_gpu_matches_eager_gradients(caplog):
    """torch.compile(backend="effcc") on CUDA: norms on effcc's kernels (dγ, dβ by atomics), float32, vs eager."""
    import logging

    eager, trained = build("gpt2").cuda(), build("gpt2").cuda()
    ids = token_ids(4, 12).cuda()

    def grads(module, model):
        logits = module(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    with caplog.at_level(logging.INFO, logger="effcc"):
        got = grads(torch.compile(trained, backend="effcc", options={"passes": ["ln_to_rmsnorm"]}), trained)
    want = grads(eager, eager)
    assert any("norm(s) on effcc Triton kernels" in r.getMessage() and "; 0 norm" not in r.getMessage() for r in caplog.records)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-4 * g.abs().max().item() + 1e-7, msg=name)
