"""Inductor reads which tensors a user Triton kernel writes from the kernel's Triton IR, and copies
every input it believes written before each launch (the functional form of the kernel may not
write into a tensor that something else still reads).  The kernels behind effcc's triton_ops must
show writes to their outputs only.  A store address made by a function that also took an input
pointer once made Inductor believe q written, and copy it before every prefix-attention launch,
forward and backward.

The IR is generated for sm_90 on the CPU (no GPU needed), in a subprocess without Triton's
interpreter: interpreted kernels have no IR.
"""

import json
import os
import subprocess
import sys

import pytest

ANALYSIS = r'''
import json
import torch
import triton
from torch._higher_order_ops import triton_kernel_wrap as wrap
from triton.backends.compiler import GPUTarget


class Hopper:  # the target for which the IR is made; nothing is launched
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Hopper())
from effcc.backends.triton import prefix_attention, rms_norm  # noqa: E402


def written(kernel, kwargs):
    """The tensor arguments Inductor believes `kernel` writes (torch ≥ 2.12 and older spellings)."""
    if hasattr(wrap, "identify_accessed_tensors"):
        accesses = wrap.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(wrap.identify_mutated_tensors(kernel, kwargs, {}))


H, N, D = 4, 256, 64
bf16 = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
f32 = lambda *shape: torch.empty(*shape, dtype=torch.float32)
vec = torch.empty(N, dtype=torch.int32)
strides = lambda *names: {f"stride_{name}{axis}": step for name in names for axis, step in (("h", D), ("n", H * D))}
short = (False, True)  # head dims up to 128, packed sequences up to SHORT_SEQUENCE
found = {
    "prefix_attention forward": written(prefix_attention._FORWARD[short], dict(
        Q=bf16(H, N, D), K=bf16(H, N, D), V=bf16(H, N, D), O=bf16(H, N, D), LSE=f32(H, N), GS=vec, PE=vec, SS=vec,
        **strides("q", "k", "v", "o"), N=N, N_BUCKET=N, heads_per_kv=1, qk_scale=0.18, HEAD_DIM=D, BLOCK_D=D)),
    "prefix_attention delta": written(prefix_attention._delta_kernel, dict(
        O=bf16(H, N, D), DO=bf16(H, N, D), DELTA=f32(H, N), **strides("o", "do"), N=N, HEAD_DIM=D, BLOCK_M=64, BLOCK_D=D)),
    "prefix_attention backward": written(prefix_attention._BACKWARD[short], dict(
        Q=bf16(H, N, D), K=bf16(H, N, D), V=bf16(H, N, D), DO=bf16(H, N, D), LSE=f32(H, N), DELTA=f32(H, N),
        DQ=bf16(H, N, D), DK=bf16(H, N, D), DV=bf16(H, N, D), GS=vec, PE=vec, SS=vec, VU=vec,
        **strides("q", "k", "v", "do", "dq", "dk", "dv"), N=N, N_BUCKET=N, heads_per_kv=1, kv_heads=H, qk_scale=0.18,
        sm_scale=0.125, HEAD_DIM=D, BLOCK_D=D)),
    "rms_norm forward, with residual": written(rms_norm._forward_kernel, dict(
        X=bf16(N, D), R=bf16(N, D), S=bf16(N, D), Y=bf16(N, D), W=bf16(D), B=bf16(D), RSTD=f32(N),
        stride_x=D, stride_r=D, stride_s=D, stride_y=D, n_rows=N, n_cols=D, eps=1e-6,
        HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, ROWS=4, BLOCK=D)),
    "rms_norm backward": written(rms_norm._backward_kernel, dict(
        DY=bf16(N, D), X=bf16(N, D), W=bf16(D), RSTD=f32(N), DS=bf16(N, D), DX=bf16(N, D), DW_PART=f32(D), DB_PART=f32(D),
        stride_dy=D, stride_x=D, stride_ds=D, stride_dx=D, n_rows=N, n_cols=D, rows_per_program=16,
        HAS_WEIGHT=True, HAS_BIAS=True, HAS_DS=True, ROWS=4, BLOCK=D, STAGES=2, ATOMIC=True, SUM_AT_END=False)),
}
print(json.dumps(found))
'''


def test_kernels_show_inductor_writes_to_their_outputs_only():
    from torch._higher_order_ops import triton_kernel_wrap

    if not hasattr(triton_kernel_wrap, "identify_accessed_tensors") and not hasattr(triton_kernel_wrap, "identify_mutated_tensors"):
        pytest.skip("this torch has neither spelling of Inductor's kernel-write analysis")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", ANALYSIS], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "assuming every input is mutated" not in run.stderr, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == {
        "prefix_attention forward": ["LSE", "O"],
        "prefix_attention delta": ["DELTA"],
        "prefix_attention backward": ["DK", "DQ", "DV"],
        "rms_norm forward, with residual": ["RSTD", "S", "Y"],
        "rms_norm backward": ["DB_PART", "DW_PART", "DX"],
    }
