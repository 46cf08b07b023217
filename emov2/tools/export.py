"""Export an EMO model to ONNX, TorchScript or CoreML, with a dynamic batch axis, and check parity.

ONNX goes through the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``);
the legacy TorchScript-based exporter is only tried if that fails. The batch axis is dynamic;
height and width are fixed to ``img_size``. :func:`check_onnx_parity` runs the file in ONNX
Runtime at a batch size other than the export batch and compares with PyTorch.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..deploy import deploy as _deploy
from ..factory import create_model

FORMATS = ("onnx", "torchscript", "coreml")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "coreml": ".mlpackage"}


class ExportError(RuntimeError):
    """An export that cannot be done (unknown format, missing optional dependency, ...)."""


def check_writable(path: str | os.PathLike, fmt: str = "onnx") -> Path:
    """Fail early, with one line naming ``path``, if the export could not be written there.

    Creates the missing parent folders and writes (then removes) a probe file beside ``path``, so
    unwritable folders, read-only or pseudo file systems (``/proc``) and paths under an existing
    regular file are reported before minutes of tracing. Raises :class:`ExportError`.
    """
    path = Path(path)
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ExportError(f"cannot write {path}: {folder} is a file, not a folder")
            break
    if path.is_dir() and fmt != "coreml":  # a Core ML package is itself a folder
        raise ExportError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
        if path.exists() and not path.is_dir() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {_why(exc, path.parent)}") from exc
    return path


def _why(exc: OSError, folder: Path) -> str:
    """A short reason for an ``OSError`` raised while writing into ``folder``."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied in {folder}"
    if exc.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if exc.errno == errno.ENOSPC:
        return "disk full"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{folder} is not a folder"
    return f"cannot create files in {folder} ({exc.strerror or exc})"


def default_output(name: str, fmt: str) -> Path:
    """``<name><suffix>`` in the current directory."""
    return Path(f"{name}{_SUFFIX[fmt]}")


def _example(batch: int, img_size: int, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int = 224, batch: int = 2,
                opset: int = 18) -> Path:
    """Write ``model`` as ONNX with input ``input`` (dynamic axis 0 ``batch``) and output ``logits``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = _example(batch, img_size)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    try:
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamo=True, opset_version=opset, dynamic_shapes=({0: batch_dim},),
                          external_data=False, verbose=False)
    except OSError:
        raise
    except Exception as dynamo_exc:
        try:
            torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                              dynamo=False, opset_version=opset,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        except OSError:
            raise
        except Exception as legacy_exc:
            raise ExportError(f"ONNX export failed: dynamo exporter: {dynamo_exc!r}; "
                              f"legacy exporter: {legacy_exc!r}") from legacy_exc
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike, img_size: int = 224, batch: int = 2) -> Path:
    """Write ``model`` traced with ``torch.jit.trace`` (the batch size is not baked into the graph)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(batch, img_size)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), (x,), check_trace=False)
    traced.save(str(path))
    return path


def export_coreml(model: nn.Module, path: str | os.PathLike, img_size: int = 224, batch: int = 1) -> Path:
    """Write ``model`` as a CoreML ML program (batch axis a range 1..64) via coremltools."""
    try:
        import coremltools as ct  # an optional dependency (extra "export"): imported only when used
    except ImportError as exc:
        raise ExportError("CoreML export needs coremltools: pip install coremltools "
                          "(conversion works on Linux; running the model needs macOS)") from exc
    path = Path(path)
    x = _example(batch, img_size)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), (x,), check_trace=False)
    shape = ct.Shape(shape=(ct.RangeDim(1, 64, default=batch), 3, img_size, img_size))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=shape)],
                         convert_to="mlprogram")
    mlmodel.save(str(path))
    return path


_EXPORTERS: dict[str, Callable[..., Path]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "coreml": export_coreml,
}


def export(model: nn.Module, fmt: str, path: str | os.PathLike, img_size: int = 224, batch: int = 2) -> Path:
    """Export ``model`` in ``fmt`` (one of :data:`FORMATS`) to ``path``.

    Raises :class:`ExportError` for an unknown format or a path that cannot be written (see
    :func:`check_writable`).
    """
    if fmt not in _EXPORTERS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = check_writable(path, fmt)
    try:
        return _EXPORTERS[fmt](model, path, img_size=img_size, batch=batch)
    except OSError as exc:  # e.g. the disk filled up while writing
        raise ExportError(f"cannot write {path}: {_why(exc, path.parent)}") from exc


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's)."""
    try:
        import onnxruntime as ort  # an optional dependency (extra "export"): imported only when used
    except ImportError as exc:
        raise ExportError("ONNX Runtime is not installed: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    ref, out = ref.double(), out.double()
    abs_err = (ref - out).abs().max().item()
    scale = ref.abs().max().item()
    return {"max_abs_err": abs_err, "max_rel_err": abs_err / scale if scale > 0 else abs_err,
            "ref_max_abs": scale}


def check_onnx_parity(model: nn.Module, path: str | os.PathLike, batch: int = 3, img_size: int = 224) -> dict:
    """Run the ONNX file in ONNX Runtime at ``batch`` and compare with ``model``.

    ``max_rel_err`` is the largest absolute difference divided by the largest absolute
    PyTorch output.
    """
    sess = onnx_session(path)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.eval()(x)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    if out.shape != ref.shape:
        raise ExportError(f"ONNX output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}")
    return {"batch": batch, **_compare(ref, out)}


def check_torchscript_parity(model: nn.Module, path: str | os.PathLike, batch: int = 3, img_size: int = 224) -> dict:
    """Load the TorchScript file and compare it with ``model`` at ``batch``."""
    loaded = torch.jit.load(str(path))
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.eval()(x)
        out = loaded(x)
    return {"batch": batch, **_compare(ref, out)}


def deploy_for_export(model: nn.Module) -> nn.Module:
    """``emov2.deploy`` with plain PyTorch ops and whole-batch stages, so that exporters (ONNX,
    TorchScript tracing) see neither oneDNN kernels nor batch-size-dependent slicing."""
    return _deploy(model.eval(), fuse=False, micro_batch_bytes=0)


def build_for_export(name: str, checkpoint: str | os.PathLike | None = None, num_classes: int = 1000,
                     deploy: bool = True) -> tuple[nn.Module, str]:
    """``emov2.create_model`` (+ :func:`deploy_for_export` when ``deploy``); returns (model, note)."""
    model = create_model(name, checkpoint=checkpoint, num_classes=num_classes).eval()
    if deploy:
        return deploy_for_export(model), "deploy (plain-op kernels)"
    return model, "eager"
