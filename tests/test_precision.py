"""--dtype=auto: the precision follows the machine (perf.resolve_dtype), the log says what was chosen and why, and
MFU is never nonsense (a near-zero or beaten peak prints n/a). The CPU probe is monkeypatched to stand for each
CPU kind these machines have shown: AVX2 only (bf16 some 50x slower), AVX-512-BF16, AMX."""

import time

import pytest
import torch

import perf
import train

AVX2_ONLY = perf.Bf16Probe(native=False, speedup=0.02)   # AMD EPYC Zen 3: bf16 matmul 50x slower
AVX512_BF16 = perf.Bf16Probe(native=True, speedup=2.0)   # AMD EPYC Zen 4
AMX = perf.Bf16Probe(native=True, speedup=5.0)           # Intel Xeon with AMX
CPU = torch.device("cpu")


@pytest.fixture
def probe(monkeypatch):
    def use(p: perf.Bf16Probe):
        monkeypatch.setattr(perf, "cpu_bf16_probe", lambda: p)
    return use


@pytest.mark.parametrize("kind,want", [(AVX2_ONLY, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16")],
                         ids=["avx2-only", "avx512-bf16", "amx"])
def test_auto_follows_the_cpu(kind, want, probe):
    """auto: float32 where the CPU has no native bf16 matmuls, bf16 where it has; the reason gives the ratio."""
    probe(kind)
    dtype, why, warning = perf.resolve_dtype("auto", CPU)
    assert dtype == want and warning is None
    assert why.startswith("auto: bf16 matmul runs ") and why.endswith(" float32 on this CPU")
    if kind is AVX2_ONLY:
        assert "50x slower than" in why


def test_without_readable_flags_the_timing_decides(probe):
    """Where /proc/cpuinfo cannot be read (native None), the timed product decides: bf16 only if it is faster."""
    probe(perf.Bf16Probe(native=None, speedup=0.5))
    assert perf.resolve_dtype("auto", CPU)[0] == "float32"
    probe(perf.Bf16Probe(native=None, speedup=1.5))
    assert perf.resolve_dtype("auto", CPU)[0] == "bfloat16"


def test_explicit_dtype_is_honoured_with_a_warning_when_slow(probe):
    """--dtype=bfloat16 on a CPU without fast bf16 runs bf16, and warns with the measured ratio; float32 never warns."""
    probe(AVX2_ONLY)
    dtype, why, warning = perf.resolve_dtype("bfloat16", CPU)
    assert dtype == "bfloat16" and why == "--dtype=bfloat16"
    assert "50x slower than float32" in warning and "--dtype=auto would pick float32" in warning
    assert perf.resolve_dtype("float32", CPU)[2] is None
    probe(AMX)
    assert perf.resolve_dtype("bfloat16", CPU)[2] is None
    with pytest.raises(ValueError, match="choose one of auto, bfloat16, float32"):
        perf.resolve_dtype("fp16", CPU)


def test_auto_on_cuda_asks_the_device(monkeypatch):
    """auto on a CUDA device: bf16 where torch says the GPU supports it (A100, H100), float32 on older cards."""
    monkeypatch.setattr(perf, "cpu_bf16_probe", lambda: pytest.fail("no CPU probe for a CUDA device"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert perf.resolve_dtype("auto", torch.device("cuda", 0))[0] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert perf.resolve_dtype("auto", torch.device("cuda", 0))[0] == "float32"


def test_probe_runs_once_per_process_and_costs_well_under_a_second(monkeypatch):
    """The real probe (uncached here) times small products only, and resolve_dtype calls it once per process."""
    perf.cpu_bf16_probe.cache_clear()
    t0 = time.perf_counter()
    p = perf.cpu_bf16_probe()
    cost = time.perf_counter() - t0
    assert p.speedup > 0 and p.native in (True, False, None)
    assert cost < 2.0, f"the probe took {cost:.2f} s"  # measured 0.1-0.3 s; the bound leaves room for a busy machine
    calls = []
    monkeypatch.setattr(perf, "_matmul_rate", lambda *a: calls.append(a) or 1.0)
    for _ in range(3):
        perf.resolve_dtype("auto", CPU)
    assert calls == [], "the probe ran again after its first call"


def test_env_stands_in_for_the_cpu_kind(monkeypatch):
    """MOSAICBERT_CPU_BF16=absent makes this machine choose as an AVX2-only one would (the suite can run so)."""
    perf.cpu_bf16_probe.cache_clear()
    monkeypatch.setenv(perf.CPU_BF16_ENV, "absent")
    try:
        dtype, why, _ = perf.resolve_dtype("auto", CPU)
        assert dtype == "float32" and f"{perf.CPU_BF16_ENV}=absent" in why
    finally:
        perf.cpu_bf16_probe.cache_clear()


# ---------------------------------------------------------------------------- MFU


def test_near_zero_peak_is_not_a_reference(monkeypatch):
    """A measured peak near zero (bf16 on an AVX2 CPU, a broken timer) gives MFU n/a with the reason,
    never '0.00 TFLOP/s'."""
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 2e6)
    peak, line = perf.mfu_reference(CPU, "bfloat16")
    assert peak is None and line.startswith("MFU: n/a (") and "implausibly low" in line
    assert "0.00 TFLOP/s" not in line
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 1.4e9)
    peak, line = perf.mfu_reference(CPU, "bfloat16")
    assert peak == 1.4e9 and "1.4 GFLOP/s" in line and "measured bfloat16 matmul" in line


def test_mfu_is_never_above_100_percent():
    assert perf.mfu(50e9, 100e9) == pytest.approx(0.5)
    assert perf.mfu(101e9, 100e9) is None  # the step outran the 'peak': it was understated
    assert perf.mfu(1e9, None) is None


def test_train_log_names_the_choice_and_prints_mfu_na(tmp_path, probe, monkeypatch, capsys):
    """train.py on a CPU without fast bf16: `dtype: float32 (auto: ...)`, the resolved dtype saved with the
    checkpoint, and a near-zero peak printed as n/a on the MFU line and every step line."""
    probe(AVX2_ONLY)
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 1e3)
    train.main(["--preset=mosaic-bert-tiny", "--max_steps=2", "--log_every=1", "--eval_every=0",
                f"--out_dir={tmp_path}", "--keep_freed_memory=false"])
    out = capsys.readouterr().out
    assert "dtype: float32 (auto: bf16 matmul runs 50x slower than float32 on this CPU)" in out
    assert "MFU: n/a (" in out
    steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(steps) == 2 and all("| mfu n/a |" in ln for ln in steps)
    ckpt = torch.load(tmp_path / "ckpt_0000002.pt", weights_only=True)
    assert ckpt["train_config"]["dtype"] == "float32"
