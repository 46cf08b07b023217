"""``python -m emov2 ...`` is the ``emov2`` command (handy under ``torchrun -m emov2 train ...``)."""
from .cli import main

if __name__ == '__main__':
    main()
