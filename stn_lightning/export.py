"""Export a trained classifier: an ONNX model or a ``torch.export`` program, with a dynamic batch size.

Both run the pure-PyTorch sampler (``backend="torch"`` on every SpatialTransformer during the export: Triton
kernels cannot be exported) and return the logits (B, num_classes) and, for models with a transformer, the warp
parameters (B, K, P). A model without a transformer (``fusion="none"``) gives the logits only.

Two things the ONNX path does on top of ``torch.onnx.export(..., dynamo=True)`` (measured with torch 2.14,
onnxscript 0.7, onnxruntime 1.32):

* the thin-plate spline's solve is a matrix inverse of a constant (N + 3) x (N + 3) system, and ONNX has no
  inverse: ``aten.linalg_inv`` is decomposed into Newton-Schulz iterations (matrix products only) first;
* the exporter's graph optimiser (``optimize=True``) wrote an invalid graph for the sampler: one of onnxscript's
  default rewrite rules turns the sampler's clamps (Max then Min) into a Clip that reads a value no node makes
  any more, which onnxruntime refuses to load. So the graph is exported unoptimised and only the optimiser's
  constant folding and dead-node removal run (the spline's inverse becomes a constant: 1124 nodes -> 340).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .kernels.reference import normalize_size
from .transformer import SpatialTransformer
from .writing import atomic_path

__all__ = [
    "EXPORT_FORMATS",
    "MIN_OPSET",
    "check_exporter",
    "example_input",
    "export_file",
    "export_onnx",
    "export_program",
    "format_of",
]

#: File extensions and the format each one writes.
EXPORT_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
#: The lowest ONNX opset written (17 has everything the graph needs; 18 is the exporter's own default).
MIN_OPSET = 17
_DEFAULT_OPSET = 18
# Newton-Schulz iterations for the spline's inverse: quadratic convergence after about 2 log2(cond) steps; the
# 4 x 4 lattice (cond ~ 1e2) is at float64 precision after 25, and extra steps keep it there.
_INVERSE_STEPS = 80
# What torch.onnx.export(dynamo=True) imports.
_ONNX_PACKAGES = ("onnx", "onnxscript")


def format_of(path: str | Path) -> str:
    """The export format ("onnx" or "pt2") of an output path, from its extension.

    Raises:
        ValueError: for any other extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        known = ", ".join(EXPORT_FORMATS)
        raise ValueError(f"cannot export to {str(path)!r}: expected an output ending in {known}")
    return EXPORT_FORMATS[suffix]


class _Exported(nn.Module):
    # The classifier with a plain output signature: (logits, params), or logits alone without a transformer.
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.has_params = getattr(classifier, "transformer", None) is not None

    def forward(self, x: Tensor) -> Any:
        logits, params = self.classifier(x)
        return (logits, params) if self.has_params else logits


def _classifier(module: nn.Module) -> nn.Module:
    # An STNModule holds its STNClassifier as ``model``; an STNClassifier (any (logits, params) module) is used as is.
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


@contextlib.contextmanager
def _exportable(module: nn.Module) -> Iterator[_Exported]:
    """The module in eval mode with the PyTorch sampler, as an ``_Exported``; its modes are restored afterwards."""
    transformers = [m for m in module.modules() if isinstance(m, SpatialTransformer)]
    backends = [t.backend for t in transformers]
    training = {m: m.training for m in module.modules()}
    try:
        for t in transformers:
            t.backend = "torch"
        module.eval()
        yield _Exported(_classifier(module)).eval()
    finally:
        for t, backend in zip(transformers, backends, strict=True):
            t.backend = backend
        for m, mode in training.items():
            m.training = mode


def example_input(module: nn.Module, batch_size: int = 2) -> Tensor:
    """An example batch (batch_size, in_chans, H, W) of the shape that the module's hyperparameters give.

    Args:
        module: an STNModule (or any module with ``hparams`` holding ``in_chans`` and ``image_size``).
        batch_size: the example's batch size; 2 or more, so that the export keeps the batch dimension dynamic.

    Returns:
        Standard-normal images (batch_size, in_chans, H, W).
    """
    hparams = getattr(module, "hparams", {})
    if "in_chans" not in hparams or "image_size" not in hparams:
        raise ValueError(f"{type(module).__name__} has no in_chans and image_size hyperparameters: pass an example")
    h, w = normalize_size(hparams["image_size"])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, int(hparams["in_chans"]), h, w, generator=generator)


def _check_example(example: Tensor) -> None:
    if not isinstance(example, Tensor) or example.dim() != 4 or example.shape[0] < 2:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise ValueError(f"expected an example batch (B >= 2, C, H, W), got {shape}")


def _trace(model: _Exported, example: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def export_program(module: nn.Module, path: str | Path | None = None, example: Tensor | None = None) -> Any:
    """Trace the classifier with ``torch.export`` and optionally save the program (``.pt2``).

    The program takes images (B, C, H, W) with any B and returns (logits (B, num_classes), params (B, K, P)), or the
    logits alone for a model without a transformer. Load a saved one with ``torch.export.load(path).module()``.

    Args:
        module: an STNModule or STNClassifier; left in the mode (and with the sampler backend) it had.
        path: where to save the program, or None.
        example: an example batch (B >= 2, C, H, W); default :func:`example_input`.

    Returns:
        The ``torch.export.ExportedProgram``.
    """
    example = example_input(module) if example is None else example
    _check_example(example)
    with _exportable(module) as model:
        program = _trace(model, example)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp))
    return program


def _inverse(a: Tensor) -> Tensor:
    # Newton-Schulz iterations X <- X (2I - A X) from X0 = A^T / (|A|_1 |A|_inf): matrix products only, which ONNX
    # has. Used for the spline's constant system only, which the export then folds into a constant.
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm = a.abs().sum(-2).amax(-1, keepdim=True) * a.abs().sum(-1).amax(-1, keepdim=True)
    x = a.transpose(-1, -2) / norm.unsqueeze(-1)
    for _ in range(_INVERSE_STEPS):
        x = x @ (2 * eye - a @ x)
    return x


def check_exporter(fmt: str) -> None:
    """Raise ValueError when the packages that the export format ("onnx" or "pt2") needs are not installed."""
    if fmt != "onnx":
        return
    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs the packages {', '.join(missing)}: pip install {' '.join(missing)}")


def export_onnx(
    module: nn.Module, path: str | Path, example: Tensor | None = None, opset: int = _DEFAULT_OPSET
) -> list[str]:
    """Write the classifier as an ONNX model with a dynamic batch size.

    Inputs: ``images`` (B, C, H, W) float32. Outputs: ``logits`` (B, num_classes) and ``params`` (B, K, P), or only
    ``logits`` for a model without a transformer.

    Args:
        module: an STNModule or STNClassifier; left in the mode (and with the sampler backend) it had.
        path: the ``.onnx`` file to write.
        example: an example batch (B >= 2, C, H, W); default :func:`example_input`.
        opset: the ONNX opset, at least :data:`MIN_OPSET`.

    Returns:
        The output names.

    Raises:
        ValueError: when the ONNX exporter's packages (onnx, onnxscript) are missing, or for an opset below 17.
    """
    check_exporter("onnx")
    if opset < MIN_OPSET:
        raise ValueError(f"expected an ONNX opset >= {MIN_OPSET}, got {opset}")
    example = example_input(module) if example is None else example
    _check_example(example)
    with _exportable(module) as model:
        names = ["logits", "params"] if model.has_params else ["logits"]
        program = _trace(model, example)
    program = program.run_decompositions({torch.ops.aten.linalg_inv.default: _inverse})
    onnx_program = torch.onnx.export(
        program,
        (example,),
        input_names=["images"],
        output_names=names,
        opset_version=opset,
        dynamo=True,
        optimize=False,  # the full optimiser's rewrite rules break this graph: only its constant folding below
        verbose=False,
    )
    if onnx_program is None:  # only the TorchScript exporter returns nothing
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    _fold_constants(onnx_program.model)
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp), external_data=False)
    return names


def _fold_constants(model: Any) -> None:
    # The part of onnxscript's optimiser that is safe here: constant folding (the spline's inverse and the casts of
    # Python numbers become initializers) and the removal of what no output needs. In place, on the onnx_ir model.
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)


def export_file(module: nn.Module, path: str | Path, example: Tensor | None = None) -> str:
    """Export to ``path``: ONNX for ``.onnx``, a ``torch.export`` program for ``.pt2`` (its folder is made).

    Args:
        module: an STNModule or STNClassifier.
        path: the file to write.
        example: an example batch (B >= 2, C, H, W); default :func:`example_input`.

    Returns:
        The format written, "onnx" or "pt2".

    Raises:
        ValueError: for another extension, or when the format's exporter is not installed.
    """
    fmt = format_of(path)
    check_exporter(fmt)
    if fmt == "onnx":
        export_onnx(module, path, example)
    else:
        export_program(module, path, example)
    return fmt
