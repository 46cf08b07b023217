"""`emov2 zoo`: params and FLOPs of every model and ablation next to the paper's figures."""
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..tools.zoo import TABLE_HEADER, markdown_table, paper_targets, rows_to_json, table_cells, zoo_rows
from .app import app


@contextmanager
def progress_callback(title: str) -> Iterator[Callable[[int, int, str], None]]:
    """An ``on_row(done, total, name)`` callback that shows progress on stderr (never on stdout).

    On a terminal: a rich progress bar; otherwise (a log file, CI) one line per row.
    """
    console = Console(stderr=True)
    if not console.is_terminal:
        def line(done: int, total: int, name: str) -> None:
            console.print(f'{title}: {done + 1}/{total} {name}' if done < total else f'{title}: done ({total} rows)',
                          soft_wrap=True, highlight=False)
        yield line
        return
    with Progress(TextColumn('[bold]{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn('{task.fields[name]}'), console=console, transient=True) as bar:
        task = bar.add_task(title, total=None, name='')

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, name=name)
        yield update


@app.command()
def zoo(
        json_out: bool = typer.Option(False, '--json', help='Print JSON instead of a table.'),
        targets: Optional[Path] = typer.Option(None, help='paper_targets.json (default: the copy shipped in the package, emov2/data).'),
        markdown: Optional[Path] = typer.Option(None, help='Also write the table as Markdown to this file.'),
        no_ablations: bool = typer.Option(False, '--no-ablations', help='Only the registered models.'),
) -> None:
    """Every registered model and ablation row: params, FLOPs (fvcore, batch 1), paper figures, differences."""
    try:
        paper = paper_targets(targets)
    except (OSError, ValueError) as exc:  # missing or malformed paper_targets.json
        Console(stderr=True).print(f'[red]error:[/red] {escape(str(exc))}', soft_wrap=True)
        raise typer.Exit(2) from None
    with progress_callback('counting params and FLOPs') as on_row:
        rows = zoo_rows(paper, include_ablations=not no_ablations, on_row=on_row)
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
