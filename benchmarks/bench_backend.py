"""torch.compile(backend="effcc") vs Inductor vs eager on a GPT-2-shaped model, on one GPU.

Side by side in one process: forward latency (median of triton.testing.do_bench), the
compiled model's error against eager, the device name.  JSON goes to benchmarks/results/.

    python benchmarks/bench_backend.py [--layers 12 --width 768 --heads 12 --batch 8 --tokens 1024]

This measures the foundation: effcc's default passes today are exact folds whose speed
effect should be near 1.0x; the figure to watch is that effcc costs nothing over Inductor.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def build(args, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.tokens, vocab_size=50257, use_cache=False)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial norm affines, as in a trained model
        for name, p in model.named_parameters():
            if p.dim() == 1 and ".ln_" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    return model.to("cuda", dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backend.json")
    args = parser.parse_args()

    from triton.testing import do_bench

    import logging

    effcc_log: list[str] = []  # what the backend says it did, kept in the JSON
    handler = logging.Handler()
    handler.emit = lambda record: effcc_log.append(record.getMessage())
    logging.getLogger("effcc").addHandler(handler)
    logging.getLogger("effcc").setLevel(logging.INFO)

    dtype = getattr(torch, args.dtype)
    model = build(args, dtype)
    ids = torch.randint(0, 50257, (args.batch, args.tokens), device="cuda")
    with torch.no_grad():
        reference = model(ids).logits.float()
        rows = {}
        for name, fn in (
            ("eager", model),
            ("inductor", torch.compile(model, backend="inductor")),
            ("effcc", torch.compile(model, backend="effcc")),
        ):
            start = time.perf_counter()
            out = fn(ids).logits.float()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            ms = do_bench(lambda: fn(ids), warmup=200, rep=1000, return_mode="median")
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            rows[name] = {"forward_ms": ms, "first_call_s": compile_s, "max_rel_err_vs_eager": err}
    for row in rows.values():
        row["speedup_vs_eager"] = rows["eager"]["forward_ms"] / row["forward_ms"]
        row["speedup_vs_inductor"] = rows["inductor"]["forward_ms"] / row["forward_ms"]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": vars(args) | {"out": None, "dtype": args.dtype},
        "results": rows,
        "effcc_log": effcc_log,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}, torch {result['torch']}, GPT-2 shape {args.layers}x{args.width}, {args.batch}x{args.tokens} tokens, {args.dtype}")
    print(f"{'':10}{'forward ms':>12}{'vs eager':>10}{'vs inductor':>13}{'rel err':>10}{'1st call s':>12}")
    print("\n".join(effcc_log))
    for name, row in rows.items():
        print(f"{name:10}{row['forward_ms']:12.3f}{row['speedup_vs_eager']:10.3f}{row['speedup_vs_inductor']:13.3f}{row['max_rel_err_vs_eager']:10.1e}{row['first_call_s']:12.1f}")


if __name__ == "__main__":
    main()
