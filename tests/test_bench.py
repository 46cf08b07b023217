"""Benchmark harness: structure of the result, ratios, interleaving. No timing thresholds."""
import json

import pytest

from emov2.tools.bench import BenchConfig, Case, compute_derived, run_benchmark, run_interleaved
from emov2.tools.bench.models import resolve_models
from emov2.tools.bench.report import PAIRED, markdown_table, plot_throughput, write_json


def test_interleaved_round_robin_and_errors():
    calls = []

    def make(key):
        return lambda: calls.append(key)

    def boom():
        raise RuntimeError("broken")

    cases = [Case("a", make("a"), 2), Case("b", make("b"), 2), Case("bad", boom, 2)]
    run_interleaved(cases, repeats=2, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # order rotates by one each round
    assert len(cases[0].times) == 2 and len(cases[1].times) == 2
    assert cases[2].error.startswith("RuntimeError") and cases[2].throughput is None
    assert cases[0].throughput == pytest.approx(2 / cases[0].median_s)


def _row(model, variant, tp, backend="eager", precision="fp32", task="throughput", batch=64):
    return {"model": model, "variant": variant, "backend": backend, "precision": precision, "task": task,
            "batch": batch, "img_per_s": tp}


def test_compute_derived_ratios():
    out = {
        "config": {"batch": 64, "device": "cpu"},
        "machine": {"bf16": {"native": True}},
        "gemm": {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 200.0}},
        "models": {"emov2_5m": {"gmacs": 1.0}, "edgenext_small": {"gmacs": 1.25}},  # 2 FLOPs per MAC
        "results": [
            _row("emov2_5m", "reference", 10.0), _row("emov2_5m", "eager", 20.0), _row("emov2_5m", "deploy", 40.0),
            _row("edgenext_small", "timm", 32.0),
            _row("emov2_5m", "deploy", 80.0, precision="bf16"), _row("edgenext_small", "timm", 16.0, precision="bf16"),
            _row("emov2_5m", "deploy", 60.0, backend="onnxruntime"),
            _row("emov2_5m", "reference", 5.0, task="train"), _row("emov2_5m", "eager", 15.0, task="train"),
        ],
    }
    compute_derived(out, baseline="edgenext_small")
    r = {(x["model"], x["variant"], x["backend"], x["precision"], x["task"]): x for x in out["results"]}
    deploy = r[("emov2_5m", "deploy", "eager", "fp32", "throughput")]
    assert deploy["vs_reference"] == pytest.approx(4.0)
    assert deploy["vs_baseline"] == pytest.approx(40 / 32)
    assert deploy["efficiency"] == pytest.approx(2.0 * 40 / 100)
    assert r[("emov2_5m", "eager", "eager", "fp32", "throughput")]["vs_reference"] == pytest.approx(2.0)
    assert r[("emov2_5m", "reference", "eager", "fp32", "throughput")]["vs_reference"] is None
    bf = r[("emov2_5m", "deploy", "eager", "bf16", "throughput")]
    assert bf["vs_fp32"] == pytest.approx(2.0) and bf["vs_baseline"] == pytest.approx(5.0)
    out["results"].append(_row("emov2_5m", "deploy", 50.0, task=PAIRED))  # fp32 measured beside the bf16 run
    compute_derived(out, baseline="edgenext_small")
    assert bf["vs_fp32"] == pytest.approx(80 / 50)
    assert r[("emov2_5m", "deploy", "eager", "fp32", "throughput")]["vs_baseline"] == pytest.approx(40 / 32)
    assert bf["efficiency"] == pytest.approx(2.0 * 80 / 200)
    assert r[("emov2_5m", "deploy", "onnxruntime", "fp32", "throughput")]["vs_eager"] == pytest.approx(1.5)
    assert r[("emov2_5m", "eager", "eager", "fp32", "train")]["vs_reference"] == pytest.approx(3.0)
    targets = {t["target"]: t for t in out["targets"]}
    t5 = targets["emov2_5m deploy / edgenext_small (fp32 eager, batch 64)"]
    assert t5["value"] == pytest.approx(1.25) and t5["met"] is True
    t2 = targets["emov2_2m deploy / edgenext_x_small (fp32 eager, batch 64)"]
    assert t2["value"] is None and t2["met"] is None and "pending" in t2["note"]
    eff = next(t for t in out["targets"] if "efficiency" in t["target"])
    assert eff["value"] == pytest.approx(0.8) and eff["met"] is True


def test_resolve_models_presets():
    assert resolve_models("emov2,edgenext_small,emov2_1m") == ["emov2_1m", "emov2_2m", "emov2_5m", "edgenext_small"]


def test_unknown_model_is_clear():
    with pytest.raises(ValueError, match="unknown model"):
        run_benchmark(BenchConfig(models=["emov9_1m"]))
    with pytest.raises(ValueError, match="unknown model"):
        run_benchmark(BenchConfig(models=["not_a_timm_model_xyz"]))


@pytest.fixture(scope="module")
def tiny_result():
    cfg = BenchConfig(models=["emov2_1m", "mobilenetv3_small_050"], batch=2, img_size=64, repeats=1, warmup=1,
                      baseline="mobilenetv3_small_050", onnx=False, memory=False, latency=True,
                      latency_min_time_s=0.0, gemm_sizes=(128,), gemm_beyond_cache=False,
                      gemm_min_time_s=0.01, num_classes=10)
    return run_benchmark(cfg)


def test_result_structure(tiny_result, tmp_path):
    res = tiny_result
    for key in ("schema", "machine", "config", "gemm", "models", "results", "targets", "notes", "baseline"):
        assert key in res
    assert res["machine"]["torch_threads"] >= 1 and "native" in res["machine"]["bf16"]
    assert res["gemm"]["fp32"]["gflops"] > 0
    assert res["models"]["emov2_1m"]["paper_top1"] == 72.3
    assert res["models"]["mobilenetv3_small_050"]["paper_top1"] is None
    tasks = {(r["model"], r["variant"], r["task"], r["precision"]) for r in res["results"]}
    assert ("emov2_1m", "eager", "throughput", "fp32") in tasks
    assert ("mobilenetv3_small_050", "timm", "latency", "fp32") in tasks
    assert ("emov2_1m", "eager", "train", "fp32") in tasks
    for r in res["results"]:
        assert r["error"] is None, r
        assert r["img_per_s"] > 0 and len(r["samples_ms"]) == 1
    base = next(r for r in res["results"] if r["model"] == "mobilenetv3_small_050" and r["task"] == "throughput"
                and r["precision"] == "fp32")
    assert base["vs_baseline"] == pytest.approx(1.0)
    path = write_json(res, tmp_path / "b.json")
    assert json.loads(path.read_text())["schema"] == res["schema"]
    assert plot_throughput(res, tmp_path / "b.png").stat().st_size > 0
    assert "emov2_1m" in markdown_table(res)


def test_every_emo_variant_runs_and_ratios_divide_by_reference(tiny_result):
    rows = [r for r in tiny_result["results"] if r["task"] == "throughput" and r["precision"] == "fp32"
            and r["backend"] == "eager"]
    by_variant = {r["variant"]: r for r in rows if r["model"] == rows[0]["model"]}
    assert {"reference", "eager", "deploy_torch", "deploy"} <= set(by_variant)
    for v in ("eager", "deploy_torch", "deploy"):
        assert by_variant[v]["vs_reference"] == pytest.approx(
            by_variant[v]["img_per_s"] / by_variant["reference"]["img_per_s"])


def test_peak_memory_subprocess():
    from emov2.tools.bench.memory import measure_peak_memory

    res = measure_peak_memory("mobilenetv3_small_050", "timm", "infer", batch=2, img_size=64, threads=1)
    assert "error" not in res, res
    assert res["peak_mib"] >= 0 and res["method"]


@pytest.mark.parametrize("device,match", [("meta", "runs on 'cpu' or 'cuda"), ("gpu0", "unknown device"),
                                          ("cuda", "no CUDA device"), ("cuda:7", "CUDA device")])
def test_bad_or_missing_device_is_a_clear_error(device, match, monkeypatch):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        if device == "cuda":
            pytest.skip("this machine has a CUDA device")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=match):
        run_benchmark(BenchConfig(models=["emov2_1m"], device=device))


def test_engines_table_small_run(tmp_path):
    """The engines run on one small pair at two thread counts: every engine/batch/threads has both models,
    ratios are per round, rows carry the keys the docs table is built from (threads, load average)."""
    from emov2.tools.bench.engines import engines_markdown, run_engines

    engines = ("torch_eager", "torch_deploy")  # ORT sessions take the same thread count (onnx_session); export is slow
    partial = []
    res = run_engines(pairs=(("emov2_1m", "edgenext_xx_small"),), batches=(1, 2), engines=engines,
                      repeats=2, img_size=64, min_time_s=0.0, threads=(1, 2), warmup=1, log=lambda s: None,
                      on_group=partial.append)
    assert [len(p["rows"]) for p in partial] == [2 * (i + 1) for i in range(2 * 2 * 2)]  # saved after each group
    assert partial[-1]["ratios"] == res["ratios"]
    assert res["threads"] == [1, 2] and res["warmup"] == 1 and len(res["load_average"]["start"]) == 3
    assert {(r["engine"], r["batch"], r["threads"]) for r in res["ratios"]} == {
        (e, b, t) for e in engines for b in (1, 2) for t in (1, 2)}
    for r in res["rows"]:
        assert r["error"] is None and len(r["ms"]) == 2 and r["median_ms"] > 0, r
        assert {"engine", "batch", "threads", "model", "load_before", "load_after"} <= set(r)
    for r in res["ratios"]:
        assert r["ratio_min"] <= r["ratio_max"] and r["ratio"] == pytest.approx(r["edgenext_ms"] / r["emo_ms"])
    table = engines_markdown(res)
    assert table.count("\n") == 1 + 2 * 2 * 2 and "emov2_1m / edgenext_xx_small" in table
    assert "| torch_eager | 1 | 1 |" in table and "| torch_deploy | 2 | 2 |" in table
    json.dumps(res)


def test_cli_engines_rejects_unknown_engine():
    from typer.testing import CliRunner

    from emov2.cli import app

    res = CliRunner().invoke(app, ["bench", "--engines", "--engine-list", "tensorrt"])
    assert res.exit_code == 2 and "unknown engine" in res.output
    for bad in ("0", "two", "1,-2"):
        res = CliRunner().invoke(app, ["bench", "--engines", "--threads", bad])
        assert res.exit_code == 2 and "positive integer" in res.output, res.output
    res = CliRunner().invoke(app, ["bench", "--threads", "1,2"])  # several counts only with --engines
    assert res.exit_code == 2 and "need --engines" in res.output
    res = CliRunner().invoke(app, ["bench", "--engines", "--pairs", "emov2_9m"])
    assert res.exit_code == 2 and "--pairs" in res.output


def test_cli_engines_passes_thread_counts(tmp_path, monkeypatch):
    """`emov2 bench --engines --threads 1,2` hands both counts to run_engines and writes its table."""
    from functools import partial

    from typer.testing import CliRunner

    import emov2.cli.bench as cli_bench
    from emov2.cli import app
    from emov2.tools.bench.engines import run_engines

    seen = {}

    def small(**kw):
        seen.update(kw)
        return partial(run_engines, img_size=64, min_time_s=0.0)(**{k: v for k, v in kw.items() if k != "img_size"})

    monkeypatch.setattr(cli_bench, "run_engines", small)
    res = CliRunner().invoke(app, ["bench", "--engines", "--engine-list", "torch_deploy", "--threads", "1,2",
                                   "--pairs", "emov2_1m", "--batch", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["threads"] == [1, 2] and seen["engines"] == ("torch_deploy",)
    assert seen["pairs"] == (("emov2_1m", "edgenext_xx_small"),)
    assert seen["warmup"] == 3  # ONNX Runtime settles after about three calls at a new batch size
    data = json.loads((tmp_path / "engines.json").read_text())
    assert data["warmup"] == 3
    assert sorted({r["threads"] for r in data["rows"]}) == [1, 2]
    assert "| torch_deploy | 2 | 2 |" in (tmp_path / "engines.md").read_text()


def test_cli_detectors_writes_the_detector_table(tmp_path, monkeypatch):
    """`emov2 bench --detectors` runs the detector bench and writes its JSON and table (small here)."""
    from functools import partial

    from typer.testing import CliRunner

    import emov2.cli.bench as cli_bench
    from emov2.cli import app
    from emov2.tools.bench.detection import bench_detection

    small = partial(bench_detection, ['emov2_1m'], image_size=64, min_time_s=0.0, count_macs=False)
    monkeypatch.setattr(cli_bench, "bench_detection", lambda **kw: small(**{k: v for k, v in kw.items()
                                                                          if k != "image_size"}))
    res = CliRunner().invoke(app, ["bench", "--detectors", "--batch", "2", "--repeats", "1", "--warmup", "0",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "detectors.json").read_text())
    assert [r["model"] for r in data["rows"]][1:] == ["ssdlite_emov2_1m_deployed"]
    assert "ssdlite_emov2_1m_deployed" in (tmp_path / "detectors.md").read_text()
