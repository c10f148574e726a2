"""The ``bench`` command: run, report, diagnose, speed, methods, datasets, status.

A thin layer: it parses flags into a spec, calls the executor / reports, and shows progress and
summaries with rich. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bench.errors import BenchError

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Benchmark self-supervised pretraining for medical image segmentation.")
console = Console()
err_console = Console(stderr=True)


def handle_errors(fn):
    """User errors → one line on stderr, exit 2; Ctrl-C → what was kept, exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as err:
            err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: finished cells are kept; rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


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


def build_spec(spec_file: Path | None, preset: str | None, methods: str | None, datasets: str | None,
               fractions: str | None, seeds: str | None, backbone: str | None, size: int | None,
               init: str | None, precision: str | None, finetune_reg: str | None):
    from bench.methods import split_method_list
    from bench.spec import DEFAULT_PRESET, DatasetEntry, load_preset, load_spec, parse_fractions, validate

    if spec_file is not None and preset is not None:
        raise BenchError("pass either --spec FILE or --preset NAME, not both")
    spec = load_spec(spec_file) if spec_file is not None else load_preset(preset or DEFAULT_PRESET)
    changes: dict = {}
    if methods is not None:
        changes["methods"] = tuple(split_method_list(methods))
        changes["showcase_note"] = ""
    if datasets is not None:
        changes["datasets"] = tuple(DatasetEntry(d) for d in _split(datasets))
    if fractions is not None:
        changes["fractions"] = parse_fractions(_split(fractions))
    if seeds is not None:
        try:
            changes["seeds"] = tuple(int(s) for s in _split(seeds))
        except ValueError:
            raise BenchError(f"--seeds {seeds!r} must be integers, e.g. --seeds 0,1,2") from None
    if backbone is not None:
        changes["backbone"] = backbone
    if init is not None:
        changes["init"] = init
    if precision is not None:
        changes["precision"] = precision
    if size is not None:
        changes["pretrain"] = spec.pretrain.__class__(**{**spec.pretrain.__dict__, "size": size})
        changes["finetune"] = spec.finetune.__class__(**{**spec.finetune.__dict__, "size": size})
    if finetune_reg is not None:
        changes["finetune"] = (changes.get("finetune") or spec.finetune).__class__(
            **{**(changes.get("finetune") or spec.finetune).__dict__, "reg": finetune_reg})
    spec = spec.replace(**changes)
    validate(spec)
    return spec


@app.command()
@handle_errors
def run(
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated method specs, e.g. dicoh,cp2,byol:momentum=0.996")] = None,
    datasets: Annotated[str | None, typer.Option(help="Registry names, LAYOUT:PATH or PATH, comma-separated")] = None,
    fractions: Annotated[str | None, typer.Option(help="Label fractions in (0, 1], e.g. 0.05,0.1")] = None,
    seeds: Annotated[str | None, typer.Option(help="Finetune seeds, e.g. 0,1,2")] = None,
    spec: Annotated[Path | None, typer.Option(help="A benchmark spec (YAML)")] = None,
    preset: Annotated[str | None, typer.Option(help="A preset from benchmarks/ (default: quick)")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: reports/<spec name>)")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm backbone name")] = None,
    size: Annotated[int | None, typer.Option(help="Image size for pretraining and fine-tuning")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    init: Annotated[str | None, typer.Option(help="Backbone init of SSL methods: scratch, imagenet or a file")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, bf16 or fp32")] = None,
    finetune_reg: Annotated[str | None, typer.Option(help="Finetune regulariser: none or disp")] = None,
    compile_models: Annotated[bool, typer.Option("--compile", help="torch.compile backbone and model")] = False,
    force_new: Annotated[bool, typer.Option(help="Use --out even if it holds another spec's records")] = False,
    workers: Annotated[int, typer.Option(help="Run independent jobs and cells in N local processes")] = 1,
    executor: Annotated[str, typer.Option(help="local, slurm, or submitit-local (SLURM's path, run here)")] = "local",
    partition: Annotated[str | None, typer.Option(help="SLURM partition")] = None,
    time_min: Annotated[int, typer.Option("--time", help="SLURM time limit per task, minutes")] = 240,
    gpus: Annotated[int, typer.Option(help="SLURM GPUs per task")] = 1,
    mem_gb: Annotated[int, typer.Option("--mem", help="SLURM memory per task, GB")] = 32,
    diagnose: Annotated[bool, typer.Option(help="Feature diagnostics of the backbones before the report")] = False,
    report: Annotated[bool, typer.Option(help="Write the report at the end")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Pretrain, fine-tune and evaluate every cell of a benchmark (resumes what exists).

    Under ``torchrun --nproc_per_node N -m bench run ...`` the processes share the work: each
    pretraining runs on all of them (DDP), the fine-tuning cells are split between them.
    """
    from bench import distributed
    from bench.protocol import resolve_device

    bench_spec = build_spec(spec, preset, methods, datasets, fractions, seeds, backbone, size, init,
                            precision, finetune_reg)
    if compile_models:
        bench_spec = bench_spec.replace(compile=True)
    out = out or Path("reports") / bench_spec.name
    target = resolve_device(device)
    try:
        if distributed.launched_by_torchrun():
            target = _join_torchrun(target, workers, executor, bench_spec.pretrain.batch_size)
        _run(bench_spec, out, target, device, force_new, workers, executor, partition, time_min, gpus, mem_gb,
             diagnose, report, progress)
    finally:
        distributed.shutdown()


def _join_torchrun(target, workers: int, executor: str, batch_size: int):
    """Join torchrun's process group; only rank 0 prints. Returns this rank's device."""
    from bench import distributed

    if workers > 1 or executor != "local":
        raise BenchError("under torchrun the processes share one benchmark; drop --workers/--executor, "
                         "or run bench without torchrun")
    distributed.init_from_env(target)
    if not distributed.is_main():
        console.quiet = err_console.quiet = True
    distributed.per_rank_batch(batch_size)
    return distributed.local_device(target)


def _run(bench_spec, out: Path, target, device: str, force_new: bool, workers: int, executor: str,
         partition: str | None, time_min: int, gpus: int, mem_gb: int, diagnose: bool, report: bool,
         progress: bool) -> None:
    from bench import distributed
    from bench.execute import run_benchmark, run_parallel, run_submitit

    console.print(f"[bold]{bench_spec.name}[/bold]: {len(bench_spec.methods)} method(s) × "
                  f"{len(bench_spec.datasets)} dataset(s) × fractions {list(bench_spec.fractions)} × seeds "
                  f"{list(bench_spec.seeds)} on {target} → {out}")
    if executor == "local" and workers <= 1:
        summary = run_benchmark(bench_spec, out, target, RichReporter(progress and distributed.is_main()),
                                force_new=force_new)
    elif executor == "local":
        summary = run_parallel(bench_spec, out, target, workers, RichReporter(progress), force_new=force_new)
    elif executor in ("slurm", "submitit-local"):
        params = {"timeout_min": time_min} if executor == "submitit-local" else {
            "timeout_min": time_min, "gpus_per_node": gpus, "mem_gb": mem_gb, "slurm_partition": partition}
        summary = run_submitit(bench_spec, out, device if executor == "slurm" else str(target),
                               "local" if executor == "submitit-local" else "slurm",
                               {k: v for k, v in params.items() if v is not None}, force_new=force_new)
        if executor == "slurm":
            for note in summary.notes:
                console.print(note)
            return
    else:
        raise BenchError(f"--executor {executor!r} unknown; use local, slurm or submitit-local")
    if not distributed.is_main():  # rank 0 prints the summary and writes the report
        if not summary.ok:
            raise typer.Exit(1)
        return
    _print_summary(summary, bench_spec)
    if diagnose:
        from bench.execute import diagnose_run

        with console.status("feature diagnostics"):
            diagnose_run(out)
    if report:
        _write_report(out, bench_spec.metric)
    for note in summary.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if bench_spec.showcase_note:
        console.print(f"[yellow]note:[/yellow] {bench_spec.showcase_note}")
    if not summary.ok:
        err_console.print(f"[bold red]{len(summary.failures)} job(s)/cell(s) failed[/bold red] "
                          f"(reasons in {out}/run.json); finished cells are kept, rerun to retry the rest")
        raise typer.Exit(1)


def _print_summary(summary, spec) -> None:
    import pandas as pd

    table_path = summary.out / "results.csv"
    results = pd.read_csv(table_path)
    ok = results[results["status"] == "ok"]
    console.print(f"{summary.ran} ran, {summary.reused} reused, {len(summary.failures)} failed in "
                  f"{summary.seconds:.0f} s")
    if ok.empty:
        return
    metric = spec.metric if spec.metric in ok else "miou"
    grouped = ok.groupby(["dataset", "fraction", "method"])[metric].agg(["mean", "std", "count"]).reset_index()
    table = Table(title=f"test {metric} (mean ± std over seeds)")
    for column in ("dataset", "fraction", "method", metric, "seeds"):
        table.add_column(column)
    for row in grouped.itertuples():
        std = 0.0 if pd.isna(row.std) else row.std
        table.add_row(row.dataset, f"{row.fraction:g}", row.method, f"{row.mean:.3f} ± {std:.3f}",
                      str(row.count))
    console.print(table)


def _write_report(out: Path, metric: str) -> None:
    from bench.reports import build_report

    try:
        summary = build_report(out, metric=metric)
    except BenchError as err:
        console.print(f"[yellow]report not written:[/yellow] {err}")
        return
    for line in summary.lines:
        console.print(line)
    console.print(f"report: {summary.out_dir}")


@app.command()
@handle_errors
def report(
    path: Annotated[Path, typer.Argument(help="A run folder or a long-format CSV")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: <run>/report)")] = None,
    metric: Annotated[str, typer.Option(help="Ranking metric: any numeric column")] = "miou",
    lower_is_better: Annotated[bool | None, typer.Option("--lower-is-better/--higher-is-better",
                                                         help="Direction (default: known per metric)")] = None,
    blocks: Annotated[str, typer.Option(help="dataset, dataset-fraction or dataset-seed")] = "dataset",
    cliques: Annotated[str, typer.Option(help="nemenyi or wilcoxon")] = "nemenyi",
    alpha: Annotated[float, typer.Option(help="Significance level")] = 0.05,
) -> None:
    """Rank tables, statistics, CD diagrams, plots and report.md/html from results."""
    from bench.reports import build_report

    if not path.exists():
        raise BenchError(f"{path} does not exist; pass a run folder (reports/<name>) or a CSV file")
    summary = build_report(path, out, metric=metric, lower_is_better=lower_is_better, blocks=blocks,
                           cliques=cliques, alpha=alpha)
    for line in summary.lines:
        console.print(line)
    console.print(f"report written to {summary.out_dir}")


@app.command()
@handle_errors
def methods() -> None:
    """List the registered methods with their papers and defaults."""
    from bench.methods import MODIFIERS, REGISTRY, method_names

    table = Table(title="methods (override as NAME:key=value, compose as NAME+disp)")
    for column in ("name", "paper", "defaults"):
        table.add_column(column, overflow="fold")
    for name in method_names():
        cls = REGISTRY[name]
        table.add_row(name, cls.paper, cls.describe() or "—")
    for name, cls in sorted(MODIFIERS.items()):
        table.add_row(f"+{name}", cls.paper, ", ".join(f"{k}={v}" for k, v in cls.defaults.items()))
    console.print(table)


@app.command("datasets")
@handle_errors
def datasets_command(
    path: Annotated[str | None, typer.Argument(help="A dataset folder, LAYOUT:PATH or a registry name")] = None,
) -> None:
    """List known datasets and layouts, or check one folder (decodes every file)."""
    from bench import datasets

    if path is None:
        table = Table(title="datasets and layouts (--datasets NAME, LAYOUT:PATH or PATH)")
        table.add_column("name")
        table.add_column("what", overflow="fold")
        for name, what in datasets.dataset_catalog():
            table.add_row(name, what)
        console.print(table)
        return
    with Progress(TextColumn("decoding"), BarColumn(), TaskProgressColumn(), console=console) as bar:
        task = bar.add_task("decode", total=None)
        report_ = datasets.inspect(path, progress=lambda done, total: bar.update(task, completed=done,
                                                                                   total=total))
    for line in _report_lines(report_):
        console.print(line)


def _report_lines(report_) -> list[str]:
    if hasattr(report_, "lines"):
        lines = report_.lines
        return list(lines() if callable(lines) else lines)
    return [str(report_)]


@app.command()
@handle_errors
def diagnose(
    out: Annotated[Path, typer.Argument(help="A run folder")],
    seed: Annotated[int, typer.Option(help="Seed of the views and pixel samples")] = 0,
    max_pixels: Annotated[int, typer.Option(help="Pixels sampled per dataset and method")] = 2000,
    max_images: Annotated[int, typer.Option(help="Test images per dataset (seeded sample)")] = 64,
) -> None:
    """Feature diagnostics of every pretrained backbone: variance, positive/negative similarity,
    silhouette, linear separability, effective rank, t-SNE plots."""
    from bench.execute import diagnose_run

    with console.status("embedding test images"):
        files = diagnose_run(out, seed=seed, max_pixels=max_pixels, max_images=max_images)
    console.print(f"diagnostics written: {', '.join(str(f) for f in files)}")
    console.print(f"run [bold]bench report {out}[/bold] to include them in the report")


@app.command()
@handle_errors
def speed(
    methods: Annotated[str, typer.Option(help="Comma-separated method specs to time")] = "byol",
    backbone: Annotated[str, typer.Option(help="timm backbone")] = "resnet18",
    size: Annotated[int, typer.Option(help="Image size")] = 64,
    batch_size: Annotated[int, typer.Option(help="Batch size")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, bf16 or fp32 for the project's path")] = "auto",
    reference: Annotated[bool, typer.Option(help="Also time the per-sample PIL + DataLoader pipeline")] = True,
    reference_workers: Annotated[int, typer.Option(help="DataLoader workers of the reference pipeline")] = 2,
    windows: Annotated[int, typer.Option(help="Timed windows (median reported)")] = 5,
    out: Annotated[Path, typer.Option(help="Folder for speed.json")] = Path("reports/speed"),
) -> None:
    """Training throughput (images/s) per method and for fine-tuning, vs. a plain PIL pipeline."""
    import torch

    from bench import datasets
    from bench.methods import split_method_list
    from bench.protocol import resolve_device, resolve_precision
    from bench.speed import finetune_speed, pretrain_speed, reference_speed, write_speed

    target = resolve_device(device)
    mode = resolve_precision(precision, target)
    data = datasets.load_dataset("synthetic-polyp", size, n=max(4 * batch_size, 64))
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks).unsqueeze(1)
    records = []
    with console.status("timing") as status:
        for text in split_method_list(methods):
            status.update(f"timing pretraining of {text}")
            records.append(pretrain_speed(text, images, backbone, size, batch_size, target, mode, windows=windows))
        status.update("timing fine-tuning")
        records.append(finetune_speed(images, masks, backbone, size, batch_size, target, mode, windows=windows))
        if reference:
            status.update("timing the per-sample PIL reference pipeline")
            records.append(reference_speed(images, backbone, size, batch_size, target, "fp32",
                                           workers=reference_workers, windows=windows))
    table = Table(title=f"training throughput on {target} ({backbone}, {size} px, batch {batch_size})")
    for column in ("method", "phase", "pipeline", "precision", "images/s", "vs reference"):
        table.add_column(column)
    ref = next((r.images_per_s for r in records if r.phase == "reference"), None)
    for r in records:
        ratio = f"{r.images_per_s / ref:.2f}×" if ref and r.phase != "finetune" else ""
        table.add_row(r.method, r.phase, r.pipeline, r.precision, f"{r.images_per_s:.1f}", ratio)
    console.print(table)
    console.print(f"written {write_speed(out, records)}")


@app.command()
@handle_errors
def status(out: Annotated[Path, typer.Argument(help="A run folder")]) -> None:
    """Done / running / failed / pending cells and jobs of a run folder, from its records."""
    from bench.execute import grid_status

    rows, jobs = grid_status(out)
    table = Table(title=f"{out}: finetune cells")
    for column in ("method", "done", "running", "failed", "pending"):
        table.add_column(column)
    for method, counts in rows.items():
        table.add_row(method, *(str(counts[k]) for k in ("done", "running", "failed", "pending")))
    console.print(table)
    console.print("pretrain jobs: " + ", ".join(f"{k} {v}" for k, v in jobs.items()))


def main() -> None:  # pragma: no cover - the console script calls app() directly
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
