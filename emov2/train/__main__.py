"""``python -m emov2.train ...`` is ``emov2 train ...`` (handy under ``torchrun -m``)."""
import sys

from ..cli import app

if __name__ == '__main__':
    app(['train', *sys.argv[1:]], prog_name='emov2')
