"""Pretrain MosaicBERT (or the BERT baseline) with masked language modelling.

    python train.py                                     # CPU demo: a small MosaicBERT on the embedded sample
    python train.py --preset=mosaic-bert-tiny --max_steps=20
    torchrun --nproc_per_node=8 train.py --preset=mosaic-bert-base --data=c4   # the paper's recipe

Everything a run does is in this file, top to bottom (grep the names):
    TrainConfig, TRAIN_PRESETS    one dataclass, --field=value flags, named recipes
    init_distributed              torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU
    perf.BoundedHeap              CPU default: glibc keeps freed memory (no page faults per step), trimmed at a bound
    decoupled weight decay        MosaicML's DecoupledAdamW expressed with torch's AdamW
    lr_at                         linear warmup, then linear decay to final_lr_frac x peak
    accumulate_gradients          global masked count: a step's MLM loss is sum(CE) / (masked tokens in the global batch)
    no_sync                       gradients are all-reduced once per step, on the last micro-step
    --compile                     torch.compile in one place, on by default on CUDA (resolve_compile)
    MFU                           against a peak-FLOP table on GPUs, a measured matmul rate on CPUs (perf.peak_flops)
    save_checkpoint / resume      atomic, weights_only-loadable, exact continuation (data, RNG, schedule)
    autoresume                    a run into an out_dir holding checkpoints of the same config continues them;
                                  of another config, it refuses (checkpoints are never deleted implicitly)
    preemption                    SIGTERM/SIGUSR1: every rank finishes the step, rank 0 saves, exit PREEMPTED_EXIT

Shape legend: B sequences per micro-batch, S = seq_len.
Recompiles: with --compile, run with TORCH_LOGS=recompiles to see every recompilation and its reason.
Every micro-batch has the same (B, S) shape and only tensors enter the model; the varying number of
real tokens (nnz) and of masked tokens is marked dynamic inside model.py (model.compile_model), so a
run compiles once per region instead of once per batch.
"""

import datetime
import inspect
import json
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import fillmask
import model as modeling
import perf
from config import ConfigError, config_dict, main_guard, parse_config, print_config


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite loss, missing checkpoint...). Printed on stderr, exit 1."""


# Exit status after a preemption signal once the checkpoint is saved: EX_TEMPFAIL of <sysexits.h>, "try again
# later". A requeue script tells it from success (0), bad flags (2) and failures (1, or a signal's 128+n).
PREEMPTED_EXIT = 75
# torchrun turns any worker's non-zero status into its own exit 1, so rank 0 also leaves this file in out_dir
# (holding the step); the next start of train.py in that out_dir removes it.
PREEMPTED_MARKER = "PREEMPTED"
# Process-group timeout: a collective waits this long for the slowest rank. torch's default is 10 min for NCCL;
# a rank's first batch (DataLoader start-up, a resumed stream re-reading part of one C4 file) may take minutes.
DIST_TIMEOUT = datetime.timedelta(hours=1)


class Preempted(Exception):
    """Raised on every rank after a preemption checkpoint was saved; cli() exits with PREEMPTED_EXIT."""


# ----------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    preset: str = "demo"               # which TRAIN_PRESETS entry was applied (set by --preset)
    # model: a model.ModelConfig preset plus overrides
    model: str = "mosaic-bert-small"   # model.PRESETS name
    model_overrides: str = ""          # "n_layers=4,d_model=256": ModelConfig fields on top of the preset
    dropout: Optional[float] = 0.0     # sets hidden_dropout and attn_dropout (0: every dropout off; none: the preset's)
    # data
    data: str = "default+sentiment"    # 'default' (embedded Wikipedia sample), 'sentiment' (the sentiment sample's
                                       # training sentences, unlabelled), joined with '+', 'c4', or a local path/glob
    data_mode: str = "pack"            # 'truncate' (paper) | 'chunk' | 'pack' (the demo: windows back to back)
    seq_len: int = 128
    mask_prob: float = 0.3             # MosaicBERT: 30% masking. Evaluation always masks 15%.
    num_workers: int = 0
    # batch and duration
    global_batch_size: int = 32        # sequences per optimizer step, over all ranks
    micro_batch_size: int = 32         # sequences per forward/backward on one rank
    max_steps: int = 300               # the LR schedule's length
    stop_at_step: int = 0              # >0: stop cleanly (with a checkpoint) after this step
    # optimizer (decoupled AdamW) and schedule
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 1e-5         # decoupled: each step multiplies weights by 1 - weight_decay * lr/peak_lr
    warmup_frac: float = 0.06          # linear warmup over this fraction of max_steps
    final_lr_frac: float = 0.02        # linear decay to this fraction of lr at max_steps
    grad_clip: float = 1.0             # max global grad norm; 0 = off
    # system
    device: str = "auto"               # 'auto' | 'cpu' | 'cuda'
    dtype: str = "auto"                # 'auto' (bf16 where this device runs it fast, else float32; perf.resolve_dtype)
                                       # | 'bfloat16' (autocast) | 'float32' (no autocast)
    compile: Optional[bool] = None     # None (auto): on CUDA; on the CPU for runs of >= 1M planned tokens (the
                                       # demo), where it pays back its compile time; true/false forces it
    keep_freed_memory: bool = True     # CPU: glibc keeps freed memory, trimmed back at a bound (see perf.BoundedHeap)
    seed: int = 0
    # logging, evaluation, checkpoints
    out_dir: str = "out/demo"
    log_every: int = 10                # 1 logs every step
    eval_every: int = 100              # 0 = no evaluation
    eval_batches: int = 8
    eval_batch_size: int = 32
    save_every: int = 150              # 0 = save only at the end (or at stop_at_step)
    keep_checkpoints: int = 2          # keep the newest k checkpoints; 0 keeps all
    resume: bool = False               # continue from the latest checkpoint in out_dir
    samples: bool = True               # print fill-mask predictions for SAMPLE_TEXTS before and after training


# The paper's recipe: mosaicml/examples v0.0.4, examples/bert/yamls/main/mosaic-bert-base-uncased.yaml
# (the version the MosaicBERT paper pins): C4, seq 128, global batch 4096, microbatch 128,
# decoupled AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, wd 1e-5, 6% warmup, linear decay to 0.02x,
# 286,720,000 samples = 70,000 steps, bf16, no gradient clipping, eval at 15% masking every 2000 steps.
_PAPER = dict(
    model_overrides="", dropout=None, data="c4", data_mode="truncate", seq_len=128, num_workers=4,
    global_batch_size=4096, micro_batch_size=128, max_steps=70_000, lr=5e-4, beta1=0.9, beta2=0.98,
    eps=1e-6, weight_decay=1e-5, warmup_frac=0.06, final_lr_frac=0.02, grad_clip=0.0, dtype="auto",
    seed=17, log_every=10, eval_every=2000, eval_batches=40, eval_batch_size=128, save_every=3500,
)
# Tiny recipes for CPU tests and quick checks.
_TINY = dict(
    model_overrides="", dropout=None, data="default", data_mode="chunk", seq_len=128, samples=False,
    global_batch_size=16, micro_batch_size=8, max_steps=40, lr=1e-3, grad_clip=1.0,
    log_every=5, eval_every=20, eval_batches=4, eval_batch_size=16, save_every=20,
)
TRAIN_PRESETS = {
    # The TrainConfig defaults: 4 layers, d=256, the real 50304 vocab, 300 steps of 32 packed rows of 128 tokens.
    # No dropout and lr 1e-3: at 2e-3 and above this model sat on the unigram plateau (mlm_acc ~0.05) for 200+
    # steps. The data is the Wikipedia sample plus the sentiment sample's training sentences without their labels
    # (in-domain text for glue.py's demo, "don't stop pretraining"; the dev sentences are never read). Packing
    # fills every row (each window attends only to itself), so every step has the same ~4,090 real tokens:
    # the matmuls are full-sized, the heap stays bounded (chunked rows of short sentences changed the tensor
    # sizes every step and fragmented it), and on the CPU the run is long enough for torch.compile to pay.
    "demo": {},
    "mosaic-bert-base": dict(_PAPER, model="mosaic-bert-base", mask_prob=0.3, out_dir="out/mosaic-bert-base"),
    # BERT baseline: the paper trains it with the same recipe at 15% masking
    # (mosaicml/examples v0.0.4 yamls/main/hf-bert-base-uncased.yaml: lr 5e-4, mlm_probability 0.15).
    "bert-base": dict(_PAPER, model="bert-base", mask_prob=0.15, out_dir="out/bert-base"),
    "mosaic-bert-tiny": dict(_TINY, model="mosaic-bert-tiny", mask_prob=0.3, out_dir="out/mosaic-bert-tiny"),
    "bert-tiny": dict(_TINY, model="bert-tiny", mask_prob=0.15, out_dir="out/bert-tiny"),
}


# Held-out sentences for the fill-mask samples (written for this file: in neither corpus), nanoGPT-style evidence
# that the model learned something: at step 0 the predictions are noise, after the demo they fit the context.
SAMPLE_TEXTS = (
    "The city is the [MASK] of the province and its largest city.",
    "It is one of the [MASK] films of the year.",
    "The acting is fine, but the [MASK] is a mess.",
)


def print_samples(model, when: str):
    """Top-5 fill-mask predictions for SAMPLE_TEXTS (fillmask.top_k), eager and in eval mode."""
    tok = data.get_tokenizer()
    print(f"fill-mask samples {when}:", flush=True)
    with torch.compiler.set_stance("force_eager"):
        for text in SAMPLE_TEXTS:
            print(fillmask.format_predictions(text, fillmask.top_k(model, tok, text, k=5)), flush=True)


def check_config(cfg: TrainConfig, world_size: int) -> int:
    """Validate choices and the batch arithmetic. Returns the gradient accumulation steps."""
    choices = dict(device=("auto", "cpu", "cuda"), dtype=perf.DTYPES,
                   data_mode=("truncate", "chunk", "pack"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    positive = ("global_batch_size", "micro_batch_size", "max_steps", "seq_len", "log_every")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(cfg, key)}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout={cfg.dropout}: must be in [0, 1)")
    if not 0.0 < cfg.mask_prob < 1.0:
        raise ConfigError(f"--mask_prob={cfg.mask_prob}: must be in (0, 1)")
    if cfg.global_batch_size % world_size:
        raise ConfigError(f"--global_batch_size={cfg.global_batch_size} is not divisible by the "
                          f"{world_size} ranks; pick a multiple of {world_size}")
    per_rank = cfg.global_batch_size // world_size
    if per_rank % cfg.micro_batch_size:
        divisors = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        hint = ", ".join(map(str, [m for m in divisors if m <= cfg.micro_batch_size][-3:]))
        raise ConfigError(f"--micro_batch_size={cfg.micro_batch_size} does not divide the per-rank batch "
                          f"{per_rank} (= --global_batch_size={cfg.global_batch_size} / {world_size} ranks); "
                          f"use a divisor of {per_rank}, e.g. {hint}")
    return per_rank // cfg.micro_batch_size


# On the CPU, compiling the demo's regions costs about 25 s and buys about 17% more tokens/s on its
# packed 32 x 128 batches (2-core AMD EPYC, the same 70 steps eager and compiled: 3,345 vs 3,905 real
# tokens/s), so it pays back after about 0.5M tokens. Auto compiles CPU runs of at least twice that.
CPU_COMPILE_MIN_TOKENS = 1_000_000


def resolve_compile(flag: Optional[bool], device: torch.device, planned_tokens: int = 0) -> tuple[bool, str]:
    """--compile: true/false as given; unset (None), compile where it pays. On CUDA the regional compile
    (fused GeGLU, LayerNorm and dropout, the fused flex kernel) is always worth its one-off cost. On the
    CPU it pays only over a long enough run: planned_tokens (max_steps x global batch x seq_len) of at
    least CPU_COMPILE_MIN_TOKENS, as in the demo; tests and quick checks stay eager. Returns (on, why)."""
    if flag is not None:
        return flag, f"--compile={str(flag).lower()}"
    if device.type == "cuda":
        return True, "default on CUDA; --compile=false to run eagerly"
    if planned_tokens >= CPU_COMPILE_MIN_TOKENS:
        return True, (f"default on the CPU for runs of >= {CPU_COMPILE_MIN_TOKENS / 1e6:g}M planned tokens, this one "
                      f"{planned_tokens / 1e6:.1f}M, where it pays back its compile time; --compile=false to run eagerly")
    return False, (f"default on the CPU for runs under {CPU_COMPILE_MIN_TOKENS / 1e6:g}M planned tokens, this one "
                   f"{planned_tokens / 1e6:.2f}M; --compile=true to compile")


def planned_tokens(cfg: "TrainConfig") -> int:
    """Token positions the whole run will train on (padding included): what resolve_compile weighs."""
    return cfg.max_steps * cfg.global_batch_size * cfg.seq_len


def model_config(cfg: TrainConfig) -> modeling.ModelConfig:
    """The ModelConfig of a run: --model preset, then --model_overrides, then --dropout."""
    if cfg.model not in modeling.PRESETS:
        raise ConfigError(f"--model={cfg.model}: unknown model preset; choose one of {', '.join(modeling.PRESETS)}")
    base = config_dict(modeling.ModelConfig.preset(cfg.model))
    argv = [f"--{kv.strip()}" for kv in cfg.model_overrides.split(",") if kv.strip()]
    if cfg.dropout is not None:
        argv += [f"--hidden_dropout={cfg.dropout}", f"--attn_dropout={cfg.dropout}"]
    try:
        return parse_config(modeling.ModelConfig, argv, **base)
    except ConfigError as e:
        raise ConfigError(f"--model_overrides={cfg.model_overrides!r}: {e}") from None
    except ValueError as e:  # ModelConfig.__post_init__ checks
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------
# Distributed


def init_distributed(device_flag: str, keep_freed: bool = False):
    """Read torchrun's env vars; without them this is one process. Returns (rank, world, device).
    keep_freed: on the CPU, apply keep_freed_memory."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but CUDA is not available; use --device=cpu (or auto)")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif keep_freed:
        perf.keep_freed_memory()
    if world > 1:
        # device_id on CUDA binds the group to this rank's GPU (NCCL then connects eagerly, no guessing)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=DIST_TIMEOUT,
                                **({"device_id": device} if use_cuda else {}))
    return rank, world, device


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DDP:
    """DDP for data-parallel training. No buffer broadcast before each forward: the only buffers are the constant ALiBi
    slopes, which DDP would otherwise re-broadcast from rank 0 on every forward. gradient_as_bucket_view:
    the .grad tensors are views into the all-reduce buckets (no copy in or out, one gradient's memory less)."""
    # newer torch renames the flag (forward_sync_buffers; its buffers are still synced once, at init: fine here)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_buffer_sync)


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather(obj) -> list:
    """Every rank's `obj` (small picklable things: RNG states, data positions)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with MosaicML's *decoupled* weight decay and no decay on biases and LayerNorm weights.

    DecoupledAdamW (Composer) decays as p -= wd * (lr_t / peak_lr) * p, so weight_decay=1e-5 means
    1e-5 of the weight per step at peak LR, independent of the LR's size. torch's AdamW decays
    p -= lr_t * weight_decay * p, so passing weight_decay = wd / peak_lr gives exactly the same update.
    Parameters with fewer than 2 dims (biases, LayerNorm gains and shifts) are not decayed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in params if p.ndim >= 2], weight_decay=cfg.weight_decay / cfg.lr),
        dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0),
    ]
    fused = device.type in ("cuda", "cpu")  # one kernel over all params; on CPU ~5x faster than foreach
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for the update with 0-based index `step`: linear warmup to cfg.lr over warmup_frac*max_steps
    updates (the first update already uses lr/warmup, not 0), then linear decay reaching
    final_lr_frac*lr at max_steps (Composer's linear_decay_with_warmup, t_warmup=0.06dur, alpha_f=0.02)."""
    warmup = round(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.lr * (1.0 - (1.0 - cfg.final_lr_frac) * progress)


# ----------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, batches, device, amp, rank, world):
    """MLM loss and accuracy on the held-out batches (15% masking, fixed masks); ranks split the batches."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, n_correct, n_masked
    for b in batches[rank::world]:
        counts = model.layout_counts(b["attention_mask"], b["labels"])  # from the CPU batch: no device sync
        b = {k: to_device(v, device) for k, v in b.items()}
        # Never under set_stance("force_eager"): that also turns off the compiled flex_attention, and eager
        # flex builds the whole (1, H, nnz, nnz) score matrix (~43 GB a layer at the paper's eval batch).
        # Under --compile each region compiles once more, for no_grad; nnz stays dynamic.
        with amp():
            out = model(b["input_ids"], b["attention_mask"], b["labels"], counts=counts)
        tot += torch.stack([out.loss_sum.float(), out.n_correct.float(), out.n_masked.float()]).double()
    model.train()
    loss_sum, n_correct, n_masked = all_reduce(tot).tolist()
    return loss_sum / max(n_masked, 1), n_correct / max(n_masked, 1)


# ----------------------------------------------------------------------------------------
# Checkpoints


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


def seed_rank(seed: int, rank: int, step: int):
    """Seed torch (CPU and CUDA), Python and numpy from (seed, rank, step): for a resume on another world size,
    where the checkpoint holds no RNG state for this rank. Every rank gets its own stream (its own dropout masks),
    and the same resume on the same world size draws the same."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


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


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n.endswith(".pt")]
    return sorted(os.path.join(out_dir, n) for n in names)


# ----------------------------------------------------------------------------------------
# Preemption


class PreemptionFlag:
    """Preemption: SIGTERM (what schedulers and torchrun send before a kill) or SIGUSR1 (SLURM's --signal) only
    sets a flag; the loop reads it at the end of every step through `agreed`, so every rank stops after the same
    step, rank 0 saves a checkpoint, and the job exits with PREEMPTED_EXIT. The previous handlers come back on exit.
    Under torchrun a SIGTERM to torchrun reaches every worker, which then have torchrun's 30 s grace to save
    (SIGUSR1 only with TORCHELASTIC_SIGNALS_TO_HANDLE listing it)."""

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


# ----------------------------------------------------------------------------------------
# Training


def main(argv: Optional[list[str]] = None):
    cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, presets=TRAIN_PRESETS)
    rank, world, device = init_distributed(cfg.device, cfg.keep_freed_memory)
    try:
        with PreemptionFlag(world) as preempt:
            train(cfg, rank, world, device, preempt)
        if world > 1:
            dist.barrier()  # every rank done before any tears the process group down
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, rank: int, world: int, device: torch.device, preempt: Optional[PreemptionFlag] = None):
    """One training run; with `preempt`, a preemption signal saves a checkpoint and raises Preempted."""
    master = rank == 0

    def print0(*a, **k):
        if master:
            print(*a, **k, flush=True)

    accum = check_config(cfg, world)
    dtype, why, warning = perf.resolve_dtype(cfg.dtype, device)
    cfg = replace(cfg, dtype=dtype)  # the resolved config is what is printed and saved
    mcfg = model_config(cfg)
    if master:
        print_config(cfg)
        print_config(mcfg)
    print0(f"batch: global {cfg.global_batch_size} = micro {cfg.micro_batch_size} x {accum} accumulation "
           f"steps x {world} rank{'s' if world > 1 else ''} | device {device}")
    print0(f"dtype: {cfg.dtype} ({why})")
    if warning:
        print0(f"warning: {warning}")

    # --- resume: read the checkpoint first, so a mismatch fails before any work. Without --resume, an out_dir
    # holding checkpoints is resumed automatically when they come from the same config (autoresume: running the
    # same command again continues it, or finds it finished), and refused otherwise: never deleted implicitly.
    ckpt = None
    path = modeling.latest_checkpoint(cfg.out_dir)
    if cfg.resume and path is None:
        raise TrainError(f"--resume: no checkpoint (ckpt_*.pt) in {cfg.out_dir}; "
                         f"run without --resume to start, or point --out_dir at the run to continue")
    end = cfg.max_steps if cfg.stop_at_step <= 0 else min(cfg.stop_at_step, cfg.max_steps)
    if path is not None:
        how = "--resume" if cfg.resume else f"autoresume ({cfg.out_dir} holds checkpoints)"
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a checkpoint, or unsafe pickled types
            raise TrainError(f"{how}: cannot load {path} ({type(e).__name__}: {str(e)[:200]}); "
                             f"move it away to resume from the previous checkpoint") from None
        diff = [] if cfg.resume else run_config_diff(ckpt.get("train_config", {}), config_dict(cfg))
        if diff:
            raise ConfigError(f"{cfg.out_dir} holds the checkpoints of a run with another config "
                              f"({path}, step {ckpt['step']}):\n  " + "\n  ".join(diff) + "\nNothing was changed. "
                              f"To continue that run with these settings, add --resume; to start a new run, pass "
                              f"another --out_dir (or delete {cfg.out_dir} yourself).")
        diff = model_config_diff(ckpt["model_config"], config_dict(mcfg))
        if diff:
            raise ConfigError(f"--resume: {path} was trained with a different model config:\n  "
                              + "\n  ".join(diff)
                              + "\nuse the same --preset/--model/--model_overrides/--dropout, or a new --out_dir")
        # (a different --data, data_mode, seq_len or seed is refused by stream.load_state_dict below)
        changed = [k for k in ("mask_prob", "global_batch_size") if ckpt["train_config"].get(k) != getattr(cfg, k)]
        if changed:
            print0(f"warning: resuming with a different {', '.join(changed)} than the checkpoint: "
                   f"the run will not continue exactly as the original")
        print0(f"resuming from {path} (step {ckpt['step']}){'' if cfg.resume else ': autoresume, same config'}")
        if ckpt["step"] >= end:
            print0(f"nothing to do: the checkpoint is at step {ckpt['step']} and the run ends at step {end}")
            return

    # --- data (first: a bad --data fails before any other work)
    stream = data.PretrainStream(cfg.data, split="train", seq_len=cfg.seq_len, mode=cfg.data_mode,
                                 mask_prob=cfg.mask_prob, seed=cfg.seed, global_batch_size=cfg.global_batch_size,
                                 rank=rank, world_size=world, num_workers=cfg.num_workers)
    eval_data = []
    if cfg.eval_every > 0:
        eval_data = data.eval_batches(cfg.data, cfg.seq_len, cfg.data_mode, cfg.eval_batch_size,
                                      cfg.eval_batches, mask_prob=0.15, seed=cfg.seed)
    print0(stream.describe())

    # --- model, optimizer
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = modeling.build(mcfg).to(device)  # uncompiled, unwrapped: saving and evaluation use this
    optimizer = build_optimizer(raw_model, cfg, device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    print0(f"model: {cfg.model} {n_params / 1e6:.1f}M parameters")
    step, tokens_seen = 0, 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, tokens_seen = ckpt["step"], ckpt.get("tokens_seen", 0)
    model = raw_model
    if master and cfg.samples and step == 0:
        print_samples(raw_model, "before training")
    use_compile, why = resolve_compile(cfg.compile, device, planned_tokens(cfg))
    print0(f"compile: {'on' if use_compile else 'off'} ({why})")
    if use_compile:
        # The one compile site. model.compile_model compiles each encoder layer and the MLM head in
        # place (regional compilation; unpadding stays eager, nnz is marked dynamic), so the state_dict
        # keeps its plain names. See recompiles with TORCH_LOGS=recompiles.
        t0 = time.perf_counter()
        modeling.compile_model(raw_model)
        print0(f"compile: regions wrapped in {time.perf_counter() - t0:.1f} s (compiled lazily on the first step)")
    if world > 1:
        model = wrap_ddp(model, device)

    if ckpt is not None:
        stream.load_state_dict(ckpt["data"])  # raises DataError if it does not fit this data
        rngs = ckpt["rng_per_rank"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:  # no saved state for this rank: a distinct one per rank, not rank 0's on every rank
            seed_rank(cfg.seed, rank, step)
            print0(f"note: the checkpoint was written by {len(rngs)} ranks, this run has {world}: each rank's RNG is "
                   f"seeded from (seed, rank, step), so dropout masks will differ from the original run")
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs across ranks
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)

    # --- output folder and metrics file
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if os.path.exists(os.path.join(cfg.out_dir, PREEMPTED_MARKER)):
            os.remove(os.path.join(cfg.out_dir, PREEMPTED_MARKER))
        if ckpt is None and os.path.exists(metrics_path):  # (no checkpoints here: see autoresume above)
            print(f"note: {metrics_path} holds the rows of a run that saved no checkpoint; starting afresh", flush=True)
            os.remove(metrics_path)
        elif os.path.exists(metrics_path):  # drop rows logged after the checkpoint (a crashed run's tail)
            with open(metrics_path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(rows)
            os.replace(metrics_path + ".tmp", metrics_path)

    def log_metrics(row: dict):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # --- precision
    def amp():
        return perf.autocast(device, cfg.dtype)

    # --- checkpointing
    nonfinite = torch.zeros((), device=device)  # > 0 once any loss or grad norm was NaN/inf (no sync per step)

    def check_finite(at_step: int):
        """Stop before a NaN can be logged as progress or saved. One sync; all ranks agree."""
        bad = all_reduce(nonfinite.clone(), dist.ReduceOp.MAX).item() > 0
        if bad:
            last = modeling.latest_checkpoint(cfg.out_dir)
            clip = "" if cfg.grad_clip > 0 else ", set --grad_clip=1.0"
            raise TrainError(f"non-finite (NaN/inf) loss or gradient at or before step {at_step}; stopping without "
                             f"saving. Last good checkpoint: {last or 'none'}. Lower --lr{clip}, or check the data.")

    def global_count(n: int) -> int:
        return int(all_reduce(torch.tensor(float(n), dtype=torch.float64, device=device)).item())

    def save_checkpoint(at_step: int):
        check_finite(at_step)
        finite = torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all()
        if not bool(all_reduce(finite.float(), dist.ReduceOp.MIN).item()):
            raise TrainError(f"non-finite weights at step {at_step}; not saving. Lower --lr, or set --grad_clip")
        rngs = all_gather(rng_state())
        data_state = stream.state_dict(gather=True)  # a collective for streams: every rank's position, in one dict
        total_tokens = tokens_seen + global_count(interval_tokens)  # collectives: every rank, before `if master`
        if master:
            path = checkpoint_path(cfg.out_dir, at_step)
            modeling.atomic_save({
                "model": raw_model.state_dict(),
                "model_config": config_dict(mcfg),
                "train_config": config_dict(cfg),
                "optimizer": optimizer.state_dict(),
                "schedule": dict(name="linear_warmup_linear_decay", lr=cfg.lr, warmup_frac=cfg.warmup_frac,
                                 final_lr_frac=cfg.final_lr_frac, max_steps=cfg.max_steps, next_lr=lr_at(at_step, cfg)),
                "step": at_step,
                "tokens_seen": total_tokens,  # real tokens trained on, all ranks
                "data": data_state,
                "rng": rngs[0],
                "rng_per_rank": rngs,
                "world_size": world,
                "tokenizer": "gpt2",
            }, path)
            if cfg.keep_checkpoints > 0:
                for old in list_checkpoints(cfg.out_dir)[:-cfg.keep_checkpoints]:
                    os.remove(old)
            print(f"saved {path}", flush=True)
        if dist.is_initialized():
            dist.barrier()

    # --- the loop
    peak, peak_line = perf.mfu_reference(device, cfg.dtype)  # measured in the dtype that runs
    print0(peak_line)
    peak_beaten = False  # the step outran the measured peak: MFU n/a, said once
    mb = cfg.micro_batch_size
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, n_correct, n_masked since last log
    interval_tokens, interval_steps, grad_norm = 0, 0, torch.zeros((), device=device)
    interval_context = 0  # sum over this rank's attention windows of length^2 (data.attention_context)
    t_log = t_start = time.perf_counter()
    first_step = step
    heap = perf.BoundedHeap(cfg.keep_freed_memory and device.type == "cpu")
    model.train()
    while step < end:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = stream.next_batch()  # this rank's share of the global batch: (global_batch / world, S)
        n_real, context_sq = data.attention_context(batch["attention_mask"])  # CPU tensor: no device sync
        # each micro-batch's layout counts, read from the CPU batch: the forwards then never wait on the GPU
        counts = [raw_model.layout_counts(batch["attention_mask"][sl], batch["labels"][sl])
                  for sl in (slice(i * mb, (i + 1) * mb) for i in range(accum))]
        batch = {k: to_device(v, device) for k, v in batch.items()}
        stats += accumulate_gradients(model, batch, accum, mb, world, amp, counts)
        grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        nonfinite = torch.maximum(nonfinite, (~torch.isfinite(grad_norm) | ~torch.isfinite(stats[0])).float())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(raw_model.parameters(), cfg.grad_clip, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        heap.after_step()
        step += 1
        interval_steps += 1
        interval_tokens += n_real
        interval_context += context_sq

        # --- log (the only place a loss is read on the host)
        if step % cfg.log_every == 0 or step == end or step == first_step + 1:
            tok = global_count(interval_tokens)
            tokens_seen += tok
            loss_sum, n_correct, n_masked_sum = all_reduce(stats.clone()).tolist()
            gn = grad_norm.item()
            dt = time.perf_counter() - t_log
            loss, acc = loss_sum / max(n_masked_sum, 1), n_correct / max(n_masked_sum, 1)
            ms = 1000 * dt / interval_steps
            tok_s = tok / dt
            # MFU's attention term counts the mean context a token actually attended to (its window)
            context = interval_context / max(interval_tokens, 1)
            flops_per_s = modeling.flops_per_token(mcfg, context, cfg.mask_prob) * tok_s / world
            mfu = perf.mfu(flops_per_s, peak)
            if peak and mfu is None and not peak_beaten:
                peak_beaten = True
                print0(f"mfu n/a: this step runs {perf.fmt_flops(flops_per_s)} per rank, above the measured "
                       f"peak of {perf.fmt_flops(peak)} (measured on a busy machine?)")
            eta = (end - step) * dt / interval_steps
            print0(f"step {step}/{cfg.max_steps} | loss {loss:.4f} | mlm_acc {acc:.3f} | "
                   f"lr {f'{lr:.1e}'.replace('e-0', 'e-')} | {ms:,.0f} ms | {tok_s:,.0f} tok/s | "
                   f"mfu {f'{mfu:.0%}' if mfu is not None else 'n/a'} | eta {fmt_time(eta)}")
            if step == first_step + 1:
                print0(f"(the first step includes warm-up{' and torch.compile' if use_compile else ''}: "
                       f"{dt:.1f} s)")
            check_finite(step)
            log_metrics(dict(step=step, loss=loss, mlm_acc=acc, lr=lr, tokens_per_s=tok_s, ms_per_step=ms,
                             mfu=mfu, grad_norm=gn, elapsed_s=time.perf_counter() - t_start,
                             rss_gb=(perf.resident_bytes() or 0) / 2**30, peak_rss_gb=perf.peak_resident_bytes() / 2**30,
                             heap_trims=heap.trims))
            stats.zero_()
            interval_tokens, interval_steps, interval_context = 0, 0, 0
            t_log = time.perf_counter()

        # --- evaluate on held-out data at 15% masking
        if eval_data and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            t0 = time.perf_counter()
            eval_loss, eval_acc = evaluate(raw_model, eval_data, device, amp, rank, world)
            print0(f"eval step {step} | eval_loss {eval_loss:.4f} | eval_mlm_acc {eval_acc:.3f} | "
                   f"{time.perf_counter() - t0:.1f} s")
            log_metrics(dict(step=step, eval_loss=eval_loss, eval_mlm_acc=eval_acc))
            t_log += time.perf_counter() - t0  # keep eval time out of the training throughput

        # --- checkpoint: periodic, at the end, and at --stop_at_step
        saved = (cfg.save_every > 0 and step % cfg.save_every == 0) or step == end
        if saved:
            t0 = time.perf_counter()
            save_checkpoint(step)
            t_log += time.perf_counter() - t0

        # --- preemption: the ranks agree on the flag here, so all of them stop after this same step
        if preempt is not None and step < end and preempt.agreed():
            if not saved:
                save_checkpoint(step)
            if master:
                with open(os.path.join(cfg.out_dir, PREEMPTED_MARKER), "w") as f:
                    f.write(f"{step}\n")
            print0(f"preempted ({preempt.received or 'a signal to another rank'}): checkpoint at step {step} saved; "
                   f"exiting with status {PREEMPTED_EXIT}. Continue with --resume (or the same command again)")
            raise Preempted(step)

    if master and cfg.samples and step == cfg.max_steps:
        print_samples(raw_model, f"after {step} steps")
    if end < cfg.max_steps:
        print0(f"stopped after step {step} (--stop_at_step); continue with --resume")
    print0(f"done: {step} steps, {fmt_time(time.perf_counter() - t_start)} wall time")


def accumulate_gradients(model, batch: dict, accum: int, mb: int, world: int, amp=nullcontext,
                         counts: Optional[list] = None) -> torch.Tensor:
    """Forward and backward of one step's micro-batches on this rank; returns float64 [loss_sum, n_correct, n_masked].
    counts: each micro-batch's model.LayoutCounts, read from the CPU batch (then no forward waits on the device).

    Global masked count: the gradient left in .grad is that of sum(CE over the masked tokens of the whole
    global batch) / (masked tokens in the whole global batch), whatever their split over micro-batches and
    ranks (tests/test_train.py checks it against autograd on the global batch). `model` is DDP-wrapped when
    world > 1: DDP averages gradients over ranks, so each rank scales by world / N_global.
    """
    # global masked count: the whole global batch's masked tokens, known before the forward pass
    n_masked = all_reduce((batch["labels"] != -100).sum().float())
    loss_scale = world / n_masked.clamp(min=1)  # DDP averages grads over ranks; `world` undoes that
    stats = torch.zeros(3, dtype=torch.float64, device=batch["labels"].device)
    with amp():  # one autocast context for all micro-steps: on CPU the bf16 weight casts are reused
        for i in range(accum):
            last = i == accum - 1
            sl = slice(i * mb, (i + 1) * mb)
            # gradients are all-reduced only on the last micro-step; forward runs inside no_sync too
            sync_ctx = model.no_sync() if world > 1 and not last else nullcontext()
            with sync_ctx:
                out = model(batch["input_ids"][sl], batch["attention_mask"][sl], batch["labels"][sl],
                            counts=counts[i] if counts else None)  # (B, S)
                (out.loss_sum * loss_scale).backward()
            stats += torch.stack([out.loss_sum.detach().float(), out.n_correct.float(),
                                  out.n_masked.float()]).double()
    return stats


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)  # a no-op on the CPU; any other device (tests/test_devices.py's meta) gets the tensor moved


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def cli(argv: Optional[list[str]] = None):
    """`main` with bad input turned into a message on stderr and a non-zero exit."""
    try:
        main(argv)
    except (data.DataError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted:
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    main_guard(cli)
