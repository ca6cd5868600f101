"""Check every GPU path on a CUDA machine in one command, and print a report to paste into the README.

    python gpu_check.py                      # on a machine with a CUDA GPU: 10-25 minutes, no internet needed
    python gpu_check.py --steps=tests        # one step (or a comma list): each fits a 10-minute command
    python gpu_check.py --dry_run            # anywhere: print the commands it would run

Needs CUDA torch 2.11+, numpy, tiktoken, pytest, hypothesis (transformers for bench.py's HF row); no `datasets`.
The steps, in order, each a subprocess stopped (with all it started) at its own time limit:
    tests     pytest -v -m cuda: the CUDA tests (flex vs naive, graphs per region, host syncs, DDP over NCCL)
    bench     bench.py --quick: each MosaicBERT change, MFU against the measured matmul rate and the data sheet
    train     train.py --preset=mosaic-bert-base, 50 steps on the embedded sample (compiled, the CUDA default)
The report (stdout and out/gpu_check/report.md): versions, each step's status, wall time and result, the training
run's MFU, bench.py's tables. Exit 0 only if all passed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import perf
from config import ConfigError, main_guard, parse_config

ROOT = Path(__file__).resolve().parent


@dataclass
class GpuCheckConfig:
    out_dir: str = "out/gpu_check"
    dry_run: bool = False        # print the steps' commands and exit
    steps: str = "tests,bench,train"  # which steps, in this order (one per command where commands are limited)
    tests_timeout: int = 540     # seconds per step, each under 10 minutes (most of it compiling)
    bench_timeout: int = 480
    train_timeout: int = 420
    train_steps: int = 50


@dataclass
class Step:
    name: str
    cmd: list
    timeout: int
    status: str = "not run"      # passed | FAILED (exit N) | TIMED OUT | not run
    wall_s: float = 0.0
    output: str = ""


def steps(cfg: GpuCheckConfig) -> list[Step]:
    """The steps cfg.steps names, in the order given."""
    out = Path(cfg.out_dir)
    py = sys.executable
    every = [
        Step("tests", [py, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "tests"], cfg.tests_timeout),
        Step("bench", [py, "bench.py", "--quick", f"--json={out / 'bench.json'}"], cfg.bench_timeout),
        Step("train", [py, "train.py", "--preset=mosaic-bert-base", "--data=default", "--data_mode=chunk",
                       "--num_workers=2", "--global_batch_size=256", "--micro_batch_size=128",
                       f"--max_steps={cfg.train_steps}", "--log_every=10", "--eval_every=0", "--save_every=0",
                       "--keep_checkpoints=1", f"--out_dir={out / time.strftime('train-%Y%m%d-%H%M%S')}"],
             cfg.train_timeout),  # a new out_dir each time: train.py would autoresume (and skip) a finished run
    ]
    by_name = {s.name: s for s in every}
    names = [n.strip() for n in cfg.steps.split(",") if n.strip()]
    if not names or any(n not in by_name for n in names):
        raise ConfigError(f"--steps={cfg.steps}: choose from {', '.join(by_name)} (a comma list)")
    return [by_name[n] for n in names]


def run_step(step: Step, env: dict, log_dir: Path) -> Step:
    """Run one step, its output written to log_dir/<name>.log as it goes (a step stopped at its limit keeps what it
    printed). At the limit its whole process group is killed: its workers too (DataLoader, torchrun)."""
    print(f"\n=== {step.name}: {' '.join(map(str, step.cmd))}", flush=True)
    log = Path(log_dir) / f"{step.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([str(c) for c in step.cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=step.timeout)
            step.status = "passed" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            step.status = f"TIMED OUT after {step.timeout} s"
    step.wall_s = time.perf_counter() - t0
    step.output = log.read_text(errors="replace")
    print(step.output[-4000:], flush=True)
    return step


def last_line(text: str, prefix: str) -> str | None:
    return next((line for line in reversed(text.splitlines()) if line.startswith(prefix)), None)


def last_lines(text: str, n: int = 30) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


def pytest_summary(text: str) -> str:
    """pytest -q's closing line ("12 passed, 3 skipped in 80.1s")."""
    return next((line.strip("= ") for line in reversed(text.splitlines())
                 if " in " in line and re.search("passed|failed|error", line)), "no summary (see the output above)")


def environment() -> list[str]:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    peak = perf.datasheet_peak(name, "bfloat16") if torch.cuda.is_available() else None
    return [f"- device: {name} x {torch.cuda.device_count()}",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}",
            f"- data-sheet dense bf16 peak: {f'{peak / 1e12:,.0f} TFLOP/s' if peak else 'not in perf.GPU_PEAK_TFLOPS'}"]


def report(done: list[Step], env_lines: list[str], bench_md: str | None, date: str) -> str:
    """The pasteable markdown report."""
    lines = [f"### GPU check ({date})", "", *env_lines, "", "| step | status | wall s | result |", "|---|---|---:|---|"]
    for s in done:
        result = {"tests": pytest_summary(s.output), "train": last_line(s.output, "step ") or "no step line"}.get(
            s.name, "tables below" if bench_md else "no bench report")
        if s.status.startswith("TIMED OUT") and result.startswith("no "):
            result = (last_lines(s.output, 1) or ["no output"])[0].strip()[:160]  # where it was when stopped
        lines.append(f"| {s.name} | {s.status} | {s.wall_s:,.0f} | `{result}` |")
    if train := next((s for s in done if s.name == "train"), None):
        ref = last_line(train.output, "MFU reference") or last_line(train.output, "MFU:")
        comp = last_line(train.output, "compile:")
        lines += ["", f"mosaic-bert-base training: {comp or 'compile: ?'}; {ref or 'no MFU reference line'}"]
    for s in done:
        if s.status.startswith("TIMED OUT"):
            lines += ["", f"#### {s.name}: the end of its output when it was stopped", "", "```",
                      *last_lines(s.output), "```"]
    if bench_md:
        lines += ["", "#### bench.py --quick", "", bench_md.strip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = parse_config(GpuCheckConfig, sys.argv[1:] if argv is None else argv)
    todo = steps(cfg)
    if cfg.dry_run:
        print("\n".join(f"{s.name} (limit {s.timeout} s): {' '.join(map(str, s.cmd))}" for s in todo))
        return 0
    if not torch.cuda.is_available():
        print("error: gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU machine run "
              "`python -m pytest -q tests` instead, or --dry_run to see the steps", file=sys.stderr)
        return 1
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = [run_step(s, env, out) for s in todo]
    bench_md = md.read_text() if (md := out / "bench.md").exists() else None
    text = report(done, environment(), bench_md, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (out / "report.md").write_text(text)
    (out / "steps.json").write_text(json.dumps([dict(name=s.name, status=s.status, wall_s=s.wall_s) for s in done]))
    print("\n" + text, flush=True)
    print(f"(report saved to {out / 'report.md'})")
    return 0 if all(s.status == "passed" for s in done) else 1


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main()))
