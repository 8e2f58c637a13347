"""Pre-LN → Pre-RMSNorm on the GPU: norm kernel bandwidth, and whole models side by side.

    python benchmarks/bench_rmsnorm.py [--quick] [--out benchmarks/results/rmsnorm.json]

1. Kernels (bf16, 128 MiB tensors, CUDA-graph replays): effcc's RMSNorm forward, fused residual-add forward and
   backward, in GB/s and as a share of the copy bandwidth measured in the same process;
   next to Inductor's own LayerNorm/RMSNorm for the same tensors.
2. Models, one process, median of triton.testing.do_bench: eager, Inductor on the original
   Pre-LN model, effcc (default passes: fold_norm_affine + ln_to_rmsnorm, norms on effcc
   kernels) and effcc without the kernels; forward under no_grad and a training step
   (forward + backward of the LM loss); also causal_attention alone and with ln_to_rmsnorm
   (the causal mask as is_causal, flash kernels).  Shapes: GPT-2-medium (24×1024, 8×1024 tokens),
   ViT-L/16 (forward), and a narrow long-sequence decoder (d=512, 4×4096 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

DEVICE = "cuda"


def bench(fn, ms=400) -> float:
    return do_bench(fn, warmup=100, rep=ms, return_mode="median")


def bench_kernel(fn) -> float:
    """Milliseconds of one call, replayed from a CUDA graph: a 128 MiB pass takes ~50 µs on an H200,
    about what Python needs to launch it, so plain event timing would measure the launch."""
    return do_bench_cudagraph(fn, rep=400, return_mode="median")


# ---- 1. kernels --------------------------------------------------------------------------------
def kernel_rows(quick: bool) -> list[dict]:
    """Each tensor 128 MiB (well past the 50 MB L2), ops called directly so the GPU, not Python, is timed."""
    from effcc.ops import add_rms_norm, rms_norm

    rows = []
    for d in (512, 1024) if quick else (512, 1024, 2048, 4096):
        n = 2**26 // d
        x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
        r, dy, ds = (torch.randn_like(x) for _ in range(3))
        w = (1 + 0.1 * torch.randn(d, device=DEVICE)).bfloat16()
        b = (0.1 * torch.randn(d, device=DEVICE)).bfloat16()
        elem = x.numel() * x.element_size()
        out = torch.empty_like(x)
        copy_bw = 2 * elem / bench_kernel(lambda: out.copy_(x)) / 1e6  # GB/s, bytes read + written

        ln = torch.compile(lambda t: F.layer_norm(t, [d], w, b, 1e-5))
        rms = torch.compile(lambda t: F.rms_norm(t, [d], w, 1e-5) + b)
        add_ln = torch.compile(lambda a, c: (F.layer_norm(a + c, [d], w, b, 1e-5), a + c))
        _, mean, rstd_ln = torch.ops.aten.native_layer_norm(x, [d], w, b, 1e-5)
        ln_bwd = torch.compile(lambda g, t: torch.ops.aten.native_layer_norm_backward(g, t, [d], mean, rstd_ln, w, b, [True, True, True]))
        _, _, rstd = torch.ops.effcc.add_rms_norm_fwd(x, r, w, b, 1e-5)
        cases = {
            "effcc rms_norm fwd": (lambda: rms_norm(x, w, b, 1e-5), 2 * elem),
            "inductor rms_norm fwd": (lambda: rms(x), 2 * elem),
            "inductor layer_norm fwd": (lambda: ln(x), 2 * elem),
            "effcc add+rms_norm fwd": (lambda: add_rms_norm(x, r, w, b, 1e-5), 4 * elem),
            "inductor add+layer_norm fwd": (lambda: add_ln(x, r), 4 * elem),
            "effcc add+rms_norm bwd": (lambda: torch.ops.effcc.rms_norm_bwd(dy, x, w, rstd, ds, True), 4 * elem),
            "inductor layer_norm bwd": (lambda: ln_bwd(dy, x), 3 * elem),
        }
        for name, (fn, nbytes) in cases.items():
            fn()
            ms = bench_kernel(fn)
            rows.append({"kernel": name, "d": d, "rows": n, "ms": ms, "GBps": nbytes / ms / 1e6, "of_copy_bw": nbytes / ms / 1e6 / copy_bw, "copy_GBps": copy_bw})
    return rows


# ---- 2. models ---------------------------------------------------------------------------------
def gpt2(layers, width, heads, tokens, vocab=50257):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=tokens, vocab_size=vocab, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    _randomize_norms(model)
    return model.to(DEVICE, torch.bfloat16)


def vit_large():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=224, patch_size=16,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTModel(cfg, add_pooling_layer=False)
    _randomize_norms(model)
    return model.to(DEVICE, torch.bfloat16)


def _randomize_norms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def model_rows(name, model, inputs, train: bool, only=None, rounds: int = 1) -> list[dict]:
    """One row per variant; with rounds > 1 the compiled variants stay alive (Dynamo keeps one cache entry per
    backend) and are timed again in alternating order, each figure the median of its rounds, so that drift of
    the clock or the heat hits all of them alike."""
    model.eval()  # dropout is 0 anyway; eval keeps the graphs the same
    reference = None
    rows = []
    crmsnorm = {"passes": ["fold_norm_affine", "ln_to_crmsnorm"]}
    rms_causal = {"passes": ["fold_norm_affine", "ln_to_rmsnorm", "causal_attention"]}  # training keeps ln_to_rmsnorm, causal_attention
    variants = [  # (label, compiled model, whether it trains)
        ("eager", lambda: model, True),
        ("inductor", lambda: torch.compile(model, backend="inductor"), True),
        ("effcc", lambda: torch.compile(model, backend="effcc"), True),
        ("effcc causal_attention", lambda: torch.compile(model, backend="effcc", options={"passes": ["causal_attention"]}), True),
        ("effcc rmsnorm+causal", lambda: torch.compile(model, backend="effcc", options=rms_causal), True),
        ("effcc, no kernels", lambda: torch.compile(model, backend="effcc", options={"kernels": False}), True),
        # Pre-CRMSNorm: the stream is d-1 wide (inference only: its weights are rewritten as constants)
        ("effcc crmsnorm", lambda: torch.compile(model, backend="effcc", options=crmsnorm), False),
        ("effcc crmsnorm, no kernels", lambda: torch.compile(model, backend="effcc", options={**crmsnorm, "kernels": False}), False),
    ]
    torch._functorch.config.donated_buffer = True  # whole training steps run as they would for a user
    torch._dynamo.reset()
    timers = {}  # label -> the callables timed again in later rounds
    for label, make, trains in variants:
        if only and label not in only and label != "inductor":
            continue
        if rounds == 1:
            torch._dynamo.reset()
        fn = make()
        with torch.no_grad():
            start = time.perf_counter()
            out = _output(fn(*inputs)).float()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            if reference is None:
                reference = out
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            fwd = bench(lambda: fn(*inputs))
        row = {"model": name, "variant": label, "forward_ms": fwd, "first_call_s": first, "rel_err_vs_eager": err}
        if train and trains:
            params = [p for p in model.parameters()]

            def step():
                loss = _output(fn(*inputs)).float().square().mean()
                torch.autograd.grad(loss, params)

            step()
            row["train_step_ms"] = bench(step, ms=1000)
            timers[label] = (fn, step)
        else:
            timers[label] = (fn, None)
        rows.append(row)
        print(row, flush=True)
    for round_ in range(1, rounds):
        order = rows if round_ % 2 else rows[::-1]
        for row in order:
            fn, step = timers[row["variant"]]
            with torch.no_grad():
                row.setdefault("forward_rounds_ms", [row["forward_ms"]]).append(bench(lambda fn=fn: fn(*inputs)))
            if step is not None:
                row.setdefault("train_rounds_ms", [row["train_step_ms"]]).append(bench(step, ms=1000))
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    for row in rows:
        if "forward_rounds_ms" in row:
            row["forward_ms"] = statistics.median(row["forward_rounds_ms"])
        if "train_rounds_ms" in row:
            row["train_step_ms"] = statistics.median(row["train_rounds_ms"])
    base = next(r for r in rows if r["variant"] == "inductor")
    for r in rows:
        r["forward_vs_inductor"] = base["forward_ms"] / r["forward_ms"]
        if "train_step_ms" in r:
            r["train_vs_inductor"] = base["train_step_ms"] / r["train_step_ms"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer kernel sizes, GPT-2-medium only")
    parser.add_argument("--models", default="gpt2-medium,vit-l16,narrow-long", help="comma-separated; 'none' for kernels only")
    parser.add_argument("--no-kernel-rows", action="store_true", help="skip the kernel bandwidth table")
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--variants", help="variant labels to run, separated by | (Inductor always runs: the baseline)")
    parser.add_argument("--rounds", type=int, default=1, help="time every variant this many times, interleaved; report medians")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rmsnorm.json")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("effcc").setLevel(logging.INFO)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": [] if args.no_kernel_rows else kernel_rows(args.quick), "models": []}
    for row in result["kernels"]:
        print(f"{row['kernel']:30} d={row['d']:5} {row['ms'] * 1e3:8.1f} µs {row['GBps']:7.0f} GB/s {100 * row['of_copy_bw']:5.1f}% of copy")
    ids = lambda b, t, v=50257: torch.randint(0, v, (b, t), device=DEVICE)  # noqa: E731
    makers = {
        "gpt2-medium": lambda: ("GPT-2-medium 24x1024, 8x1024 tokens", gpt2(24, 1024, 16, 1024), (ids(8, 1024),), True),
        "vit-l16": lambda: ("ViT-L/16, 32 images 224px", vit_large(), (torch.randn(32, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16),), False),
        "narrow-long": lambda: ("decoder d=512 8 layers, 4x4096 tokens", gpt2(8, 512, 8, 4096, vocab=8192), (ids(4, 4096, 8192),), True),
    }
    for key in [k for k in args.models.split(",") if k != "none"]:
        name, model, inputs, train = makers[key]()
        train = train and not args.no_train
        result["models"] += model_rows(name, model, inputs, train, only=args.variants.split("|") if args.variants else None, rounds=args.rounds)
        del model
        torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))  # after each model: a time-out keeps what was measured
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\ndevice: {result['device']}, torch {result['torch']}")
    for r in result["models"]:
        train = f"{r['train_step_ms']:8.2f} ms ({r['train_vs_inductor']:.3f}x)" if "train_step_ms" in r else "-"
        print(f"{r['model'][:38]:38} {r['variant']:18} fwd {r['forward_ms']:8.2f} ms ({r['forward_vs_inductor']:.3f}x) train {train} err {r['rel_err_vs_eager']:.1e}")


if __name__ == "__main__":
    main()
