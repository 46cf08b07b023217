"""`emov2 downstream`: params and FLOPs of the paper's detectors, segmenters, U-EMO, V-EMO and D-EMO
next to its figures (the table of docs/DOWNSTREAM.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..tools.common import paper_targets
from ..tools.downstream import HEADER, downstream_rows, markdown_table, rows_to_json, table_cells
from .app import app
from .common import console, fail
from .zoo import progress_callback


@app.command()
def downstream(
        json_out: bool = typer.Option(False, '--json', help='Print JSON instead of a table.'),
        targets: Optional[Path] = typer.Option(None, help='paper_targets.json (default: the copy in the package).'),
        markdown: Optional[Path] = typer.Option(None, help='Also write the tables as Markdown to this file.'),
        only: Optional[str] = typer.Option(None, help='Only the paper tables whose name contains this text '
                                           '(detection, segmentation, unet, video, dit).'),
) -> None:
    """Every downstream model of the paper: params and FLOPs (fvcore, batch 1, the paper's input) vs its figures."""
    try:
        paper = paper_targets(targets)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    if only:
        paper = {k: v for k, v in paper.items() if only in k}
        if not paper:
            fail(f'no paper table matches {only!r}')
    with progress_callback('counting downstream models') as on_row:
        rows = downstream_rows(paper, on_row=on_row)
    if json_out:
        typer.echo(rows_to_json(rows))
    else:
        table = Table(title='Downstream models: ours vs paper')
        for h in HEADER:
            table.add_column(h, justify='left' if h in ('model', 'backbone', 'note') else 'right')
        for r in rows:
            table.add_row(*table_cells(r))
        console.print(table)
    if markdown:
        markdown.write_text(markdown_table(rows, header=only is None) + '\n')
