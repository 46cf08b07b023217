"""Only what the issue's targets need: EMOv2-1M/2M/5M and their EdgeNeXt counterparts, fp32 + bf16 + training."""
import sys

from emov2.cli import main

if __name__ == "__main__":
    sys.argv = ["emov2", "bench", "--models", "targets", "--no-onnx", "--out", "runs/bench_targets", *sys.argv[1:]]
    main()
