"""Launch effcc's one-token int4 GEMV kernel once at 11008 × 4096 with a fixed configuration, for
Nsight Compute (no autotuning, so that the profiled launch is the kernel itself), and write its
PTX and SASS next to the report:

    ncu --kernel-name regex:int4_gemv --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats --section InstructionStats \\
        python benchmarks/profile_int4_gemv.py [--asm-dir DIR]
"""

import argparse
from pathlib import Path

import torch

from effcc.backends.triton import quantized_linear as k
from effcc.ops import quantized_linear as q

parser = argparse.ArgumentParser()
parser.add_argument("--asm-dir", type=Path)
args = parser.parse_args()
n, kdim, group = 11008, 4096, 128
x = torch.randn(1, kdim, device="cuda", dtype=torch.bfloat16)
packed, scales, zeros = q.quantize_weight_int4(torch.randn(n, kdim, device="cuda"), group)
scales = scales.bfloat16()
words = packed.view(torch.int32)
out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
split, block_n, per_step, warps = 2, 16, 2, 1
partial = torch.empty(split * n, device="cuda", dtype=torch.float32)
arrived = torch.zeros(n // block_n + 1, device="cuda", dtype=torch.int32)
compiled = k._int4_gemv_kernel[(triton_cdiv := (n + block_n - 1) // block_n, 1, split)](
    x, words, scales, zeros, scales, out, partial, arrived, 1, n, kdim, 1,
    x.stride(0), words.stride(0), scales.stride(0), zeros.stride(0), out.stride(0), k.FLOAT_ONE_BITS,
    GROUP=group, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=block_n, GROUPS_PER_STEP=per_step, SPLIT_K=split, num_warps=warps, num_stages=1)
torch.cuda.synchronize()
print(f"launched {triton_cdiv} x {split} programs; registers {compiled.n_regs}, spills {compiled.n_spills}")
if args.asm_dir:
    args.asm_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("ttgir", "ptx", "sass"):
        try:
            (args.asm_dir / f"int4_gemv.{kind}").write_text(compiled.asm[kind])
        except Exception as error:  # noqa: BLE001 - sass needs nvdisasm, which an image may lack
            print(f"no {kind}: {error}")
