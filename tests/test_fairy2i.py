"""real_to_complex (exact) and fairy2i ({±1, ±i} codes): identity, equivalence, refusals, stage errors."""

import pytest
import sympy
import torch
from conftest import build, token_ids
from torch import nn

import effcc
from effcc.errors import UnknownPassError
from effcc.ops import complex_linear as cl


def _count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is op)


def test_widely_linear_identity_holds_symbolically():
    """For a symbolic real 4×6 weight and input, A z + B z̄ with the pass's A, B is exactly W x."""
    m, n = 2, 3
    w = sympy.Matrix(2 * m, 2 * n, lambda r, c: sympy.Symbol(f"w{r}_{c}", real=True))
    x = sympy.Matrix(2 * n, 1, lambda r, _: sympy.Symbol(f"x{r}", real=True))
    w11, w12, w21, w22 = w[:m, :n], w[:m, n:], w[m:, :n], w[m:, n:]
    a = ((w11 + w22) + sympy.I * (w21 - w12)) / 2
    b = ((w11 - w22) + sympy.I * (w21 + w12)) / 2
    z = x[:n, :] + sympy.I * x[n:, :]
    out = a * z + b * z.conjugate()
    y = w * x
    for j in range(m):
        assert sympy.simplify(sympy.re(out[j]) - y[j]) == 0
        assert sympy.simplify(sympy.im(out[j]) - y[m + j]) == 0
    # and a code times z only swaps and negates parts: i·(p + iq) = −q + ip, −i·(p + iq) = q − ip
    p, q = sympy.symbols("p q", real=True)
    for code, (re, im) in {0: (p, q), 1: (-p, -q), 2: (-q, p), 3: (q, -p)}.items():
        value = complex(cl.DIRECTIONS[code].item())
        assert sympy.expand((sympy.Integer(int(value.real)) + sympy.I * int(value.imag)) * (p + sympy.I * q)) == re + sympy.I * im


def test_round_trip_of_a_random_weight_is_exact_in_float64():
    w = torch.randn(10, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = cl.to_widely_linear(w)
    assert (cl.from_widely_linear(a, b) - w).abs().max() < 1e-15


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_real_to_complex_is_exact_on_real_architectures(arch):
    model = build(arch).double()
    ids = token_ids(2, 8)
    result = effcc.optimize(model, (ids,), passes=["real_to_complex"])
    gm = result.program.gm
    layers = _count(gm, torch.ops.effcc.widely_linear.default)
    assert layers == {"gpt2": 8, "llama": 14}[arch]  # every linear in the blocks; the LM head is outside them
    with torch.no_grad():
        for batch, tokens in ((2, 8), (3, 5)):
            ids = token_ids(batch, tokens, seed=batch)
            want, got = model(ids).logits, result.model(ids).logits
            assert ((got - want).abs().max() / want.abs().max()) < 1e-12


def test_selection_by_name_and_what_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.Linear(6, 5)
            self.shared = nn.Linear(6, 6)
            self.fine = nn.Linear(6, 6)

        def forward(self, x):
            return self.fine(self.shared(self.shared(x))) + self.odd(x).sum(-1, keepdim=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.blocks[0](x))

    model = Net().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    result = effcc.optimize(model, (x,), passes=["real_to_complex"])
    log = result.report.passes[-1]
    reasons = {site.where: site.detail for site in log.skipped}
    assert any("odd" in where and "5×6" in why for where, why in reasons.items())
    assert any("shared" in where and "also read by" in why for where, why in reasons.items())
    assert len(log.changed) == 1 and "fine" in log.changed[0].where  # the head is not in a block
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-12)
    # include / exclude are regular expressions on the weight name
    only_head = effcc.optimize(model, (x,), passes=[("real_to_complex", {"include": r"^head\."})])
    changed = only_head.report.passes[-1].changed
    assert len(changed) == 1 and changed[0].where.startswith("head")
    none = effcc.optimize(model, (x,), passes=[("real_to_complex", {"exclude": "fine"})])
    assert not none.report.passes[-1].changed


def test_fairy2i_stages_shrink_the_error_and_are_reported():
    model = build("gpt2").double()
    ids = token_ids(2, 8)
    errors = []
    with torch.no_grad():
        want = model(ids).logits
        for stages in (1, 2, 3):
            result = effcc.optimize(model, (ids,), passes=["real_to_complex", ("fairy2i", {"stages": stages})])
            gm = result.program.gm
            assert _count(gm, torch.ops.effcc.fairy2i_linear.default) == 8 and _count(gm, torch.ops.effcc.widely_linear.default) == 0
            sites = result.report.passes[-1].changed
            per_stage = [float(e) for e in sites[0].detail.rsplit(":", 1)[1].split(",")]
            assert len(per_stage) == stages and per_stage == sorted(per_stage, reverse=True)
            errors.append(((result.model(ids).logits - want).abs().max() / want.abs().max()).item())
    assert errors[0] > errors[1] > errors[2]
    assert 0.2 < per_stage[0] < 0.8 and per_stage[2] < 0.35  # ≈ 1, 2, 3 bits per real weight on Gaussian weights


def test_fairy2i_codes_and_scales_follow_the_documented_layout():
    g = torch.Generator().manual_seed(3)
    a = torch.complex(torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64))
    codes, scales, approx = cl.quantize_fairy2i(a, 2, per_row=True)
    assert codes.shape == (2, 6, 8) and codes.max() <= 3 and scales.shape == (2, 6, 2)
    direction = cl.DIRECTIONS[codes[0].long()]
    # phase-nearest: the chosen direction has the largest projection of w on it
    assert (torch.real(a * direction.conj()) >= torch.stack([torch.real(a * d.conj()) for d in cl.DIRECTIONS]).amax(0) - 1e-12).all()
    real_axis = codes[0] < 2
    assert torch.isclose(scales[0, 0, 0].double(), a[0].real.abs()[real_axis[0]].mean(), rtol=1e-6)
    packed = cl.pack_codes(codes)
    assert packed.shape == (2, 6, 2) and torch.equal(cl.unpack_codes(packed), codes)
    stacked = cl.pack_codes(torch.stack((codes, codes), dim=1))
    a_back, _ = cl.dequantize_fairy2i(stacked, torch.stack((scales, scales), dim=1))
    assert (a_back - approx[-1]).abs().max() < 1e-6  # scales are stored in float32


def test_fairy2i_says_what_it_needs():
    model = build("gpt2")
    ids = token_ids()
    result = effcc.optimize(model, (ids,), passes=["fairy2i"])
    assert "run real_to_complex first" in result.report.passes[-1].skipped[0].detail
    with pytest.raises(UnknownPassError, match="stages"):
        effcc.optimize(model, (ids,), passes=[("fairy2i", {"stages": 4})])
    with pytest.raises(effcc.EffccError, match="no linear"):
        effcc.qat.fairy2i_prepare(model, include="nothing-matches")


@pytest.mark.parametrize("arch,passes", [("gpt2", ["real_to_complex"]), ("llama", ["real_to_complex", ("fairy2i", {"stages": 2})])], ids=["widely-linear", "fairy2i"])
def test_onnx_export_in_standard_ops_matches_in_onnx_runtime(arch, passes, tmp_path):
    import onnx

    model = build(arch)
    ids = token_ids(2, 8)
    result = effcc.optimize(model, (ids,), passes=passes)
    path = effcc.export_onnx(result, tmp_path / "model.onnx")
    for batch, tokens in ((2, 8), (3, 5)):  # dynamic batch and sequence
        effcc.check_onnx(path, result.model, (token_ids(batch, tokens, seed=batch),))  # raises above 1e-4
    graph = onnx.load(path).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # nothing custom left
    if "fairy2i" in str(passes):  # the file keeps the 2-bit codes, not float weights
        assert any(init.data_type == onnx.TensorProto.UINT8 and "codes" in init.name for init in graph.initializer)


CUDA = torch.cuda.is_available()
# (tokens, complex outputs, complex inputs, stages); 40 inputs: the codes are read as bytes, not words
KERNEL_SHAPES = [(1, 24, 32, 2), (3, 16, 48, 1), (5, 40, 64, 3), (2, 24, 40, 2)] + ([(1, 2048, 2048, 2), (16, 5504, 2048, 2)] if CUDA else [])


def test_kernel_sign_sums_give_every_code():
    """The kernel's algebra, checked on the codebook itself: with a = bit 0 and b = bit 1 of a code,
    P·x = (σ_a + σ_e)/2 and Q·x = (σ_a − σ_e)/2 for σ_a = (−1)^a x, σ_e = (−1)^(a XOR b) x."""
    for code, value in enumerate(cl.DIRECTIONS.tolist()):
        a, b = code & 1, code >> 1
        sigma_a, sigma_e = (-1) ** a, (-1) ** (a ^ b)  # per unit of x
        assert complex((sigma_a + sigma_e) / 2, (sigma_a - sigma_e) / 2) == value


def _random_fairy2i_layer(tokens: int, m: int, n: int, stages: int):
    """(codes, scales, x, bias) of a Fairy2i layer quantised from a random real [2m, 2n] weight, on the kernels' device."""
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(tokens)
    a, b = cl.to_widely_linear(torch.randn(2 * m, 2 * n, generator=g))
    (ca, sa, _), (cb, sb, _) = cl.quantize_fairy2i(a, stages), cl.quantize_fairy2i(b, stages)
    codes, scales = cl.pack_codes(torch.stack((ca, cb), 1)).to(device), torch.stack((sa, sb), 1).to(device)
    return codes, scales, torch.randn(tokens, 2 * n, generator=g).to(device), torch.randn(2 * m, generator=g).to(device)


def test_tensor_core_decoder_ptx_gives_twice_every_code():
    """The tensor-core kernel's PTX decoder, run by an emulator of its instructions on every byte in every
    position of a word: code j of byte e becomes 2P (register 2j, 2j+1) and 2Q (8+2j, 9+2j), 0 or ±2,
    in bfloat16 and float16 alike."""
    from ptx_emulator import halves_to_floats, run

    from effcc.backends.triton.fairy2i import _DOUBLED_PARTS_PTX

    real, imag = [1, -1, 0, 0], [0, 0, 1, -1]  # code → P, Q
    for byte in range(256):
        for position in range(4):
            word = (byte << 8 * position) | (0x5A5A5A5A & ~(0xFF << 8 * position))  # other bytes: other codes
            out = run(_DOUBLED_PARTS_PTX.value, {16: word})
            for e in range(4):
                code_byte = word >> 8 * e & 0xFF
                for j in range(4):
                    code = code_byte >> 2 * j & 3
                    for first, want in ((2 * j, 2 * real[code]), (8 + 2 * j, 2 * imag[code])):
                        for dtype in (torch.bfloat16, torch.float16):
                            assert halves_to_floats(out[first + e // 2], dtype)[e % 2] == want


TENSOR_CORE_CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": 2}, {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": 3}]


@pytest.mark.parametrize("tokens,m,n,stages", KERNEL_SHAPES, ids=str)
def test_tensor_core_kernel_matches_reference(tokens, m, n, stages):
    """The tensor-core kernel (the default for 16-bit activations and ≥ 2 stages): splits that do not divide the input,
    rows and inputs past the tiles."""
    from effcc.backends.triton import fairy2i as kernels

    codes, scales, x, bias = _random_fairy2i_layer(tokens, m, n, stages)
    for dtype in (torch.float32, torch.bfloat16) if CUDA else (torch.float32,):
        x_in, bias_in = x.to(dtype), bias.to(dtype)
        want = cl.fairy2i_linear_reference(x_in.double(), codes, scales, bias_in.double())
        tolerance = 1e-5 if dtype == torch.float32 else 4.5e-3  # float32 sums; bfloat16: the output rounded once
        runs = [{"config": {**config, "BLOCK_N": 64} if CUDA else config} for config in TENSOR_CORE_CONFIGS] + [{"tensor_cores": True}]
        for run in runs:  # each configuration, and the autotuned kernel
            got = kernels.fairy2i_linear(x_in, codes, scales, bias_in, **run)
            assert got.shape == (tokens, 2 * m) and ((got.double() - want).abs().max() / want.abs().max()) < tolerance, run


@pytest.mark.parametrize("tokens,m,n,stages", KERNEL_SHAPES, ids=str)
def test_multiplication_free_kernel_matches_reference(tokens, m, n, stages):
    from effcc.backends.triton import fairy2i as kernels

    codes, scales, x, bias = _random_fairy2i_layer(tokens, m, n, stages)
    got = kernels.fairy2i_linear(x, codes, scales, bias)
    want = cl.fairy2i_linear_reference(x.double(), codes, scales, bias.double())
    assert got.shape == (tokens, 2 * m) and ((got.double() - want).abs().max() / want.abs().max()) < 1e-5  # float32 sums


@pytest.mark.parametrize("arch,layers", [("llama", 14), ("gpt2", 8)])
def test_quantisation_aware_fine_tuning_deploys_to_what_it_trained(arch, layers):
    model = build(arch).double()
    ids = token_ids(2, 8)
    trainee = effcc.qat.fairy2i_prepare(model, stages=2)
    assert effcc.qat.prepared_layers(trainee) == layers
    assert effcc.qat.prepared_layers(model) == 0  # the caller's model is untouched
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-3)
    latent = [p for n, p in trainee.named_parameters() if n.endswith("parametrizations.weight.original")]
    before = [p.detach().clone() for p in latent]
    for _ in range(3):
        loss = trainee(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad.abs().sum() > 0 for p in latent)  # straight through the rounding
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, latent))
    deployed = effcc.optimize(effcc.qat.fairy2i_finish(trainee), (ids,), passes=["real_to_complex", ("fairy2i", {"stages": 2})])
    with torch.no_grad():
        want, got = trainee(ids).logits, deployed.model(ids).logits
    assert ((got - want).abs().max() / want.abs().max()) < 1e-12
