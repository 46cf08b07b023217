"""`emov2` command line: a thin layer over the library. Each submodule adds its commands."""
from .app import app
from . import zoo  # noqa: F401  (registers commands)
from . import train  # noqa: F401
from . import bench, export  # noqa: F401
from . import viz  # noqa: F401  (emov2 viz cam | erf | windows | frontier)
from . import detect, segment, video, generate  # noqa: F401  (emov2 detect | segment | video | generate ...)
from . import downstream  # noqa: F401  (emov2 downstream)


def main() -> None:
    app()
