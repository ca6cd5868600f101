"""Checkpoints and run management: atomic files, listing, autoresume, preemption, RNG state.

    atomic_save, atomic_write_json    temp file + fsync + os.replace: a crash leaves the old file or the new one
    checkpoint_path, list_checkpoints, latest_checkpoint    out_dir/ckpt_{step:07d}.pt, sorted by step
    load_for_resume                   --resume, or autoresume: same config continues, another config is refused
    PreemptionFlag, PREEMPTED_EXIT    SIGTERM/SIGUSR1: every rank stops after the same step, rank 0 saves
    rng_state, set_rng_state          torch/CUDA/Python/numpy RNG as weights_only-loadable values
    trim_metrics                      metrics.jsonl keeps only the rows up to the checkpoint a run resumes from
"""

import json
import os
import random
import signal
import threading
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite loss, missing checkpoint...). Printed on stderr, exit 1."""


# ----------------------------------------------------------------------------------------
# Atomic files and the checkpoint list


def _atomic_write(path, write: Callable, mode: str):
    """write(f) into path.tmp in the same directory, fsync, then os.replace: never half a file."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def atomic_save(obj, path):
    """torch.save, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_json(obj, path):
    """json.dump(indent=2), atomically."""
    _atomic_write(path, lambda f: json.dump(obj, f, indent=2), "w")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    """The ckpt_*.pt files of out_dir, oldest step first ([] without the folder)."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n.endswith(".pt")]
    return sorted(os.path.join(out_dir, n) for n in names)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The highest-step checkpoint in out_dir, or None."""
    paths = list_checkpoints(out_dir)
    return paths[-1] if paths else None


# ----------------------------------------------------------------------------------------
# Autoresume: the same config continues, another config is refused (checkpoints are never deleted implicitly)

# TrainConfig fields that change how a run is carried out or logged, not what it computes: autoresume ignores them.
HOW_NOT_WHAT = ("resume", "stop_at_step", "out_dir", "device", "compile", "keep_freed_memory", "num_workers",
                "log_every", "eval_every", "eval_batches", "eval_batch_size", "save_every", "keep_checkpoints")


def run_config_diff(saved: dict, current: dict) -> list[str]:
    """The fields (other than HOW_NOT_WHAT) in which a checkpoint's train_config differs from this run's."""
    keys = sorted((set(saved) | set(current)) - set(HOW_NOT_WHAT))
    return [f"--{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def model_config_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_for_resume(out_dir: str, resume: bool, train_cfg: dict, model_cfg: dict, print0=print) -> Optional[dict]:
    """The checkpoint this run continues, or None for a fresh start; raises before any work on a mismatch.
    Without --resume an out_dir holding checkpoints of the same config is resumed (autoresume: running the same
    command again continues it), and one of another config is refused. A different --data, data_mode, seq_len
    or seed is refused later, by the data stream's load_state_dict."""
    path = latest_checkpoint(out_dir)
    if path is None:
        if resume:
            raise TrainError(f"--resume: no checkpoint (ckpt_*.pt) in {out_dir}; "
                             f"run without --resume to start, or point --out_dir at the run to continue")
        return None
    how = "--resume" if resume else f"autoresume ({out_dir} holds checkpoints)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or unsafe pickled types
        raise TrainError(f"{how}: cannot load {path} ({type(e).__name__}: {str(e)[:200]}); "
                         f"move it away to resume from the previous checkpoint") from None
    diff = [] if resume else run_config_diff(ckpt.get("train_config", {}), train_cfg)
    if diff:
        raise ConfigError(f"{out_dir} holds the checkpoints of a run with another config "
                          f"({path}, step {ckpt['step']}):\n  " + "\n  ".join(diff) + "\nNothing was changed. "
                          f"To continue that run with these settings, add --resume; to start a new run, pass "
                          f"another --out_dir (or delete {out_dir} yourself).")
    diff = model_config_diff(ckpt["model_config"], model_cfg)
    if diff:
        raise ConfigError(f"--resume: {path} was trained with a different model config:\n  " + "\n  ".join(diff)
                          + "\nuse the same --preset/--model/--model_overrides/--dropout, or a new --out_dir")
    changed = [k for k in ("mask_prob", "global_batch_size") if ckpt["train_config"].get(k) != train_cfg[k]]
    if changed:
        print0(f"warning: resuming with a different {', '.join(changed)} than the checkpoint: "
               f"the run will not continue exactly as the original")
    print0(f"resuming from {path} (step {ckpt['step']}){'' if resume else ': autoresume, same config'}")
    return ckpt


def trim_metrics(metrics_path: str, step: Optional[int]):
    """A fresh run (step None) removes the rows of a run that saved no checkpoint; a resumed one drops the
    rows logged after its checkpoint (a crashed run's tail)."""
    if not os.path.exists(metrics_path):
        return
    if step is None:
        print(f"note: {metrics_path} holds the rows of a run that saved no checkpoint; starting afresh", flush=True)
        os.remove(metrics_path)
        return
    with open(metrics_path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(metrics_path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(metrics_path + ".tmp", metrics_path)


# ----------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    """This process's RNG states as weights_only-safe values (numpy's ndarray becomes a list of ints)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def restore_rng(ckpt: Optional[dict], seed: int, rank: int, world: int, print0=print):
    """A resumed run takes this rank's saved RNG state; a fresh one seeds each rank apart (dropout differs across
    ranks). Resumed on another world size, each rank is seeded from (seed, rank, step): its own stream, and the
    same resume draws the same."""
    if ckpt is None:
        torch.manual_seed(seed + 1 + rank)
        random.seed(seed + rank)
        np.random.seed(seed + rank)
    elif len(ckpt["rng_per_rank"]) == world:
        set_rng_state(ckpt["rng_per_rank"][rank])
    else:
        s = int(np.random.SeedSequence([seed, rank, ckpt["step"]]).generate_state(1, np.uint64)[0])
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        print0(f"note: the checkpoint was written by {len(ckpt['rng_per_rank'])} ranks, this run has {world}: each "
               f"rank's RNG is seeded from (seed, rank, step), so dropout masks will differ from the original run")


# ----------------------------------------------------------------------------------------
# Preemption

# Exit status once the preemption checkpoint is saved: EX_TEMPFAIL of <sysexits.h>, "try again later", which a
# requeue script tells from success (0), bad flags (2) and failures (1, or a signal's 128+n).
PREEMPTED_EXIT = 75
# torchrun turns any worker's non-zero status into its own exit 1, so rank 0 also leaves this file (holding
# the step) in out_dir; the next start of train.py in that out_dir removes it.
PREEMPTED_MARKER = "PREEMPTED"


class Preempted(Exception):
    """Raised on every rank after a preemption checkpoint was saved; train.cli exits with PREEMPTED_EXIT."""


class PreemptionFlag:
    """SIGTERM (what schedulers and torchrun send before a kill) or SIGUSR1 (SLURM's --signal) only sets a flag;
    the loop reads it after every step through `agreed`, so every rank stops after the same step. The previous
    handlers come back on exit. Under torchrun the workers have torchrun's 30 s grace to save."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world: int):
        self.received, self.previous, self.group = None, {}, None
        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # the flag is a host value: no device sync to agree on it

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank received a preemption signal (a collective on the host: call it on every rank)."""
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
