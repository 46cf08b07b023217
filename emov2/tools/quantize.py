"""int8 post-training static quantization, calibrated on real pixels: ONNX Runtime (QDQ files) and PyTorch PT2E.

:func:`quantize_onnx` runs ONNX Runtime's ``quant_pre_process`` (shape inference, graph clean-up) and
``quantize_static`` in QDQ form (uint8 activations, int8 per-channel weights: the form ONNX Runtime's
x86 kernels run fastest without VNNI), calibrated by min-max on images that
:func:`calibration_images` draws from scikit-learn's digits (upsampled) or scikit-image's
photographs (random crops), or from a folder of images. :func:`top1_agreement` compares the int8
file with the float one on held-out images.

:func:`quantize_pt2e` is the PyTorch route: ``torch.export`` of the model, ``prepare_pt2e`` with the
x86 inductor quantizer (uint8 activations, int8 per-channel weights), min-max calibration on the same
kind of images, ``convert_pt2e``. The result runs as a reference graph (quantize / dequantize around float
ops, what :func:`pt2e_top1_agreement` checks); :func:`compile_int8` lowers it with ``torch.compile``
(inductor, weight freezing) into oneDNN int8 convolutions and linears. In torch 2.14 the PT2E API
lives in ``torchao`` (``torchao.quantization.pt2e``; ``torch.ao.quantization.quantize_pt2e`` is gone),
an optional dependency; the torch.ao location is used where it still exists.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..train.demo import load_digits_split
from .export import ExportError, onnx_session

if TYPE_CHECKING:  # an optional dependency, imported where quantize_onnx runs
    import onnx

__all__ = ["CALIBRATION_SETS", "calibration_images", "attention_product_nodes", "quantize_onnx", "top1_agreement",
           "predict_onnx", "quantize_pt2e", "compile_frozen", "compile_int8", "pt2e_top1_agreement", "agreement"]

CALIBRATION_SETS = ("digits", "photos")
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "moon", "page", "text", "coins",
           "horse", "immunohistochemistry", "hubble_deep_field", "retina", "logo")


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).numpy().astype(np.float32)


def _digits(images: np.ndarray, img_size: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1)


def _photos(n: int, img_size: int, seed: int) -> torch.Tensor:
    """``n`` random square crops (20-100% of the short side) of scikit-image's photographs, resized."""
    import skimage.data  # an optional dependency of the tools (scikit-image): imported only when used

    rng = np.random.default_rng(seed)
    pictures = []
    for name in _PHOTOS:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        img = img / (255.0 if img.max() > 1.0 else 1.0)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        pictures.append(torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1))
    out = []
    for i in range(n):
        p = pictures[i % len(pictures)]
        h, w = p.shape[1:]
        side = int(min(h, w) * rng.uniform(0.2, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = p[:, top:top + side, left:left + side].unsqueeze(0)
        out.append(F.interpolate(crop, size=(img_size, img_size), mode="bilinear", align_corners=False))
    return torch.cat(out).clamp(0, 1)


def _folder(path: Path, n: int, img_size: int, split: str) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise ExportError(f"no images (png/jpg/bmp/webp) under {path}")
    files = files[0::2] if split == "train" else files[1::2]  # disjoint: calibration never sees the held-out half
    if not files:
        raise ExportError(f"{path} holds one image: calibration and the held-out check need at least 2 "
                          "(alternate files are held out)")
    out = []
    for f in files[:n]:
        try:
            img = Image.open(f).convert("RGB").resize((img_size, img_size), Image.BILINEAR)
        except OSError as exc:
            raise ExportError(f"cannot read calibration image {f}: {exc}") from exc
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def calibration_images(source: str | os.PathLike, n: int = 64, img_size: int = 224,
                       mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                       split: str = "train", seed: int = 0) -> np.ndarray:
    """``(n, 3, img_size, img_size)`` float32 images, normalised with ``mean`` / ``std``.

    ``source``: ``"digits"`` (scikit-learn's 8x8 scans upsampled; ``split`` picks the demo's stratified
    train or test part, so calibration and agreement never share an image), ``"photos"``
    (scikit-image's photographs, random crops) or a folder of image files (sorted; ``split`` takes every
    other file, the train part the even positions, the test part the odd ones).
    """
    if str(source) == "digits":
        tx, _, vx, _ = load_digits_split(seed=seed)
        x = _digits((tx if split == "train" else vx)[:n], img_size)
    elif str(source) == "photos":
        x = _photos(n, img_size, seed if split == "train" else seed + 1)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ExportError(f"calibration source {source!s} is neither {' nor '.join(CALIBRATION_SETS)} "
                              "nor a folder of images")
        x = _folder(folder, n, img_size, split)
    return _normalize(x, mean, std)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an array of images, a few at a time."""

    def __init__(self, name: str, images: np.ndarray, batch: int = 8) -> None:
        self.name, self.images, self.batch = name, images, batch
        self._it: Iterator[dict] | None = None

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = iter({self.name: self.images[i:i + self.batch]} for i in range(0, len(self.images), self.batch))
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def attention_product_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the attention products of an ONNX graph: every Softmax, and every MatMul of two activations
    (no initializer among its inputs), as in ``softmax(q k^T) v``; weight MatMuls (linear layers) are not among them."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Softmax" or (n.op_type == "MatMul" and not any(i in weights for i in n.input))]


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                  per_channel: bool = True, float_attention: bool = True) -> Path:
    """Write an int8 QDQ copy of the float ONNX file ``fp32_path``, calibrated (min-max) on ``calibration``.

    ``float_attention`` keeps the attention products (:func:`attention_product_nodes`) in float32: ONNX Runtime's
    QLinearSoftmax and activation-by-activation QLinearMatMul take about twice the time of the float ops on an
    AVX2 core (EMOv2-1M at batch 1: 6.6 vs 3.2 ms), and the attention weights keep their precision. Convolutions
    and weight MatMuls are quantized either way."""
    try:  # optional dependencies (pip install emov2[export])
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ExportError("int8 quantization needs onnxruntime (pip install onnxruntime)") from exc
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise ExportError(f"no ONNX file at {fp32_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    input_name = onnx_session(fp32_path).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="emov2-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        excluded = attention_product_nodes(onnx.load(str(pre))) if float_attention else []
        quantize_static(str(pre), str(out_path), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    return out_path


def predict_onnx(path: str | os.PathLike, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of the ONNX file on ``images`` (float32 NCHW), ``batch`` at a time."""
    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def top1_agreement(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, images: np.ndarray) -> dict:
    """Share of ``images`` on which both files predict the same class, and their logit difference."""
    return agreement(predict_onnx(fp32_path, images), predict_onnx(int8_path, images))


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Top-1 agreement of two logit arrays (float reference ``a``, quantized ``b``) and their largest difference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.abs(a).max()) or 1.0
    return {"n": int(len(a)), "agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(a - b).max()), "rel_logit_diff": float(np.abs(a - b).max() / scale)}


def _pt2e_api() -> tuple[Callable, Callable, Callable]:
    """(prepare_pt2e, convert_pt2e, make_quantizer) from torch.ao (torch < 2.10) or torchao."""
    try:
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        try:  # an optional dependency (pip install torchao): imported only when used
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
        except ImportError as exc:
            raise ExportError("PT2E int8 needs torchao with this torch (torch.ao.quantization.quantize_pt2e "
                              f"is gone in torch {torch.__version__}): pip install torchao") from exc

    def make_quantizer() -> object:
        return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())

    return prepare_pt2e, convert_pt2e, make_quantizer


def quantize_pt2e(model: nn.Module, calibration: np.ndarray | torch.Tensor, batch: int = 8) -> nn.Module:
    """int8 copy of the float ``model`` by PyTorch 2 export quantization (x86 inductor quantizer),
    calibrated (min-max observers) on ``calibration`` images, ``batch`` at a time.

    ``model`` must be exportable by ``torch.export`` (EMO models: :func:`~emov2.tools.export.deploy_for_export`;
    the batch axis stays dynamic). Returns the converted reference graph (a ``torch.fx.GraphModule``);
    run it through :func:`compile_int8` for int8 kernels.
    """
    prepare_pt2e, convert_pt2e, make_quantizer = _pt2e_api()
    images = torch.as_tensor(np.asarray(calibration), dtype=torch.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ExportError(f"calibration images must be a non-empty (N, C, H, W) array, got shape {tuple(images.shape)}")
    example = images[:min(batch, len(images))]
    dims = ({0: torch.export.Dim("batch", min=1, max=4096)},) if len(example) > 1 else None
    try:
        exported = torch.export.export(model.eval(), (example,), dynamic_shapes=dims).module()
    except Exception as exc:  # torch.export reports untraceable code with many exception types
        raise ExportError(f"torch.export could not capture the model for PT2E: {type(exc).__name__}: {exc}") from exc
    prepared = prepare_pt2e(exported, make_quantizer())
    with torch.no_grad():
        for i in range(0, len(images), batch):
            prepared(images[i:i + batch])
    return convert_pt2e(prepared)


class _FrozenCompiled:
    """``torch.compile`` (static shapes) whose compilations run with inductor's weight freezing switched on.

    Freezing is set through ``torch._inductor.config`` around each call: passed as
    ``torch.compile(options={"freezing": True})`` it fails on PT2E graphs in torch 2.14
    (``UnsupportedOperatorException: onednn.qconv_prepack.default`` while folding the int8 weights)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)


def compile_frozen(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` for CPU inference: inductor with weight freezing (constant-folded, prepacked oneDNN
    weights), one compilation per batch size on its first call. Call it under ``torch.no_grad()`` /
    ``torch.inference_mode()``. Used for the float models and for :func:`compile_int8` alike."""
    return _FrozenCompiled(model)


def compile_int8(quantized: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Lower a :func:`quantize_pt2e` graph with :func:`compile_frozen`: inductor folds the quantize /
    dequantize pairs into oneDNN int8 convolutions and linears."""
    return compile_frozen(quantized)


def pt2e_top1_agreement(model: nn.Module, quantized: Callable[[torch.Tensor], torch.Tensor],
                        images: np.ndarray | torch.Tensor, batch: int = 64) -> dict:
    """:func:`agreement` of the float ``model`` and the PT2E int8 ``quantized`` (reference graph or compiled) on ``images``."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    with torch.no_grad():
        a = torch.cat([model.eval()(x[i:i + batch]) for i in range(0, len(x), batch)])
        b = torch.cat([quantized(x[i:i + batch]) for i in range(0, len(x), batch)])
    return agreement(a.numpy(), b.numpy())
