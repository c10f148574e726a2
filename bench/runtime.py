"""Where and how the numbers are computed: device, number format, threads and compilation.

One ``Runtime`` is made per process (``make_runtime``) and handed to the protocol; it records what
it chose in ``provenance()``. See docs/architecture.md.

- Precision ``auto``: on CPU both candidates (fp32 and bf16 autocast) are timed for a few steps on
  a copy of the real model and batch, the first time a machine meets a (backbone, size, batch,
  phase); bf16 is taken only when it is faster by ``BF16_MARGIN`` (``choose_precision``). The
  figures are cached in ``$BENCH_CACHE/precision.json`` (default ``~/.cache/medssl-bench``). On
  CUDA, bf16 is taken wherever the GPU supports it, without measuring.
- Threads: intra-op threads ≤ the cores this process may use (CPU affinity and cgroup quota),
  ``--threads N`` overrides (``choose_threads``). ``bench/__init__`` sets ``OMP_WAIT_POLICY=PASSIVE``
  before torch is loaded, so idle OpenMP threads sleep instead of spinning against other work.
- Compile: ``compile_break_even`` / ``compile_pays`` decide from measured figures whether
  ``torch.compile`` repays its compile time over a job.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError

PRECISIONS = ("auto", "bf16", "fp32")
BF16_MARGIN = 0.10  # bf16 must be ≥ 10% faster than fp32 to be chosen: below that, fp32 is as fast and exact
TRIAL_WARMUP = 2  # untimed calls of trial(p) per candidate (building the copy, kernel selection)
TRIAL_REPEATS = 3  # timed calls per candidate, interleaved across candidates; the median counts
SCREEN_RATIO = 3.0  # a candidate this much slower than the fastest on the screening batch is not timed further
SCREEN_IMAGES = 4  # images of the screening step (``trial.screen``)
CACHE_FILE = "precision.json"
CACHE_VERSION = 1

Trial = Callable[[str], None]


# --- device -------------------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None


def cache_dir() -> Path:
    """``$BENCH_CACHE``, else ``~/.cache/medssl-bench`` (the same folder as the dataset cache)."""
    env = os.environ.get("BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medssl-bench"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model string (``model name`` of /proc/cpuinfo), else what ``platform`` knows."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags_have_bf16(cpuinfo: str) -> bool:
    """Native bf16 units (AVX512-BF16 or AMX-BF16) among the CPU flags. Informative only: whether
    bf16 pays is measured, since a native flag is no guarantee (it was 0.7× fp32 on one Xeon)."""
    return any(f" {flag}" in cpuinfo for flag in ("avx512_bf16", "amx_bf16"))


# --- precision ----------------------------------------------------------------------------------

def choose_precision(images_per_s: dict[str, float], margin: float = BF16_MARGIN) -> str:
    """fp32 unless bf16 is faster than fp32 by more than ``margin`` (0.1 = 10%) in images/s."""
    if not images_per_s:
        raise ValueError("no precision was timed")
    bad = {p: v for p, v in images_per_s.items() if p not in ("fp32", "bf16") or not (v > 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"timings must be finite images/s > 0 for fp32/bf16, got {bad}")
    if "fp32" not in images_per_s:
        return "bf16"
    if "bf16" in images_per_s and images_per_s["bf16"] > images_per_s["fp32"] * (1.0 + margin):
        return "bf16"
    return "fp32"


def precision_candidates(device: torch.device) -> list[str]:
    """What ``auto`` may choose on ``device``: fp32, and bf16 where autocast supports it."""
    if device.type == "cpu":
        return ["fp32", "bf16"]
    if device.type == "cuda":
        return ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    return ["fp32"]


def key_text(key: dict[str, Any]) -> str:
    """A canonical text for a decision key: ``{"backbone": "resnet18", "size": 64, ...}``."""
    return json.dumps(key, sort_keys=True, default=str)


def machine_id(device: torch.device, threads: int) -> str:
    """What a precision figure is valid for: the processor, the cores and threads, the torch build."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_model()} ({os.cpu_count()} cpus, {threads} threads)"
    return f"{where} | torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_trial(trial: Trial, candidates: list[str], device: torch.device, batch: int = 1,
                  warmup: int = TRIAL_WARMUP, repeats: int = TRIAL_REPEATS) -> dict[str, float]:
    """images/s of each candidate: ``warmup`` untimed calls each, then ``repeats`` timed calls
    interleaved across candidates (so a change of load hits both alike), median per candidate. A trial
    with a ``screen`` is screened first (``_screen``); when one candidate is left, the screening
    figures (images/s on ``trial.screen_batch`` images) are returned for all.
    ``batch``: images per call (1 gives calls per second). The RNG state is restored afterwards, so
    measuring does not change the run's numbers."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        screened = _screen(trial, candidates, device)
        if screened is not None:
            kept, screen_rates = screened
            if len(kept) == 1:
                return screen_rates
            candidates = kept
        seconds: dict[str, list[float]] = {p: [] for p in candidates}
        for p in candidates:
            for _ in range(warmup):
                trial(p)
        sync(device)
        for _ in range(repeats):
            for p in candidates:
                start = time.perf_counter()
                trial(p)
                sync(device)
                seconds[p].append(time.perf_counter() - start)
    return {p: batch / max(statistics.median(s), 1e-9) for p, s in seconds.items()}


def _screen(trial: Trial, candidates: list[str], device: torch.device
            ) -> tuple[list[str], dict[str, float]] | None:
    """A quick first look on a few images (``trial.screen``, a step on ``trial.screen_batch`` images,
    when the trial has one): one untimed and one timed call per candidate. Candidates more than
    ``SCREEN_RATIO`` slower than the fastest are dropped — e.g. bf16 emulated in software, 27× slower
    than fp32 on one EPYC, whose full trial alone would have cost minutes. Returns (kept, images/s on
    the screening batch), or None without a screen or when it fails (then every candidate is timed)."""
    screen = getattr(trial, "screen", None)
    if screen is None or len(candidates) < 2:
        return None
    seconds: dict[str, float] = {}
    try:
        for p in candidates:
            screen(p)
            sync(device)
            start = time.perf_counter()
            screen(p)
            sync(device)
            seconds[p] = max(time.perf_counter() - start, 1e-9)
    except Exception:  # noqa: BLE001 - a method that cannot step on a few images: time the full batch
        return None
    fastest = min(seconds.values())
    kept = [p for p in candidates if seconds[p] <= SCREEN_RATIO * fastest]
    images = int(getattr(trial, "screen_batch", 1))
    return kept, {p: images / t for p, t in seconds.items()}


class PrecisionCache:
    """``precision.json``: measured images/s per machine × key. Safe for several processes (a lock
    file, atomic replace); a corrupt or unreadable file counts as empty and is rewritten."""

    _lock = threading.Lock()

    def __init__(self, folder: Path):
        self.path = Path(folder) / CACHE_FILE

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing, unreadable, not JSON: start afresh
            return {"version": CACHE_VERSION, "machines": {}}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
                or not isinstance(data.get("machines"), dict):
            return {"version": CACHE_VERSION, "machines": {}}
        return data

    def get(self, machine: str, key: str) -> dict[str, float] | None:
        """The cached images/s per candidate, or None when absent or malformed."""
        entry = self._read()["machines"].get(machine, {})
        entry = entry.get(key) if isinstance(entry, dict) else None
        rates = entry.get("images_per_s") if isinstance(entry, dict) else None
        if not isinstance(rates, dict) or not rates:
            return None
        if not all(p in ("fp32", "bf16") and isinstance(v, (int, float)) and v > 0 for p, v in rates.items()):
            return None
        return {p: float(v) for p, v in rates.items()}

    def put(self, machine: str, key: str, rates: dict[str, float], choice: str) -> None:
        data = self._read()
        machines = data["machines"]
        if not isinstance(machines.get(machine), dict):
            machines[machine] = {}
        machines[machine][key] = {"images_per_s": rates, "choice": choice,
                                  "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".precision-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes: the second process waits, then finds the figures."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.path.with_suffix(".lock"), "a")  # noqa: SIM115 - closed below
            except OSError:
                yield
                return
            try:
                try:
                    import fcntl

                    fcntl.flock(handle, fcntl.LOCK_EX)
                except ImportError:  # not POSIX: the thread lock only
                    pass
                yield
            finally:
                handle.close()  # releases the flock


# --- threads ------------------------------------------------------------------------------------

def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"200000 100000"`` or ``"max 100000"``) → cores, None if unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` → cores, None if unlimited (-1)."""
    try:
        quota, period = float(quota_text), float(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_v2_path(self_cgroup: str) -> str:
    for line in self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return "/"


def cgroup_quota_cores(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2, else v1), None when there is none."""
    try:
        own = _cgroup_v2_path(Path("/proc/self/cgroup").read_text())
    except OSError:
        own = "/"
    for path in (root / own.lstrip("/") / "cpu.max", root / "cpu.max"):
        with contextlib.suppress(OSError):
            return parse_cpu_max(path.read_text())
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        with contextlib.suppress(OSError):
            return parse_cfs((folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text())
    return None


def affinity_cores() -> int:
    """The CPUs this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None, affinity_cores: int, cgroup_quota_cores: float | None,
                   processes: int = 1) -> int:
    """Intra-op threads per process: ``requested`` when given, else the usable cores (the affinity
    mask, capped by the cgroup quota rounded down, at least 1) shared among ``processes``."""
    if requested is not None:
        if requested < 1:
            raise BenchError(f"--threads {requested}: give a number of threads ≥ 1")
        return int(requested)
    cores = max(1, int(affinity_cores))
    if cgroup_quota_cores is not None:
        cores = min(cores, max(1, math.floor(cgroup_quota_cores)))
    return max(1, cores // max(1, processes))


MAX_AUTO_WORKERS = 4  # beyond this, memory (a data and model copy per process) outweighs the gain


def choose_workers(requested: str | int, device_type: str, usable_cores: int, items: int,
                   threads: int | None = None) -> int:
    """Local worker processes of ``bench run``: ``requested`` when a number, else (``auto``) one
    single-threaded process per usable core on a CPU (at most ``MAX_AUTO_WORKERS`` and no more than
    there are jobs and cells), one process on a GPU or when ``threads`` were asked for.

    Why processes, not threads, on a CPU: at the sizes of small benchmarks a training step is many
    small kernels whose parallel regions scale poorly, so two one-thread processes did 1.6× the
    images/s of one two-thread process on a 2-core machine (bench speed, docs/architecture.md); and a
    one-thread process never spins against a competing program."""
    if isinstance(requested, int) or str(requested).strip().isdigit():
        count = int(requested)
        if count < 1:
            raise BenchError(f"--workers {count}: give a number of processes ≥ 1, or auto")
        return count
    if str(requested).strip() != "auto":
        raise BenchError(f"--workers {requested!r}: give a number of processes ≥ 1, or auto")
    if device_type != "cpu" or threads is not None:
        return 1
    return max(1, min(int(usable_cores), MAX_AUTO_WORKERS, int(items)))


def usable_cores() -> int:
    """The cores this process may use: its affinity mask capped by the cgroup quota (at least 1)."""
    return choose_threads(None, affinity_cores(), cgroup_quota_cores())


def openmp_runtime(maps: str | None = None) -> str:
    """Which OpenMP library torch loaded (GNU libgomp, Intel libiomp5, LLVM libomp), from the
    process's memory map; "unknown" where that cannot be read."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    for lib, name in (("libiomp5", "Intel libiomp5"), ("libgomp", "GNU libgomp"), ("libomp", "LLVM libomp")):
        if lib in maps:
            return name
    return "unknown"


def omp_wait_policy() -> dict[str, Any]:
    """The OpenMP wait policy and whether it is in effect: the OpenMP library reads it once, when
    torch is first loaded, so it counts only if ``bench`` was imported before torch."""
    import bench

    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "omp_wait_policy_in_effect": not getattr(bench, "TORCH_LOADED_FIRST", False)}


# --- compile ------------------------------------------------------------------------------------

def compile_break_even(compile_s: float, eager_images_per_s: float, compiled_images_per_s: float) -> float:
    """Images after which ``torch.compile`` has repaid its compile time (inf if it is not faster)."""
    if eager_images_per_s <= 0 or compiled_images_per_s <= 0:
        raise ValueError("throughputs must be > 0")
    saved_per_image = 1.0 / eager_images_per_s - 1.0 / compiled_images_per_s
    if saved_per_image <= 0:
        return math.inf
    return max(0.0, compile_s) / saved_per_image


def compile_pays(compile_s: float, eager_images_per_s: float, compiled_images_per_s: float, images: float) -> bool:
    """Whether a job of ``images`` training images finishes sooner compiled (compile time included)."""
    return images >= compile_break_even(compile_s, eager_images_per_s, compiled_images_per_s)


# --- the runtime --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Device, number format (as asked: auto, bf16 or fp32), compilation and thread count of a run."""

    device: torch.device
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None
    cache: Path | None = None  # folder of precision.json; None: cache_dir()
    margin: float = BF16_MARGIN
    thread_policy: dict[str, Any] = field(default_factory=dict, compare=False)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    def precision_for(self, key: dict[str, Any], trial: Trial | None = None) -> str:
        """The number format for ``key`` (e.g. ``{"phase": "pretrain", "backbone": ..., "size": ...,
        "batch": ...}``). Non-auto: as asked. auto on CUDA: bf16 where supported. auto on CPU: the
        cached figures for this machine × key, else ``trial`` is timed (``trial(p)`` runs one training
        step at precision ``p`` on a COPY of the model and batch; its first call may build the copy),
        else — no figures and no trial — fp32."""
        if self.precision != "auto":
            return self.precision
        text = key_text(key)
        if text in self.decisions:
            return self.decisions[text]["choice"]
        candidates = precision_candidates(self.device)
        if self.device.type == "cuda":  # tensor cores: bf16 wherever supported, not measured
            return self._decide(text, candidates[-1], "rule: bf16 where the GPU supports it")
        if len(candidates) == 1:
            return self._decide(text, "fp32", "rule: no bf16 autocast on this device")
        store = PrecisionCache(self.cache or cache_dir())
        machine = machine_id(self.device, torch.get_num_threads())
        with store.locked():
            rates = store.get(machine, text)
            if rates is not None and set(rates) == set(candidates):
                return self._decide(text, choose_precision(rates, self.margin), "cache", rates)
            if trial is None:
                return self._decide(text, "fp32", "default: not measured")
            rates = measure_trial(trial, candidates, self.device, int(key.get("batch", 1)))
            choice = choose_precision(rates, self.margin)
            with contextlib.suppress(OSError):  # a read-only cache: the choice holds for this run
                store.put(machine, text, rates, choice)
        return self._decide(text, choice, "measured", rates)

    def _decide(self, text: str, choice: str, source: str, rates: dict[str, float] | None = None) -> str:
        self.decisions[text] = {"choice": choice, "source": source,
                                **({"images_per_s": {p: round(v, 2) for p, v in rates.items()}} if rates else {})}
        return choice

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device for ``"bf16"``; nothing for ``"fp32"``."""
        if precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if precision == "fp32":
            return contextlib.nullcontext()
        raise ValueError(f"autocast needs bf16 or fp32, got {precision!r} (resolve auto with precision_for)")

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` on the device; on CUDA also channels-last memory and cuDNN autotuning."""
        module = module.to(self.device)
        if self.device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        return module

    def apply_threads(self) -> None:
        """Set torch's thread counts to this runtime's (again in a worker process that received it)."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with contextlib.suppress(RuntimeError):  # only settable before the first inter-op work
            torch.set_num_interop_threads(1)

    def provenance(self) -> dict[str, Any]:
        """What a record should keep about how its numbers were computed."""
        info: dict[str, Any] = {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_model(),
            "precision": self.precision, "precision_margin": self.margin,
            "precision_decisions": dict(self.decisions), "compile": self.compile,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "thread_policy": dict(self.thread_policy), "openmp": openmp_runtime(), **omp_wait_policy(),
        }
        if self.device.type == "cpu":
            info["cpu_bf16_flags"] = cpu_flags_have_bf16(_cpuinfo())
        return info


def make_runtime(device: str | torch.device = "auto", precision: str = "auto", compile: bool = False,
                 threads: int | None = None, processes: int = 1, cache: Path | None = None,
                 margin: float = BF16_MARGIN) -> Runtime:
    """Resolve the device, check the precision, choose and apply the thread count.

    ``processes``: how many processes of this run share the machine's cores (``--workers``)."""
    if precision not in PRECISIONS:
        raise BenchError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    target = device if isinstance(device, torch.device) else resolve_device(device)
    cores, quota = affinity_cores(), cgroup_quota_cores()
    chosen = choose_threads(threads, cores, quota, processes)
    policy = {"requested": threads, "affinity_cores": cores, "cgroup_quota_cores": quota,
              "processes": processes, "chosen": chosen}
    runtime = Runtime(target, precision, bool(compile), chosen, cache, margin, policy)
    runtime.apply_threads()
    return runtime
