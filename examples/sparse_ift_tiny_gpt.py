"""Sparse-IFT vs dense at equal FLOPs on a small byte-level GPT, trained on text found on this machine.

    python examples/sparse_ift_tiny_gpt.py                  # dense and each family at s = 0.5, 0.75; 2 seeds
    python examples/sparse_ift_tiny_gpt.py --quick          # a few steps: checks that everything runs

Corpus: the package descriptions and .md/.rst files in site-packages (effcc.models.installed_text_corpus),
the last 10 % held out.  effcc's TinyGPT (Pre-LN, tied embeddings), AdamW with a one-cycle schedule,
the same windows for every model of a seed; sparse models from the `sparse_ift` pass (FLOPs checked)
with RigL.  Reports held-out perplexity and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import effcc
from effcc.models import TinyGPT, installed_text_corpus, text_windows
from effcc.sparsity import RigL

CONTEXT = 128
FAMILIES = ("wide", "parallel", "factorized", "doped")


def lm_loss(model, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction=reduction)


def train(model, data: torch.Tensor, steps: int, seed: int, lr: float = 3e-3) -> None:
    windows = torch.Generator().manual_seed(100 + seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    rigl = RigL(model, optimizer, total_steps=steps, update_every=max(1, steps // 12)) if effcc.sparsity.masked_layers(model) else None
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, text_windows(data, 32, CONTEXT, windows))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if rigl is not None:
            rigl.step()
    model.eval()


@torch.no_grad()
def perplexity(model, batches: list[torch.Tensor]) -> float:
    total = sum(lm_loss(model, b, "sum").item() for b in batches)
    return math.exp(total / sum(b[:, 1:].numel() for b in batches))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks/results/sparse_ift_tiny_gpt.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.sparsities, args.families = 12, 1, [0.75], ["wide", "parallel"]
    data = installed_text_corpus()
    split = int(0.9 * len(data))
    train_data, held_out = data[:split], data[split:]
    evaluation = [text_windows(held_out, 16, CONTEXT, torch.Generator().manual_seed(1)) for _ in range(2 if args.quick else 16)]
    example = (train_data[: 2 * CONTEXT].view(2, CONTEXT),)
    rows = []
    for family, sparsity in [(None, 0.0)] + [(f, s) for f in args.families for s in args.sparsities]:
        scores, flops, start = [], {}, time.perf_counter()
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = TinyGPT(vocab=256, width=128, depth=4, heads=4, context=CONTEXT)
            if family is not None:
                res = effcc.optimize(model, example, passes=[("sparse_ift", {"family": family, "sparsity": sparsity, "seed": seed})])
                model, (dense_flops, sparse_flops) = res.model, res.passes[0].flops
                flops = {"flops_dense": dense_flops, "flops_sparse": sparse_flops}
            train(model, train_data, args.steps, seed)
            scores.append(perplexity(model, evaluation))
        row = {"family": family or "dense", "sparsity": sparsity, "perplexity": scores, "mean": statistics.mean(scores),
               "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, **flops}  # fmt: skip
        rows.append(row)
        label = f"{family} s={sparsity}" if family else "dense"
        print(f"{label:20} held-out perplexity {row['mean']:.3f} ± {row['std']:.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)
    result = {"model": "TinyGPT 4×128, byte vocabulary", "train_bytes": split, "held_out_bytes": len(held_out), "steps": args.steps,
              "seeds": args.seeds, "rows": rows}  # fmt: skip
    if not args.quick:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
