"""SSDLite-EMOv2 vs torchvision's SSDLite-MobileNetV3-Large on CPU: writes JSON and a markdown table.

    python benchmarks/bench_detection.py --out benchmarks/results/detection [--backbones emov2_1m,emov2_2m,emov2_5m]
"""
import argparse
import json
from pathlib import Path

from emov2.tools.bench.detection import bench_detection, markdown_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='benchmarks/results/detection', help='folder for detection.json / detection.md')
    p.add_argument('--backbones', default='emov2_1m,emov2_2m,emov2_5m')
    p.add_argument('--image-size', type=int, default=320)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--eager', action='store_true', help='also time the EMO training graphs (not deployed)')
    p.add_argument('--no-macs', action='store_true', help='skip the fvcore MAC counts')
    a = p.parse_args()
    result = bench_detection([b for b in a.backbones.split(',') if b], image_size=a.image_size, batch=a.batch,
                             repeats=a.repeats, threads=a.threads, eager=a.eager, count_macs=not a.no_macs,
                             log=lambda s: print(s, flush=True))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'detection.json').write_text(json.dumps(result, indent=2))
    table = markdown_table(result)
    (out / 'detection.md').write_text(table)
    print(table)


if __name__ == '__main__':
    main()
