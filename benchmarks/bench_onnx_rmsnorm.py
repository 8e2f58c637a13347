"""ONNX Runtime on the CPU: the original Pre-LN export vs the Pre-RMSNorm export, side by side.

    python benchmarks/bench_onnx_rmsnorm.py [--layers 6 --width 512 --heads 8 --batch 4 --tokens 256]

Both files come from the same model (GPT-2 architecture, random weights); the converted one is
effcc's default pipeline (fold_norm_affine + ln_to_rmsnorm), whose norms export as ONNX
RMSNormalization (opset 23).  Runs alternate between the two sessions; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import effcc
from effcc.backends.onnx.export import RMS_NORM_OPSET


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_rmsnorm_cpu.json")
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=args.tokens, vocab_size=8192, use_cache=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ids = torch.randint(0, 8192, (args.batch, args.tokens))
    folder = Path(tempfile.mkdtemp(prefix="effcc-bench-"))
    original = effcc.export_onnx(model, folder / "original.onnx", (ids,))
    converted = effcc.export_onnx(effcc.optimize(model, (ids,)), folder / "pre_rmsnorm.onnx", opset=RMS_NORM_OPSET)
    errors = {name: effcc.check_onnx(path, model, (ids,)).max_rel for name, path in (("original", original), ("pre_rmsnorm", converted))}

    sessions = {name: effcc.backends.onnx.onnx_session(path) for name, path in (("original", original), ("pre_rmsnorm", converted))}
    feeds = {name: {s.get_inputs()[0].name: ids.numpy()} for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():  # warm-up
        s.run(None, feeds[name])
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    result = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "onnxruntime": ort.__version__, "shape": vars(args) | {"out": None},
        "median_ms": medians, "speedup": medians["original"] / medians["pre_rmsnorm"], "max_rel_err_vs_pytorch": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['cpu']}, onnxruntime {ort.__version__}, GPT-2 {args.layers}x{args.width}, {args.batch}x{args.tokens} tokens, fp32")
    for name, ms in medians.items():
        print(f"  {name:12} {ms:8.2f} ms   max rel err vs PyTorch {errors[name]:.1e}")
    print(f"  Pre-RMSNorm speed-up: {result['speedup']:.3f}x")


if __name__ == "__main__":
    main()
