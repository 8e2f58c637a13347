"""Export a rewritten program to ONNX and check it in ONNX Runtime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ...capture import eval_mode
from ...errors import EffccError, VerificationError, first_line
from ...verify import Comparison, compare

ONNX_RTOL = 1e-4  # float32 in ONNX Runtime vs float32 in PyTorch: kernel order differs, nothing else
RMS_NORM_OPSET = 23  # the first opset with RMSNormalization: export_onnx(..., opset=RMS_NORM_OPSET)


def _uses(model: nn.Module, target) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any(node.target is target for node in graph.nodes)


def export_onnx(model: nn.Module, path, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None, opset: int | None = None,
                name: str | None = None) -> Path:
    """Write `model(*args, **kwargs)` as an ONNX file through torch.onnx (dynamo exporter); `name` is the model's
    in errors (a rewritten model is a GraphModule)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"dynamo": True, "external_data": False}
    # The exporter's default opset unless asked: opset 23 (RMSNorm as RMSNormalization nodes, RMS_NORM_OPSET)
    # also turns attention into ONNX Attention, which torch.onnx refuses for fewer kv heads than q heads,
    # and rotary embeddings into RotaryEmbedding nodes that ONNX Runtime 1.32 rejects for partial rotary
    # (GPT-NeoX, Phi): measured no faster in ONNX Runtime (README), so it is for those who ask.
    if opset is not None:
        options["opset_version"] = opset
    if dynamic_shapes is not None:
        options["dynamic_shapes"] = dynamic_shapes
    from . import complex_linear, quantized, sparse  # onnxscript, which torch.onnx.export loads anyway

    table = {**quantized.TRANSLATIONS, **complex_linear.TRANSLATIONS, **sparse.TRANSLATIONS}

    # A GraphModule shows which ops it calls; any other module is only known after torch.export,
    # so it gets them all (an entry for an op that never appears changes nothing).
    if not isinstance(model, fx.GraphModule):
        options["custom_translation_table"] = table
    elif translations := {op: fn for op, fn in table.items() if _uses(model, op)}:
        options["custom_translation_table"] = translations  # the exporter adds their domains' opset imports
    if _uses(model, torch.ops.effcc.fairy2i_linear.default):
        # The exporter's constant folding would turn the 2-bit codes into dense float weights in
        # the file; ONNX Runtime still folds them when a session loads (complex_linear.py).
        options["optimize"] = False
    if _adds_a_tiny_constant(model):
        # The exporter's optimizer takes `x + c` for `x` when |c| ≤ 1e-8 (onnxscript's add-zero rule):
        # an RMSNorm with ε = 1e-12 (ViT's, DeiT's, kept by ln_to_rmsnorm) would lose its ε and give
        # inf on a zero row.  Unoptimised, the file keeps the Add; ONNX Runtime optimises at load.
        options["optimize"] = False
    quiet = io.StringIO()
    try:
        with torch.no_grad(), eval_mode(model), contextlib.redirect_stdout(quiet), _quiet_exporter():
            program = torch.onnx.export(model, args, kwargs=kwargs or None, **options)
    except Exception as error:  # any exporter failure, reported by its root cause and the node it stopped at
        raise EffccError(f"ONNX export of {name or type(model).__name__} failed: {_export_failure(error, model)}") from error
    program.save(os.fspath(path))
    return path


def _adds_a_tiny_constant(model: nn.Module) -> bool:
    """Whether the graph adds a constant 0 < |c| ≤ 1e-8: an RMSNorm's ε, written out or as aten.rms_norm."""
    def tiny(value) -> bool:
        return isinstance(value, float) and 0 < abs(value) <= 1e-8

    for node in getattr(model, "graph", fx.Graph()).nodes:
        if node.target is torch.ops.aten.rms_norm.default and tiny((list(node.args) + [None] * 4)[3]):
            return True
        if node.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar) and any(tiny(arg) for arg in node.args):
            return True
    return False


def _export_failure(error: BaseException, model: nn.Module) -> str:
    """The exporter wraps its root cause ("No ONNX function found for <op>") in errors whose first lines
    are generic next steps: say the root cause, and the node (with its layer, when the model is a
    graph) that the exporter was translating."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    first_lines = [first_line(e, limit=10_000) for e in chain]
    reason = first_lines[-1][:400]
    translating = next((m for line in first_lines if (m := re.search(r"translating node %(\w+) .*target=([\w.:]+)", line))), None)
    if translating is None:
        return reason
    name, target = translating.groups()
    node = next((n for n in getattr(model, "graph", fx.Graph()).nodes if n.name == name), None)
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    layer = f" in {next(reversed(stack.values()))[0]}" if stack else ""
    return f"node {name} ({target}){layer}: {reason}. An op with no ONNX form needs a translation registered with torch.onnx"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing optional package (torchvision ops): not ours to show."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def onnx_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path, model: nn.Module, args: tuple, kwargs: dict | None = None, *, rtol: float = ONNX_RTOL) -> Comparison:
    """Run the ONNX file in ONNX Runtime and compare with `model` run by PyTorch on the same inputs.

    Raises VerificationError above `rtol` (max|Δ| / max|ref|, per output)."""
    session = onnx_session(path)
    leaves = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(leaves):
        raise EffccError(f"{path} takes {len(names)} input(s) but {len(leaves)} tensor(s) were given")
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, leaves)}
    got = [torch.from_numpy(np.asarray(v)) for v in session.run(None, feed)]
    with torch.no_grad(), eval_mode(model):
        want = model(*args, **(kwargs or {}))
    want = [t for t in tree_flatten(want)[0] if isinstance(t, torch.Tensor)]
    comparison = compare(got, want)
    if not comparison.within(rtol):
        raise VerificationError(f"ONNX Runtime's outputs for {path} differ from PyTorch's: {comparison} (tolerance {rtol:.0e})")
    return comparison
