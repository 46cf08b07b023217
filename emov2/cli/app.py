import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help='EMOv2 / EMO lightweight vision backbones.')


@app.callback()
def _root() -> None:
    """EMOv2 / EMO lightweight vision backbones: models, zoo, training, benchmarks, export."""
