"""`emov2` command line: a thin layer over the library. Each submodule adds its commands."""
from .app import app
from . import zoo  # noqa: F401  (registers commands)
from . import train  # noqa: F401
from . import bench, export  # noqa: F401


def main() -> None:
    app()
