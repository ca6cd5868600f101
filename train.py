"""Pretrain MosaicBERT (or the BERT baseline) with masked language modelling.

    python train.py                                     # CPU demo: a small MosaicBERT on the embedded sample
    python train.py --preset=mosaic-bert-tiny --max_steps=20
    torchrun --nproc_per_node=8 train.py --preset=mosaic-bert-base --data=c4   # the paper's recipe

The recipe, top to bottom: TrainConfig, TRAIN_PRESETS; init_distributed; build_optimizer (MosaicML's decoupled
weight decay); lr_factor (warmup, linear decay); mlm_step (sum(CE) / masked tokens of the global batch, one gradient
sync a step); compile_model; Run (log line with MFU, evaluation, checkpoints); checkpoint.py (autoresume, preemption).

    stats = mlm_step(model, micro_batches(batch, mb), world=1, amp=nullcontext, loss_fn=mlm_loss)

Shape legend: B sequences per micro-batch, S = seq_len. TORCH_LOGS=recompiles shows each recompile and its reason.
"""

import datetime
import inspect
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import fillmask
import model as modeling
import perf
from checkpoint import (PREEMPTED_EXIT, PREEMPTED_MARKER, Preempted, PreemptionFlag, TrainError,  # noqa: F401
                        latest_checkpoint, load_for_resume, prepare_out_dir, restore_rng, rng_state, save_checkpoint)
from config import ConfigError, config_dict, main_guard, parse_config, print_config

# --- Config
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
    dtype: str = "auto"                # 'auto' (bf16 where this device runs it fast) | 'bfloat16' | 'float32'
    compile: Optional[bool] = None     # None: on CUDA, and on the CPU for runs of >= 1M planned tokens (the demo)
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
    samples: bool = True               # print fill-mask predictions for fillmask.SAMPLE_TEXTS before and after training


# The paper's recipe: mosaicml/examples v0.0.4, examples/bert/yamls/main/mosaic-bert-base-uncased.yaml (the
# version the paper pins): 286,720,000 samples = 70,000 steps of 4096, bf16, eval at 15% masking every 2000 steps.
_PAPER = dict(
    model_overrides="", dropout=None, data="c4", data_mode="truncate", seq_len=128, num_workers=4,
    global_batch_size=4096, micro_batch_size=128, max_steps=70_000, lr=5e-4, grad_clip=0.0, seed=17,
    eval_every=2000, eval_batches=40, eval_batch_size=128, save_every=3500)  # the other fields: TrainConfig's defaults
# Tiny recipes for CPU tests and quick checks.
_TINY = dict(
    model_overrides="", dropout=None, data="default", data_mode="chunk", seq_len=128, samples=False,
    global_batch_size=16, micro_batch_size=8, max_steps=40, lr=1e-3, grad_clip=1.0,
    log_every=5, eval_every=20, eval_batches=4, eval_batch_size=16, save_every=20)
TRAIN_PRESETS = {
    # The TrainConfig defaults: 300 steps of 32 packed rows (every step the same ~4,090 real tokens) of the
    # Wikipedia sample plus the sentiment sample's unlabelled training sentences (in-domain for glue.py's demo).
    "demo": {},
    "mosaic-bert-base": dict(_PAPER, model="mosaic-bert-base", mask_prob=0.3, out_dir="out/mosaic-bert-base"),
    # BERT baseline: the same recipe at 15% masking (mosaicml/examples v0.0.4 yamls/main/hf-bert-base-uncased.yaml)
    "bert-base": dict(_PAPER, model="bert-base", mask_prob=0.15, out_dir="out/bert-base"),
    "mosaic-bert-tiny": dict(_TINY, model="mosaic-bert-tiny", mask_prob=0.3, out_dir="out/mosaic-bert-tiny"),
    "bert-tiny": dict(_TINY, model="bert-tiny", mask_prob=0.15, out_dir="out/bert-tiny"),
}


def check_config(cfg: TrainConfig, world_size: int) -> int:
    """Validate choices and the batch arithmetic. Returns the gradient accumulation steps."""
    for key, allowed in dict(device=("auto", "cpu", "cuda"), dtype=perf.DTYPES,
                             data_mode=("truncate", "chunk", "pack")).items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    for key in ("global_batch_size", "micro_batch_size", "max_steps", "seq_len", "log_every"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(cfg, key)}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout={cfg.dropout}: must be in [0, 1)")
    if not 0.0 < cfg.mask_prob < 1.0:
        raise ConfigError(f"--mask_prob={cfg.mask_prob}: must be in (0, 1)")
    if cfg.global_batch_size % world_size:
        raise ConfigError(f"--global_batch_size={cfg.global_batch_size} is not divisible by the {world_size} ranks; "
                          f"pick a multiple of {world_size}")
    per_rank = cfg.global_batch_size // world_size
    if per_rank % cfg.micro_batch_size:
        hint = ", ".join(map(str, [m for m in range(1, cfg.micro_batch_size + 1) if per_rank % m == 0][-3:]))
        raise ConfigError(f"--micro_batch_size={cfg.micro_batch_size} does not divide the per-rank batch {per_rank} "
                          f"(= --global_batch_size={cfg.global_batch_size} / {world_size} ranks); use a divisor of "
                          f"{per_rank}, e.g. {hint}")
    return per_rank // cfg.micro_batch_size


# --- CPU workaround (the other ones are in perf.py): compiling pays back its ~25 s on the CPU only over a long run
# (docs/log.md has the measurement), so auto compiles CPU runs of at least this many planned tokens.
CPU_COMPILE_MIN_TOKENS = 1_000_000


def resolve_compile(flag: Optional[bool], device: torch.device, planned_tokens: int = 0) -> tuple[bool, str]:
    """--compile: as given; unset (None), on CUDA (the fused GeGLU, LayerNorm, dropout and flex kernels are
    always worth it) and on the CPU from CPU_COMPILE_MIN_TOKENS planned tokens (the demo). Returns (on, why)."""
    if flag is not None:
        return flag, f"--compile={str(flag).lower()}"
    if device.type == "cuda":
        return True, "default on CUDA; --compile=false to run eagerly"
    if planned_tokens >= CPU_COMPILE_MIN_TOKENS:
        return True, (f"default on the CPU for runs of >= {CPU_COMPILE_MIN_TOKENS / 1e6:g}M planned tokens, this one "
                      f"{planned_tokens / 1e6:.1f}M, where it pays back its compile time; "
                      "--compile=false to run eagerly")
    return False, (f"default on the CPU for runs under {CPU_COMPILE_MIN_TOKENS / 1e6:g}M planned tokens, this one "
                   f"{planned_tokens / 1e6:.2f}M; --compile=true to compile")


def planned_tokens(cfg: TrainConfig) -> int:
    """Token positions (padding included) the whole run trains on: what resolve_compile weighs."""
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


# --- Distributed
def init_distributed(device_flag: str, keep_freed: bool = False):
    """(rank, world, device) from torchrun's env vars, one process without them; keep_freed: perf.keep_freed_memory."""
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
        # a collective waits an hour for the slowest rank (NCCL's 10 min is less than a first batch may take);
        # device_id on CUDA binds the group to this rank's GPU (NCCL then connects eagerly, no guessing)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=1),
                                **({"device_id": device} if use_cuda else {}))
    return rank, world, device


def print0(*args):
    """print on rank 0 only (every rank when no process group is up)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DDP:
    """DDP without buffer broadcasts (the only buffers are the constant ALiBi slopes), the .grad tensors as views
    into the all-reduce buckets (no copy: one gradient's memory less)."""
    # torch 2.13 names the flag forward_sync_buffers; older releases (the GPU machines' 2.11) broadcast_buffers
    flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **{flag: False})


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather(obj) -> list:
    """Every rank's `obj` (small picklable things: RNG states, data positions)."""
    out = [obj] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


# --- Optimizer and schedule
def build_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.98), eps=1e-6) -> torch.optim.AdamW:
    """AdamW with MosaicML's *decoupled* weight decay (DecoupledAdamW: p -= wd * (lr_t / peak_lr) * p), which is
    torch's AdamW (p -= lr_t * weight_decay * p) with weight_decay = wd / peak_lr. Tensors with fewer than 2 dims
    (biases, LayerNorm) are not decayed. params: a module or an iterable of parameters."""
    params = [p for p in (params.parameters() if isinstance(params, torch.nn.Module) else params) if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=weight_decay / lr),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)  # one kernel: ~5x foreach on CPU
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_factor(step: float, total: float, warmup: float, final_frac: float) -> float:
    """Multiplier of the peak LR for update `step` (0-based): linear warmup (the first update already gets
    1/warmup, not 0), then linear decay reaching final_frac at `total` (Composer's linear_decay_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - (1.0 - final_frac) * min(1.0, (step - warmup) / max(1, total - warmup)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The paper's schedule: warmup over warmup_frac (6%) of max_steps, decay to final_lr_frac (0.02) x lr."""
    return cfg.lr * lr_factor(step, cfg.max_steps, round(cfg.warmup_frac * cfg.max_steps), cfg.final_lr_frac)


# --- The MLM step and evaluation
def mlm_loss(model, mb: dict):
    """model.BertForMaskedLM's loss_fn: (summed CE over the masked tokens, correct top-1 count, masked count)."""
    out = model(mb["input_ids"], mb["attention_mask"], mb["labels"], counts=mb.get("counts"))  # (B, S)
    return out.loss_sum, out.n_correct, out.n_masked


def hf_mlm_loss(model, mb: dict):
    """A transformers BertForMaskedLM's loss_fn: its mean CE over the masked tokens as a sum; n_correct 0."""
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"])
    n = (mb["labels"] != -100).sum()
    return out.loss * n, torch.zeros((), device=n.device), n


def mlm_step(model, micro: list[dict], world: int = 1, amp=nullcontext, loss_fn: Callable = mlm_loss) -> torch.Tensor:
    """Forward and backward of one step's micro-batches (micro_batches) on this rank; the caller steps the optimizer.
    loss_fn(model, mb) -> (summed CE, correct top-1, masked count); amp() -> a context. .grad is the gradient of
    sum(CE) / the global batch's masked count, whatever the split over micro-batches and ranks (`model` is
    DDP-wrapped when world > 1). Returns float64 [loss_sum, n_correct, n_masked]."""
    n_masked = all_reduce(sum((mb["labels"] != -100).sum() for mb in micro).float())
    loss_scale = world / n_masked.clamp(min=1)  # DDP averages grads over ranks; `world` undoes that
    stats = torch.zeros(3, dtype=torch.float64, device=micro[0]["labels"].device)
    with amp():  # one autocast context for all micro-steps: on CPU the bf16 weight casts are reused
        for i, mb in enumerate(micro):
            # gradients are all-reduced only on the last micro-step; forward runs inside no_sync too
            with model.no_sync() if world > 1 and i < len(micro) - 1 else nullcontext():
                loss_sum, n_correct, n = loss_fn(model, mb)
                (loss_sum * loss_scale).backward()
            stats += torch.stack([loss_sum.detach().float(), n_correct.float(), n.float()]).double()
    return stats


def micro_batches(batch: dict, mb: int, model=None, device=None) -> list[dict]:
    """This rank's batch (B_rank, S) as micro-batches of mb rows, moved to `device` in one copy, each with the
    `model`'s LayoutCounts read from the CPU batch (then no forward waits on the device)."""
    slices = [slice(i, i + mb) for i in range(0, batch["input_ids"].shape[0], mb)]
    counts = [model.layout_counts(batch["attention_mask"][sl], batch["labels"][sl]) if model is not None else None
              for sl in slices]
    if device is not None:  # pinned memory lets the copy to a GPU overlap with compute
        batch = {k: (v.pin_memory() if device.type == "cuda" else v).to(device, non_blocking=True)
                 for k, v in batch.items()}
    return [dict({k: v[sl] for k, v in batch.items()}, counts=c) for sl, c in zip(slices, counts)]


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """The global gradient norm (for the log; no host sync), after clipping to max_norm when > 0."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, grad_norm)
    return grad_norm


@torch.no_grad()
def evaluate(model, batches, device, amp, rank, world):
    """MLM loss and accuracy on the held-out batches (15% masking, fixed masks); ranks split the batches."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, n_correct, n_masked
    for b in batches[rank::world]:
        (mb,) = micro_batches(b, len(b["input_ids"]), model, device)  # counts from the CPU batch: no device sync
        with amp():  # never under set_stance("force_eager"): eager flex builds the whole (1, H, nnz, nnz) scores
            tot += torch.stack([t.float() for t in mlm_loss(model, mb)]).double()
    model.train()
    loss_sum, n_correct, n_masked = all_reduce(tot).tolist()
    return loss_sum / max(n_masked, 1), n_correct / max(n_masked, 1)


# --- Training
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
    # --- config; a checkpoint to continue is read first, so a mismatch fails before any work
    cfg, mcfg = resolve_config(cfg, world, device)
    end = cfg.max_steps if cfg.stop_at_step <= 0 else min(cfg.stop_at_step, cfg.max_steps)
    ckpt = load_for_resume(cfg.out_dir, cfg.resume, config_dict(cfg), config_dict(mcfg), print0)
    if ckpt is not None and ckpt["step"] >= end:
        return print0(f"nothing to do: the checkpoint is at step {ckpt['step']} and the run ends at step {end}")

    # --- data (first: a bad --data fails before any other work)
    stream, eval_data = build_data(cfg, rank, world)

    # --- model and optimizer (restored from the checkpoint), compiled, wrapped for DDP
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = modeling.build(mcfg).to(device)  # uncompiled, unwrapped: saving and evaluation use this
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    print0(f"model: {cfg.model} {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        stream.load_state_dict(ckpt["data"])  # raises DataError if it does not fit this data
    elif rank == 0 and cfg.samples:
        fillmask.print_samples(raw_model, "before training")
    use_compile = compile_model(raw_model, cfg, device)
    model = wrap_ddp(raw_model, device) if world > 1 else raw_model
    restore_rng(ckpt, cfg.seed, rank, world, print0)
    run = Run(cfg, mcfg, rank, world, device, raw_model, optimizer, stream, ckpt, use_compile, end)

    # --- the loop
    step = run.first_step
    model.train()
    while step < end:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = stream.next_batch()  # this rank's share of the global batch: (global_batch / world, S)
        stats = mlm_step(model, micro_batches(batch, cfg.micro_batch_size, raw_model, device), world, run.amp)
        grad_norm = clip_gradients(raw_model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run.record(batch, stats, grad_norm)
        if step % cfg.log_every == 0 or step == end or step == run.first_step + 1:
            run.log(step, lr)
        if eval_data and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            run.evaluate(step, eval_data)
        saved = (cfg.save_every > 0 and step % cfg.save_every == 0) or step == end  # periodic, end, stop_at_step
        if saved:
            run.save(step)
        if preempt is not None and step < end and preempt.agreed():  # every rank agrees: all stop after this step
            run.stop_preempted(step, saved, preempt.received)

    run.finish(step)


def build_data(cfg: TrainConfig, rank: int, world: int):
    """This rank's training stream and the held-out batches (15% masking, fixed masks; [] without evaluation)."""
    stream = data.PretrainStream(cfg.data, split="train", seq_len=cfg.seq_len, mode=cfg.data_mode,
                                 mask_prob=cfg.mask_prob, seed=cfg.seed, global_batch_size=cfg.global_batch_size,
                                 rank=rank, world_size=world, num_workers=cfg.num_workers)
    eval_data = [] if cfg.eval_every <= 0 else data.eval_batches(
        cfg.data, cfg.seq_len, cfg.data_mode, cfg.eval_batch_size, cfg.eval_batches, mask_prob=0.15, seed=cfg.seed)
    print0(stream.describe())
    return stream, eval_data


def resolve_config(cfg: TrainConfig, world: int, device: torch.device) -> tuple[TrainConfig, modeling.ModelConfig]:
    """Check the flags, resolve --dtype, print the configs, the batch arithmetic and the precision."""
    accum = check_config(cfg, world)
    dtype, why, warning = perf.resolve_dtype(cfg.dtype, device)
    cfg = replace(cfg, dtype=dtype)  # the resolved config is what is printed and saved
    mcfg = model_config(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print_config(cfg)
        print_config(mcfg)
    print0(f"batch: global {cfg.global_batch_size} = micro {cfg.micro_batch_size} x {accum} accumulation "
           f"steps x {world} rank{'s' if world > 1 else ''} | device {device}")
    print0(f"dtype: {cfg.dtype} ({why})" + (f"\nwarning: {warning}" if warning else ""))
    return cfg, mcfg


def compile_model(raw_model, cfg: TrainConfig, device: torch.device) -> bool:
    """The one compile site: model.compile_model compiles each encoder layer and the MLM head in place
    (regional compilation; unpadding stays eager, nnz is marked dynamic), so the state_dict keeps its plain names."""
    use_compile, why = resolve_compile(cfg.compile, device, planned_tokens(cfg))
    print0(f"compile: {'on' if use_compile else 'off'} ({why})")
    if use_compile:
        t0 = time.perf_counter()
        modeling.compile_model(raw_model)
        print0(f"compile: regions wrapped in {time.perf_counter() - t0:.1f} s (compiled lazily on the first step)")
    return use_compile


class Run:
    """The loop's state: sums since the last log line (on the device: read only at log time), metrics, checkpoints."""

    def __init__(self, cfg, mcfg, rank, world, device, raw_model, optimizer, stream, ckpt, use_compile, end):
        self.cfg, self.mcfg, self.rank, self.world, self.device, self.end = cfg, mcfg, rank, world, device, end
        self.raw_model, self.optimizer, self.stream, self.use_compile = raw_model, optimizer, stream, use_compile
        self.master = rank == 0
        self.first_step, self.tokens_seen = (0, 0) if ckpt is None else (ckpt["step"], ckpt.get("tokens_seen", 0))
        if self.master:
            self.metrics_path = prepare_out_dir(cfg.out_dir, None if ckpt is None else self.first_step)
        self.peak, peak_line = perf.mfu_reference(device, cfg.dtype)  # measured in the dtype that runs
        print0(peak_line)
        self.peak_beaten = False  # the step outran the measured peak: MFU n/a, said once
        # since the last log line: [loss_sum, n_correct, n_masked] on the device, real tokens, steps, sum of windows^2
        self.stats, self.tokens, self.steps, self.context = torch.zeros(3, dtype=torch.float64, device=device), 0, 0, 0
        self.nonfinite = torch.zeros((), device=device)  # > 0 once any loss or grad norm was NaN/inf (no sync per step)
        self.t_log = self.t_start = time.perf_counter()
        self.amp = lambda: perf.autocast(device, cfg.dtype)  # the run's precision, a context per use
        self.heap = perf.BoundedHeap(cfg.keep_freed_memory and device.type == "cpu")  # a CPU workaround

    def record(self, batch: dict, stats: torch.Tensor, grad_norm: torch.Tensor):
        """Add one step to the sums since the last log line (read from the CPU batch: no device sync)."""
        self.heap.after_step()
        n_real, context_sq = data.attention_context(batch["attention_mask"])
        self.stats += stats
        self.grad_norm = grad_norm
        self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(grad_norm + self.stats[0])).float())  # NaN/inf
        self.tokens, self.steps, self.context = self.tokens + n_real, self.steps + 1, self.context + context_sq

    def global_count(self, n: int) -> int:
        return int(all_reduce(torch.tensor(float(n), dtype=torch.float64, device=self.device)).item())

    def log(self, step: int, lr: float):
        """The log line and metrics row (the only place a loss is read on the host)."""
        tok = self.global_count(self.tokens)
        self.tokens_seen += tok
        loss_sum, n_correct, n_masked_sum = all_reduce(self.stats.clone()).tolist()
        dt = time.perf_counter() - self.t_log
        loss, acc = loss_sum / max(n_masked_sum, 1), n_correct / max(n_masked_sum, 1)
        ms, tok_s = 1000 * dt / self.steps, tok / dt
        # MFU's attention term counts the mean context a token actually attended to (its window)
        context = self.context / max(self.tokens, 1)
        flops_per_s = modeling.flops_per_token(self.mcfg, context, self.cfg.mask_prob) * tok_s / self.world
        mfu = perf.mfu(flops_per_s, self.peak)
        if self.peak and mfu is None and not self.peak_beaten:
            self.peak_beaten = True
            print0(f"mfu n/a: this step runs {perf.fmt_flops(flops_per_s)} per rank, above the measured "
                   f"peak of {perf.fmt_flops(self.peak)} (measured on a busy machine?)")
        print0(f"step {step}/{self.cfg.max_steps} | loss {loss:.4f} | mlm_acc {acc:.3f} | "
               f"lr {f'{lr:.1e}'.replace('e-0', 'e-')} | {ms:,.0f} ms | {tok_s:,.0f} tok/s | mfu "
               f"{f'{mfu:.0%}' if mfu is not None else 'n/a'} | eta {fmt_time((self.end - step) * dt / self.steps)}")
        if step == self.first_step + 1:
            print0(f"(the first step includes warm-up{' and torch.compile' if self.use_compile else ''}: {dt:.1f} s)")
        self.check_finite(step)
        self.write_metrics(dict(step=step, loss=loss, mlm_acc=acc, lr=lr, tokens_per_s=tok_s, ms_per_step=ms, mfu=mfu,
                                grad_norm=self.grad_norm.item(), elapsed_s=time.perf_counter() - self.t_start,
                                rss_gb=(perf.resident_bytes() or 0) / 2**30,
                                peak_rss_gb=(perf.peak_resident_bytes() or 0) / 2**30, heap_trims=self.heap.trims))
        self.stats.zero_()
        self.tokens, self.steps, self.context, self.t_log = 0, 0, 0, time.perf_counter()

    def write_metrics(self, row: dict):
        if self.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(self, step: int, eval_data: list):
        """Held-out MLM loss and accuracy at 15% masking; its time is kept out of the training throughput."""
        t0 = time.perf_counter()
        eval_loss, eval_acc = evaluate(self.raw_model, eval_data, self.device, self.amp, self.rank, self.world)
        print0(f"eval step {step} | eval_loss {eval_loss:.4f} | eval_mlm_acc {eval_acc:.3f} | "
               f"{time.perf_counter() - t0:.1f} s")
        self.write_metrics(dict(step=step, eval_loss=eval_loss, eval_mlm_acc=eval_acc))
        self.t_log += time.perf_counter() - t0

    def check_finite(self, step: int):
        """Stop before a NaN can be logged as progress or saved. One sync; all ranks agree."""
        if all_reduce(self.nonfinite.clone(), dist.ReduceOp.MAX).item() > 0:
            raise TrainError(f"non-finite (NaN/inf) loss or gradient at or before step {step}; stopping without "
                             f"saving. Last good checkpoint: {latest_checkpoint(self.cfg.out_dir) or 'none'}. "
                             f"Lower --lr{', set --grad_clip=1.0' * (self.cfg.grad_clip <= 0)}, or check the data.")

    def save(self, step: int):
        """An atomic, weights_only-loadable checkpoint (rank 0 writes; every rank joins the collectives)."""
        t0, cfg = time.perf_counter(), self.cfg
        self.check_finite(step)
        finite = torch.stack([torch.isfinite(p).all() for p in self.raw_model.parameters()]).all()
        if not bool(all_reduce(finite.float(), dist.ReduceOp.MIN).item()):
            raise TrainError(f"non-finite weights at step {step}; not saving. Lower --lr, or set --grad_clip")
        rngs = all_gather(rng_state())
        data_state = self.stream.state_dict(gather=True)  # a collective for streams: every rank's position
        total_tokens = self.tokens_seen + self.global_count(self.tokens)  # collectives: every rank, before `if master`
        if self.master:
            save_checkpoint({
                "model": self.raw_model.state_dict(), "model_config": config_dict(self.mcfg),
                "train_config": config_dict(cfg), "optimizer": self.optimizer.state_dict(),
                "schedule": dict(name="linear_warmup_linear_decay", lr=cfg.lr, warmup_frac=cfg.warmup_frac,
                                 final_lr_frac=cfg.final_lr_frac, max_steps=cfg.max_steps, next_lr=lr_at(step, cfg)),
                "step": step, "tokens_seen": total_tokens,  # real tokens trained on, all ranks
                "data": data_state, "rng": rngs[0], "rng_per_rank": rngs, "world_size": self.world, "tokenizer": "gpt2",
            }, cfg.out_dir, cfg.keep_checkpoints)
        if dist.is_initialized():
            dist.barrier()
        self.t_log += time.perf_counter() - t0

    def finish(self, step: int):
        if self.master and self.cfg.samples and step == self.cfg.max_steps:
            fillmask.print_samples(self.raw_model, f"after {step} steps")
        if self.end < self.cfg.max_steps:
            print0(f"stopped after step {step} (--stop_at_step); continue with --resume")
        print0(f"done: {step} steps, {fmt_time(time.perf_counter() - self.t_start)} wall time")

    def stop_preempted(self, step: int, saved: bool, received: Optional[str]):
        """Save (unless this step just did), leave the PREEMPTED marker, raise Preempted on every rank."""
        if not saved:
            self.save(step)
        if self.master:
            with open(os.path.join(self.cfg.out_dir, PREEMPTED_MARKER), "w") as f:
                f.write(f"{step}\n")
        print0(f"preempted ({received or 'a signal to another rank'}): checkpoint at step {step} saved; "
               f"exiting with status {PREEMPTED_EXIT}. Continue with --resume (or the same command again)")
        raise Preempted(step)


def fmt_time(seconds: float) -> str:
    h, rem = divmod(int(max(0, seconds)), 3600)
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
