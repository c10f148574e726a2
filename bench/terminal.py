"""What ``bench`` shows in the terminal: the consoles, the progress of a run, its summary line and
its results table (used by ``bench.cli``)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)
PHASE_NAMES = {"data": "data", "pretrain": "pretraining", "finetune": "fine-tuning", "evaluate": "evaluation",
               "report": "report"}


class RichReporter:
    """Progress for a run: an overall bar (steps of all jobs and cells, with ETA) and the current task."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.overall = None
        self.current = None

    def start(self, total_steps: int) -> None:
        self.progress.start()
        self.overall = self.progress.add_task("[bold]benchmark", total=max(1, total_steps))

    def task(self, description: str, steps: int) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(description, total=max(1, steps))

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.overall, steps)
        if self.current is not None:
            self.progress.advance(self.current, steps)

    def skip(self, steps: int) -> None:
        self.progress.advance(self.overall, steps)

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def stop(self) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        self.progress.stop()


def summary_line(summary) -> str:
    """"12 ran, 0 reused, 0 failed in 281 s (data 4 s, pretraining 90 s, ...)": the run and where its time went."""
    phases = ", ".join(f"{PHASE_NAMES.get(k, k)} {v:.0f} s" for k, v in summary.phases.items() if v >= 0.5)
    return (f"{summary.ran} ran, {summary.reused} reused, {len(summary.failures)} failed in {summary.seconds:.0f} s"
            + (f" ({phases})" if phases else ""))


def results_table(path: Path, metric: str) -> Table | None:
    """Mean ± std over seeds of ``metric`` per dataset, fraction and method, from results.csv (None: no ok cell)."""
    import pandas as pd

    results = pd.read_csv(path)
    ok = results[results["status"] == "ok"]
    if ok.empty:
        return None
    metric = metric if metric in ok else "miou"
    grouped = ok.groupby(["dataset", "fraction", "method"])[metric].agg(["mean", "std", "count"]).reset_index()
    table = Table(title=f"test {metric} (mean ± std over seeds)")
    for column in ("dataset", "fraction", "method", metric, "seeds"):
        table.add_column(column)
    for row in grouped.itertuples():
        std = 0.0 if pd.isna(row.std) else row.std
        table.add_row(row.dataset, f"{row.fraction:g}", row.method, f"{row.mean:.3f} ± {std:.3f}", str(row.count))
    return table
