"""gpu_check.py's logic on the CPU: its commands parse, its path never needs `datasets`, its report reads."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import gpu_check
import train
from config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
NO_DATASETS = "import sys; sys.modules['datasets'] = None\n"  # `import datasets` then raises ImportError


def test_step_commands_parse_with_the_scripts_own_configs():
    """Every flag gpu_check passes is one train.py and bench.py accept (a typo would only show on the GPU)."""
    s = {x.name: x for x in gpu_check.steps(gpu_check.GpuCheckConfig(out_dir="o"))}
    assert s["tests"].cmd[1:] == ["-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    cfg = parse_config(train.TrainConfig, s["train"].cmd[2:], presets=train.TRAIN_PRESETS)
    assert cfg.model == "mosaic-bert-base" and cfg.max_steps == 50 and cfg.compile is None
    assert train.check_config(cfg, 1) == 2
    bcfg = parse_config(bench.BenchConfig, s["bench"].cmd[2:])
    assert bcfg.quick and bcfg.json.endswith("bench.json")
    assert all(x.timeout < 600 for x in s.values())  # each step fits one 10-minute command (--steps=NAME)
    only = gpu_check.steps(gpu_check.GpuCheckConfig(out_dir="o", steps="train,tests"))
    assert [x.name for x in only] == ["train", "tests"]
    with pytest.raises(ConfigError, match="choose from tests, bench, train"):
        gpu_check.steps(gpu_check.GpuCheckConfig(steps="tests,bnech"))


# A step that prints, starts a worker that outlives it (as DataLoader workers and torchrun's do), then hangs.
HANGS = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("tests/test_kernels.py::test_flex_matches_naive[bf16] PASSED", flush=True)
print("tests/test_model.py::test_compiled_regions ", flush=True)
time.sleep(60)
"""


def test_a_step_past_its_limit_is_stopped_and_the_report_shows_where(tmp_path):
    """The step and its workers are killed at the limit (not left running, not waited for), and the report shows
    the end of its output: the test it was in, in the table and in a section of its own."""
    step = gpu_check.Step("tests", [sys.executable, "-c", HANGS], timeout=3)
    t0 = time.perf_counter()
    gpu_check.run_step(step, {**os.environ, "PYTHONUNBUFFERED": "1"}, tmp_path)
    assert time.perf_counter() - t0 < 20
    assert step.status == "TIMED OUT after 3 s"
    md = gpu_check.report([step], [], None, "2026-12-06")
    assert "| tests | TIMED OUT after 3 s | 3 | `tests/test_model.py::test_compiled_regions` |" in md
    assert "#### tests: the end of its output when it was stopped" in md and "test_flex_matches_naive[bf16] PASSED" in md


def test_gpu_path_never_imports_datasets(tmp_path):
    """With `datasets` absent (the GPU machines have none), every module imports, the dry run lists the steps,
    a training run on the embedded sample with the check's data flags works, and pytest collects the CUDA tests."""
    code = NO_DATASETS + f"""
import gpu_check, train, bench, glue, data, model, kernels
assert gpu_check.main(["--dry_run"]) == 0
train.main(["--preset=mosaic-bert-tiny", "--data=default", "--data_mode=chunk", "--seq_len=32",
            "--global_batch_size=4", "--micro_batch_size=4", "--max_steps=2", "--eval_every=0",
            "--save_every=0", "--device=cpu", "--out_dir={tmp_path}"])
import pytest
assert pytest.main(["--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]) == 0
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tests (limit" in p.stdout and "bench.py --quick" in p.stdout and "step 2/2 | loss" in p.stdout


def test_report_is_pasteable_markdown():
    """One table row per step with its status and result (pytest's summary, the last training log line),
    the compile choice and MFU reference of the run, and bench.py's tables."""
    done = [gpu_check.Step("tests", [], 1, "passed", 81.2, "....\n38 passed, 1 skipped in 80.00s\n"),
            gpu_check.Step("bench", [], 1, "FAILED (exit 1)", 12.0, "Traceback ..."),
            gpu_check.Step("train", [], 1, "passed", 95.0,
                           "compile: on (default on CUDA; --compile=false to run eagerly)\n"
                           "MFU reference: 989.00 TFLOP/s per rank (data-sheet dense bfloat16 peak)\n"
                           "step 40/50 | loss 7.9\nstep 50/50 | loss 7.5000 | mfu 41% | eta 0:00\n")]
    md = gpu_check.report(done, ["- device: NVIDIA H200 x 1"], "### (a) pretraining\n| row |", "2026-12-02")
    lines = md.splitlines()
    assert lines[0] == "### GPU check (2026-12-02)" and "- device: NVIDIA H200 x 1" in lines
    assert "| tests | passed | 81 | `38 passed, 1 skipped in 80.00s` |" in lines
    assert "| bench | FAILED (exit 1) | 12 | `tables below` |" in lines
    assert "| train | passed | 95 | `step 50/50 | loss 7.5000 | mfu 41% | eta 0:00` |" in lines
    assert any("compile: on (default on CUDA" in x and "data-sheet dense bfloat16 peak" in x for x in lines)
    assert md.rstrip().endswith("| row |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_without_cuda_it_says_what_to_do(capsys):
    assert gpu_check.main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_embedded_sample_reads_the_same_without_datasets(monkeypatch):
    """The embedded sample's plain reader gives exactly the records the `datasets` json loader gives."""
    import collections

    import data
    plain = list(data._read_file(str(data.DEFAULT_CORPUS), collections.Counter()))
    via = list(data._records(next(iter(data._load_dataset("json", [str(data.DEFAULT_CORPUS)]).iter(batch_size=10**6))),
                             "x", False, collections.Counter()))
    assert len(plain) > 100 and plain == via
