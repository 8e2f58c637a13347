"""Export a rewritten program to ONNX and check it in ONNX Runtime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ...capture import eval_mode
from ...errors import EffccError, VerificationError
from ...verify import Comparison, compare

ONNX_RTOL = 1e-4  # float32 in ONNX Runtime vs float32 in PyTorch: kernel order differs, nothing else
RMS_NORM_OPSET = 23  # the first opset with RMSNormalization


def _uses(model: nn.Module, target) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any(node.target is target for node in graph.nodes)


def export_onnx(model: nn.Module, path, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None, opset: int | None = None) -> Path:
    """Write `model(*args, **kwargs)` as an ONNX file through torch.onnx (dynamo exporter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"dynamo": True, "external_data": False}
    if opset is None and _uses(model, torch.ops.aten.rms_norm.default):
        opset = RMS_NORM_OPSET  # a real RMSNormalization node instead of a pile of primitives
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
    quiet = io.StringIO()
    try:
        with torch.no_grad(), eval_mode(model), contextlib.redirect_stdout(quiet), _quiet_exporter():
            program = torch.onnx.export(model, args, kwargs=kwargs or None, **options)
    except Exception as error:  # any exporter failure, reported with its own first line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise EffccError(f"ONNX export of {type(model).__name__} failed: {first[:400]}") from error
    program.save(os.fspath(path))
    return path


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
