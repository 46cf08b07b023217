"""Clear errors for unknown models, export misuse, zoo progress and the GEMM peak; no long timings."""
import pytest
from typer.testing import CliRunner

import emov2
from emov2.cli import app
from emov2.factory import UnknownModelError


def _one_line_error(output: str) -> str:
    """The ``error: ...`` line of a CLI run; fails if there is none or if a traceback was printed."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


# --- unknown model names ------------------------------------------------------------------------

@pytest.mark.parametrize("name, closest", [("emov2_1mm", "emov2_1m"), ("emov25m", "emov2_5m"),
                                           ("EMOv1_6M", "emov1_6m")])
def test_create_model_unknown_name_suggests_closest(name, closest):
    with pytest.raises(ValueError) as info:
        emov2.create_model(name)
    assert isinstance(info.value, UnknownModelError)
    msg = str(info.value)
    assert f"did you mean {closest!r}?" in msg
    assert all(m in msg for m in emov2.list_models())
    assert info.value.suggestion == closest


def test_create_model_unrelated_name_lists_models_without_a_guess():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet50'") as info:
        emov2.create_model("resnet50")
    assert "did you mean" not in str(info.value) and "emov2_5m" in str(info.value)


def test_cli_export_unknown_model_suggests_closest():
    res = CliRunner().invoke(app, ["export", "--model", "emov2_1mm"])
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert "unknown model 'emov2_1mm'" in line and "did you mean 'emov2_1m'?" in line and "emov1_6m" in line


@pytest.mark.parametrize("name, closest", [("emov2_1mm", "emov2_1m"), ("edgenext_smal", "edgenext_small")])
def test_cli_bench_unknown_model_suggests_closest(name, closest, tmp_path):
    res = CliRunner().invoke(app, ["bench", "--models", f"emov2_1m,{name}", "--out", str(tmp_path)])
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert f"unknown model {name!r}" in line and f"did you mean {closest!r}?" in line
    assert not any(tmp_path.iterdir())  # failed before measuring anything


# --- emov2 export ---------------------------------------------------------------------------------

def _export(*args):
    return CliRunner().invoke(app, ["export", "--model", "emov2_1m", "--format", "torchscript", "--num-classes", "10",
                                    "--img-size", "64", "--no-check", *args])


def test_cli_export_without_weights_is_refused(tmp_path):
    out = tmp_path / "m.pt"
    res = _export("--output", str(out))
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert "--checkpoint" in line and "--random-weights" in line
    assert not out.exists()


def test_cli_export_help_says_random_weights_are_for_checks_only():
    import typer

    command = typer.main.get_command(app).commands["export"]
    helps = {opt: p.help for p in command.params for opt in p.opts}
    assert "only for speed or format checks" in helps["--random-weights"]
    assert "--random-weights" in helps["--checkpoint"]


def test_cli_export_random_weights_warns(tmp_path):
    out = tmp_path / "m.pt"
    res = _export("--output", str(out), "--random-weights")
    assert res.exit_code == 0, res.output
    assert out.is_file() and "warning: exporting random weights" in res.output


def test_cli_export_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    res = _export("--output", str(tmp_path / "m.pt"), "--checkpoint", str(missing))
    assert res.exit_code == 2
    assert str(missing) in _one_line_error(res.output)
    res = _export("--output", str(tmp_path / "m.pt"), "--checkpoint", str(tmp_path))
    assert res.exit_code == 2 and "is a folder" in _one_line_error(res.output)


def test_cli_export_refuses_to_replace_an_existing_file(tmp_path):
    """An existing output is left as it is unless --overwrite; then it is replaced."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    res = _export("--output", str(out), "--random-weights")
    assert res.exit_code == 2 and "already exists" in _one_line_error(res.output) and "--overwrite" in res.output
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    res = _export("--output", str(out), "--random-weights", "--overwrite")
    assert res.exit_code == 0, res.output
    assert out.read_bytes() != b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_cli_export_with_bad_calibration_writes_nothing(tmp_path):
    """--int8 with a calibration folder that holds no readable image fails before anything is written: no float
    file without its int8 copy, no temporary files left."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out" / "m.onnx"
    res = CliRunner().invoke(app, ["export", "--model", "emov2_1m", "--random-weights", "--num-classes", "10",
                                   "--img-size", "32", "--int8", "--calibration", str(tmp_path / "cal"),
                                   "--output", str(out)])
    assert res.exit_code == 2 and "broken.png" in _one_line_error(res.output)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _unwritable_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [("/proc/x.pt", "/proc"), (str(a_file / "m.pt"), str(a_file)),
             (str(a_file / "sub" / "m.pt"), str(a_file)), (str(tmp_path), str(tmp_path))]
    return cases


def test_cli_export_unwritable_path_is_one_clear_line(tmp_path):
    for out, culprit in _unwritable_cases(tmp_path):
        res = _export("--output", out, "--random-weights")
        assert res.exit_code == 2, (out, res.output)
        line = _one_line_error(res.output)
        assert f"cannot write {out}" in line and culprit in line, line


def test_export_to_read_only_folder_names_it(tmp_path):
    import os

    import torch

    from emov2.tools.export import ExportError, export

    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ExportError, match=f"cannot write {locked / 'm.pt'}: permission denied"):
            export(torch.nn.Identity(), "torchscript", locked / "m.pt", img_size=8)
    finally:
        locked.chmod(0o700)


def test_export_write_failure_is_reported_as_permission_denied(tmp_path, monkeypatch):
    """What a folder without write permission gives a non-root user (here simulated: tests run as root)."""
    import errno
    import tempfile

    import torch

    from emov2.tools.export import ExportError, export

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(ExportError, match=f"cannot write {tmp_path / 'm.pt'}: permission denied in {tmp_path}"):
        export(torch.nn.Identity(), "torchscript", tmp_path / "m.pt", img_size=8)


# --- emov2 zoo progress ---------------------------------------------------------------------------

@pytest.fixture
def fast_zoo(monkeypatch):
    """``emov2 zoo`` with the 4 s per-row fvcore count replaced by a stub (the CLI is what is tested)."""
    import emov2.tools.zoo as zoo_mod

    counted = []

    def fake_row(name, model, size, switches, entry):
        counted.append(name)
        return zoo_mod.ZooRow(name=name, model=model, input_size=size, switches=switches, params_m=1.0, flops_m=2.0)

    monkeypatch.setattr(zoo_mod, "_row", fake_row)
    return counted


def test_zoo_rows_reports_progress_per_row(fast_zoo, reference_dir):
    from emov2.tools.zoo import paper_targets, zoo_rows

    calls = []
    rows = zoo_rows(paper_targets(reference_dir / "paper_targets.json"), on_row=lambda *a: calls.append(a))
    n = len(rows)
    assert n > 30 and [c[:2] for c in calls] == [(i, n) for i in range(n + 1)]
    assert [c[2] for c in calls[:-1]] == fast_zoo == [r.name for r in rows]


def test_cli_zoo_progress_on_stderr_json_clean(fast_zoo, reference_dir):
    import json

    res = CliRunner().invoke(app, ["zoo", "--json", "--targets", str(reference_dir / "paper_targets.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)  # stdout is only the JSON
    n = len(rows)
    assert f"1/{n} {rows[0]['name']}" in res.stderr and f"{n}/{n} {rows[-1]['name']}" in res.stderr
    assert f"done ({n} rows)" in res.stderr


def test_cli_zoo_progress_bar_on_a_terminal(fast_zoo, reference_dir, monkeypatch):
    import json

    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    res = CliRunner().invoke(app, ["zoo", "--json", "--no-ablations",
                                   "--targets", str(reference_dir / "paper_targets.json")])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == len(fast_zoo) and "counting params and FLOPs" in res.stderr


def test_cli_zoo_missing_targets_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["zoo", "--targets", str(tmp_path / "none.json")])
    assert res.exit_code == 2 and str(tmp_path / "none.json") in _one_line_error(res.output)


# --- GEMM peak (no real timings: the measurement is stubbed) --------------------------------------

from emov2.tools.bench import BenchConfig  # noqa: E402

def _fake_measure(rates, calls):
    def measure(dtype, n, repeats, device, min_time_s):
        calls.append(n)
        r = rates[n]
        return {"dtype": "float32", "n": n, "gflops": r * 0.9, "best_gflops": r, "samples_gflops": [r * 0.8, r]}
    return measure


def test_gemm_peak_is_the_best_sample_over_sizes():
    from emov2.tools.bench.gemm import measure_gemm_peak

    calls = []
    rates = {512: 20.0, 1024: 55.0, 2048: 80.0, 4096: 70.0}
    peak = measure_gemm_peak(sizes=(4096, 512, 2048, 1024), measure=_fake_measure(rates, calls))
    assert calls == [512, 1024, 2048, 4096]  # ascending, every size
    assert peak["gflops"] == 80.0 and peak["n"] == 2048  # the best sample, not a median, not the last size
    assert peak["sizes"] == rates and peak["threads"] >= 1


def test_gemm_peak_skips_sizes_too_slow_to_measure():
    from emov2.tools.bench.gemm import measure_gemm_peak

    calls = []
    rates = {512: 1.0, 1024: 1.0, 2048: 1.0}  # 1 GFLOP/s: emulated bf16; n=2048 would take 17 s a product
    peak = measure_gemm_peak(sizes=(512, 1024, 2048), max_call_s=3.0, measure=_fake_measure(rates, calls))
    assert calls == [512, 1024] and peak["skipped"] == [2048]


def test_quick_bench_peak_includes_a_size_beyond_the_cache():
    import torch

    from emov2.tools.bench.gemm import gemm_working_set, sizes_beyond_cache
    from emov2.tools.bench.machine import last_level_cache_bytes

    quick = BenchConfig.quick()
    assert 512 in quick.gemm_sizes and max(quick.gemm_sizes) >= 2048  # not n=512 alone
    assert gemm_working_set(2048) == 3 * 2048 * 2048 * 4
    cache = last_level_cache_bytes() or 32 << 20
    for dtype in (torch.float32, torch.bfloat16):
        sizes = sizes_beyond_cache(quick.gemm_sizes, cache, dtype)
        assert set(quick.gemm_sizes) <= set(sizes) and gemm_working_set(max(sizes), dtype) > cache
    assert sizes_beyond_cache((512,), 512 << 20) == (512, 1024, 2048, 4096, 8192)  # a 512 MiB cache: grow
    assert sizes_beyond_cache((512, 2048), None) == (512, 2048)


def test_bench_runner_measures_all_sizes_and_bf16_yardstick(monkeypatch):
    """The runner takes the peak over its sizes, re-measures the best size after the models, and
    uses the fp32 peak for bf16 when bf16 torch.mm is slower (emulated bf16 computes in fp32)."""
    import torch

    from emov2.tools.bench import gemm as gemm_mod
    from emov2.tools.bench import runner as runner_mod

    calls = []

    def measure(dtype, n, repeats, device, min_time_s):
        calls.append((dtype, n))
        r = {512: 20.0, 1024: 60.0, 2048: 75.0}[n] * (1.0 if dtype == torch.float32 else 0.02)
        return {"dtype": str(dtype), "n": n, "gflops": r, "best_gflops": r, "samples_gflops": [r]}

    monkeypatch.setattr(gemm_mod, "measure_gemm_flops", measure)
    monkeypatch.setattr(runner_mod, "measure_gemm_flops", measure)
    r = runner_mod._Runner(BenchConfig.quick(gemm_beyond_cache=False, gemm_max_call_s=1e9), log=lambda s: None)
    peaks = r.gemm_peaks()
    assert [n for d, n in calls if d == torch.float32] == [512, 1024, 2048]
    assert peaks["fp32"]["gflops"] == 75.0 and peaks["fp32"]["n"] == 2048
    assert peaks["bf16"]["gemm_gflops"] == pytest.approx(1.5) and peaks["bf16"]["gflops"] == 75.0
    r.remeasure_gemm(peaks)
    assert calls[-2:] == [(torch.float32, 2048), (torch.bfloat16, 2048)]


@pytest.mark.parametrize("args, words", [(["--repeats", "0"], "--repeats 0"), (["--batch", "0"], "--batch 0"),
                                         (["--img-size", "8"], "at least 32 px")])
def test_cli_bench_refuses_values_that_measure_nothing(tmp_path, args, words):
    res = CliRunner().invoke(app, ["bench", "--engines", "--pairs", "emov2_1m", "--out", str(tmp_path / "b"), *args])
    assert res.exit_code == 2 and words in _one_line_error(res.output)
    assert not (tmp_path / "b").exists()
