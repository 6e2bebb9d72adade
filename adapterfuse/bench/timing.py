"""Timing primitives (docs/design.md, Benchmarks): medians after warm-up, inputs rotated past the last-level
cache, the device's measured copy bandwidth, peak memory."""
from __future__ import annotations

import ctypes
import math
import platform
import sys
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> Optional[str]:
    """For CPU timings: make glibc's malloc serve every allocation from its heap and keep what is freed
    (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB), as the CUDA caching allocator keeps device memory.
    By default glibc serves an allocation of 32 MiB or more with a fresh mmap and unmaps it when freed, so
    every call's [M, d] output faults its pages in again: at ViT-B/16's 12608 x 768 fp32 rows that was 9458
    page faults and 8.3 ms of the fused forward's 13.1 ms (4.8 ms without), and with the host's memory state
    it swung to 57 ms, on one variant more than another. Returns what was set, or None (not Linux glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2 ** 30) != 1:
        return None
    return "glibc heap only, freed memory kept (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The cache to rotate past: the GPU's L2, or a generous 64 MiB stand-in for a CPU's L3."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20))
    return 64 * 2 ** 20


def rotation_count(set_bytes: int, device: torch.device, cap: int = 8) -> int:
    """How many input sets make one full rotation larger than twice the cache."""
    return max(1, min(cap, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))))


def median_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> float:
    """Median wall time of fn in ms: triton.testing.do_bench on CUDA (it also flushes L2 between
    calls), CUDA events without triton, perf_counter on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median"))
        except ImportError:
            pass
        for _ in range(3):
            fn()
        times = []
        for _ in range(10 if quick else 30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    # warm up for a while, not a fixed count: the first calls pay thread-pool start-up and page faults
    t_warm, n = time.perf_counter() + (0.3 if quick else 0.6), 0
    while n < 3 or time.perf_counter() < t_warm:
        fn()
        n += 1
    budget, times = (0.5 if quick else 1.5), []
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def as_step(fn: Callable[[], torch.Tensor], train: bool) -> Callable[[], object]:
    """What one timed call runs: fn under no_grad (forward), or fn then backward of its sum (training)."""
    if train:
        return lambda: fn().sum().backward()

    def forward():
        with torch.no_grad():
            return fn()
    return forward


def copy_bandwidth_gbs(device: torch.device, *, quick: bool = False) -> float:
    """Achieved GB/s of a large device-to-device copy (bytes read + bytes written)."""
    # buffers well past the last-level cache (H100 L2 50 MiB; server CPUs' L3 32-256 MiB)
    numel = (512 if device.type == "cuda" else (128 if quick else 256)) * 2 ** 20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, quick=quick)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory allocated by one call above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def interleaved_samples(fns: Dict[str, Callable[[], object]], device: torch.device, *, burst: int = 1,
                        samples: int = 7, warm_calls: int = 2) -> Dict[str, List[float]]:
    """For each fn: `samples` times, in seconds, of one call (the mean over a burst of `burst` back-to-back calls).
    The variants' bursts are interleaved (a, b, c, a, b, c, ...), so a busy machine slows them alike: sample i of
    every variant comes from the same round, and paired_ratio compares them round by round."""
    for fn in fns.values():  # warm-up (first calls build, compile, fault pages)
        for _ in range(warm_calls):
            fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(samples):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / burst)
    return times


def interleaved_seconds(fns: Dict[str, Callable[[], object]], device: torch.device, *, burst: int = 1,
                        samples: int = 7, warm_calls: int = 2) -> Dict[str, float]:
    """The median of interleaved_samples per fn, in seconds."""
    return {k: statistics.median(v) for k, v in
            interleaved_samples(fns, device, burst=burst, samples=samples, warm_calls=warm_calls).items()}


def paired_ratio(times: Dict[str, List[float]], num: str, den: str) -> Tuple[float, float, float]:
    """(median, first quartile, third quartile) of the per-round ratios times[num][i] / times[den][i]: on a machine
    whose speed drifts between rounds this is steadier than a ratio of medians."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den]))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


def auto_burst(fn: Callable[[], object], device: torch.device, target_s: float = 0.02, cap: int = 100) -> int:
    """Back-to-back calls per timed sample so that a sample lasts about target_s (timer resolution, per-call
    jitter): from the time of one warm call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return max(1, min(cap, int(target_s / max(time.perf_counter() - t0, 1e-6))))


class Deadline:
    """A wall-clock budget for a benchmark run (``adapterfuse-bench --time-budget S``): work not started before it
    passes is skipped and named in ``skipped`` (the results JSON's meta lists it, with ``failed``: what raised),
    so a run inside a fixed time limit still ends with every result it measured written out. ``seconds=None``: no
    budget."""

    def __init__(self, seconds: Optional[float] = None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.skipped: List[str] = []
        self.failed: List[str] = []  # steps / variants that raised (recorded by the benchmark runner)

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def skip(self, what: str) -> bool:
        """Whether to skip `what` (recorded) because the budget has run out."""
        if self.expired():
            self.skipped.append(what)
            return True
        return False
