"""bench.py: the quick run on tiny presets reports every row and column; the FLOP counter behind MFU
matches a hand count; the pieces the numbers rest on (memory high-water mark, the ladder, the
skipped peer) do what they say."""

import json
from dataclasses import replace
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import bench_report
import model as M
import perf
import train
from conftest import skip_if_transformers_clash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------- smoke run


def test_quick_tiny_run_reports_every_row_and_column(tmp_path):
    """`bench.py --quick --size=tiny --json PATH` exits 0 and writes the JSON interface: device, torch,
    threads, the measured matmul peak, and every row of every workload with finite, positive tokens/s,
    step time, MFU and peak memory; targets are computed (met or not, never missing) and the Markdown
    table is written beside it. torch.compile and flex are off to keep this short (test_model and
    test_kernels cover them); batches are tiny, and one thread: on a shared machine whose cores are
    oversubscribed, a 2-thread OpenMP step stalls at every barrier (4x slower here)."""
    skip_if_transformers_clash()  # bench.py refuses to run its HF rows then (hf.KERNELS_CLASH says why)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--quick", "--size=tiny", "--json", str(out), "--compile=false",
           "--attn_backends=naive,sdpa", "--attn_lengths=32,64", "--attn_tokens=128", "--pretrain_batch=2",
           "--glue_batch=4", "--demo_batch=2", "--n_batches=1", "--repeats=2", "--threads=1"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    j = json.loads(out.read_text())

    assert isinstance(j["device"], str) and j["device"]
    assert j["torch"] == torch.__version__
    assert isinstance(j["threads"], int) and j["threads"] >= 1
    assert _finite_positive(j["matmul_peak_flops"])

    ladder = ["bert-base", "+bf16", "+unpad", "+alibi", "+geglu", "+lowp-layernorm", "+sparse-pred",
              "mosaic-bert-base", "hf-bert-base", "hf-bert-base-eager"]
    expected = {("pretrain", n) for n in ladder}
    expected |= {("glue", n) for n in ("bert-base", "+bf16", "+unpad", "mosaic-bert-base", "hf-bert-base",
                                       "hf-bert-base-eager")}
    expected |= {("demo", f"{train.TrainConfig().model} (demo)")}
    expected |= {("attention", f"{b}-{p}@{L}") for b in ("naive", "sdpa") for p in ("fwd", "fwd+bwd") for L in (32, 64)}
    got = {(r["workload"], r["name"]) for r in j["rows"]}
    assert got == expected

    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
    low = j["config"]["dtype"] == "bfloat16"  # --dtype=auto made concrete: float32 where bf16 is slow here
    assert j["config"]["dtype"] == perf.resolve_dtype("auto", torch.device("cpu"))[0]
    for r in j["rows"]:
        if r["name"].startswith("hf-") and not have_hf:
            assert r["note"] == "skipped: transformers not installed"
            continue
        if r["name"] in bench.BF16_ONLY and not low:
            assert r["note"].startswith("skipped: measures bf16") and r["tokens_per_s"] is None, r
            continue
        if "dtype" in r:
            assert r["dtype"] == j["config"]["dtype"] or r["name"] == "bert-base", r
        for col in ("tokens_per_s", "step_ms", "mfu", "peak_mem_bytes"):
            assert _finite_positive(r[col]), (r["workload"], r["name"], col, r[col])
        assert r["mfu"] < 1.5, (r["name"], r["mfu"])  # sanity: MFU in the right units
    for r in j["rows"]:
        if r["workload"] in ("pretrain", "glue") and r["name"] == "bert-base":
            assert r["speedup"] == pytest.approx(1.0)

    # targets: each value recomputed here from the rows of the same JSON, and `met` is value >= threshold
    row = {(r["workload"], r["name"]): r for r in j["rows"]}
    expected = []
    for w, ratio in (("pretrain", 1.6), ("glue", 3.0)):
        peers = [r["tokens_per_s"] for (wl, name), r in row.items() if wl == w and name.startswith("hf-")
                 and r.get("tokens_per_s")]
        expected.append((ratio, row[(w, "mosaic-bert-base")]["tokens_per_s"] / max(peers) if peers else None))
    expected.append((0.75, row[("pretrain", "mosaic-bert-base")]["mfu"]))
    expected.append((0.40, next(r for (wl, _), r in row.items() if wl == "demo")["mfu"]))
    for w in ("pretrain", "glue"):
        padded = row[(w, "+bf16" if low else "bert-base")]  # float32: the +bf16 row is skipped
        expected.append((0.8 / (1 - j["workloads"][w]["pad_frac"]),
                         row[(w, "+unpad")]["tokens_per_s"] / padded["tokens_per_s"]))
    assert len(j["targets"]) == len(expected) == 6
    for t, (threshold, value) in zip(j["targets"], expected):
        assert t["threshold"] == pytest.approx(threshold), t
        if value is None:
            assert "HF peer" in t["target"] and not have_hf and t["met"] is None and t["value"] is None, t
        else:
            assert t["value"] == pytest.approx(value, rel=1e-9) and t["met"] == (value >= threshold), t
    assert set(j["projection"]["hours"]) >= {"bert-base", "mosaic-bert-base"}
    md = out.with_suffix(".md").read_text()
    assert "mosaic-bert-base" in md and "Targets" in md


# ---------------------------------------------------------------------------- FLOPs


def test_flops_per_token_matches_hand_count():
    """model.flops_per_token (the MFU numerator) equals the matmul FLOPs counted by hand for the tiny presets.

    mosaic-bert-tiny: d=128, d_ff=512, 2 layers, GeGLU, V = 50261 padded to 50304, sparse head; seq_len 128.
    Forward, per token and layer:
        QKV projection      2 * 128 * 384      =  98,304
        QK^T and PV         2 * 2 * 128 * 128  =  65,536
        output projection   2 * 128 * 128      =  32,768
        GeGLU in (2*d_ff)   2 * 128 * 1024     = 262,144
        GeGLU out           2 * 512 * 128      = 131,072
        layer total                              589,824   x 2 layers = 1,179,648
    MLM head: dense 2*128*128 = 32,768 + decoder 2*128*50304 = 12,877,824 -> 12,910,592 per predicted token;
    sparse prediction at 30% masking: 3,873,177.6. Forward 5,052,825.6; training = 3 x forward = 15,158,476.8.

    bert-tiny: GELU MLP 2*128*512 + 2*512*128 = 262,144, so a layer is 458,752 and 2 layers 917,504; the dense
    head predicts every token: 12,910,592. Forward 13,828,096; training 41,484,288.
    """
    assert M.flops_per_token(M.ModelConfig.preset("mosaic-bert-tiny"), 128, 0.3) == pytest.approx(15_158_476.8)
    assert M.flops_per_token(M.ModelConfig.preset("bert-tiny"), 128, 0.3) == pytest.approx(41_484_288)


def test_flops_per_token_matches_torch_flop_counter():
    """The formula also matches what torch's FlopCounterMode counts in a real forward + backward of
    mosaic-bert-tiny (naive attention, so its matmuls are counted too; 64 of 256 tokens masked)."""
    torch.manual_seed(0)
    cfg = M.ModelConfig.preset("mosaic-bert-tiny", hidden_dropout=0.0, attn_dropout=0.0, attn_backend="naive")
    m = M.build(cfg)
    B, S = 2, 128
    ids = torch.randint(0, 50257, (B, S))
    labels = torch.full((B, S), -100)
    picked = torch.randperm(B * S)[:64]
    labels.view(-1)[picked] = ids.view(-1)[picked]
    with FlopCounterMode(display=False) as fc:
        m(ids, torch.ones(B, S, dtype=torch.long), labels).loss_sum.backward()
    assert fc.get_total_flops() / (B * S) == pytest.approx(M.flops_per_token(cfg, S, 64 / (B * S)), rel=1e-6)


# ---------------------------------------------------------------------------- pieces


def test_high_water_sees_a_step_allocation():
    """The CPU memory probe reports at least what a step allocates and touches (64 MiB here)."""
    def step():
        x = torch.ones(16 * 2**20)  # 64 MiB, written
        return float(x[-1])
    got = perf.high_water(step, torch.device("cpu"))
    if got is None:
        pytest.skip("no /proc/self/clear_refs on this system: the CPU high-water mark cannot be reset")
    assert got >= 60 * 2**20


def test_ladder_changes_one_thing_at_a_time_and_ends_at_mosaic():
    """bert-base -> +bf16 -> ... -> mosaic-bert-base: consecutive rows differ by one change (the +alibi
    step also drops attention dropout), and the last row is exactly the mosaic preset, compiled."""
    rows = bench.ladder(bench.resolve(bench.BenchConfig(quick=True, size="tiny", dtype="bfloat16")))
    names = [r[0] for r in rows]
    assert names == ["bert-base", "+bf16", "+unpad", "+alibi", "+geglu", "+lowp-layernorm", "+sparse-pred",
                     "mosaic-bert-base"]
    assert rows[0][1] == M.ModelConfig.preset("bert-tiny") and not rows[0][2]
    # the last row is the mosaic preset (its classifier pooling, which no MLM step uses, aside)
    assert rows[-1][1] == replace(M.ModelConfig.preset("mosaic-bert-tiny"), pooling="cls") and rows[-1][2] \
        and rows[-1][3]
    for (_, a, abf, acomp, _), (name, b, bbf, bcomp, _) in zip(rows, rows[1:]):
        changed = {k for k in vars(a) if getattr(a, k) != getattr(b, k)} | ({"bf16"} if abf != bbf else set()) \
            | ({"compile"} if acomp != bcomp else set())
        allowed = {"+alibi": {"position", "attn_backend", "attn_dropout"}}.get(name)
        assert changed == allowed if allowed else len(changed) == 1, (name, changed)


def test_float32_rows_skip_only_what_measures_bf16():
    """--dtype=float32 (what auto picks on a CPU without fast bf16): the ladder keeps its rows and configs, every
    row runs in float32, the bf16-only rows are skipped with a one-line reason, and the peer runs in float32 too
    (a ratio compares like with like)."""
    cfg = bench.resolve(bench.BenchConfig(quick=True, size="tiny", dtype="float32"))
    assert cfg.dtype == "float32"
    ladder = bench.ladder(cfg)
    assert [r[0] for r in ladder] == [r[0] for r in bench.ladder(replace(cfg, dtype="bfloat16"))]
    assert not any(bf16 for _, _, bf16, _, _ in ladder)
    cpu = bench.pretrain_batches(replace(cfg, pretrain_batch=2, n_batches=1))
    stats = {"pretrain": bench.BatchStats.of(cpu)}
    rows = bench.model_rows(cfg, torch.device("cpu"), {"pretrain": bench.to_device_batches(cpu, torch.device("cpu"))},
                            stats)
    skipped = {r.name for r in rows if r.skipped}
    assert skipped == {"+bf16", "+lowp-layernorm"}
    assert all(r.dtype == "float32" for r in rows if not r.skipped)
    assert all(r.note.startswith("skipped: measures bf16") for r in rows if r.skipped)
    variants = [(r.name, r.info.get("bf16")) for r in bench.hf_rows(cfg, torch.device("cpu"), {"pretrain": []}, stats)]
    assert all(not bf16 for _, bf16 in variants)


def test_peer_without_transformers_is_a_skipped_row(monkeypatch):
    """Without transformers the peer rows exist with note 'skipped: transformers not installed'."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    cfg = bench.resolve(bench.BenchConfig(quick=True, size="tiny"))
    rows = bench.hf_rows(cfg, torch.device("cpu"), {"pretrain": []}, {})
    assert [(r.name, r.workload) for r in rows] == [("hf-bert-base", "pretrain"), ("hf-bert-base-eager", "pretrain")]
    res = bench_report.row_result(rows[0], peak=None, sheet=None)
    assert res["note"] == "skipped: transformers not installed" and res["tokens_per_s"] is None


def test_transformers_clashing_with_our_kernels_module_says_what_to_do(monkeypatch):
    """transformers >= 5.25 imports Hugging Face's `kernels` package, a name our kernels.py takes when run from
    here: the peer rows and the test session stop with what to do, instead of a skip that reads "not installed"."""
    import types  # noqa: PLC0415

    def clash(name):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels.py)")

    fake = types.ModuleType("transformers")
    fake.__getattr__ = clash
    monkeypatch.setitem(sys.modules, "transformers", fake)
    cfg = bench.resolve(bench.BenchConfig(quick=True, size="tiny"))
    with pytest.raises(ImportError, match="pip uninstall kernels"):
        bench.hf_rows(cfg, torch.device("cpu"), {"pretrain": []}, {})


def test_space_separated_flags():
    """`--json PATH` is accepted as `--json=PATH` (the documented interface); booleans stay flags."""
    assert bench.normalize_argv(["--quick", "--json", "a.json", "--size=tiny"]) == \
        ["--quick", "--json=a.json", "--size=tiny"]
