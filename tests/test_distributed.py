"""effcc's rewritten models under FSDP2, in 2 CPU processes (gloo), against one process.

Each rank trains on its half of the batch (one of two GRPO groups for the grouped model);
FSDP2 averages the gradients, so every step equals one process training on the whole batch.  Compared: the loss
at every step (float32 tolerance) and, for Sparse-IFT with RigL, every mask on every rank.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import effcc
from effcc.distributed import block_of, fully_shard_blocks, shards_agree, split_into_blocks

sys.path.insert(0, os.path.dirname(__file__))
from conftest import VOCAB, build, token_ids

WORLD = 2
STEPS = 4
LOSS_RTOL = 1e-5  # float32: the sharded run adds gradients in another order


def causal_lm_loss(logits, ids):
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---- the three kinds of rewritten model ------------------------------------------------------------
def pre_rmsnorm_gpt2():
    model = build("gpt2", torch.float32)
    ids = token_ids(batch=4, tokens=12)
    return effcc.optimize(model, (ids,), passes=[("ln_to_rmsnorm", {"trainable": True})]).model, ids


def sparse_ift_gpt2():
    model = build("gpt2", torch.float32)
    ids = token_ids(batch=4, tokens=12)
    sparse = effcc.optimize(
        model, (ids,), passes=[("sparse_ift", {"family": "parallel", "sparsity": 0.5, "block": (4, 4)})]
    ).model
    return sparse.eval(), ids  # dropout off: two runs can only agree then


def train_causal_lm(model, ids, *, rigl: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    updater = effcc.sparsity.RigL(model, optimizer, total_steps=STEPS + 1, update_every=1, stop_fraction=1.0) if rigl else None
    losses = []
    for _ in range(STEPS):
        loss = causal_lm_loss(model(ids).logits, ids)
        loss.backward()
        optimizer.step()
        if updater is not None:
            updater.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    masks = {name: layer.mask.clone() for name, layer in effcc.sparsity.masked_layers(model)} if rigl else {}
    return losses, masks


def grouped_decoder():
    """A decoder and two GRPO groups (prompt, 4 ragged answers, advantages), prompts of different lengths."""
    model = build("llama", torch.float32)
    g = torch.Generator().manual_seed(5)
    groups = []
    for prefix_length in (9, 6):
        suffix = torch.randint(0, VOCAB, (4, 6), generator=g)
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[1, 4:] = mask[3, 2:] = False
        groups.append((torch.randint(0, VOCAB, (prefix_length,), generator=g), suffix, mask, torch.randn(4, 1, generator=g)))
    return model, groups


def grpo_loss(grouped, groups):
    """Advantage-weighted suffix log-probabilities, averaged per group, then over groups."""
    logprobs = grouped.token_logprobs([p for p, _, _, _ in groups], [s for _, s, _, _ in groups], [m for _, _, m, _ in groups])
    per_group = [-(a * lp * m).sum() / m.sum() for lp, (_, _, m, a) in zip(logprobs, groups)]
    return torch.stack(per_group).mean()


def train_grouped(grouped, groups):
    optimizer = torch.optim.AdamW(grouped.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = grpo_loss(grouped, groups)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---- one process -----------------------------------------------------------------------------------
def single_process(case):
    if case == "pre_rmsnorm":
        model, ids = pre_rmsnorm_gpt2()
        return train_causal_lm(model, ids, rigl=False)
    if case == "sparse_ift":
        model, ids = sparse_ift_gpt2()
        return train_causal_lm(model, ids, rigl=True)
    model, groups = grouped_decoder()
    return train_grouped(effcc.shared_prefix(model), groups), {}


# ---- two processes ---------------------------------------------------------------------------------
def _rank_main(rank, port, case, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        if case == "grouped":  # data parallel over groups: each rank takes one
            model, groups = grouped_decoder()
            losses, masks = train_grouped(fully_shard_blocks(effcc.shared_prefix(model)), groups[rank : rank + 1]), {}
        else:
            model, ids = pre_rmsnorm_gpt2() if case == "pre_rmsnorm" else sparse_ift_gpt2()
            half = ids.shape[0] // WORLD
            losses, masks = train_causal_lm(
                fully_shard_blocks(model), ids[rank * half : (rank + 1) * half], rigl=case == "sparse_ift"
            )
        mean = torch.tensor(losses)
        dist.all_reduce(mean)
        losses, disagree = (mean / WORLD).tolist(), shards_agree(masks)
        results[rank] = (losses, {k: v.clone() for k, v in masks.items()}, disagree)
    finally:
        dist.destroy_process_group()


def two_processes(case):
    with socket.socket() as s:  # a free port for this test's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(port, case, results), nprocs=WORLD)
    return dict(results)


@pytest.mark.parametrize("case", ["pre_rmsnorm", "sparse_ift", "grouped"])
def test_fsdp2_training_matches_one_process(case):
    expected_losses, expected_masks = single_process(case)
    results = two_processes(case)
    for rank, (losses, masks, disagree) in results.items():
        assert losses == pytest.approx(expected_losses, rel=LOSS_RTOL), f"rank {rank}"
        assert disagree == [], f"masks differ between ranks: {disagree}"
        assert masks.keys() == expected_masks.keys()
        for name, mask in masks.items():  # RigL moved the same blocks as in one process
            assert torch.equal(mask, expected_masks[name]), name
    if case == "sparse_ift":
        assert any(not torch.equal(m, m0) for m, m0 in zip(expected_masks.values(), _initial_masks())), "RigL moved nothing"


def _initial_masks():
    model, _ = sparse_ift_gpt2()
    return [layer.mask for _, layer in effcc.sparsity.masked_layers(model)]


# ---- the graph cut, in one process -----------------------------------------------------------------
def test_block_paths():
    assert block_of("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert block_of("model.layers.11") == "model.layers.11"
    assert block_of("lm_head") is None


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_split_graph_gives_the_same_outputs_and_gradients(arch):
    model = build(arch, torch.float64)
    ids = token_ids(batch=2, tokens=10)
    gm = effcc.optimize(model, (ids,), passes=[("ln_to_rmsnorm", {"trainable": True})] if arch != "llama" else []).model
    split = split_into_blocks(gm)
    assert split.effcc_blocks == [name for name, _ in effcc.distributed.repeated_blocks(model)]
    # each block's tensors now belong to its submodule; the same Parameter objects, none copied
    assert {id(p) for p in split.parameters()} == {id(p) for p in gm.parameters()}
    originals = dict(gm.named_parameters())
    for name, p in split.named_parameters():  # every tensor's name in the model is known
        assert originals[split.effcc_original_names.get(name, name)] is p, name
    blocks = [m for name, m in split.named_children() if name.startswith("submod_")][1:-1]
    assert len(blocks) == len(split.effcc_blocks) and all(any(True for _ in b.parameters()) for b in blocks)
    ref = gm(ids).logits
    ref.square().mean().backward()
    expected = [p.grad.clone() for p in gm.parameters()]
    gm.zero_grad()
    out = split(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().mean().backward()
    for p, want in zip(gm.parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


def test_model_without_blocks_is_refused():
    gm = effcc.optimize(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), passes=[]).model
    with pytest.raises(effcc.EffccError, match="no numbered blocks"):
        split_into_blocks(gm)
