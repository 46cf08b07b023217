"""The paper's GPU column: img/s at batch 256, 224 px, fp16 / bf16 autocast, EMOv2-1M/2M/5M vs EdgeNeXt-XXS/XS/S.

EMO models as trained (``eager``: channels-last training graph) and as deployed (``emov2.deploy``;
on a GPU the deployed form runs plain PyTorch ops: folded norms and scales, merged stem, no CPU
kernels); EdgeNeXt from timm (reparameterised eval model), channels-last too. Every case is timed
with CUDA events over ``--iters`` calls after ``--warmup`` calls, in ``--rounds`` interleaved rounds
(median and min-max spread of img/s). Writes JSON to ``--out`` and prints a markdown table.

    python benchmarks/gpu_column.py --out gpu.json
"""
import argparse
import json
import statistics
import time

import timm
import torch

from emov2 import deploy, reference, to_channels_last

PAIRS = [("emov2_1m", "edgenext_xx_small"), ("emov2_2m", "edgenext_x_small"), ("emov2_5m", "edgenext_small")]


def build(name: str, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("emov"):
        model = reference.create_model(name).eval()
        model = to_channels_last(model) if variant == "eager" else deploy(model, compiled_kernels=False)
    else:
        model = timm.utils.reparameterize_model(timm.create_model(name).eval())
        model = model.to(memory_format=torch.channels_last)
    return model.cuda().eval()


def time_case(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, iters: int, warmup: int) -> float:
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            model(x)
        end.record()
        torch.cuda.synchronize()
    return x.shape[0] * iters / (start.elapsed_time(end) / 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="gpu.json")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    cases = []
    for emo, edge in PAIRS:
        for name, variant in ((emo, "eager"), (emo, "deploy"), (edge, "timm")):
            model = build(name, variant)
            for dt in (torch.float16, torch.bfloat16):
                cases.append({"model": name, "variant": variant, "dtype": str(dt).split(".")[-1], "m": model,
                              "t": dt, "img_per_s": []})
    t0 = time.time()
    for c in cases:  # warm-up: cudnn autotuning, lazy init
        time_case(c["m"], x, c["t"], 2, args.warmup)
    for r in range(args.rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for c in order:
            c["img_per_s"].append(time_case(c["m"], x, c["t"], args.iters, 3))
    rows = [{k: v for k, v in c.items() if k not in ("m", "t")} for c in cases]
    for row in rows:
        row["median"] = statistics.median(row["img_per_s"])
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timm": timm.__version__,
           "batch": args.batch, "img_size": 224, "iters": args.iters, "rounds": args.rounds,
           "seconds": time.time() - t0, "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    med = {(r["model"], r["variant"], r["dtype"]): r for r in rows}
    print(f"{out['device']}, torch {out['torch']}, batch {args.batch}, 224 px, img/s median of {args.rounds} "
          f"rounds (min-max)")
    print("| EMOv2 / EdgeNeXt | dtype | EMOv2 eager | EMOv2 deploy | EdgeNeXt | deploy / EdgeNeXt |")
    print("|---|---|---|---|---|---|")
    for emo, edge in PAIRS:
        for dt in ("float16", "bfloat16"):
            e, d, g = med[(emo, "eager", dt)], med[(emo, "deploy", dt)], med[(edge, "timm", dt)]

            def cell(r: dict) -> str:
                return f"{r['median']:.0f} ({min(r['img_per_s']):.0f}-{max(r['img_per_s']):.0f})"
            print(f"| {emo} / {edge} | {dt} | {cell(e)} | {cell(d)} | {cell(g)} | {d['median'] / g['median']:.2f} |")


if __name__ == "__main__":
    main()
