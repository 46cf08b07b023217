"""Merge `emov2 bench --engines` results (e.g. a run of the eager/deploy/ORT engines and one of the compiled
engines) into the one headline table of docs/BENCHMARKS.md, the spread of each ratio over the runs that
measured it, and the load averages each run recorded.

    python benchmarks/engines_table.py benchmarks/results/engines_*.json
    python benchmarks/engines_table.py run1.json:torch_eager,ort_fp32 run2.json   # only these engines of run1

The headline table gives, for each (engine, batch, threads, pair), the median over the runs that measured it
(ms and ratio; with an even number of runs, the lower middle) and the min-max of the per-round ratios over all of
those runs' rounds; the spread table lists each run's ratio (runs in the order given).
"""
import json
import statistics
import sys
from pathlib import Path

from emov2.tools.bench.engines import ENGINES, engines_markdown


def _key(r: dict) -> tuple:
    return r["engine"], r["batch"], r.get("threads"), r["emo"]


def _load(arg: str) -> dict:
    """A result file, or ``file.json:engine,engine`` for only those engines' rows and ratios of it."""
    path, _, engines = arg.partition(".json:")
    res = json.loads(Path(path + ".json" if engines else arg).read_text())
    if engines:
        keep = set(engines.split(","))
        res = {**res, "rows": [r for r in res["rows"] if r["engine"] in keep],
               "ratios": [r for r in res["ratios"] if r["engine"] in keep]}
    return res


def main(paths: list[str]) -> None:
    results = [_load(p) for p in paths]
    first: dict[tuple, dict] = {}
    every: dict[tuple, list] = {}
    rows: dict[tuple, list] = {}
    for i, res in enumerate(results):
        for r in res["ratios"]:
            first.setdefault(_key(r), r)
            every.setdefault(_key(r), []).append((i + 1, r["ratio"]))
            rows.setdefault(_key(r), []).append(r)
    print(engines_markdown({"ratios": [_median_run(v) for v in rows.values()]}))
    print()
    order = {e: i for i, e in enumerate(ENGINES)}
    multi = sorted((k for k, v in every.items() if len(v) > 1), key=lambda k: (order.get(k[0], 99), k[1], k[2] or 0, k[3]))
    if multi:
        print("| engine | batch | threads | pair | EdgeNeXt ms / EMOv2 ms in each run | min-max |")
        print("|---|---|---|---|---|---|")
        for k in multi:
            vals = every[k]
            cells = ", ".join(f"{v:.2f} (run {i})" for i, v in vals)
            lo, hi = min(v for _, v in vals), max(v for _, v in vals)
            print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} / {first[k]['edgenext']} | {cells} | {lo:.2f}-{hi:.2f} |")
        print()
    for i, (p, res) in enumerate(zip(paths, results)):
        engines = sorted({r["engine"] for r in res["rows"]})
        loads = [x[0] for r in res["rows"] for x in (r.get("load_before"), r.get("load_after")) if x]
        load = f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} during its groups" if loads else "no load record"
        name = Path(p).name if p.endswith(".json") else Path(p.partition(".json:")[0]).name + ".json"
        print(f"- run {i + 1}: `{name}` ({res['created']}; {', '.join(engines)}; threads {res['threads']}; "
              f"{res['repeats']} rounds; OMP_WAIT_POLICY={res.get('env', {}).get('OMP_WAIT_POLICY')}): {load}")
        for note in res.get("notes", []):
            print(f"  - {note}")
        for r in res["rows"]:
            if r.get("error"):
                print(f"  - error {r['engine']} batch {r['batch']} {r['model']}: {r['error']}")


def _median_run(runs: list[dict]) -> dict:
    """One headline cell from the runs of a key: the median run's ms and ratio, rounds' min-max over all runs."""
    ordered = sorted(runs, key=lambda r: r["ratio"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["ratio"] = statistics.median_low([r["ratio"] for r in runs])
    mid["ratio_min"] = min(r["ratio_min"] for r in runs)
    mid["ratio_max"] = max(r["ratio_max"] for r in runs)
    return mid


if __name__ == "__main__":
    main(sys.argv[1:])
