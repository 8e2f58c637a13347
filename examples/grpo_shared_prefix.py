"""A GRPO training step with a shared prompt: grouped (prompt computed once) vs ungrouped.

For each prompt the policy samples G completions of different lengths; rewards become
group-relative advantages, and the clipped policy loss is taken over completion tokens
only.  `effcc.shared_prefix` computes the prompt once for the whole group, and its
loss and gradients are those of the ordinary batch.  Run:

    python examples/grpo_shared_prefix.py            # 3 steps, prints loss and gradient agreement
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import effcc

EOS = 1


def small_policy(dtype=torch.float32, seed=0) -> GPTNeoXForCausalLM:
    """A Pythia-style decoder (rotary positions, parallel residual) with random weights."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           vocab_size=64, eos_token_id=EOS, bos_token_id=0, use_cache=False)
    return GPTNeoXForCausalLM(config).to(dtype).eval()  # eval: dropout off, as GRPO's policy forward


@torch.no_grad()
def sample_group(model, prompt: torch.Tensor, group: int, max_new: int, generator: torch.Generator):
    """G completions of the prompt, right-padded, each stopping at EOS or its own length limit
    (a stand-in for varied answer lengths): (ids [G, S], mask [G, S])."""
    ids = torch.zeros(group, max_new, dtype=torch.long)
    mask = torch.zeros(group, max_new, dtype=torch.bool)
    limits = torch.randint(2, max_new + 1, (group,), generator=generator)
    for g in range(group):
        sequence = prompt.clone()
        for t in range(int(limits[g])):
            logits = model(sequence[None]).logits[0, -1]
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            ids[g, t], mask[g, t] = token, True
            sequence = torch.cat([sequence, token])
            if token.item() == EOS:
                break
    return ids, mask


def rewards_of(completions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A toy verifiable reward: the share of even tokens in the completion."""
    return ((completions % 2 == 0) & mask).sum(1) / mask.sum(1).clamp(min=1)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2):
    """GRPO's token-level objective (no KL term), averaged over completion tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    per_token = -torch.minimum(ratio * advantages[:, None], ratio.clamp(1 - clip, 1 + clip) * advantages[:, None])
    return (per_token * mask).sum() / mask.sum()


def ungrouped_logprobs(model, prompt, completions, mask):
    """The ordinary way: every sequence cat(prompt, completion) on its own, prompt computed G times."""
    rows = []
    for row, valid in zip(completions, mask):
        sequence = torch.cat([prompt, row[valid]])
        logits = model(sequence[None]).logits[0, prompt.numel() - 1 : -1]
        logprob = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1).gather(-1, row[valid][:, None]).squeeze(-1)
        rows.append(torch.nn.functional.pad(logprob, (0, completions.shape[1] - logprob.numel())))
    return torch.stack(rows)


def run(steps: int = 3, group: int = 4, prompt_len: int = 12, max_new: int = 10, dtype=torch.float32, seed: int = 0, verbose=True):
    """Train two copies of one policy side by side, grouped and ungrouped; return per-step figures."""
    policy = small_policy(dtype, seed)
    twin = copy.deepcopy(policy)
    grouped = effcc.shared_prefix(policy)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (policy, twin)]
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        prompt = torch.randint(2, 64, (prompt_len,), generator=generator)
        completions, mask = sample_group(policy, prompt, group, max_new, generator)
        advantages = group_advantages(rewards_of(completions, mask))
        batch = grouped.pack(prompt, completions, mask)  # packed once for both passes below
        with torch.no_grad():
            old = grouped.token_logprobs(batch)  # the sampling policy's log-probs
        losses, grads = [], []
        for model, optimizer in zip((policy, twin), optimizers):
            optimizer.zero_grad()
            logprobs = grouped.token_logprobs(batch) if model is policy else ungrouped_logprobs(twin, prompt, completions, mask)
            loss = clipped_policy_loss(logprobs, old, advantages, mask)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            losses.append(loss.item())
            optimizer.step()
        grad_error = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
        history.append({"step": step, "loss_grouped": losses[0], "loss_ungrouped": losses[1], "grad_rel_error": grad_error,
                        "completion_lengths": mask.sum(1).tolist()})
        if verbose:
            print(f"step {step}: loss grouped {losses[0]:+.8f}  ungrouped {losses[1]:+.8f}  "
                  f"max grad rel. error {grad_error:.1e}  completion lengths {mask.sum(1).tolist()}")
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--float64", action="store_true", help="run in float64 (agreement to ~1e-12)")
    args = parser.parse_args()
    run(args.steps, args.group, dtype=torch.float64 if args.float64 else torch.float32)


if __name__ == "__main__":
    main()
