"""Lower a rewritten program to effcc's Triton ops, for torch.compile on CUDA.

    rms_norm(x, [d], γ, ε) (+ β)            → effcc::rms_norm_fwd(x, γ, β, ε)
    rms_norm(a + b, [d], γ, ε) (+ β)        → effcc::add_rms_norm_fwd(a, b, γ, β, ε)
                                                (the sum is an output too: the stream goes on)
    w8a8_linear(x, W, s_W, b)               → xq, s_x = per-token quantisation of x (ATen ops,
                                                once per x however many linears read it: Inductor
                                                fuses it into the op that produces x)
                                              effcc::int8_linear(xq, s_x, W, s_W, b)
w4a16_linear needs no lowering: on CUDA the op runs its Triton kernel.
Everything else is left to Inductor.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ...analysis.graph import value_of

aten = torch.ops.aten


def _bias_after(norm: fx.Node):
    """The `+ β` that follows a norm, when β is a stored vector and the norm has no other reader."""
    users = list(norm.users)
    if len(users) == 1 and users[0].target is aten.add.Tensor and users[0].args[0] is norm:
        beta = users[0].args[1]
        if isinstance(beta, fx.Node) and beta.op == "get_attr" and value_of(beta) is not None and value_of(beta).dim() == 1:
            return users[0], beta
    return None, None


def _fusable_add(x) -> bool:
    if not (isinstance(x, fx.Node) and x.target is aten.add.Tensor and len(x.args) == 2 and not x.kwargs):
        return False
    out = value_of(x)
    operands = [value_of(a) if isinstance(a, fx.Node) else None for a in x.args]
    return out is not None and all(v is not None and v.shape == out.shape and v.dtype == out.dtype for v in operands)


def lower_rms_norms(gm: fx.GraphModule, device_types=("cuda",)) -> int:
    """Replace RMSNorms (with their bias add and residual add) by effcc ops; returns how many.

    Only norms whose tensors live on `device_types` are lowered (the kernels are for GPUs;
    tests lower CPU graphs too, running the kernels in Triton's interpreter)."""
    from ...ops import norms  # noqa: F401 - defines torch.ops.effcc.rms_norm_fwd and friends

    graph = gm.graph
    lowered = 0
    for norm in list(graph.find_nodes(op="call_function", target=aten.rms_norm.default)):
        x, shape, weight, eps = (list(norm.args) + [None, None])[:4]
        val = value_of(norm)
        if val is None or len(shape) != 1 or eps is None or val.device.type not in device_types:
            continue
        fuse = _fusable_add(x)
        bias_add, beta = _bias_after(norm)
        last = bias_add or norm
        with graph.inserting_before(norm):
            if fuse:
                call = graph.call_function(torch.ops.effcc.add_rms_norm_fwd.default, (*x.args, weight, beta, float(eps)))
                stream = graph.call_function(operator.getitem, (call, 1))
                stream.meta = dict(x.meta)
                x.replace_all_uses_with(stream, delete_user_cb=lambda user: user is not call)
            else:
                call = graph.call_function(torch.ops.effcc.rms_norm_fwd.default, (x, weight, beta, float(eps)))
            y = graph.call_function(operator.getitem, (call, 0))
        y.meta = dict(last.meta)
        last.replace_all_uses_with(y)
        for dead in (bias_add, norm):
            if dead is not None:
                graph.erase_node(dead)
        if fuse and not x.users:
            graph.erase_node(x)
        lowered += 1
    graph.lint()
    gm.recompile()
    return lowered


def lower_quantized_linears(gm: fx.GraphModule, device_types=("cuda",)) -> int:
    """Split each W8A8 linear into a shared activation quantisation and the int8 GEMM; returns how many."""
    from ...ops import quantized_linear as q

    graph = gm.graph
    quantized = {}  # activation node → (codes, scales) nodes
    lowered = 0
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.effcc.w8a8_linear.default)):
        x, qweight, weight_scale, bias = node.args
        val = value_of(node)
        if val is None or val.device.type not in device_types or val.dtype == torch.float64:
            continue
        with graph.inserting_before(node):  # nodes are visited in order: the first reader of x
            if x not in quantized:
                pair = graph.call_function(q.quantize_per_token_int8_f32, (x,))
                quantized[x] = (graph.call_function(operator.getitem, (pair, 0)), graph.call_function(operator.getitem, (pair, 1)))
            codes, scales = quantized[x]
            call = graph.call_function(torch.ops.effcc.int8_linear.default, (codes, scales, qweight, weight_scale, bias, val.dtype))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        lowered += 1
    graph.lint()
    gm.recompile()
    return lowered
