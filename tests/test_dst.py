"""RigL and SET: the schedule, which blocks move, constant active FLOPs, optimizer state, resuming, errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from effcc.errors import EffccError
from effcc.sparsity import SET, MaskedLayer, RigL, blocks
from effcc.sparsity.layers import LayerSpec

LINEAR = LayerSpec("linear", 32, 48, True)
CONV = LayerSpec("conv2d", 4, 8, True, (3, 3), (1, 1), (1, 1))


def layer(spec=LINEAR, block=(1, 1), kept_blocks=None, seed=0) -> MaskedLayer:
    """A MaskedLayer with exactly `kept_blocks` random blocks kept (half of them by default)."""
    torch.manual_seed(seed)
    m = MaskedLayer(spec, block)
    rows, cols = blocks.grid(m.mask.shape, block)
    kept = torch.zeros(rows * cols, dtype=torch.bool)
    kept[torch.randperm(rows * cols)[: (rows * cols // 2 if kept_blocks is None else kept_blocks)]] = True
    m.mask.copy_(blocks.expand(kept.view(rows, cols), m.mask.shape, block))
    return m


def model_of(*layers: MaskedLayer) -> nn.Module:
    return nn.ModuleDict({f"l{i}": m for i, m in enumerate(layers)})


def random_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def kept_blocks(m: MaskedLayer) -> int:
    return int(blocks.collapse(m.mask, m.block).sum())


def test_cosine_schedule():
    updater = RigL(model_of(layer()), None, total_steps=1000, update_every=100, drop_fraction=0.3, stop_fraction=0.8)
    assert updater.drop_fraction_at(0) == pytest.approx(0.3)
    assert updater.drop_fraction_at(200) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert updater.drop_fraction_at(400) == pytest.approx(0.15)
    assert updater.drop_fraction_at(799) == pytest.approx(0.0, abs=1e-5)
    assert updater.drop_fraction_at(800) == updater.drop_fraction_at(900) == 0.0


def test_rigl_drops_smallest_weights_grows_largest_gradients_and_resets_adam():
    m = layer(LayerSpec("linear", 6, 1, False))
    with torch.no_grad():
        m.mask.copy_(torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool))
        m.weight.copy_(torch.tensor([[2.0, -0.1, 3.0, 1.0, 1.0, 1.0]]))
    m.weight.grad = torch.tensor([[9.0, 9.0, 9.0, 0.2, -5.0, 0.3]])  # kept positions' gradients must not matter
    optimizer = torch.optim.Adam(m.parameters())
    optimizer.state[m.weight] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(1, 6), "exp_avg_sq": torch.ones(1, 6)}
    updater = RigL(model_of(m), optimizer, total_steps=100, update_every=1, drop_fraction=0.4, stop_fraction=1.0)
    assert updater.step() == [(1, "l0", 1, 1)]  # round(f(1) · 3) = round(1.2) = 1 block
    assert m.mask.tolist() == [[True, False, True, False, True, False]]  # drop |w| 0.1, grow |g| 5
    assert m.weight.tolist() == [[2.0, 0.0, 3.0, 1.0, 0.0, 1.0]]  # grown and dropped start at zero, the rest untouched
    for key in ("exp_avg", "exp_avg_sq"):
        assert optimizer.state[m.weight][key].tolist() == [[1, 1, 1, 1, 0, 1]]
    assert optimizer.state[m.weight]["step"] == 3


def test_rigl_ranks_whole_blocks_and_resets_sgd_momentum():
    m = layer(LayerSpec("linear", 16, 8, False), block=(4, 8), kept_blocks=0)  # 2 × 2 blocks
    with torch.no_grad():
        m.mask.copy_(blocks.expand(torch.tensor([[True, True], [False, False]]), m.mask.shape, m.block))
        m.weight.fill_(1.0)
        m.weight[:4, :8] = 0.5  # block (0, 0): smaller Σ|W| than (0, 1) even though one weight is large
        m.weight[0, 0] = 3.0
    grad = torch.zeros(8, 16)
    grad[4:, 8:] = 0.1  # block (1, 1): Σ|g| 3.2 beats one big entry in (1, 0): 3.0
    grad[4, 0] = -3.0
    m.weight.grad = grad
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    optimizer.state[m.weight] = {"momentum_buffer": torch.ones(8, 16)}
    updater = RigL(model_of(m), optimizer, total_steps=10, update_every=1, drop_fraction=0.6, stop_fraction=1.0)
    updater.step()  # round(0.6/2 · (1 + cos(π/10)) · 2) = 1
    assert blocks.collapse(m.mask, m.block).tolist() == [[False, True], [False, True]]
    buffer = optimizer.state[m.weight]["momentum_buffer"]
    assert (buffer[4:, 8:] == 0).all() and buffer.sum() == 8 * 16 - 32
    assert (m.weight[4:, 8:] == 0).all() and (m.weight[:4, :8] == 0).all()


@pytest.mark.parametrize("kind", [RigL, SET])
def test_kept_blocks_constant_block_structure_kept_nothing_after_stop(kind):
    layers = [layer(), layer(CONV, seed=1), layer(LayerSpec("linear", 32, 16, False), block=(4, 8), seed=2)]
    model = model_of(*layers)
    before = [kept_blocks(m) for m in layers]
    nonzeros = [int(m.mask.sum()) for m in layers]
    updater = kind(model, torch.optim.Adam(model.parameters()), total_steps=40, update_every=4, drop_fraction=0.5)
    masks = {}
    for step in range(1, 41):
        random_grads(model)
        updater.step()
        assert [kept_blocks(m) for m in layers] == before  # collapse also checks the masks stay block-constant
        assert [int(m.mask.sum()) for m in layers] == nonzeros  # so active FLOPs stay constant
        masks[step] = [m.mask.clone() for m in layers]
    assert {u.step for u in updater.history} == {4, 8, 12, 16, 20, 24, 28}  # 32 = 0.8 · 40: the stop
    assert all(u.dropped == u.grown for u in updater.history) and all(u.grown > 0 for u in updater.history if u.step <= 12)
    assert all(torch.equal(a, b) for step in range(29, 41) for a, b in zip(masks[28], masks[step]))


def test_nothing_moves_when_there_is_nothing_to_do():
    dense = layer(kept_blocks=32 * 48)
    nearly_dense = layer(LayerSpec("linear", 4, 2, False), kept_blocks=7)
    frozen = layer(seed=3)
    model = model_of(dense, nearly_dense)
    random_grads(model)
    updates = RigL(model, None, total_steps=10, update_every=1, drop_fraction=1.0, stop_fraction=1.0).step()
    assert updates == [(1, "l0", 0, 0), (1, "l1", 1, 1)]  # dense: skipped; one candidate: drop only one
    assert dense.mask.all() and int(nearly_dense.mask.sum()) == 7
    mask = frozen.mask.clone()
    frozen.weight.grad = torch.randn_like(frozen.weight)
    assert RigL(model_of(frozen), None, total_steps=10, update_every=1, drop_fraction=0.0).step()[0].grown == 0
    assert torch.equal(frozen.mask, mask)


def test_partial_edge_blocks():
    m = layer(LayerSpec("linear", 10, 7, True), block=(4, 4), kept_blocks=3)  # 2 × 3 blocks, the last row/column partial
    random_grads(model_of(m))
    updater = SET(model_of(m), None, total_steps=100, update_every=1, drop_fraction=0.6, stop_fraction=1.0)
    for _ in range(20):
        updater.step()
        assert kept_blocks(m) == 3
    assert sum(u.grown for u in updater.history) > 0


def run_set(seed: int, steps: int = 20, resume_at: int | None = None) -> torch.Tensor:
    m = layer()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(-1, 1, m.weight.numel()).view_as(m.weight))
    updater = SET(model_of(m), None, total_steps=steps, update_every=2, drop_fraction=0.5, seed=seed)
    for i in range(steps):
        if i == resume_at:
            saved = io.BytesIO()
            torch.save(updater.state_dict(), saved)
            updater = SET(model_of(m), None, total_steps=steps, update_every=2, drop_fraction=0.5, seed=99)
            updater.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
        updater.step()
    return m.mask.clone()


def test_set_is_reproducible_and_resumes():
    assert torch.equal(run_set(0), run_set(0))
    assert not torch.equal(run_set(0), run_set(1))
    assert torch.equal(run_set(0), run_set(0, resume_at=7))


def test_rigl_resumes_identically():
    def run(resume_at=None):
        m = layer(CONV, seed=4)
        grads = torch.Generator().manual_seed(0)
        updater = RigL(model_of(m), None, total_steps=30, update_every=3)
        for i in range(30):
            if i == resume_at:
                state = updater.state_dict()
                updater = RigL(model_of(m), None, total_steps=30, update_every=3)
                updater.load_state_dict(state)
            m.weight.grad = torch.randn(m.weight.shape, generator=grads)
            updater.step()
        return m.mask.clone(), updater.history

    (mask, history), (resumed_mask, resumed_history) = run(), run(resume_at=13)
    assert torch.equal(mask, resumed_mask) and history == resumed_history
    with pytest.raises(EffccError, match="no rng"):
        SET(model_of(layer()), None, total_steps=10).load_state_dict(RigL(model_of(layer()), None, total_steps=10).state_dict())


def test_errors_name_the_problem():
    with pytest.raises(EffccError, match="no MaskedLayer"):
        RigL(nn.Linear(3, 3), None, total_steps=10)
    for bad, match in [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "update_every": 0}, "update_every"),
        ({"total_steps": 10, "drop_fraction": 1.5}, "drop_fraction"),
        ({"total_steps": 10, "stop_fraction": 0.0}, "stop_fraction"),
    ]:
        with pytest.raises(EffccError, match=match):
            SET(model_of(layer()), None, **bad)
    first, second = layer(), layer(seed=1)
    model = nn.Sequential(first, nn.Sequential(nn.ReLU(), second))
    first.weight.grad = torch.randn_like(first.weight)
    masks = [first.mask.clone(), second.mask.clone()]
    updater = RigL(model, None, total_steps=10, update_every=1)
    with pytest.raises(EffccError, match=r"1\.1\.weight has no gradient.*after loss\.backward\(\) and optimizer\.step\(\)"):
        updater.step()
    assert torch.equal(first.mask, masks[0]) and torch.equal(second.mask, masks[1])  # nothing changed half-way


def test_training_loop_with_rigl_learns():
    torch.manual_seed(0)
    hidden, out = (
        layer(LayerSpec("linear", 8, 64, True), kept_blocks=150),
        layer(LayerSpec("linear", 64, 1, True), kept_blocks=32),
    )
    model = nn.Sequential(hidden, nn.ReLU(), out)
    x = torch.randn(256, 8)
    y = (x[:, :1] * x[:, 1:2]).tanh() + x[:, 2:3]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    updater = RigL(model, optimizer, total_steps=300, update_every=50)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        updater.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert {u.step for u in updater.history} == {50, 100, 150, 200}  # the stop is at 240
    assert sum(u.grown for u in updater.history) > 0
    assert int(hidden.mask.sum()) == 150 and int(out.mask.sum()) == 32
