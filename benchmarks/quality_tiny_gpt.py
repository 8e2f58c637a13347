"""Quantisation quality of a small Pre-LN GPT that effcc trains itself, by held-out perplexity.

    python benchmarks/quality_tiny_gpt.py [--steps 800]

Corpus: English documentation installed on this machine (package descriptions, .md and .rst
files in site-packages), read as bytes; the last 10% is held out.  The model is effcc's TinyGPT
(Pre-LN, byte vocabulary), trained here on the CPU and saved with safetensors (reused on the next
run).  Variants: fp32, naive W8A8, SmoothQuant W8A8 (α searched), OS+ W8A8, naive W4A16 and
SmoothQuant + W4A16 (groups of 64).  JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

import effcc
from effcc.models import TinyGPT, installed_text_corpus, text_windows

CONTEXT = 128


def windows(data: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return text_windows(data, count, CONTEXT, generator)


def train(model: TinyGPT, data: torch.Tensor, steps: int, lr: float = 3e-3, weight_decay: float = 0.1, one_cycle: bool = True, seed: int = 0) -> None:
    """AdamW on random windows; one-cycle schedule for training from scratch, constant for fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps) if one_cycle else None
    model.train()
    for step in range(steps):
        batch = windows(data, 32, g)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        if step % 100 == 0:
            print(f"step {step:5d}  train loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def perplexity(fn, batches: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        logits = fn(batch[:, :-1])
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def trained_model(weights: Path, steps: int) -> tuple[TinyGPT, torch.Tensor, torch.Tensor]:
    """(the model, training bytes, held-out bytes): trained here once, then loaded from `weights`."""
    data = installed_text_corpus()
    split = int(0.9 * len(data))
    train_data, held_out = data[:split], data[split:]
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, width=128, depth=4, heads=4, context=CONTEXT)
    if weights.exists():
        load_model(model, weights)
        model.eval()
    else:
        start = time.perf_counter()
        train(model, train_data, steps)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, weights)
        print(f"trained in {time.perf_counter() - start:.0f} s, saved to {weights}")
    return model, train_data, held_out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--weights", type=Path, default=Path.home() / ".cache" / "effcc" / "tiny_gpt_corpus.safetensors")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality_tiny_gpt.json")
    args = parser.parse_args()

    model, train_data, held_out = trained_model(args.weights, args.steps)
    split = len(train_data)

    g = torch.Generator().manual_seed(1)
    evaluation = [windows(held_out, 16, g) for _ in range(16)]
    calibration = [(windows(train_data, 8, g)[:, :-1],) for _ in range(8)]
    example = calibration[0]
    variants = {
        "naive W8A8": ["quantize_w8a8"],
        "SmoothQuant W8A8 (alpha auto)": [("smoothquant", {"alpha": "auto"}), "quantize_w8a8"],
        "OS+ W8A8": ["os_plus", "quantize_w8a8"],
        "naive W4A16 (g64)": [("quantize_w4a16", {"group_size": 64})],
        "SmoothQuant W4A16 (alpha 0.5, g64)": [("smoothquant", {"alpha": 0.5}), ("quantize_w4a16", {"group_size": 64})],
        "SmoothQuant+ W4A16 (g64)": [("smoothquant_plus", {"group_size": 64}), ("quantize_w4a16", {"group_size": 64})],
    }
    rows = {"fp32": perplexity(model, evaluation)}
    print(f"{'fp32':38} perplexity {rows['fp32']:.3f}")
    for name, passes in variants.items():
        res = effcc.optimize(model, example, passes, calibration=calibration)
        rows[name] = perplexity(res.model, evaluation)
        print(f"{name:38} perplexity {rows[name]:.3f}", flush=True)
    result = {"model": "TinyGPT 4x128, byte vocabulary, trained here", "train_bytes": split, "held_out_bytes": len(held_out),
              "steps": args.steps, "torch": torch.__version__, "perplexity": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
