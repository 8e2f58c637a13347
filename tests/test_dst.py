"""RigL and SET: the schedule, which blocks move, constant active FLOPs, optimizer state, resuming."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effcc.errors import EffccError
from effcc.sparsity import SET, MaskedLayer, RigL, blocks
from effcc.sparsity.layers import LayerSpec


def layer(spec=None, block=(1, 1), keep=0.5, seed=0) -> MaskedLayer:
    torch.manual_seed(seed)
    m = MaskedLayer(spec or LayerSpec("linear", 16, 12, True), block)
    rows, cols = blocks.grid(m.mask.shape, block)
    kept = torch.rand(rows, cols) < keep
    m.mask.copy_(blocks.expand(kept, m.mask.shape, block))
    return m


def test_cosine_schedule():
    updater = RigL(nn.Sequential(layer()), None, total_steps=1000, update_every=100, drop_fraction=0.3, stop_fraction=0.8)
    assert updater.drop_fraction_at(0) == pytest.approx(0.3)
    assert updater.drop_fraction_at(400) == pytest.approx(0.15)
    assert updater.drop_fraction_at(800) == 0.0
    assert updater.drop_fraction_at(200) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))


def test_rigl_drops_smallest_weights_and_grows_largest_gradients():
    m = layer(LayerSpec("linear", 4, 2, False), keep=0.0)
    with torch.no_grad():
        m.mask.copy_(torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool))
        m.weight.copy_(torch.tensor([[0.1, -5.0, 3.0, 0.01], [9.0, 9.0, 9.0, 9.0]]))
    m.weight.grad = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.5, -7.0, 0.1, 6.0]])
    model = nn.Sequential(m)
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.state[m.weight] = {"exp_avg": torch.ones(2, 4), "exp_avg_sq": torch.ones(2, 4), "step": torch.tensor(3.0)}
    updater = RigL(model, optimizer, total_steps=10, update_every=1, drop_fraction=1.0, stop_fraction=1.0)
    updater.step()  # f(1) = 1/2 (1 + cos(π/10)) ≈ 0.98 → round(0.98 · 4) = 4 ... capped by 4 candidates
    moved = updater.history[0][2]
    assert moved == 4 and m.mask.sum() == 4
    assert m.mask[1].all() and not m.mask[0].any()
    assert (m.weight[1] == 0).all()  # grown connections start at zero
    assert (optimizer.state[m.weight]["exp_avg"][1] == 0).all() and (optimizer.state[m.weight]["exp_avg"][0] == 1).all()


def test_rigl_partial_update_picks_the_extremes():
    m = layer(LayerSpec("linear", 6, 1, False), keep=0.0)
    with torch.no_grad():
        m.mask.copy_(torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool))
        m.weight.copy_(torch.tensor([[2.0, 0.1, 3.0, 1.0, 1.0, 1.0]]))
    m.weight.grad = torch.tensor([[0.0, 0.0, 0.0, 0.2, 5.0, 0.3]])
    updater = RigL(nn.Sequential(m), None, total_steps=100, update_every=1, drop_fraction=0.4, stop_fraction=1.0)
    updater.step()  # round(0.4 · 3) = 1 block: drop column 1 (|w| 0.1), grow column 4 (|g| 5)
    assert m.mask.tolist() == [[True, False, True, False, True, False]]


@pytest.mark.parametrize("kind", [RigL, SET])
def test_kept_blocks_constant_and_block_structure_kept(kind):
    layers = [layer(block=(4, 4)), layer(LayerSpec("conv2d", 4, 8, True, (3, 3), (1, 1), (1, 1)), block=(2, 6), seed=1)]
    model = nn.Sequential(*layers[:1])
    model.add_module("conv", layers[1])
    before = [int(m.mask.sum()) for m in layers]
    updater = kind(model, None, total_steps=40, update_every=2, drop_fraction=0.5)
    for _ in range(40):
        for m in layers:
            m.weight.grad = torch.randn_like(m.weight)
        updater.step()
    assert [int(m.mask.sum()) for m in layers] == before
    assert any(moved for *_, moved in updater.history)
    assert max(step for step, *_ in updater.history) < 0.8 * 40  # nothing after stop_fraction
    for m in layers:
        blocks.collapse(m.mask, m.block)


def test_set_is_reproducible_and_resumes():
    def run(seed, resume_at=None):
        m = layer()
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-1, 1, m.weight.numel()).view_as(m.weight))
        updater = SET(nn.Sequential(m), None, total_steps=20, update_every=2, seed=seed)
        for i in range(20):
            if i == resume_at:
                state, mask = updater.state_dict(), m.mask.clone()
                updater = SET(nn.Sequential(m), None, total_steps=20, update_every=2, seed=99)
                updater.load_state_dict(state)
                assert torch.equal(m.mask, mask)
            updater.step()
        return m.mask.clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(0), run(0, resume_at=7))


def test_errors_name_the_problem():
    with pytest.raises(EffccError, match="no masked layers"):
        RigL(nn.Linear(3, 3), None, total_steps=10)
    with pytest.raises(EffccError, match="total_steps"):
        RigL(nn.Sequential(layer()), None, total_steps=0)
    updater = RigL(nn.Sequential(layer()), None, total_steps=10, update_every=1)
    with pytest.raises(EffccError, match=r"0\.weight has no gradient"):
        updater.step()


def test_training_loop_with_rigl_learns():
    torch.manual_seed(0)
    model = nn.Sequential(layer(LayerSpec("linear", 8, 64, True), keep=0.3), nn.ReLU(), layer(LayerSpec("linear", 64, 1, True), keep=0.5))
    x = torch.randn(256, 8)
    y = (x[:, :1] * x[:, 1:2]).tanh()
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
    assert losses[-1] < 0.5 * losses[0]
    assert len({step for step, *_ in updater.history}) == 4  # steps 50 … 200 (stop at 240)
