"""The ``bench`` command: run, report, diagnose, speed, methods, datasets, status, export.

A thin layer (docs/architecture.md): it turns flags into a spec and a runtime, calls the executors
or the reports, and shows progress and summaries with rich. Every user error is one line on stderr
and exit code 2. ``bench --install-completion`` adds shell completion.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from bench.errors import BenchError
from bench.terminal import RichReporter, console, err_console, results_table, summary_line


def _untyped_flags(command: Any, ctx: typer.Context) -> None:
    """Flags take no value: show them without a type (typer would print ``<bool>``)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if getattr(param, "is_flag", False):
            param.metavar = ""


class Group(typer.core.TyperGroup):
    """The ``bench`` group; its help and every command's show flags without a type."""

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _untyped_flags(command, ctx)
        return command

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        _untyped_flags(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(cls=Group, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark self-supervised pretraining for medical image segmentation.")


def _version(value: bool) -> None:
    if value:
        import bench

        console.print(f"bench (medssl-bench) {bench.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
) -> None:
    """The options before the command (``bench --version``)."""


def handle_errors(fn):
    """User errors → one line on stderr, exit 2; Ctrl-C → what was kept, exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as err:
            err_console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM inside bench.interrupt.terminate_as_interrupt
            from bench.interrupt import exit_code, message

            err_console.print(message(err), highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(err)) from None

    return wrapper


def build_spec(spec_file: Path | None, preset: str | None, flags: dict[str, Any], settings: list[str]):
    """The spec of a run: a file or a preset, then the flags (``None``: not given), then ``--set KEY=VALUE``
    settings; the result goes through the spec's one validation pass."""
    from bench.spec import DEFAULT_PRESET, apply_settings, load_preset, load_spec, spec_from_dict, validate

    if spec_file is not None and preset is not None:
        raise BenchError("pass either --spec FILE or --preset NAME, not both")
    spec = load_spec(spec_file) if spec_file is not None else load_preset(preset or DEFAULT_PRESET)
    given = {key: value for key, value in flags.items() if value is not None}
    if given:
        raw = spec.to_dict()
        for key, value in given.items():
            if key == "size":
                raw["pretrain"]["size"] = raw["finetune"]["size"] = value
            else:
                raw[key] = value
        if "methods" in given:  # the preset's note about its method subset no longer applies
            raw["showcase_note"] = ""
        spec = spec_from_dict(raw, where="command line")
    spec = apply_settings(spec, settings) if settings else spec
    validate(spec)  # also this machine's paths (dataset folders, init file), before anything is written
    return spec


@dataclass(frozen=True)
class Execution:
    """How ``bench run`` executes a spec (none of it changes a result)."""

    out: Path
    device: str
    threads: int | None
    force_new: bool
    workers: int
    executor: str
    slurm: dict[str, Any]
    diagnose: bool
    report: bool
    progress: bool


@app.command()
@handle_errors
def run(
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated method specs, e.g. dicoh,cp2,byol:momentum=0.996, or all")] = None,
    datasets: Annotated[str | None, typer.Option(help="Registry names, LAYOUT:PATH or PATH, comma-separated")] = None,
    fractions: Annotated[str | None, typer.Option(help="Label fractions in (0, 1], e.g. 0.05,0.1")] = None,
    seeds: Annotated[str | None, typer.Option(help="Finetune seeds, e.g. 0,1,2")] = None,
    spec: Annotated[Path | None, typer.Option(help="A benchmark spec (YAML)")] = None,
    preset: Annotated[str | None, typer.Option(help="A preset from benchmarks/ (default: quick)")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="Any spec field, repeatable: --set pretrain.steps=200 --set finetune.lr=1e-4")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: reports/<spec name>)")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm backbone name")] = None,
    size: Annotated[int | None, typer.Option(help="Image size for pretraining and fine-tuning")] = None,
    init: Annotated[str | None, typer.Option(help="Backbone init of SSL methods: scratch, imagenet or a file")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (measured per machine), bf16 or fp32")] = None,
    compile_models: Annotated[bool, typer.Option("--compile", help="torch.compile backbone and model")] = False,
    keep_models: Annotated[bool, typer.Option("--keep-models", help="Keep each cell's fine-tuned weights")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads per process (default: the usable cores)")] = None,
    force_new: Annotated[bool, typer.Option(help="Use --out even if it holds another spec's records")] = False,
    workers: Annotated[str, typer.Option(
        envvar="BENCH_WORKERS", help="Local processes for independent jobs and cells: N, or auto (CPU: one "
        "single-threaded process per core, up to 4; GPU: 1)")] = "auto",
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
    from bench.interrupt import terminate_as_interrupt

    flags = {"methods": methods, "datasets": datasets, "fractions": fractions, "seeds": seeds, "backbone": backbone,
             "size": size, "init": init, "precision": precision, "compile": compile_models or None,
             "keep_models": keep_models or None, "threads": threads}
    bench_spec = build_spec(spec, preset, flags, settings or [])
    slurm = {"timeout_min": time_min, "gpus_per_node": gpus, "mem_gb": mem_gb, "slurm_partition": partition}
    how = Execution(out or Path("reports") / bench_spec.name, device, bench_spec.threads, force_new,
                    _workers(bench_spec, workers, device, executor), executor, slurm, diagnose, report, progress)
    with terminate_as_interrupt():  # SIGTERM (SLURM's stop) ends the run like Ctrl-C, exit 143
        try:
            _run(bench_spec, how)
        finally:
            distributed.shutdown()


def _workers(spec, requested: str, device: str, executor: str) -> int:
    """``--workers`` resolved (``bench.runtime.choose_workers``); 1 under torchrun and for SLURM."""
    from bench import distributed
    from bench.grid import build_grid
    from bench.runner import baseline_skips
    from bench.runtime import choose_workers, resolve_device, usable_cores

    if requested.strip() == "auto" and (executor != "local" or distributed.launched_by_torchrun()):
        return 1
    grid = build_grid(spec, baseline_skips(spec))
    return choose_workers(requested, resolve_device(device).type, usable_cores(), len(grid.jobs) + len(grid.cells),
                          spec.threads)


def _runtime(spec, how: Execution):
    """The run's ``Runtime``; under torchrun after joining the process group (each rank on its GPU)."""
    import os

    from bench import distributed
    from bench.runtime import make_runtime, resolve_device

    target = resolve_device(how.device)
    processes = how.workers if how.executor == "local" else 1
    if distributed.launched_by_torchrun():
        if how.workers > 1 or how.executor != "local":
            raise BenchError("under torchrun the processes share one benchmark; drop --workers/--executor, "
                             "or run bench without torchrun")
        distributed.init_from_env(target)
        if not distributed.is_main():
            console.quiet = err_console.quiet = True
        distributed.per_rank_batch(spec.pretrain.batch_size)
        target = distributed.local_device(target)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return make_runtime(target, spec.precision, spec.compile, how.threads, processes=max(1, processes))


def _run(bench_spec, how: Execution) -> None:
    from bench import distributed
    from bench.executors import run_benchmark, run_parallel, run_submitit
    from bench.methods.external import external_reports  # LABEL=ckpt:PATH rows: what each file gave

    runtime = _runtime(bench_spec, how)
    where = f"{how.workers} processes × {runtime.threads} thread(s)" if how.workers > 1 and how.executor == "local" \
        else f"{runtime.threads} thread(s)"
    console.print(f"[bold]{bench_spec.name}[/bold]: {len(bench_spec.methods)} method(s) × "
                  f"{len(bench_spec.datasets)} dataset(s) × fractions {list(bench_spec.fractions)} × seeds "
                  f"{list(bench_spec.seeds)} on {runtime.device} ({where}) → {how.out}")
    for match in external_reports(bench_spec):
        console.print(f"external encoder {match.line()}", highlight=False)
    if how.executor == "local" and how.workers <= 1:
        summary = run_benchmark(bench_spec, how.out, runtime, RichReporter(how.progress and distributed.is_main()),
                                force_new=how.force_new)
    elif how.executor == "local":
        summary = run_parallel(bench_spec, how.out, runtime, how.workers, RichReporter(how.progress),
                               force_new=how.force_new)
    elif how.executor in ("slurm", "submitit-local"):
        local = how.executor == "submitit-local"
        params = {"timeout_min": how.slurm["timeout_min"]} if local else how.slurm
        summary = run_submitit(bench_spec, how.out, runtime, str(runtime.device) if local else how.device,
                               "local" if local else "slurm", {k: v for k, v in params.items() if v is not None},
                               force_new=how.force_new)
        if not local:
            for note in summary.notes:
                console.print(note)
            return
    else:
        raise BenchError(f"--executor {how.executor!r} unknown; use local, slurm or submitit-local")
    if not distributed.is_main():  # rank 0 prints the summary and writes the report
        if not summary.ok:
            raise typer.Exit(1)
        return
    _print_table(summary, bench_spec)
    _report_phase(summary, bench_spec, how)
    _print_summary_line(summary)
    for note in summary.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if bench_spec.showcase_note:
        console.print(f"[yellow]note:[/yellow] {bench_spec.showcase_note}")
    if not summary.ok:
        err_console.print(f"[bold red]{len(summary.failures)} job(s)/cell(s) failed[/bold red] "
                          f"(reasons in {how.out}/run.json); finished cells are kept, rerun to retry the rest")
        raise typer.Exit(1)


def _report_phase(summary, spec, how: Execution) -> None:
    """Diagnostics and the report, timed as the run's ``report`` phase (added to run.json)."""
    from bench.executors import record_phase

    start = time.perf_counter()
    if how.diagnose:
        from bench.diagnose import diagnose_run

        with console.status("feature diagnostics"):
            diagnose_run(how.out)
    if how.report:
        _write_report(how.out, spec)
    seconds = time.perf_counter() - start
    summary.phases["report"] = summary.phases.get("report", 0.0) + seconds
    summary.seconds += seconds
    record_phase(how.out, "report", seconds)


def _print_summary_line(summary) -> None:
    console.print(summary_line(summary))


def _print_table(summary, spec) -> None:
    table = results_table(summary.out / "results.csv", spec.metric)
    if table is not None:
        console.print(table)


def _write_report(out: Path, spec) -> None:
    from bench.reports import build_report
    from bench.runner import test_images

    try:
        summary = build_report(out, metric=spec.metric, test_images=test_images(spec))
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
    """List the registered methods by family, with their papers and defaults."""
    from bench.methods import MODIFIERS, REGISTRY, method_groups

    table = Table(title="methods (override as NAME:key=value, compose as NAME+disp)")
    for column in ("group", "name", "paper", "defaults"):
        table.add_column(column, overflow="fold")
    for group, names in method_groups().items():
        for i, name in enumerate(names):
            cls = REGISTRY[name]
            table.add_row(group if i == 0 else "", name, cls.paper, cls.describe() or "—")
        table.add_section()
    for i, (name, cls) in enumerate(sorted(MODIFIERS.items())):
        table.add_row("modifiers" if i == 0 else "", f"+{name}", cls.paper,
                      ", ".join(f"{k}={v}" for k, v in cls.defaults.items()))
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
    from bench.diagnose import diagnose_run

    with console.status("embedding test images"):
        files = diagnose_run(out, seed=seed, max_pixels=max_pixels, max_images=max_images)
    console.print(f"diagnostics written: {', '.join(str(f) for f in files)}")
    console.print(f"run [bold]bench report {out}[/bold] to include them in the report")


@app.command()
@handle_errors
def speed(
    methods: Annotated[str, typer.Option(
        help="Method specs to time, comma-separated; default (the default run's) or all")] = "default",
    backbone: Annotated[str, typer.Option(help="timm backbone")] = "resnet18",
    size: Annotated[int, typer.Option(help="Image size")] = 64,
    batch_size: Annotated[int, typer.Option(help="Batch size")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (time every candidate), bf16 or fp32")] = "auto",
    threads: Annotated[int | None, typer.Option(help="Intra-op CPU threads (default: the usable cores)")] = None,
    compile_models: Annotated[bool, typer.Option("--compile", help="Also time compiled steps and compile time")
                              ] = False,
    reference: Annotated[bool, typer.Option(help="Also time the per-sample PIL + DataLoader pipeline")] = True,
    reference_workers: Annotated[int, typer.Option(help="DataLoader workers of the reference pipeline")] = 2,
    warmup: Annotated[int, typer.Option(help="Untimed steps before the windows")] = 2,
    windows: Annotated[int, typer.Option(help="Timed windows (median reported)")] = 3,
    steps: Annotated[int, typer.Option(help="Steps per timed window")] = 2,
    out: Annotated[Path, typer.Option(help="Folder for speed.json")] = Path("reports/speed"),
) -> None:
    """Training throughput (images/s) per method and for fine-tuning at each precision: the data
    path beside the compute-only step, and a plain PIL pipeline as yardstick."""
    import torch

    from bench import datasets
    from bench.runtime import make_runtime
    from bench.speed import Settings, run_speed, speed_methods, summary_rows, write_speed

    runtime = make_runtime(device, precision, compile_models, threads)
    settings = Settings(backbone, size, batch_size, runtime, warmup, windows, steps)
    names = speed_methods(methods)
    data = datasets.load_dataset("synthetic-polyp", size, n=max(4 * batch_size, 64))
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks).unsqueeze(1)
    with console.status("timing") as status:
        records = run_speed(names, images, masks, settings, reference, reference_workers, status.update)
    table = Table(title=f"training throughput on {runtime.device} ({backbone}, {size} px, batch {batch_size}, "
                        f"{runtime.threads} threads)")
    lines = summary_rows(records)
    for column in lines[0]:
        table.add_column(column)
    for line in lines:
        table.add_row(*line.values())
    console.print(table)
    console.print("data-path overhead: the data path's extra time per step over the compute-only step (goal ≤ 10%)")
    console.print(f"written {write_speed(out, records, runtime)}")


@app.command()
@handle_errors
def status(out: Annotated[Path, typer.Argument(help="A run folder")]) -> None:
    """Done / running / failed / pending cells and jobs of a run folder, from its records."""
    from bench.status import grid_status

    rows, jobs = grid_status(out, report=lambda line: err_console.print(f"note: {line}", highlight=False,
                                                                       soft_wrap=True))
    table = Table(title=f"{out}: finetune cells")
    for column in ("method", "done", "running", "failed", "pending"):
        table.add_column(column)
    for method, counts in rows.items():
        table.add_row(method, *(str(counts[k]) for k in ("done", "running", "failed", "pending")))
    console.print(table)
    console.print("pretrain jobs: " + ", ".join(f"{k} {v}" for k, v in jobs.items()))


@app.command("export")
@handle_errors
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder")],
    method: Annotated[str, typer.Option(help="The method whose pretrained backbone to export, e.g. byol")],
    fmt: Annotated[str, typer.Option("--format", help="timm, torchvision or smp (segmentation_models_pytorch)")
                   ] = "timm",
    out: Annotated[Path | None, typer.Option(help="Output .safetensors/.pth (default: <run>/export/...)")] = None,
    job: Annotated[str | None, typer.Option(help="The pretrain job, when the method has several")] = None,
) -> None:
    """Write a pretrained backbone with the keys timm, torchvision or smp load, and a JSON card beside it."""
    from bench.export import export_encoder

    for line in export_encoder(run, method, fmt, out, job).lines():
        console.print(line, highlight=False)


def main() -> None:  # pragma: no cover - the console script calls app() directly
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
