"""Export: ONNX (dynamic batch, ONNX Runtime parity), TorchScript round trip, Core ML conversion, clear errors."""
import sys

import pytest
import torch

import emov2
from emov2.tools.export import ExportError, check_onnx_parity, check_torchscript_parity, export

IMG = 64


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = emov2.create_model("emov2_1m", num_classes=10).eval()
    with torch.no_grad():  # a non-trivial head so that logits are O(1) and a relative error means something
        model.get_classifier().weight.normal_(0, 1.0)
    return model


def test_onnx_dynamic_batch_parity(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export(tiny_model, "onnx", tmp_path / "m.onnx", img_size=IMG, batch=2)
    graph_input = onnx.load(str(path)).graph.input[0]
    dim0 = graph_input.type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch axis must be symbolic"
    res = check_onnx_parity(tiny_model, path, batch=3, img_size=IMG)
    assert res["ref_max_abs"] > 1e-3
    assert res["max_rel_err"] < 1e-4


def test_torchscript_round_trip(tiny_model, tmp_path):
    path = export(tiny_model, "torchscript", tmp_path / "m.pt", img_size=IMG, batch=2)
    res = check_torchscript_parity(tiny_model, path, batch=3, img_size=IMG)
    assert res["max_abs_err"] == 0.0 or res["max_rel_err"] < 1e-6


def test_unknown_format(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="unknown format"):
        export(tiny_model, "tflite", tmp_path / "m.tflite", img_size=IMG)


def test_coreml_missing_is_clear(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # as if it were not installed
    with pytest.raises(ExportError, match="pip install coremltools"):
        export(tiny_model, "coreml", tmp_path / "m.mlpackage", img_size=IMG)


def test_coreml_conversion_has_a_flexible_batch(tmp_path):
    """Conversion only: running a Core ML model needs macOS."""
    ct = pytest.importorskip("coremltools")
    from emov2.tools.export import build_for_export

    model, note = build_for_export("emov2_1m", num_classes=10)
    path = export(model, "coreml", tmp_path / "m.mlpackage", img_size=IMG, batch=1)
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    batch = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges[0]
    assert (batch.lowerBound, batch.upperBound) == (1, 64)
    assert list(spec.description.input[0].type.multiArrayType.shape)[1:] == [3, IMG, IMG]


def test_cli_export_unknown_model_and_format(tmp_path):
    from typer.testing import CliRunner

    from emov2.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", "--model", "emov9_1m", "--format", "onnx"])
    assert res.exit_code != 0 and "unknown model" in res.output
    res = runner.invoke(app, ["export", "--model", "emov2_1m", "--format", "tflite"])
    assert res.exit_code != 0 and "unknown format" in res.output


def test_cli_export_torchscript(tmp_path):
    from typer.testing import CliRunner

    from emov2.cli import app

    out = tmp_path / "m.pt"
    res = CliRunner().invoke(app, ["export", "--model", "emov2_1m", "--format", "torchscript", "--num-classes", "10",
                                   "--img-size", str(IMG), "--output", str(out), "--random-weights"])
    assert res.exit_code == 0, res.output
    assert out.exists() and "parity at batch 3" in res.output
    assert "warning: exporting random weights" in res.output


def test_build_for_export_follows_the_checkpoints_model_kwargs(tmp_path):
    """A checkpoint of a model trained with other depths (the demo's 1-2-2-1) exports as that model, with its
    weights: the metadata's model kwargs build it (emov2 export failed on runs/demo before)."""
    import emov2
    from emov2.checkpoint import save_safetensors
    from emov2.tools.export import build_for_export

    torch.manual_seed(0)
    trained = emov2.create_model("emov2_1m", num_classes=10, depths=[1, 2, 2, 1]).eval()
    meta = {"variant": "emov2_1m", "num_classes": 10, "model_kwargs": {"depths": [1, 2, 2, 1]}}
    path = save_safetensors(trained.state_dict(), tmp_path / "model.safetensors", metadata=meta)
    model, _ = build_for_export("emov2_1m", checkpoint=path, num_classes=10, deploy=False)
    blocks = [m for m in model.modules() if type(m).__name__ == "ImprovedInvertedResidualMobileBlock"]
    assert len(blocks) == 1 + 2 + 2 + 1
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))


def test_cli_export_takes_size_classes_and_normalisation_from_the_checkpoint(tmp_path):
    """Without --img-size / --num-classes / --mean / --std, `emov2 export` uses what this project's checkpoint
    records (it used 224 px, 1000 classes and ImageNet statistics: a silent wrong input size)."""
    from typer.testing import CliRunner

    from emov2.checkpoint import save_safetensors
    from emov2.cli import app

    trained = emov2.create_model("emov2_1m", num_classes=10, depths=[1, 2, 2, 1]).eval()
    meta = {"variant": "emov2_1m", "num_classes": 10, "model_kwargs": {"depths": [1, 2, 2, 1]}, "img_size": 48,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    path = save_safetensors(trained.state_dict(), tmp_path / "model.safetensors", metadata=meta)
    out = tmp_path / "m.pt"
    res = CliRunner().invoke(app, ["export", "--model", "emov2_1m", "--checkpoint", str(path), "--format",
                                   "torchscript", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "48x48" in res.output
    scripted = torch.jit.load(str(out))
    assert scripted(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_deploy_onnx_parity(tmp_path):
    """The deploy module (plain-op kernels) exports with a dynamic batch and matches in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    if getattr(emov2, "deploy", None) is None:
        pytest.skip("emov2.deploy is not available")
    from emov2.tools.export import build_for_export

    torch.manual_seed(0)
    model, note = build_for_export("emov2_1m", num_classes=10)
    assert note.startswith("deploy")
    with torch.no_grad():
        model.get_classifier().weight.normal_(0, 1.0)
    path = export(model, "onnx", tmp_path / "d.onnx", img_size=IMG, batch=2)
    res = check_onnx_parity(model, path, batch=3, img_size=IMG)
    assert res["max_rel_err"] < 1e-4


def test_graph_attention_equals_definition():
    """windowed_attention_graph (the exported form) is windowed_attention, for 1-3 axes and both partitions."""
    from emov2.layers.window_attention import windowed_attention, windowed_attention_graph

    g = torch.Generator().manual_seed(0)
    for size, window in [((14, 14), [7, 7]), ((7, 7), [7, 7]), ((6, 9), [3, 3]), ((12,), [4]), ((4, 6, 6), [2, 3, 3])]:
        for modes in (["neighbour", "distant"], ["distant"]):
            for skip in (False, True):
                qk = torch.randn(2, 24, *size, generator=g, dtype=torch.float64)
                v = torch.randn(2, 15, *size, generator=g, dtype=torch.float64)
                ref = windowed_attention(qk, v, window, 3, modes, None, skip)
                out = windowed_attention_graph(qk, v, window, 3, modes, None, skip)
                assert torch.allclose(ref, out, rtol=0, atol=1e-12), (size, modes, skip)


def test_export_form_pads_heads_exactly():
    """EMOv2-1M's last stage (630 = 9 x 70 value channels) is padded per head to 648; outputs unchanged."""
    from emov2.tools.export import deploy_for_export

    torch.manual_seed(0)
    model = emov2.create_model("emov2_1m", num_classes=10).eval().double()
    with torch.no_grad():
        for m in model.modules():  # O(1) LayerScales, so that every block changes the output
            if hasattr(m, "gamma"):
                m.gamma.uniform_(0.5, 1.0)
    form = deploy_for_export(model)
    widths = [b.mixer.v.out_channels for b in form.modules() if hasattr(b, "mixer") and hasattr(b.mixer, "v")]
    assert widths and all(w % 8 == 0 for w in widths) and 648 in widths
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), form(x)
    assert torch.allclose(ref, out, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


def test_optimized_graph_is_saved(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    from emov2.tools.export import deploy_for_export, optimize_onnx

    form = deploy_for_export(tiny_model)
    path = export(form, "onnx", tmp_path / "m.onnx", img_size=IMG, batch=2)
    opt = optimize_onnx(path)
    assert opt.name == "m.ort.onnx" and opt.is_file()
    res = check_onnx_parity(tiny_model, opt, batch=2, img_size=IMG)
    assert res["max_rel_err"] < 1e-4
