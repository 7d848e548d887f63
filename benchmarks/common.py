"""Shared timing helpers for the benchmarks (kernels, generation, end-to-end PPO).

    from common import bench, copy_bandwidth, device_info, append_jsonl, markdown_table

(the scripts run as `python benchmarks/X.py`, which puts this folder on sys.path).

- `bench(fn, device, reps=..., cold_l2=...)`: median (and p10/p90) milliseconds of `fn()`
  over many runs after warm-up. On CUDA each run is bracketed by its own CUDA events, and
  with `cold_l2=True` a buffer larger than the L2 cache is overwritten before every run
  (outside the timed region), so memory-bound kernels are measured reading from HBM.
- `bench_interleaved({name: fn}, device, rounds=...)`: medians of several functions timed in
  alternation (for ratios against a baseline measured in the same run).
- `copy_bandwidth(device)`: GB/s of a device-to-device copy (bytes read + written), the
  practical ceiling that memory-bound kernels are reported against (% of copy).
- `device_info(device)`: {"device", "date" (ISO UTC), "commit", "torch", "transformers",
  "triton"} for result rows; `git_commit()`: the short hash of the checkout's HEAD ("" outside
  git); `versions()`: the installed versions of the libraries the numbers depend on.
- `append_jsonl(path, rows)` and `markdown_table(rows, columns)` to record and print.
- `machine_load()`: how busy the CPUs were just before a run (recorded in CPU rows, with a
  warning when other work is running: see its docstring).

Medians, not means: a few slow outliers (clock ramp-up, a neighbour process) must not
move the number. Everything here works on the CPU too (for smoke tests), where the
numbers only say the code runs.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

_FLUSH_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}  # > H100's 50 MB L2; > a CPU's LLC
_flush_buffers: Dict[str, torch.Tensor] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flush_l2(device: torch.device) -> None:
    """Evict caches by overwriting a buffer larger than them."""
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(_FLUSH_BYTES.get(device.type, 32 << 20) // 4,
                                          dtype=torch.float32, device=device)
    _flush_buffers[key].fill_(1.0)


def bench(fn: Callable[[], object], device, *, reps: int = 50, warmup: int = 5,
          cold_l2: bool = False, max_seconds: float = 10.0) -> Dict[str, float]:
    """Time `fn()`; returns {"median_ms", "p10_ms", "p90_ms", "reps"}.

    Stops early (with at least 3 runs) once `max_seconds` of timed runs have passed, so a
    slow backend (e.g. the CPU interpreter) cannot stall a whole benchmark run.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    spent = 0.0
    for _ in range(reps):
        if cold_l2:
            flush_l2(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if spent > max_seconds and len(times) >= 3:
            break
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "reps": len(times)}


def bench_interleaved(fns: Dict[str, Callable[[], object]], device, *, rounds: int = 10, reps: int = 3,
                      cold_l2: bool = False, max_seconds: float = 10.0) -> Dict[str, float]:
    """Median ms of each of `fns`, timed interleaved: `rounds` rounds, each running every function
    `reps` times in turn (a, a, a, b, b, b, a, ...), so drift and neighbours' load hit them alike.
    Ratios between them are then measured in the same run. Stops early after max_seconds."""
    device = torch.device(device)
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    t0 = time.perf_counter()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn, device, reps=reps, warmup=0, cold_l2=cold_l2)["median_ms"])
        if time.perf_counter() - t0 > max_seconds and len(times[name]) >= 2:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device, nbytes: Optional[int] = None, reps: int = 20) -> float:
    """GB/s (1e9 bytes) of a device-to-device tensor copy, counting bytes read + written."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, reps=reps, warmup=3)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> Dict[str, str]:
    """torch, transformers and triton versions ("" when not installed): HF generate, the
    baseline of generation.py and rlhf.py, changes speed between transformers releases."""
    found = {"torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = ""
    return found


def device_info(device) -> Dict[str, str]:
    return {"device": device_name(device),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), **versions()}


def _cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over the next `seconds` (from /proc/stat; NaN where there is none).
    Unlike the 1-minute load average it does not remember a job that has just finished."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def machine_load(warn: bool = True) -> Dict[str, float]:
    """{"cpu_busy_1s", "load_avg_1m", "cpu_count"} before a run, warning when other work runs.

    CPU timings taken while other processes run are not comparable with quiet ones, and not
    even between the two sides of one run: torch's OpenMP threads wait at every op for a
    sibling thread that the OS has descheduled, so loops of many small ops (token-by-token
    decoding) slow down several times more than large GEMMs do (benchmarks/README.md shows
    one such pair of rows).
    """
    busy = _cpu_busy_fraction()
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):
        load1 = float("nan")
    cores = os.cpu_count() or 1
    if warn and busy > 0.25:
        print(f"WARNING: {busy:.0%} of the {cores} cores were busy with other work just before the run, so "
              f"CPU timings (and engine-vs-HF ratios) are unreliable; rerun on a quiet machine", file=sys.stderr)
    return {"cpu_busy_1s": round(busy, 3), "load_avg_1m": round(load1, 2), "cpu_count": cores}


def append_jsonl(path: str, rows: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
