"""Presenting a benchmark result: a rich table, the JSON file, a throughput-vs-params PNG, markdown."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


PAIRED = "throughput_beside_bf16"  # task of the fp32 runs interleaved with the bf16 runs (runner.py)


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _rows_for_table(result: dict) -> list[dict]:
    """One line per (model, variant): the columns of the summary table."""
    batch = result["config"]["batch"]
    lines: dict[tuple[str, str], dict] = {}
    for r in result["results"]:
        line = lines.setdefault((r["model"], r["variant"]), {"model": r["model"], "variant": r["variant"]})
        b, t, p = r["backend"], r["task"], r["precision"]
        if t == "throughput" and b == "eager" and p == "fp32" and r["batch"] == batch:
            line.update(fp32=r["img_per_s"], vs_base=r.get("vs_baseline"), vs_ref=r.get("vs_reference"),
                        eff=r.get("efficiency"), error=r.get("error"))
        elif t == "throughput" and b == "eager" and p == "fp32":
            line["large"] = r["img_per_s"]
        elif t == "latency":
            line["lat_ms"] = r["ms_per_call"]
        elif t == "throughput" and p == "bf16":
            line.update(bf16=r["img_per_s"], bf16_x=r.get("vs_fp32"))
        elif t == PAIRED:
            line["fp32_beside_bf16"] = r["img_per_s"]
        elif b == "onnxruntime":
            line["ort"] = r["img_per_s"]
        elif b == "compile":
            line["compile"] = r["img_per_s"]
        elif t == "train" and p == "bf16":
            line.update(train_bf16=r["img_per_s"], train_bf16_vs_ref=r.get("vs_reference_fp32"))
        elif t == "train":
            line.update(train=r["img_per_s"], train_vs_ref=r.get("vs_reference"))
    for m in result.get("memory", []):
        line = lines.get((m["model"], m["variant"]))
        if line is not None:
            line[f"mem_{m['mode']}"] = m.get("peak_mib")
    return list(lines.values())


COLUMNS = [
    ("model", "model", None), ("variant", "variant", None), ("params_m", "params M", ".2f"),
    ("gmacs", "GMACs", ".2f"), ("top1", "top-1", ".1f"), ("fp32", "img/s fp32", ".1f"),
    ("vs_base", "x base", ".2f"), ("vs_ref", "x ref", ".2f"), ("eff", "% GEMM", ".1%"),
    ("lat_ms", "ms b1", ".1f"), ("bf16", "img/s bf16", ".1f"), ("fp32_beside_bf16", "img/s fp32 beside bf16", ".1f"),
    ("bf16_x", "bf16 x", ".2f"),
    ("ort", "img/s ORT", ".1f"), ("compile", "img/s compile", ".1f"), ("large", "img/s big b", ".1f"),
    ("train", "train img/s", ".1f"), ("train_vs_ref", "train x ref", ".2f"),
    ("train_bf16", "train img/s bf16 AMP", ".1f"), ("train_bf16_vs_ref", "bf16 train x ref fp32", ".2f"),
    ("mem_infer", "MiB infer", ".0f"), ("mem_train", "MiB train", ".0f"),
]


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the summary table; columns with no data are dropped."""
    lines = _rows_for_table(result)
    for line in lines:
        info = result["models"].get(line["model"], {})
        line.update(params_m=info.get("params_m"), gmacs=info.get("gmacs"), top1=info.get("paper_top1"))
    cols = [c for c in COLUMNS if any(line.get(c[0]) is not None for line in lines)]
    header = [c[1] for c in cols]
    body = []
    for line in lines:
        cells = []
        for key, _, spec in cols:
            v = line.get(key)
            cells.append(str(v) if spec is None else _fmt(v, spec))
        if line.get("error"):
            cells[-1] += f" (error: {line['error'][:60]})"
        body.append(cells)
    return header, body


def gemm_line(dtype: str, g: dict) -> str:
    """One line describing a GEMM peak entry of the result (older results measured one size)."""
    sizes = g.get("sizes")
    where = f"best of n={'/'.join(str(n) for n in sizes)}, at n={g['n']}" if sizes else f"n={g['n']}"
    if g.get("threads"):
        where += f", {g['threads']} threads"
    line = f"GEMM peak {dtype}: {g['gflops']:.1f} GFLOP/s ({where})"
    if g.get("gemm_gflops") is not None and g["gemm_gflops"] < g["gflops"]:
        line += f"; bf16 torch.mm reached only {g['gemm_gflops']:.1f}, so the fp32 peak is the yardstick"
    return line


def print_report(result: dict, console: Console | None = None) -> None:
    """Print the machine, GEMM peak, summary table, targets and notes."""
    console = console or Console()
    m = result["machine"]
    console.print(f"[bold]{m['cpu_model']}[/bold], {m['logical_cpus']} logical CPUs, torch {m['torch']} "
                  f"with {m['torch_threads']} threads, native bf16: {m['bf16']['native']}, "
                  f"load average {m.get('loadavg_1_5_15')}")
    for dt, g in result.get("gemm", {}).items():
        console.print(gemm_line(dt, g))
    header, body = table_rows(result)
    cfg = result["config"]
    table = Table(title=f"batch {cfg['batch']} at {cfg['img_size']}px, medians of {cfg['repeats']} "
                        f"interleaved repeats; x base = vs {result['baseline']}")
    for h in header:
        table.add_column(h, justify="left" if h in ("model", "variant") else "right")
    for cells in body:
        table.add_row(*cells)
    console.print(table)
    targets = result.get("targets", [])
    if targets:
        t = Table(title="targets (reported, not asserted)")
        for h in ("target", "value", "threshold", "met"):
            t.add_column(h)
        for tg in targets:
            met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: tg.get("note") or "pending"}[tg["met"]]
            t.add_row(tg["target"], _fmt(tg["value"], ".2f"), f"{tg['threshold']:.2f}", met)
        console.print(t)
    for note in result.get("notes", []):
        console.print(f"[dim]note: {note}[/dim]")


def markdown_table(result: dict) -> str:
    """The summary table as GitHub markdown."""
    header, body = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    """Write ``result`` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def plot_throughput(result: dict, path: str | Path) -> Path:
    """Scatter fp32 eager throughput (primary variant) vs parameters, labelled with the paper's top-1."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = result["config"]["batch"]
    best: dict[str, tuple[float, str]] = {}
    for r in result["results"]:
        if (r["task"], r["backend"], r["precision"], r["batch"]) != ("throughput", "eager", "fp32", batch):
            continue
        if r["variant"] == "reference" or not r.get("img_per_s"):
            continue
        if r["model"] not in best or r["variant"] == "deploy":
            best[r["model"]] = (r["img_per_s"], r["variant"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, (tp, variant) in best.items():
        info = result["models"][name]
        color = "tab:red" if name.startswith("emov2") else "tab:orange" if name.startswith("emov1") else "tab:blue"
        ax.scatter(info["params_m"], tp, color=color, s=40)
        label = name + (f" [{variant}]" if variant not in ("timm",) else "")
        if info.get("paper_top1") is not None:
            label += f"\n{info['paper_top1']:.1f}% top-1"
        ax.annotate(label, (info["params_m"], tp), textcoords="offset points", xytext=(4, 4), fontsize=7)
    m = result["machine"]
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"images/s (fp32, batch {batch}, {result['config']['img_size']}px)")
    ax.set_title(f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
