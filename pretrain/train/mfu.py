"""Model FLOPs utilisation: the FLOP/s a step achieves over the peak of the device it runs on.

MFU = tokens/s x model FLOPs per token (``pretrain.models.flops_per_token``: 6N plus the
mixers' sequence terms) / (peak FLOP/s of one device x devices). The peak is, in order:

* ``train.peak_flops`` when set (FLOP/s of one device);
* on CUDA, the dense bf16 datasheet peak of the GPU, found by name in a table;
* on a CPU, a measured rate: the best fp32 GEMM rate of this process's thread pool (square
  GEMMs of 512 and 1024, several trials each), and never less than the best rate measured
  before on the same machine, thread count and torch version, kept in
  ``$XDG_CACHE_HOME/pretrain/cpu_peak_flops.json`` (``~/.cache`` by default). A single
  start-up measurement reads low when another process is busy (a loaded 2-core machine logged
  ``mfu 232%``); the best of many trials and the cache make that rare, and an MFU above 1 is
  capped at 1 with one log line naming the cause, since a figure above 100 % means the peak,
  not the model, is wrong.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per GPU (no sparsity), by a substring of the device name.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
    "V100": 125e12,
    "B200": 2250e12,
}
UNKNOWN_GPU_PEAK = 312e12


def cache_path() -> Path:
    """Where the best CPU GEMM rates measured on this machine are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "pretrain" / "cpu_peak_flops.json"


def _cpu_key() -> str:
    model = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads | torch {torch.__version__}"


def measure_cpu_gemm_flops(sizes: tuple[int, ...] = (512, 1024), trials: int = 8, budget_s: float = 0.5) -> float:
    """Best fp32 FLOP/s of ``n x n @ n x n`` over ``sizes`` on the current thread pool: up to
    ``trials`` timed runs per size after one warm-up, stopping a size after ``budget_s``."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: thread pool start, packing buffers
        spent = 0.0
        for _ in range(trials):
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            spent += dt
            best = max(best, 2 * n**3 / dt)
            if spent > budget_s:
                break
    return best


def _best_cached(cached: dict, key: str) -> float:
    value = cached.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else 0.0


def cpu_peak_flops(measure: Callable[[], float] = measure_cpu_gemm_flops) -> float:
    """Measured CPU peak (FLOP/s), raised to the best earlier measurement of this machine key
    (CPU model, CPUs, threads, torch version) and written back to :func:`cache_path` under a
    file lock, so runs measuring at once never lower it. A cache that cannot be read or written,
    or an entry that is not a positive finite number, is ignored: it is an optimisation, never
    an input."""
    key, path = _cpu_key(), cache_path()
    measured = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-write of one file by concurrent runs
            try:
                cached = json.loads(path.read_text())
            except (OSError, ValueError):
                cached = {}
            if not isinstance(cached, dict):
                cached = {}
            best = max(measured, _best_cached(cached, key))
            if best > _best_cached(cached, key):
                cached[key] = best
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cached, indent=1))
                os.replace(tmp, path)  # atomic: a reader never sees half a file
            return best
    except OSError:
        return measured


def peak_flops(device: torch.device, configured: float) -> tuple[float, str]:
    """Peak FLOP/s of one device and a few words saying where it comes from (for the logs):
    ``configured`` (train.peak_flops) when > 0, the GPU table on CUDA, else :func:`cpu_peak_flops`."""
    if configured > 0:
        return configured, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{key} dense bf16 datasheet peak"
        return UNKNOWN_GPU_PEAK, f"unknown GPU {name!r}: assumed {UNKNOWN_GPU_PEAK / 1e12:.0f} TFLOP/s, set train.peak_flops"
    return cpu_peak_flops(), "best fp32 GEMM rate measured on this CPU"


class MFU:
    """``mfu(tokens_per_s)`` -> model FLOPs utilisation in (0, 1].

    Args:
        peak: FLOP/s of one device; ``source`` says where it came from.
        flops_per_token: model training FLOPs per token (forward + backward).
        devices: devices the tokens/s is summed over.
        log: where the one-time note goes when a value above 1 is capped.
    """

    def __init__(self, peak: float, source: str, flops_per_token: float, devices: int, log: Callable[[str], None]):
        self.peak, self.source = peak, source
        self.flops_per_token, self.devices = flops_per_token, devices
        self.log = log
        self._capped = False

    def __call__(self, tokens_per_s: float) -> float:
        value = tokens_per_s * self.flops_per_token / (self.peak * self.devices)
        if value <= 1.0:
            return value
        if not self._capped:
            self._capped = True
            cause = (
                "train.peak_flops is below what this run achieves: set it to this device's peak"
                if self.source == "train.peak_flops"
                else "the peak reads low (a busy machine at start-up?): set train.peak_flops to this "
                "device's peak for a true figure"
            )
            self.log(
                f"mfu: measured {value:.0%} of a peak of {self.peak:.3g} FLOP/s per device ({self.source}), "
                f"so MFU is capped at 100%; {cause}"
            )
        return 1.0
