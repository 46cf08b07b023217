"""Export an EMO model to ONNX, TorchScript or CoreML, with a dynamic batch axis, and check parity.

ONNX goes through the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``);
the legacy TorchScript-based exporter is only tried if that fails. The batch axis is dynamic;
height and width are fixed to ``img_size``. :func:`check_onnx_parity` runs the file in ONNX
Runtime at a batch size other than the export batch and compares with PyTorch.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..deploy import deploy as _deploy
from ..factory import create_model
from ..layers import ConvNormAct, ImprovedInvertedResidualMobileBlock, SpanningWindowAttention
from ..train.inference import load_model

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


@contextlib.contextmanager
def staged_outputs(targets: Sequence[str | os.PathLike], overwrite: bool = False) -> Iterator[list[Path]]:
    """Write a set of files together: yields temporary paths (in a hidden folder beside the first target, on the
    same file system) and renames them onto ``targets`` only after the block succeeded, so a failed or killed
    export replaces nothing and leaves no half-written file. Existing targets raise :class:`ExportError` unless
    ``overwrite``."""
    paths = [Path(t) for t in targets]
    existing = [str(t) for t in paths if t.exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                          "replace with --overwrite (overwrite=True in Python), or choose another output")
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=paths[0].parent, prefix=f".{paths[0].name}.", suffix=".partial"))
    try:
        staged = [folder / t.name for t in paths]
        yield staged
        for tmp, target in zip(staged, paths):
            if target.is_dir() and not target.is_symlink():  # a Core ML package is a folder
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def default_output(name: str, fmt: str) -> Path:
    """``<name><suffix>`` in the current directory."""
    return Path(f"{name}{_SUFFIX[fmt]}")


def _example(batch: int, img_size: int, in_chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int = 224, batch: int = 2,
                opset: int = 20) -> Path:
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


@contextlib.contextmanager
def _tracing_form(model: nn.Module) -> Iterator[None]:
    """Window attention in its tracing form (tensors of rank <= 5, which Core ML needs) while tracing;
    the ONNX graph form is restored afterwards."""
    changed = [m for m in model.modules() if isinstance(m, SpanningWindowAttention) and m.graph_form]
    for m in changed:
        m.graph_form = False
    try:
        yield
    finally:
        for m in changed:
            m.graph_form = True


def export_torchscript(model: nn.Module, path: str | os.PathLike, img_size: int = 224, batch: int = 2) -> Path:
    """Write ``model`` traced with ``torch.jit.trace`` (the batch size is not baked into the graph)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(batch, img_size)
    with torch.no_grad(), _tracing_form(model):
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
    with torch.no_grad(), _tracing_form(model):
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


def optimize_onnx(path: str | os.PathLike, out: str | os.PathLike | None = None, level: str = "all") -> Path:
    """Save the graph ONNX Runtime runs after its optimisations (``SessionOptions.optimized_model_filepath``)
    as ``<name>.ort.onnx`` beside ``path`` (or ``out``).

    ``level="all"`` includes the layout transformations for this CPU (blocked NCHWc convs, whose block
    size depends on the vector width): load the file on the same kind of CPU; ``"extended"`` stops
    before them and is portable. The saved file loads faster (no optimisation at start-up).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("ONNX Runtime is not installed: pip install onnxruntime") from exc
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise ExportError(f"unknown optimisation level {level!r}; choose one of {', '.join(levels)}")
    path = Path(path)
    out = Path(out) if out is not None else path.with_name(path.name[:-len(".onnx")] + ".ort.onnx"
                                                           if path.name.endswith(".onnx") else path.name + ".ort.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime could not optimise {path}: {exc}") from exc
    return out


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


def deploy_for_export(model: nn.Module, graph_form: bool = True, channel_multiple: int = 8) -> nn.Module:
    """``emov2.deploy`` with plain PyTorch ops and whole-batch stages, so that exporters (ONNX,
    TorchScript tracing) see neither oneDNN kernels nor batch-size-dependent slicing.

    ``graph_form`` writes window attention as :func:`~emov2.layers.window_attention.windowed_attention_graph`
    (fewer transposes, MatMul/Softmax patterns ONNX Runtime fuses); ``channel_multiple`` pads each
    attention head's values with zero channels so that the expanded width is a multiple of it (ONNX
    Runtime's blocked NCHWc convs need multiples of 8; EMOv2-1M/2M's last stage has 630 / 700).
    Outputs are unchanged (zero channels stay zero through GELU, attention, the DW conv and SiLU).
    """
    model = _deploy(model.eval(), fuse=False, micro_batch_bytes=0)
    for module in model.modules():
        if isinstance(module, SpanningWindowAttention):
            module.graph_form = graph_form
        if channel_multiple > 1 and isinstance(module, ImprovedInvertedResidualMobileBlock):
            pad_value_heads(module, channel_multiple)
    return model


@torch.no_grad()
def pad_value_heads(block: nn.Module, multiple: int = 8) -> bool:
    """Widen a deployed attention block's values per head with zero channels (in place) so that the
    expanded width is a multiple of ``multiple``; returns whether it changed anything.

    Applies to blocks whose attention feeds the DW conv and then ``proj`` (the i2RMB in its default
    order, BatchNorm already folded): the value conv gets zero rows, the DW conv zero filters and
    ``proj`` zero columns, so every output is exactly the same.
    """
    attn, dw, proj = block.mixer, block.dw, block.proj
    if not (isinstance(attn, SpanningWindowAttention) and attn.value_position == 'post'
            and not block.parallel and not block.conv_first and isinstance(block.se, nn.Identity)
            and isinstance(dw, ConvNormAct) and isinstance(dw.norm, nn.Identity) and type(dw.conv) is nn.Conv2d
            and type(attn.v) is nn.Conv2d and attn.v.groups == 1 and type(proj) is nn.Conv2d
            and dw.conv.groups == dw.conv.in_channels == attn.v.out_channels):
        return False
    heads, width = attn.num_heads, attn.v.out_channels
    if width % multiple == 0:
        return False
    dv = width // heads
    dv_new = dv
    while (heads * dv_new) % multiple:
        dv_new += 1
    index = torch.cat([torch.arange(h * dv_new, h * dv_new + dv) for h in range(heads)])

    def widen(t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = heads * dv_new
        out = t.new_zeros(shape)
        out.index_copy_(dim, index, t)
        return out

    def conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> nn.Conv2d:
        new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, groups, bias is not None).to(weight.dtype)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        return new.requires_grad_(False)

    v = attn.v
    attn.v = conv_like(v, widen(v.weight, 0), None if v.bias is None else widen(v.bias, 0), 1)
    c = dw.conv
    dw.conv = conv_like(c, widen(c.weight, 0), None if c.bias is None else widen(c.bias, 0), heads * dv_new)
    proj_bias = proj.bias
    block.proj = conv_like(proj, widen(proj.weight, 1), proj_bias, 1)
    block.dim_mid = heads * dv_new
    return True


def build_for_export(name: str, checkpoint: str | os.PathLike | None = None, num_classes: int | None = None,
                     deploy: bool = True) -> tuple[nn.Module, str]:
    """The model ``name`` with ``checkpoint``'s weights (built as the checkpoint's metadata describes it, e.g. a
    trained run's depths; :func:`emov2.train.inference.load_model`), randomly initialised without one
    (+ :func:`deploy_for_export` when ``deploy``); returns (model, note). ``num_classes`` None: the checkpoint's,
    else 1000."""
    if checkpoint is None:
        model = create_model(name, num_classes=1000 if num_classes is None else num_classes).eval()
    else:
        model, _ = load_model(str(checkpoint), model=name, num_classes=num_classes)
    if deploy:
        return deploy_for_export(model), "deploy (plain-op kernels)"
    return model, "eager"
