"""`emov2 zoo`: params and FLOPs of every model and ablation next to the paper's figures."""
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app


@app.command()
def zoo(
        json_out: bool = typer.Option(False, '--json', help='Print JSON instead of a table.'),
        targets: Optional[Path] = typer.Option(None, help='paper_targets.json (default: ../shared/reference).'),
        markdown: Optional[Path] = typer.Option(None, help='Also write the table as Markdown to this file.'),
        no_ablations: bool = typer.Option(False, '--no-ablations', help='Only the registered models.'),
) -> None:
    """Every registered model and ablation row: params, FLOPs (fvcore, batch 1), paper figures, differences."""
    from ..zoo import TABLE_HEADER, markdown_table, paper_targets, rows_to_json, table_cells, zoo_rows
    rows = zoo_rows(paper_targets(targets), include_ablations=not no_ablations)
    if json_out:
        typer.echo(rows_to_json(rows))
    else:
        table = Table(title='EMO model zoo: ours vs official definition vs paper')
        for h in TABLE_HEADER:
            table.add_column(h, justify='left' if h == 'name' else 'right')
        for r in rows:
            table.add_row(*table_cells(r))
        Console(width=200).print(table)
    if markdown:
        markdown.write_text(markdown_table(rows) + '\n')
