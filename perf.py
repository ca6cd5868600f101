"""What the machine can do and what a step costs it: --dtype=auto (resolve_dtype), peak FLOP/s (data sheets on GPUs,
timed matmuls on CPUs), MFU = model FLOPs per second / that peak in the run's dtype, memory (resident_bytes,
high_water), and the CPU workarounds (keep_freed_memory, BoundedHeap)."""

import contextlib
import ctypes
import functools
import gc
import os
import platform
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch


# --- Precision: bf16 where the machine runs it fast (--dtype=auto)
DTYPES = ("auto", "bfloat16", "float32")


class Bf16Probe(NamedTuple):
    native: Optional[bool]  # the CPU advertises bf16 matmul instructions (AVX-512-BF16 or AMX); None: unknown
    speedup: float          # measured bf16 / float32 matmul rate on a small product (> 1: bf16 is faster)
    forced: str = ""        # set from CPU_BF16_ENV: 'native' or 'absent' stands in for the flags


def _proc(path: str, key: str) -> Optional[str]:
    """The value of the first `key: value` line of a /proc file (Linux), or None where it cannot be read."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    """'cuda: <GPU name>' or 'cpu: <model name> (<n> logical cores)': the machine a result was measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = _proc("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    return f"cpu: {name} ({os.cpu_count()} logical cores)"


def _matmul_rate(dtype: torch.dtype, n: int, reps: int, window: float = 0.0) -> float:
    """The best rate of `reps` timed windows of n^3 products (one product, or as many as fill `window` seconds):
    another process on the machine can only slow a window down, and an understated peak overstates every MFU."""
    g = torch.Generator().manual_seed(0)  # its own generator: the training RNG stream stays untouched
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(reps):
        k, t0 = 0, time.perf_counter()
        while k == 0 or time.perf_counter() - t0 < window:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


# 'absent' (or 'native') takes the other CPU kind's --dtype=auto choice here: the tests run as without fast bf16.
CPU_BF16_ENV = "MOSAICBERT_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_bf16_probe() -> Bf16Probe:
    """Whether bf16 matmuls are fast on this CPU: the feature flags decide (without AVX-512-BF16 or AMX oneDNN has
    no bf16 kernel); timed 256^3 products, best of interleaved rounds, give the ratio. Once per process."""
    flags, forced = _proc("/proc/cpuinfo", "flags"), os.environ.get(CPU_BF16_ENV, "")
    native = None if flags is None else bool(set(flags.split()) & {"avx512_bf16", "amx_bf16"})
    if forced in ("native", "absent"):
        native = forced == "native"
    rates = [(_matmul_rate(torch.bfloat16, 256, 2), _matmul_rate(torch.float32, 256, 2)) for _ in range(4)]
    speedup = max(r[0] for r in rates) / max(r[1] for r in rates)
    return Bf16Probe(native, speedup, forced if forced in ("native", "absent") else "")


def resolve_dtype(flag: str, device: torch.device) -> tuple[str, str, Optional[str]]:
    """--dtype: (the dtype to run, why, a warning or None). `auto`: bfloat16 on GPUs that support it and on CPUs
    with native bf16 matmuls (the timed product decides where flags are unknown), else float32."""
    if flag not in DTYPES:
        raise ValueError(f"--dtype={flag}: choose one of {', '.join(DTYPES)}")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if flag == "auto":
            return ("bfloat16", "auto: this GPU supports bf16") if ok else ("float32", "auto: this GPU has no bf16")
        warn = None if ok or flag == "float32" else "this GPU has no native bf16; expect it to be slow"
        return flag, f"--dtype={flag}", warn
    if device.type != "cpu":  # meta and other test devices: no probe, as asked
        return ("float32" if flag == "auto" else flag), f"--dtype={flag} on {device.type}", None
    probe = cpu_bf16_probe()
    fast, s = (probe.native if probe.native is not None else probe.speedup >= 1.0), probe.speedup
    ratio = f"bf16 matmul runs {f'{s:.1f}x faster than' if s >= 1 else f'{1 / s:.0f}x slower than'} float32 on this CPU"
    if probe.forced:
        ratio += f"; {CPU_BF16_ENV}={probe.forced} says bf16 is {probe.forced}"
    if flag == "auto":
        return ("bfloat16" if fast else "float32"), f"auto: {ratio}", None
    return flag, f"--dtype={flag}", None if fast or flag == "float32" else f"{ratio}; --dtype=auto would pick float32"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for dtype 'bfloat16'; nothing (plain float32) otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


# --- Peak FLOP/s: the data sheet on GPUs, timed matmuls on CPUs
# Dense (no sparsity) peaks in TFLOP/s from the vendors' data sheets: (bf16 tensor core, fp32 at torch's default
# "highest" matmul precision; with TF32 float32 gets half the bf16 peak). Names match as whole words, longest first.
GPU_PEAK_TFLOPS = {
    "A100": (312, 19.5), "B200": (2250, 75), "GB200": (2500, 80),
    "H100": (989, 67), "H100 PCIe": (756, 51), "H100 NVL": (835, 60),
    "H200": (989, 67), "H200 NVL": (835, 60), "GH200": (989, 67),
    "L4": (121, 30.3), "L40": (181, 90.5), "L40S": (362, 91.6),
    # export parts: H800 and A800 have the H100's and A100's compute (NVLink cut), H20 a smaller Hopper
    "H800": (989, 67), "H800 PCIe": (756, 51), "A800": (312, 19.5), "H20": (148, 44),
    "A10G": (70, 31.2),  # no NVIDIA data sheet: 70 is AWS's dense bf16 figure (not the A10's 125), fp32 the A10's
    # Ada workstation and GeForce: bf16 with fp32 accumulate, as torch runs it (GeForce: half the fp16-acc rate)
    "RTX 4090": (165.2, 82.6), "RTX 6000 Ada": (364.2, 91.1),
}


def datasheet_peak(device_name: str, dtype: str) -> Optional[float]:
    """Dense peak FLOP/s of a GPU (torch.cuda.get_device_name) in `dtype`, or None if unknown. The longest key whose
    words are in the name wins: "NVIDIA H100 NVL" is the NVL part, "NVIDIA A100-SXM4-80GB" an A100, "L40" no "L4"."""
    _words = lambda name: name.upper().replace("-", " ").replace("_", " ").split()  # noqa: E731
    words = _words(device_name)
    for key in sorted(GPU_PEAK_TFLOPS, key=lambda k: (len(_words(k)), len(k)), reverse=True):
        kw = _words(key)
        if any(words[i:i + len(kw)] == kw for i in range(len(words) - len(kw) + 1)):
            bf16, fp32 = GPU_PEAK_TFLOPS[key]
            tf32 = torch.get_float32_matmul_precision() != "highest"
            return (bf16 if dtype == "bfloat16" else bf16 / 2 if tf32 else fp32) * 1e12
    return None


def datasheet_peaks(device: torch.device) -> Optional[dict]:
    """{dtype: dense peak FLOP/s} of this GPU from GPU_PEAK_TFLOPS (None on CPU or for an unknown GPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = {dt: datasheet_peak(name, dt) for dt in ("bfloat16", "float32")}
    return peaks if peaks["bfloat16"] else None


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    """FLOP/s one rank can reach: the GPU's data-sheet peak for `dtype`, or on CPU a timed matmul in it."""
    if device.type == "cuda":
        return datasheet_peak(torch.cuda.get_device_name(device), dtype)
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    # the best square product of 512-2048 (caches favour different sizes on different CPUs); where the dtype is
    # slow (bf16 without native support) 256^3 alone keeps this within a second
    if 2 * 2048**3 / _matmul_rate(dt, 256, 1) >= 0.25:
        return _matmul_rate(dt, 256, reps=3, window=0.3)
    return max(_matmul_rate(dt, n, reps=3, window=0.1) for n in (512, 1024, 2048))


def fmt_flops(rate: float) -> str:
    """A FLOP/s figure in the unit that shows it: '1.4 GFLOP/s', '312.00 TFLOP/s'."""
    return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def mfu_reference(device: torch.device, dtype: str) -> tuple[Optional[float], str]:
    """(the peak MFU is taken against, or None; the line that says what it is, or why MFU is n/a)."""
    peak = peak_flops(device, dtype)
    if device.type == "cuda":
        if peak is None:
            return None, (f"MFU: n/a (no data-sheet peak for {torch.cuda.get_device_name(device)!r}; "
                          f"add it to perf.GPU_PEAK_TFLOPS)")
        return peak, f"MFU reference: {fmt_flops(peak)} per rank (data-sheet dense {dtype} peak)"
    if peak is None or peak < 1e9:  # below 1 GFLOP/s: a broken measurement, not a machine
        return None, (f"MFU: n/a (the measured {dtype} matmul rate, {(peak or 0) / 1e9:.3f} GFLOP/s, "
                      f"is implausibly low to measure against)")
    return peak, f"MFU reference: {fmt_flops(peak)} per rank (measured {dtype} matmul)"


def mfu(flops_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation, or None (n/a) without a peak or above it (the peak was understated: a busy machine)."""
    return flops_per_s / peak if peak and flops_per_s / peak <= 1.0 else None


def sync(device: torch.device):
    """Wait for the device's queued work (CUDA is asynchronous): timings start and stop on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulPeak:
    """The matmul rate this device reaches, per dtype, measured in bursts interleaved with the rows."""

    def __init__(self, device: torch.device, n: Optional[int] = None, dtypes=("bfloat16", "float32")):
        self.device, self.n = device, n or (8192 if device.type == "cuda" else 2048)
        self.rates = {name: [] for name in dtypes}  # only the dtypes the rows run in: bf16 can be 50x slow
        self._ab = {}

    def burst(self, reps: int = 3):
        for name in self.rates:
            if name not in self._ab:
                dt = getattr(torch, name)
                self._ab[name] = [torch.randn(self.n, self.n, device=self.device, dtype=dt) for _ in range(2)]
                self._ab[name][0] @ self._ab[name][1]  # warm-up
            a, b = self._ab[name]
            times = []
            for _ in range(reps):
                sync(self.device)
                t0 = time.perf_counter()
                a @ b
                sync(self.device)
                times.append(time.perf_counter() - t0)
            self.rates[name].append(2 * self.n**3 / statistics.median(times))

    def peak(self, dtype: str) -> float:
        return statistics.median(self.rates[dtype])


# --- Memory: resident set and a step's high-water mark
def resident_bytes(key: str = "VmRSS") -> Optional[int]:
    """This process's resident set (VmRSS of /proc/self/status; VmHWM: its high-water mark) in bytes, or None."""
    kib = _proc("/proc/self/status", key)
    return None if kib is None else int(kib.split()[0]) * 1024


def peak_resident_bytes(reset: bool = False) -> Optional[int]:
    """The resident set's high-water mark (VmHWM), or None. reset: first set it to the current RSS (Linux >= 4.0)."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
    return resident_bytes("VmHWM")


def high_water(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Run fn once; return the memory high-water mark above the level at its start (bytes), or None."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    malloc_trim()
    reset, start = peak_resident_bytes(reset=True), resident_bytes()
    fn()
    peak = peak_resident_bytes()
    return None if reset is None or start is None or peak is None else max(0, peak - start)


# --- CPU workarounds: the glibc heap (train.py holds the other one, the CPU compile threshold)
def malloc_trim():
    """Give every free page of the heap back to the kernel (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> bool:
    """CPU: glibc keeps freed memory, so a step's re-allocated tensors are not page-faulted (and zero-filled) back
    in every step (as jemalloc/tcmalloc do); BoundedHeap bounds the heap. Returns whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None
    except OSError:
        libc = None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>: no mmap for big blocks, no trimming of the heap's top
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class BoundedHeap:
    """--keep_freed_memory (the CPU default): freed memory is kept, and the heap trimmed (malloc_trim) whenever the
    resident set passes `growth` x its level after `warmup` steps (a kept heap fragments). Needs glibc and /proc."""

    def __init__(self, enabled: bool, growth: float = 1.15, warmup: int = 20):
        self.active = enabled and keep_freed_memory() and resident_bytes() is not None
        self.growth, self.warmup, self.steps, self.limit, self.trims = growth, warmup, 0, None, 0

    def after_step(self):
        if not self.active:
            return
        self.steps += 1
        rss = resident_bytes()
        if self.steps == self.warmup:
            self.limit = self.growth * rss
        elif self.limit is not None and rss > self.limit:
            malloc_trim()
            self.trims += 1
