"""Merge `emov2 bench --engines` results (e.g. a run of the eager/deploy/ORT engines and one of the compiled
engines) into the one headline table of docs/BENCHMARKS.md, with the load averages each run recorded.

    python benchmarks/engines_table.py benchmarks/results/engines_*.json
"""
import json
import sys
from pathlib import Path

from emov2.tools.bench.engines import engines_markdown


def main(paths: list[str]) -> None:
    results = [json.loads(Path(p).read_text()) for p in paths]
    print(engines_markdown({"ratios": [r for res in results for r in res["ratios"]]}))
    print()
    for p, res in zip(paths, results):
        engines = sorted({r["engine"] for r in res["rows"]})
        loads = [x for r in res["rows"] for x in (r.get("load_before"), r.get("load_after")) if x]
        one_min = [x[0] for x in loads]
        print(f"- `{Path(p).name}` ({res['created']}; {', '.join(engines)}; threads {res['threads']}; "
              f"{res['repeats']} rounds; OMP_WAIT_POLICY={res.get('env', {}).get('OMP_WAIT_POLICY')}): load average "
              f"(1 min) {min(one_min):.1f}-{max(one_min):.1f} during the groups" if one_min else "")
        for note in res.get("notes", []):
            print(f"  - {note}")
        for r in res["rows"]:
            if r.get("error"):
                print(f"  - error {r['engine']} batch {r['batch']} {r['model']}: {r['error']}")


if __name__ == "__main__":
    main(sys.argv[1:])
