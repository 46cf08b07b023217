"""Full benchmark (same as `emov2 bench`); pass the same options, e.g. `--quick` or `--large-batch 256`."""
import sys

from emov2.cli import main

if __name__ == "__main__":
    sys.argv = ["emov2", "bench", *sys.argv[1:]]
    main()
