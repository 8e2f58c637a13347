"""Sparse-IFT vs dense at equal FLOPs, trained on scikit-learn's bundled digits (no download).

    python examples/sparse_ift_digits.py                      # MLP and CNN, 3 seeds, s ∈ {0.5, 0.75, 0.9}
    python examples/sparse_ift_digits.py --model cnn --seeds 5 --dst set
    python examples/sparse_ift_digits.py --quick              # one seed, one sparsity, few steps

Every sparse model comes from `effcc.optimize(..., passes=[("sparse_ift", ...)])`, which checks that
its forward FLOPs equal the dense model's; all models train with the same optimizer, steps and
batches, and the sparse ones update their masks with RigL (the paper's setting) or SET.
Prints test accuracy (mean ± std over seeds) and writes JSON next to the other results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import effcc
from effcc.sparsity import SET, RigL
from effcc.verify import count_flops

FAMILIES = ("wide", "parallel", "factorized", "doped")


def digits(seed: int = 0):
    """(train x, train y, test x, test y): 8×8 images scaled to [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn() -> nn.Module:
    def unit(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *unit(1, 16, 1), *unit(16, 32, 1), *unit(32, 32, 2), *unit(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def train(model: nn.Module, data, *, steps: int, seed: int, dst: str | None, batch: int = 64, lr: float = 2e-3) -> float:
    """Adam for `steps` batches (the same batches for every model of a seed); returns test accuracy."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    updater = None
    if dst is not None and effcc.sparsity.masked_layers(model):
        kind = RigL if dst == "rigl" else SET
        extra = {} if dst == "rigl" else {"seed": seed}
        updater = kind(model, optimizer, total_steps=steps, update_every=max(1, steps // 12), drop_fraction=0.3, stop_fraction=0.8, **extra)
    order = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(y_train), (batch,), generator=order)
        loss = nn.functional.cross_entropy(model(x_train[pick]), y_train[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if updater is not None:
            updater.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(-1) == y_test).float().mean().item()


def build(kind: str, family: str | None, sparsity: float, seed: int, example: torch.Tensor) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    dense = mlp() if kind == "mlp" else cnn()
    if family is None:
        return dense, {}
    res = effcc.optimize(dense, (example,), passes=[("sparse_ift", {"family": family, "sparsity": sparsity, "seed": seed})])
    before, after = res.passes[0].flops
    return res.model, {"flops_dense": before, "flops_sparse": after}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "cnn", "both"), default="both")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--dst", choices=("rigl", "set", "static"), default="rigl")
    parser.add_argument("--quick", action="store_true", help="one seed, s = 0.75, 60 steps: checks that everything runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks/results/sparse_ift_digits.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.sparsities, args.steps = 1, [0.75], 60
    data = digits()
    dst = None if args.dst == "static" else args.dst
    kinds = ("mlp", "cnn") if args.model == "both" else (args.model,)
    rows = []
    for kind in kinds:
        configs = [(None, 0.0)] + [(f, s) for f in args.families for s in args.sparsities]
        for family, sparsity in configs:
            accuracies, flops, start = [], {}, time.perf_counter()
            for seed in range(args.seeds):
                model, flops = build(kind, family, sparsity, seed, data[0][:2])
                accuracies.append(train(model, data, steps=args.steps, seed=seed, dst=dst))
                if flops:  # mask updates move connections, never add them
                    flops["flops_after_training"] = count_flops(model, (data[0][:2],))
            mean = statistics.mean(accuracies)
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            rows.append({"model": kind, "family": family or "dense", "sparsity": sparsity, "accuracy": accuracies,
                         "mean": mean, "std": spread, **flops})  # fmt: skip
            label = f"{family} s={sparsity}" if family else "dense"
            print(f"{kind:4} {label:22} test accuracy {100 * mean:6.2f} ± {100 * spread:4.2f} %  ({time.perf_counter() - start:.0f}s)", flush=True)
    result = {"dataset": "sklearn digits (1437 train / 360 test)", "steps": args.steps, "seeds": args.seeds, "dst": args.dst, "rows": rows}
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
