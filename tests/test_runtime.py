"""The runtime's decisions (precision, threads, compile payback), its cache and the OpenMP wait
policy. Decision functions are tested on given figures; nothing here asserts a time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import runtime
from bench.errors import BenchError
from bench.runtime import (
    PrecisionCache,
    Runtime,
    choose_precision,
    choose_threads,
    choose_workers,
    compile_break_even,
    compile_pays,
    make_runtime,
    parse_cfs,
    parse_cpu_max,
)

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


# --- precision decision ---------------------------------------------------------------------------

def test_choose_precision_prefers_fp32_unless_bf16_is_faster_by_the_margin():
    assert choose_precision({"fp32": 43.6, "bf16": 28.9}) == "fp32"  # bf16 slower (the Xeon of issue 17)
    assert choose_precision({"fp32": 100.0, "bf16": 109.0}) == "fp32"  # 9% faster: within the margin
    assert choose_precision({"fp32": 100.0, "bf16": 110.0}) == "fp32"  # exactly 10%: not more than the margin
    assert choose_precision({"fp32": 100.0, "bf16": 111.0}) == "bf16"
    assert choose_precision({"fp32": 30.0, "bf16": 39.0}) == "bf16"  # 1.3x (the EPYC of issue 17)
    assert choose_precision({"fp32": 100.0, "bf16": 101.0}, margin=0.0) == "bf16"
    assert choose_precision({"fp32": 5.0}) == "fp32"
    assert choose_precision({"bf16": 5.0}) == "bf16"


@pytest.mark.parametrize("bad", [{}, {"fp32": 0.0, "bf16": 1.0}, {"fp32": math.nan}, {"fp16": 3.0},
                                 {"fp32": math.inf, "bf16": 1.0}])
def test_choose_precision_rejects_figures_that_cannot_decide(bad):
    with pytest.raises(ValueError):
        choose_precision(bad)


# --- threads --------------------------------------------------------------------------------------

def test_choose_threads_stays_within_affinity_and_quota():
    assert choose_threads(None, 8, None) == 8
    assert choose_threads(None, 8, 2.0) == 2
    assert choose_threads(None, 8, 1.5) == 1  # a fractional quota rounds down: never more threads than cores
    assert choose_threads(None, 8, 0.5) == 1
    assert choose_threads(None, 2, 16.0) == 2  # the affinity mask is the tighter limit
    assert choose_threads(None, 8, None, processes=2) == 4
    assert choose_threads(None, 4, None, processes=3) == 1
    assert choose_threads(None, 2, None, processes=8) == 1


def test_auto_workers_are_one_single_threaded_process_per_core_on_cpu_only():
    assert choose_workers("auto", "cpu", 2, 76) == 2
    assert choose_workers("auto", "cpu", 16, 76) == runtime.MAX_AUTO_WORKERS  # memory: a copy per process
    assert choose_workers("auto", "cpu", 8, 3) == 3  # no idle processes for a grid of three items
    assert choose_workers("auto", "cpu", 1, 76) == 1
    assert choose_workers("auto", "cuda", 16, 76) == 1  # one process feeds the GPU
    assert choose_workers("auto", "cpu", 8, 76, threads=4) == 1  # threads asked for: one process uses them
    assert choose_threads(None, 2, None, processes=choose_workers("auto", "cpu", 2, 76)) == 1


def test_requested_workers_override_and_are_checked():
    assert choose_workers("3", "cuda", 2, 1) == 3
    assert choose_workers(1, "cpu", 8, 76) == 1
    for bad in ("0", "many", "-1"):
        with pytest.raises(BenchError, match="--workers"):
            choose_workers(bad, "cpu", 2, 10)


def test_requested_threads_override_and_are_checked():
    assert choose_threads(6, 2, 1.0) == 6
    with pytest.raises(BenchError, match="--threads 0"):
        choose_threads(0, 2, None)


def test_cgroup_quota_parsing():
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("200000 100000\n") == 2.0
    assert parse_cpu_max("150000 100000") == 1.5
    assert parse_cpu_max("garbage") is None
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("50000", "100000") == 0.5
    assert parse_cfs("x", "100000") is None


def test_cgroup_quota_read_from_v2_and_v1_layouts(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("300000 100000\n")
    assert runtime.cgroup_quota_cores(v2) == 3.0
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.cgroup_quota_cores(tmp_path / "v1") == 1.5
    assert runtime.cgroup_quota_cores(tmp_path / "none") is None


def test_machine_facts_parsing():
    info = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx512f avx512_bf16\n"
    assert runtime.cpu_model(info) == "Intel(R) Xeon(R) Platinum 8481C"
    assert runtime.cpu_flags_have_bf16(info)
    assert not runtime.cpu_flags_have_bf16("flags\t\t: fpu avx2 avx512f\n")
    assert runtime.openmp_runtime("7f00 r-xp /x/torch/lib/libgomp.so.1\n") == "GNU libgomp"
    assert runtime.openmp_runtime("7f00 r-xp /x/libiomp5.so\n") == "Intel libiomp5"
    assert runtime.openmp_runtime("7f00 r-xp /x/libc.so.6\n") == "unknown"


# --- compile payback ------------------------------------------------------------------------------

def test_compile_break_even_and_payback():
    # 10 s to compile; 1/10 - 1/20 = 0.05 s saved per image -> repaid after 200 images
    assert compile_break_even(10.0, 10.0, 20.0) == pytest.approx(200.0)
    assert not compile_pays(10.0, 10.0, 20.0, images=199)
    assert compile_pays(10.0, 10.0, 20.0, images=200)
    assert compile_break_even(10.0, 20.0, 20.0) == math.inf  # not faster: never repaid
    assert not compile_pays(1.0, 20.0, 15.0, images=10**9)
    assert compile_pays(0.0, 10.0, 11.0, images=1)
    with pytest.raises(ValueError):
        compile_break_even(1.0, 0.0, 1.0)


# --- the precision cache --------------------------------------------------------------------------

def test_cache_round_trip_and_rebuild_after_corruption(tmp_path):
    cache = PrecisionCache(tmp_path)
    assert cache.get("m", "k") is None
    cache.put("m", "k", {"fp32": 40.0, "bf16": 30.0}, "fp32")
    assert cache.get("m", "k") == {"fp32": 40.0, "bf16": 30.0}
    assert cache.get("other machine", "k") is None
    cache.path.write_bytes(b"\x00\xffnot json{")
    assert cache.get("m", "k") is None
    cache.put("m", "k2", {"fp32": 1.0}, "fp32")
    assert set(json.loads(cache.path.read_text())["machines"]["m"]) == {"k2"}  # rebuilt from scratch


@pytest.mark.parametrize("content", ['[1, 2]', '{"version": 99, "machines": {}}',
                                     '{"version": 1, "machines": {"m": {"k": {"images_per_s": {"fp32": -1}}}}}',
                                     '{"version": 1, "machines": {"m": {"k": {"images_per_s": {"fp32": "x"}}}}}',
                                     '{"version": 1, "machines": {"m": "k"}}'])
def test_malformed_cache_contents_count_as_absent(tmp_path, content):
    cache = PrecisionCache(tmp_path)
    cache.path.write_text(content)
    assert cache.get("m", "k") is None
    cache.put("m", "k", {"fp32": 2.0}, "fp32")
    assert cache.get("m", "k") == {"fp32": 2.0}


def test_concurrent_writers_keep_every_entry(tmp_path):
    cache = PrecisionCache(tmp_path)

    def write(i: int) -> None:
        with cache.locked():
            cache.put("m", f"k{i}", {"fp32": float(i + 1)}, "fp32")

    workers = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert {cache.get("m", f"k{i}")["fp32"] for i in range(8)} == {float(i + 1) for i in range(8)}


# --- precision_for ----------------------------------------------------------------------------------

KEY = {"phase": "pretrain", "backbone": "resnet18", "size": 64, "batch": 32}


def _never(_p: str) -> None:
    raise AssertionError("the trial must not run")


def test_asked_precision_is_returned_without_measuring(tmp_path):
    assert Runtime(CPU, "fp32", cache=tmp_path).precision_for(KEY, _never) == "fp32"
    assert Runtime(CPU, "bf16", cache=tmp_path).precision_for(KEY, _never) == "bf16"
    assert not (tmp_path / "precision.json").exists()


def test_auto_measures_once_per_machine_and_key_then_reads_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_measure(trial, candidates, device, batch=1, **_):
        calls.append((tuple(candidates), batch))
        return {"fp32": 30.0, "bf16": 39.0}

    monkeypatch.setattr(runtime, "measure_trial", fake_measure)
    first = Runtime(CPU, "auto", cache=tmp_path)
    assert first.precision_for(KEY, lambda p: None) == "bf16"
    assert calls == [(("fp32", "bf16"), 32)]
    decision = first.provenance()["precision_decisions"][runtime.key_text(KEY)]
    assert decision == {"choice": "bf16", "source": "measured", "images_per_s": {"fp32": 30.0, "bf16": 39.0}}
    later = Runtime(CPU, "auto", cache=tmp_path)  # a new process on the same machine
    assert later.precision_for(KEY, _never) == "bf16"
    assert later.decisions[runtime.key_text(KEY)]["source"] == "cache"
    other = {**KEY, "phase": "finetune", "batch": 8}
    assert later.precision_for(other, None) == "fp32"  # no figures and no trial: fp32, said so
    assert later.decisions[runtime.key_text(other)]["source"] == "default: not measured"
    assert len(calls) == 1


def test_auto_with_a_corrupt_cache_measures_and_rewrites_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "measure_trial", lambda *a, **k: {"fp32": 40.0, "bf16": 20.0})
    (tmp_path / "precision.json").write_text("{truncated")
    assert Runtime(CPU, "auto", cache=tmp_path).precision_for(KEY, lambda p: None) == "fp32"
    assert json.loads((tmp_path / "precision.json").read_text())["version"] == runtime.CACHE_VERSION


def test_measure_trial_interleaves_candidates_and_restores_the_rng():
    order: list[str] = []

    def trial(p: str) -> None:
        order.append(p)
        torch.rand(3)  # the trial's draws must not shift the run's random stream

    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    rates = runtime.measure_trial(trial, ["fp32", "bf16"], CPU, batch=4, warmup=1, repeats=2)
    assert torch.equal(torch.rand(2), expected)
    assert order == ["fp32", "bf16", "fp32", "bf16", "fp32", "bf16"]
    assert set(rates) == {"fp32", "bf16"} and all(v > 0 for v in rates.values())


def test_a_screen_drops_a_candidate_far_slower_on_a_few_images():
    """Emulated bf16 (27× slower than fp32 on one EPYC) is dropped on the screening batch, so the full
    batch is never stepped at bf16; close candidates both go on to the full trial."""
    import time

    calls: list[tuple[str, str]] = []

    def make(slow: float):
        def trial(p: str) -> None:
            calls.append(("full", p))

        def screen(p: str) -> None:
            calls.append(("screen", p))
            time.sleep(0.001 if p == "fp32" else 0.001 * slow)

        trial.screen, trial.screen_batch = screen, 4
        return trial

    rates = runtime.measure_trial(make(20.0), ["fp32", "bf16"], CPU, batch=32, warmup=1, repeats=1)
    assert ("full", "bf16") not in calls and ("full", "fp32") not in calls  # one left: screening decides
    assert rates["fp32"] > runtime.SCREEN_RATIO * rates["bf16"]
    assert runtime.choose_precision(rates) == "fp32"
    calls.clear()
    runtime.measure_trial(make(1.2), ["fp32", "bf16"], CPU, batch=32, warmup=1, repeats=1)
    assert ("full", "bf16") in calls and ("full", "fp32") in calls


def test_the_protocols_trials_screen_on_a_few_images():
    from bench.protocol import _finetune_trial

    model = nn.Sequential(nn.Conv2d(3, 1, 1))
    images = torch.randint(0, 255, (10, 3, 16, 16), dtype=torch.uint8)
    masks = torch.randint(0, 2, (10, 1, 16, 16), dtype=torch.uint8)
    from bench.spec import Schedule

    trial = _finetune_trial(model, Schedule(size=16), images, masks, 8, 0, False)
    assert trial.screen_batch == runtime.SCREEN_IMAGES
    trial.screen("fp32")
    trial("fp32")
    small = _finetune_trial(model, Schedule(size=16), images, masks, 4, 0, False)
    assert not hasattr(small, "screen")  # nothing to screen: the batch is already that small


# --- device helpers and make_runtime --------------------------------------------------------------

def test_autocast_and_prepare_on_cpu():
    rt = Runtime(CPU, "auto")
    a = torch.randn(4, 4)
    with rt.autocast("bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with rt.autocast("fp32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="precision_for"):
        rt.autocast("auto")
    module = rt.prepare(nn.Conv2d(3, 4, 3))
    assert module.weight.device == CPU and module.weight.is_contiguous()


def test_resolve_device_errors_are_one_line():
    assert runtime.resolve_device("cpu") == CPU
    with pytest.raises(BenchError, match="not a device"):
        runtime.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")


def test_make_runtime_applies_and_records_the_thread_policy(tmp_path):
    before = torch.get_num_threads()
    try:
        rt = make_runtime("cpu", "fp32", threads=1, cache=tmp_path)
        assert torch.get_num_threads() == 1 and rt.threads == 1
        info = rt.provenance()
        assert info["threads"] == 1 and info["thread_policy"]["requested"] == 1
        assert info["device"] == "cpu" and info["precision"] == "fp32" and info["openmp"]
        default = make_runtime("cpu", "auto", cache=tmp_path)
        assert default.threads == choose_threads(None, runtime.affinity_cores(), runtime.cgroup_quota_cores())
    finally:
        torch.set_num_threads(before)
    with pytest.raises(BenchError, match="precision 'fp16'"):
        make_runtime("cpu", "fp16")
    with pytest.raises(BenchError, match="--threads"):
        make_runtime("cpu", "fp32", threads=0)


# --- OpenMP wait policy ---------------------------------------------------------------------------

def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**clean, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_cli_entry_sets_a_passive_wait_policy_before_torch_loads():
    code = "import sys, os, bench.cli, bench; print(os.environ['OMP_WAIT_POLICY'], bench.TORCH_LOADED_FIRST)"
    assert _python(code) == "PASSIVE False"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"  # the user's value wins


def test_torch_loaded_before_bench_is_reported_as_not_in_effect(monkeypatch):
    code = "import sys; sys.modules['torch'] = None; import bench; print(bench.TORCH_LOADED_FIRST)"
    assert _python(code) == "True"  # the package notices that torch (and its OpenMP) came first
    import bench

    monkeypatch.setattr(bench, "TORCH_LOADED_FIRST", True)
    assert runtime.omp_wait_policy()["omp_wait_policy_in_effect"] is False
    assert Runtime(CPU).provenance()["omp_wait_policy_in_effect"] is False
