"""The algebraic rules effcc's exact passes rely on, proved symbolically (sympy) for a small width.

Each test builds both sides of a rule from symbols and checks that their difference simplifies to 0,
so the rule holds for every value, not only for the numbers the float64 checks try.  The widely-linear
identity of real_to_complex is proved in test_fairy2i.py.
"""

from __future__ import annotations

import sympy as sp

D = 4  # features: small enough for sympy, large enough to be general (nothing depends on D)


def vector(name: str, n: int = D, **assumptions) -> sp.Matrix:
    return sp.Matrix(n, 1, lambda i, _: sp.Symbol(f"{name}{i}", real=True, **assumptions))


def zero(expr) -> bool:
    return all(sp.simplify(e) == 0 for e in (expr if isinstance(expr, sp.MatrixBase) else [expr]))


def layer_norm(x: sp.Matrix, gamma: sp.Matrix, beta: sp.Matrix, eps) -> sp.Matrix:
    mean = sum(x) / D
    centred = x - sp.ones(D, 1) * mean
    var = sum(c**2 for c in centred) / D
    return centred.multiply_elementwise(gamma) / sp.sqrt(var + eps) + beta


def rms_norm(x: sp.Matrix, gamma: sp.Matrix, beta: sp.Matrix, eps) -> sp.Matrix:
    ms = sum(v**2 for v in x) / D
    return x.multiply_elementwise(gamma) / sp.sqrt(ms + eps) + beta


def test_layer_norm_ignores_a_shift_of_every_feature():
    """LN(x + c·1) = LN(x): why re-centring what writes into the stream changes nothing downstream."""
    x, g, b = vector("x"), vector("g"), vector("b")
    c, eps = sp.Symbol("c", real=True), sp.Symbol("eps", positive=True)
    assert zero(layer_norm(x + sp.ones(D, 1) * c, g, b, eps) - layer_norm(x, g, b, eps))


def test_layer_norm_of_a_mean_free_vector_is_rms_norm():
    """Σx = 0 ⇒ LN(x) = RMSNorm(x) with the same γ, β, ε (ln_to_rmsnorm)."""
    free = vector("x", D - 1)
    x = free.col_join(sp.Matrix([[-sum(free)]]))  # the last feature makes the mean zero
    g, b, eps = vector("g"), vector("b"), sp.Symbol("eps", positive=True)
    assert zero(layer_norm(x, g, b, eps) - rms_norm(x, g, b, eps))


def test_crmsnorm_reads_the_dropped_feature_from_the_others():
    """Σx = 0 ⇒ Σ_{i<d} x_i² + (Σ_{i<d} x_i)² = Σ x_i² (ln_to_crmsnorm keeps d − 1 features)."""
    free = vector("x", D - 1)
    x = free.col_join(sp.Matrix([[-sum(free)]]))
    assert zero(sum(v**2 for v in free) + sum(free) ** 2 - sum(v**2 for v in x))


def test_norm_affine_folds_into_the_linear():
    """W(γ ⊙ x̂ + β) + b = (W·diag(γ)) x̂ + (b + W β) (fold_norm_affine)."""
    xhat, g, beta = vector("xhat"), vector("g"), vector("beta")
    w = sp.Matrix(3, D, lambda i, j: sp.Symbol(f"w{i}_{j}", real=True))
    bias = vector("bias", 3)
    assert zero(w * (xhat.multiply_elementwise(g) + beta) + bias - ((w * sp.diag(*g)) * xhat + (bias + w * beta)))


def test_scale_and_shift_migrate_into_the_linear():
    """W x + b = (W·diag(s)) ((x − z) ⊘ s) + (b + W z) for s > 0 (SmoothQuant: z = 0; Outlier Suppression+)."""
    x, z, s = vector("x"), vector("z"), vector("s", positive=True)
    w = sp.Matrix(3, D, lambda i, j: sp.Symbol(f"w{i}_{j}", real=True))
    bias = vector("bias", 3)
    moved = (x - z).multiply_elementwise(s.applyfunc(lambda v: 1 / v))
    assert zero(w * x + bias - ((w * sp.diag(*s)) * moved + (bias + w * z)))


def test_attention_split_over_key_blocks_merges_by_log_sum_exp():
    """softmax over [K_P; K_S] · [V_P; V_S] = the two blocks' outputs weighted by exp of their log-sum-exps (shared_prefix)."""
    scores, values = vector("q_k"), vector("v")
    weights = [sp.exp(t) for t in scores]
    whole = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    blocks = [(slice(0, 2)), slice(2, D)]  # prefix keys, suffix keys
    outs, lses = [], []
    for block in blocks:
        w, v = weights[block], values[block]
        outs.append(sum(a * b for a, b in zip(w, v)) / sum(w))
        lses.append(sp.log(sum(w)))
    merged = sum(sp.exp(lse) * out for lse, out in zip(lses, outs)) / sum(sp.exp(lse) for lse in lses)
    assert zero(whole - merged)


def test_a_causal_mask_keeps_exactly_what_is_causal_keeps():
    """Adding −∞ to the scores of j > i (the mask) and skipping them (is_causal) give the same row (causal_attention)."""
    scores, values = vector("s"), vector("v")
    for i in range(D):
        kept = range(i + 1)
        with_mask = [sp.exp(scores[j]) if j <= i else sp.exp(-sp.oo) for j in range(D)]  # exp(−∞) = 0
        masked = sum(w * v for w, v in zip(with_mask, values)) / sum(with_mask)
        causal = sum(sp.exp(scores[j]) * values[j] for j in kept) / sum(sp.exp(scores[j]) for j in kept)
        assert zero(masked - causal)
