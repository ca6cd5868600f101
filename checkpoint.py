"""Checkpoints and run management: atomic files, the checkpoint list, autoresume (load_for_resume: the same config
continues, another is refused), metrics.jsonl trimmed to the checkpoint (prepare_out_dir), RNG state, preemption."""

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


PREEMPTED_EXIT = 75  # EX_TEMPFAIL of <sysexits.h>, "try again later": not success (0), bad flags (2) or failure (1)
# torchrun turns a worker's non-zero status into its exit 1, so rank 0 also leaves this file (holding the step)
# in out_dir; the next start there removes it.
PREEMPTED_MARKER = "PREEMPTED"


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite loss, missing checkpoint...). Printed on stderr, exit 1."""


# --- Atomic files and the checkpoint list
def _atomic_write(path, write: Callable, mode: str):
    """write(f) into path.tmp in the same directory, fsync, then os.replace: never half a file."""
    path = os.fspath(path)
    with open(path + ".tmp", mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
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


def list_checkpoints(out_dir: str) -> list[str]:
    """The ckpt_*.pt files of out_dir, oldest step first ([] without the folder)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(os.path.join(out_dir, n) for n in names if n.startswith("ckpt_") and n.endswith(".pt"))


def save_checkpoint(state: dict, out_dir: str, keep: int):
    """Rank 0: `state` (train.py's: weights, configs, optimizer, schedule, step, tokens_seen, data position, RNG)
    as out_dir/ckpt_{step:07d}.pt, atomically; only the newest `keep` checkpoints stay (0: all)."""
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    atomic_save(state, path)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    print(f"saved {path}", flush=True)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The highest-step checkpoint in out_dir, or None."""
    return (list_checkpoints(out_dir) or [None])[-1]


# --- Autoresume: the same config continues, another config is refused (checkpoints are never deleted implicitly)
# TrainConfig fields that change how a run is carried out or logged, not what it computes: autoresume ignores them.
HOW_NOT_WHAT = ("resume", "stop_at_step", "out_dir", "device", "compile", "keep_freed_memory", "num_workers",
                "log_every", "eval_every", "eval_batches", "eval_batch_size", "save_every", "keep_checkpoints")


def config_diff(saved: dict, current: dict, ignore=(), flag="") -> list[str]:
    """The fields (other than `ignore`) in which a checkpoint's config differs from this run's."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{flag}{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


def load_for_resume(out_dir: str, resume: bool, train_cfg: dict, model_cfg: dict, print0=print) -> Optional[dict]:
    """The checkpoint this run continues, or None; raises before any work on a mismatch (a different --data,
    data_mode, seq_len or seed is refused later, by the data stream's load_state_dict)."""
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
    diff = [] if resume else config_diff(ckpt.get("train_config", {}), train_cfg, HOW_NOT_WHAT, "--")
    if diff:
        raise ConfigError(f"{out_dir} holds the checkpoints of a run with another config "
                          f"({path}, step {ckpt['step']}):\n  " + "\n  ".join(diff) + "\nNothing was changed. "
                          f"To continue that run with these settings, add --resume; to start a new run, pass "
                          f"another --out_dir (or delete {out_dir} yourself).")
    if diff := config_diff(ckpt["model_config"], model_cfg):
        raise ConfigError(f"--resume: {path} was trained with a different model config:\n  " + "\n  ".join(diff)
                          + "\nuse the same --preset/--model/--model_overrides/--dropout, or a new --out_dir")
    changed = [k for k in ("mask_prob", "global_batch_size") if ckpt["train_config"].get(k) != train_cfg[k]]
    if changed:
        print0(f"warning: resuming with a different {', '.join(changed)} than the checkpoint: "
               f"the run will not continue exactly as the original")
    print0(f"resuming from {path} (step {ckpt['step']}){'' if resume else ': autoresume, same config'}")
    return ckpt


def prepare_out_dir(out_dir: str, step: Optional[int]) -> str:
    """Rank 0: create out_dir, remove a PREEMPTED marker; in metrics.jsonl a fresh run (step None) removes the rows
    of a run that saved no checkpoint, a resumed one those logged after its checkpoint. Returns the metrics path."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, PREEMPTED_MARKER)):
        os.remove(os.path.join(out_dir, PREEMPTED_MARKER))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics_path) and step is None:
        print(f"note: {metrics_path} holds the rows of a run that saved no checkpoint; starting afresh", flush=True)
        os.remove(metrics_path)
    elif os.path.exists(metrics_path):  # drop the rows logged after the checkpoint (a crashed run's tail)
        with open(metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        _atomic_write(metrics_path, lambda f: f.writelines(rows), "w")
    return metrics_path


# --- RNG state
def rng_state() -> dict:
    """This process's RNG states as weights_only-safe values (numpy's ndarray becomes a list of ints)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def restore_rng(ckpt: Optional[dict], seed: int, rank: int, world: int, print0=print):
    """A resumed run takes this rank's saved RNG state; a fresh one, or one resumed on another world size (seeded
    from (seed, rank, step)), gives each rank its own stream."""
    if ckpt is not None and len(ckpt["rng_per_rank"]) == world:
        return set_rng_state(ckpt["rng_per_rank"][rank])
    if ckpt is None:  # a fresh run: dropout differs across ranks
        torch_seed, s = seed + 1 + rank, seed + rank
    else:
        torch_seed = s = int(np.random.SeedSequence([seed, rank, ckpt["step"]]).generate_state(1, np.uint64)[0])
        print0(f"note: the checkpoint was written by {len(ckpt['rng_per_rank'])} ranks, this run has {world}: each "
               f"rank's RNG is seeded from (seed, rank, step), so dropout masks will differ from the original run")
    torch.manual_seed(torch_seed)
    random.seed(s)
    np.random.seed(s % 2**32)


# --- Preemption
class Preempted(Exception):
    """Raised on every rank after a preemption checkpoint was saved; train.cli exits with PREEMPTED_EXIT."""


class PreemptionFlag:
    """SIGTERM (schedulers, torchrun) or SIGUSR1 (SLURM's --signal) only sets a flag; the loop reads it after every
    step through `agreed` (over gloo: no device sync), so every rank stops after the same step; the old handlers
    come back on exit."""

    def __init__(self, world: int):
        self.received, self.previous = None, {}
        self.group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None

    def __enter__(self):
        def handle(signum, frame):
            self.received = signal.Signals(signum).name
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any rank received a preemption signal (a collective on the host: call it on every rank)."""
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
