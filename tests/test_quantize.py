"""int8 (ONNX Runtime static QDQ quantization): Q/DQ graph, closeness to float, agreement on the trained demo."""
from pathlib import Path

import numpy as np
import pytest
import torch

import emov2
from emov2.tools.export import deploy_for_export, export_onnx
from emov2.tools.quantize import calibration_images, predict_onnx, quantize_onnx, top1_agreement

pytest.importorskip("onnxruntime")
IMG = 32
DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo" / "last"
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_int8_file_is_qdq_and_close_on_digits(tmp_path):
    """The int8 copy holds Q/DQ nodes and runs; its logits follow the float ones on held-out digits."""
    torch.manual_seed(0)
    model = emov2.create_model("emov2_1m", num_classes=10, depths=[1, 2, 2, 1]).eval()
    with torch.no_grad():
        model.get_classifier().weight.normal_(0, 1.0)
    fp32 = export_onnx(deploy_for_export(model), tmp_path / "m.onnx", img_size=IMG)
    cal = calibration_images("digits", n=32, img_size=IMG, split="train", **NORM)
    int8 = quantize_onnx(fp32, tmp_path / "m.int8.onnx", cal)
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    test = calibration_images("digits", n=64, img_size=IMG, split="test", **NORM)
    a, b = predict_onnx(fp32, test), predict_onnx(int8, test)
    assert a.shape == b.shape == (64, 10)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


@pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="needs a trained demo (emov2 demo --out runs/demo)")
def test_int8_agrees_with_trained_demo_on_held_out_digits(tmp_path):
    """On the demo's trained model (runs/demo), int8 predicts the float model's class on >= 99% of held-out digits."""
    model = emov2.create_model("emov2_1m", num_classes=10, depths=[1, 2, 2, 1])
    emov2.load_checkpoint(model, DEMO / "model.safetensors")
    fp32 = export_onnx(deploy_for_export(model.eval()), tmp_path / "m.onnx", img_size=32)
    int8 = quantize_onnx(fp32, tmp_path / "m.int8.onnx", calibration_images("digits", n=256, img_size=32, **NORM))
    res = top1_agreement(fp32, int8, calibration_images("digits", n=360, img_size=32, split="test", **NORM))
    assert res["agreement"] >= 0.99, res


def test_calibration_sources(tmp_path):
    photos = calibration_images("photos", n=4, img_size=48)
    assert photos.shape == (4, 3, 48, 48) and photos.dtype == np.float32 and photos.std() > 0.1
    from emov2.tools.export import ExportError

    with pytest.raises(ExportError, match="neither"):
        calibration_images(tmp_path / "missing", n=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images"):
        calibration_images(tmp_path / "empty", n=2)
