"""PT2E int8 (X86InductorQuantizer, lowered by torch.compile) of the trained digits demo model: top-1 agreement
with fp32 on the 360 held-out digits, and speed against fp32 (deploy, compiled) in interleaved rounds.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/pt2e_demo.py --demo runs/demo/last --out benchmarks/results/pt2e_demo.json
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import emov2
from emov2.tools.bench.machine import load_average
from emov2.tools.bench.machine import machine_info
from emov2.tools.bench.timing import Case, run_interleaved
from emov2.tools.export import deploy_for_export
from emov2.tools.quantize import calibration_images, compile_frozen, compile_int8, pt2e_top1_agreement, quantize_pt2e

NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("runs/demo/last"), help="checkpoint folder of `emov2 demo`")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pt2e_demo.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load_start = load_average()
    model = emov2.create_model("emov2_1m", num_classes=10, depths=[1, 2, 2, 1])
    emov2.load_checkpoint(model, a.demo / "model.safetensors")
    float_model = deploy_for_export(model.eval())
    deployed = emov2.deploy(model.eval())
    cal = calibration_images("digits", n=256, img_size=32, **NORM)
    test = torch.from_numpy(calibration_images("digits", n=360, img_size=32, split="test", **NORM))
    t0 = time.perf_counter()
    q = quantize_pt2e(float_model, cal, batch=64)
    t_quant = time.perf_counter() - t0
    reference = pt2e_top1_agreement(float_model, q, test, batch=360)
    int8 = compile_int8(q)
    t0 = time.perf_counter()
    compiled = pt2e_top1_agreement(float_model, int8, test, batch=360)  # one compilation at batch 360
    t_compile = time.perf_counter() - t0
    fp32_compiled = compile_frozen(float_model)
    rows = []
    for batch in (1, 64):
        x = test[:batch].contiguous()
        cases = [Case(key=k, fn=(lambda f=f: _infer(f, x)), items=batch) for k, f in
                 (("fp32_deploy", deployed), ("fp32_compile", fp32_compiled), ("int8_pt2e_compile", int8))]
        run_interleaved(cases, repeats=a.repeats, warmup=1, min_time_s=0.3)
        for c in cases:
            rows.append({"batch": batch, "model": c.key, "ms": [t * 1e3 for t in c.times],
                         "median_ms": c.median_s * 1e3 if c.median_s else None, "error": c.error})
    out = {"schema": "emov2-pt2e-demo/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "machine": machine_info("cpu"), "threads": a.threads, "img_size": 32, "demo": str(a.demo),
           "calibration": "256 training digits", "test": "360 held-out digits",
           "agreement_reference_graph": reference, "agreement_compiled_int8": compiled,
           "quantize_s": t_quant, "compile_and_predict_s": t_compile, "rows": rows,
           "load_average": {"start": load_start, "end": load_average()},
           "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("agreement_reference_graph", "agreement_compiled_int8", "load_average")},
                     indent=1))
    for r in rows:
        print(r["batch"], r["model"], r["median_ms"], r["error"])


def _infer(f, x):
    with torch.no_grad():
        return f(x)


if __name__ == "__main__":
    main()
