"""`emov2` command line: a thin layer over the library. Each submodule adds its commands."""
from .app import app
from . import zoo  # noqa: F401  (registers commands)
from . import train  # noqa: F401
from . import bench, export  # noqa: F401
from . import viz  # noqa: F401  (emov2 viz cam | erf | windows | frontier)


def main() -> None:
    app()
