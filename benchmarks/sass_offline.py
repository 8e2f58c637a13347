"""Compile one of effcc's Triton kernels for a GPU architecture on a machine without a GPU, and say
what its loops run: registers, spills, and per loop the SASS instruction mix (shared-memory traffic and
barriers included, which is where Triton's layout conversions show).  Device time is scarce; this
answers "how many instructions per weight" and "did that change remove the conversion" for free.
Triton's wheel carries ptxas, nvdisasm and cuobjdump.

    python benchmarks/sass_offline.py effcc.backends.triton.quantized_linear:_int4_mma_kernel \\
        --types X=*bf16,QW=*u8,SCALES=*bf16,ZEROS=*u8,BIAS=*bf16,C=*bf16,PARTIAL=*fp32,ARRIVED=*i32 \\
        --constexprs GROUP=128,HAS_BIAS=0,DOT_IN_FP32=0,BLOCK_M=16,BLOCK_N=128,SPLIT_K=4,WEIGHTS_AS_A=1 --warps 8 --stages 3

To compile with the Triton a GPU machine has (spills can differ: the prefix-attention dK/dV kernel,
now the dK/dV programs of _backward_kernel, spilled up to 944 bytes a thread under Triton 3.6 at
D = 64, less under 3.9; the loops say where the reloads are, LDL: there, between its inner loops,
not in them), put that version first on the path:
pip install --no-deps --target /tmp/triton36 triton==3.6.0, then run with PYTHONPATH=/tmp/triton36.

Arguments not named in --types are 32-bit integers; pointers and integers are taken as multiples of
16 (as Triton specialises them at run time for aligned tensors and strides).  Timing still needs the
GPU: fewer instructions helped the int4 GEMV only 5% where it waited on memory.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"^\s*\.?(L_x_\d+):")
BRANCH = re.compile(r"BRA\s+`?\(?\.?(L_x_\d+)")


def parse_pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item) if text else {}


def compile_kernel(spec: str, types: dict[str, str], constexprs: dict[str, str], warps: int, stages: int, arch: int):
    module_name, function_name = spec.split(":")
    kernel = getattr(importlib.import_module(module_name), function_name)
    values = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in constexprs.items()}
    signature = {name: "constexpr" if name in values else types.get(name, "i32") for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name not in values}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def sass_of(compiled) -> tuple[str, str]:
    """(SASS text, resource usage line) of a compiled kernel, by the tools in Triton's wheel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    return sass, next((line.strip() for line in usage.splitlines() if "REG:" in line), "")


def loops(sass: str) -> list[tuple[str, collections.Counter]]:
    """Each backward branch's body (label to branch) as an instruction count by opcode."""
    lines = sass.splitlines()
    label_line = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    found = []
    for i, line in enumerate(lines):
        branch = BRANCH.search(line)
        if branch and label_line.get(branch.group(1), i) < i:
            body = [m.group(2) for text in lines[label_line[branch.group(1)]: i + 1] if (m := INSTRUCTION.search(text))]
            found.append((branch.group(1), collections.Counter(body)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", help="module:function of a @triton.jit kernel")
    parser.add_argument("--types", default="", help="name=type for pointers and non-i32 scalars: *bf16, *fp32, *i32, *u8, fp32, ...")
    parser.add_argument("--constexprs", default="", help="name=value for every tl.constexpr argument")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as a number: 90 for Hopper (H100, H200)")
    parser.add_argument("--sass", help="also write the whole SASS to this file")
    args = parser.parse_args()
    compiled = compile_kernel(args.kernel, parse_pairs(args.types), parse_pairs(args.constexprs), args.warps, args.stages, args.arch)
    sass, usage = sass_of(compiled)
    if args.sass:
        with open(args.sass, "w") as out:
            out.write(sass)
    total = sum(1 for line in sass.splitlines() if INSTRUCTION.search(line))
    print(f"{args.kernel} for sm_{args.arch}, {args.warps} warps: {total} instructions; {usage}")
    for label, ops in loops(sass):
        memory = {op: ops[op] for op in ("LDG", "STG", "LDS", "STS", "STSM", "LDL", "STL", "BAR", "ATOMG", "RED") if ops[op]}
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(10))
        print(f"  loop {label}: {sum(ops.values())} instructions ({top}); memory (LDL/STL: spills) and barriers {memory}")


if __name__ == "__main__":
    main()
