"""emov2.kernels' float32 depthwise and 1x1 convs against the oneDNN calls they replace, on EMOv2's shapes.

For every depthwise conv of EMOv2-1M and its kinds of 1x1 conv (expansions with SiLU, value convs with GELU,
projections with the block's residual) it times, interleaved in one process, ``mkldnn._convolution_pointwise``
with the post-op (plus the residual add for depthwise convs), what the deployed model runs at batch 1
(``emov2.kernels.depthwise_conv_f32`` with SiLU and the residual in the kernel; ``emov2.kernels.pointwise_conv_f32``
for the 1x1s) and, for the 1x1s, the batch-1 path before it (ATen's conv, then ``emov2.kernels.silu_``, GELU or
the add). It checks that all give the same output and prints the medians and ratios (> 1: the kernel is
faster). The per-call overhead rows are 2x2 maps.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels_vs_onednn.py --threads 1 --batch 1 --json out.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from emov2 import kernels
from emov2.tools.bench.machine import load_average, machine_info
from emov2.tools.bench.timing import Case, run_interleaved

# (channels in, channels out, map size, kernel, stride): EMOv2-1M's depthwise convs
DEPTHWISE = [(16, 16, 112, 3, 1), (64, 64, 112, 5, 2), (64, 64, 56, 5, 1), (160, 160, 56, 5, 2), (120, 120, 28, 5, 1),
             (288, 288, 28, 5, 2), (240, 240, 14, 5, 1), (560, 560, 14, 5, 2), (630, 630, 7, 5, 1), (16, 16, 2, 5, 1)]
# (channels in, channels out, map size, activation, residual): its 1x1 convs of each kind
POINTWISE = [(16, 64, 112, 'swish', False), (32, 160, 56, 'swish', False), (48, 288, 28, 'swish', False),
             (80, 240, 14, 'gelu', False), (180, 630, 7, 'gelu', False), (64, 32, 56, 'none', True),
             (240, 80, 14, 'none', True), (630, 180, 7, 'none', True), (16, 16, 2, 'swish', False)]


def _depthwise_cases(shape, batch):
    cin, cout, size, k, stride = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, 1, k, k, generator=g) / k).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    pad, out = [k // 2] * 2, (size + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(batch, cout, out, out, generator=g).contiguous(memory_format=torch.channels_last)
    packed = kernels.pack_depthwise_weight_f32(w)
    return {"onednn": lambda: torch.ops.mkldnn._convolution_pointwise(
                x, w, b, pad, [stride] * 2, [1, 1], cin, 'swish', [], '').add_(r),
            "kernel": lambda: kernels.depthwise_conv_f32(x, packed, b, k, stride, True, r)}


def _pointwise_cases(shape, batch):
    cin, cout, size, act, residual = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g)
    r = torch.randn(batch, cout, size, size, generator=g).contiguous(memory_format=torch.channels_last) \
        if residual else None
    conv = torch.ops.mkldnn._convolution_pointwise

    def onednn():
        if r is not None:
            return conv(x, r, w, b, [0, 0], [1, 1], [1, 1], 1, 'add', None, None, [], None)
        return conv(x, w, b, [0, 0], [1, 1], [1, 1], 1, act, [], 'none' if act == 'gelu' else '')

    def aten():
        y = F.conv2d(x, w, b)
        y = kernels.silu_(y) if act == 'swish' else F.gelu(y) if act == 'gelu' else y
        return y if r is None else y.add_(r)

    w2 = w.view(cout, cin)
    return {"onednn": onednn, "aten": aten, "kernel": lambda: kernels.pointwise_conv_f32(x, w2, b, act, r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.build_error() is not None:
        raise SystemExit(f"emov2 kernels unavailable: {kernels.build_error()}")
    rows = []
    print("| op | shape | oneDNN ms | ATen + act ms | kernel ms | oneDNN / kernel | ATen / kernel | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in DEPTHWISE + POINTWISE:
        depthwise = isinstance(shape[3], int)
        fns = _depthwise_cases(shape, args.batch) if depthwise else _pointwise_cases(shape, args.batch)
        cases = [Case(k, fn, args.batch) for k, fn in fns.items()]
        with torch.inference_mode():
            outs = {k: fn() for k, fn in fns.items()}
            run_interleaved(cases, repeats=args.repeats, warmup=2, min_time_s=0.2)
        err = max((o - outs["kernel"]).abs().max().item() for o in outs.values())
        ms = {c.key: c.median_s * 1e3 for c in cases}
        cin, cout, size, kind, extra = shape
        if depthwise:
            op, desc = "depthwise + SiLU + residual", f"{cin} @ {size}, k{kind}, s{extra}"
        else:
            op = "1x1 conv + " + {"swish": "SiLU", "gelu": "GELU", "none": "residual"}[kind]
            desc = f"{cin} -> {cout} @ {size}"
        row = {"op": op, "shape": list(shape), **{f"{k}_ms": v for k, v in ms.items()},
               "ratio": ms["onednn"] / ms["kernel"], "max_abs_diff": err}
        if "aten" in ms:
            row["ratio_vs_aten"] = ms["aten"] / ms["kernel"]
        rows.append(row)
        aten = f"{ms['aten']:.3f}" if "aten" in ms else "-"
        vs_aten = f"{row['ratio_vs_aten']:.2f}" if "aten" in ms else "-"
        print(f"| {op} | {desc} | {ms['onednn']:.3f} | {aten} | {ms['kernel']:.3f} | {row['ratio']:.2f} | "
              f"{vs_aten} | {err:.1e} |")
    result = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats, "machine": machine_info("cpu"),
              "load_average": load_average(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
