"""Speed claims, measured: what each MosaicBERT change buys, against BERT, Hugging Face and the machine.

    python bench.py --quick         # ~5 minutes on 2 CPU cores, base-size models (full mode: bigger, more, ablations)
    python bench.py --quick --size=tiny --json out/b.json    # tiny presets: the smoke test (also `--json=PATH`)

Each MLM row times a full training step (train.mlm_step, fused AdamW, zero_grad) on the same batches. Grep: LADDER
(one MosaicBERT change at a time), ABLATIONS, hf_rows (the Hugging Face peer), WORKLOADS, run (warm-up on every
shape, then interleaved rounds; medians). bench_report.py turns the times into tokens/s, MFU, targets, tables.
"""

import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch

import bench_report as report
import data
import hf
import kernels
import model as modeling
import perf
import train
from bench_report import PAPER_SEQ_LEN, BatchStats
from config import ConfigError, config_dict, main_guard, parse_config, print_config


MASK_PROB = 0.3  # MosaicBERT's masking rate, used for every row's batches (dense heads do not care)
optimizer = partial(train.build_optimizer, lr=5e-4, weight_decay=1e-5)  # the paper's AdamW (see train.py)


# --- Config
@dataclass
class BenchConfig:
    quick: bool = False                 # smaller batches and fewer repeats (base-size models still)
    size: str = "base"                  # 'base' | 'tiny' (bert-tiny / mosaic-bert-tiny / tiny HF: smoke tests)
    workloads: str = "pretrain,glue,demo,attention"
    device: str = "auto"                # 'auto' | 'cpu' | 'cuda'
    dtype: str = "auto"                 # 'auto' (bf16 where it runs fast here, else float32) | bfloat16 | float32
    threads: int = 0                    # torch.set_num_threads; 0 keeps torch's default
    keep_freed_memory: bool = True      # CPU: train.py's default heap (perf.BoundedHeap) for every row, the peer's too
    compile: bool = True                # model.compile_model for mosaic-bert-base (and the demo where train.py would)
    hf: bool = True                     # time the Hugging Face peer
    ablations: Optional[bool] = None    # each change alone on bert-base+bf16 (default: full mode only)
    # None below means "the mode's default" (quick / full), printed once resolved
    pretrain_batch: Optional[int] = None    # sequences of 128 per step (quick 8, full 32)
    glue_batch: Optional[int] = None        # sentences per step (quick 32, full 128)
    demo_batch: int = 0                     # sequences per demo step (0: train.py's, 32; smaller for smoke tests)
    accum: int = 1                          # micro-batches per optimizer step (one autocast context)
    n_batches: Optional[int] = None         # distinct batches per workload, cycled (quick 1, full 4)
    repeats: Optional[int] = None           # timed rounds (quick 3, full 7)
    attn_backends: str = "naive,sdpa,flex"
    attn_lengths: str = "128,512,1024,2048"
    attn_tokens: Optional[int] = None       # tokens per attention call, n = tokens // L (quick 2048, full 8192)
    n_devices: int = 8                      # the projection's device count
    seed: int = 0
    json: str = "out/bench/bench.json"
    markdown: str = ""                      # default: the json path with .md
    png: str = ""                           # default: the json path with .png


QUICK = dict(pretrain_batch=8, glue_batch=32, n_batches=1, repeats=3, attn_tokens=2048, ablations=False)
FULL = dict(pretrain_batch=32, glue_batch=128, n_batches=4, repeats=7, attn_tokens=8192, ablations=True)
SIZES = ("base", "tiny")  # the presets bert-{size} and mosaic-bert-{size}; the HF peer takes bert-{size}'s shape
WORKLOADS = ("pretrain", "glue", "demo", "attention")


def bench_device(cfg: BenchConfig) -> torch.device:
    return torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill the mode's defaults, make --dtype concrete for the device, and check the choices."""
    cfg = replace(cfg, **{k: v for k, v in (QUICK if cfg.quick else FULL).items() if getattr(cfg, k) is None})
    for key, allowed in dict(size=SIZES, device=("auto", "cpu", "cuda"), dtype=perf.DTYPES).items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    cfg = replace(cfg, dtype=perf.resolve_dtype(cfg.dtype, bench_device(cfg))[0])
    for key, allowed in dict(workloads=WORKLOADS, attn_backends=("naive", "sdpa", "flex")).items():
        if bad := set(split_list(getattr(cfg, key))) - set(allowed):
            raise ConfigError(f"--{key}: unknown {sorted(bad)}; choose from {', '.join(allowed)}")
    for key in ("pretrain_batch", "glue_batch", "accum", "n_batches", "repeats", "attn_tokens", "n_devices"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(cfg, key)}")
    if not all(x.isdigit() and int(x) > 0 for x in split_list(cfg.attn_lengths)):
        raise ConfigError(f"--attn_lengths={cfg.attn_lengths}: expected comma-separated positive integers")
    return cfg


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept `--key VALUE` as well as config.py's `--key=VALUE` (the documented interface is `--json PATH`)."""
    takes_value, out = {f.name for f in fields(BenchConfig) if f.type is not bool}, []
    for a in argv:
        if out and out[-1].startswith("--") and out[-1][2:].replace("-", "_") in takes_value and not a.startswith("--"):
            out[-1] += f"={a}"
        else:
            out.append(a)
    return out


# --- Workload batches (CPU tensors; moved to the device once)
def pretrain_batches(cfg: BenchConfig) -> list[dict]:
    """(a) data.py's 'truncate' rows (the paper's mode) of the embedded Wikipedia sample, as train.py's stream."""
    stream = data.PretrainStream("default", split="train", seq_len=PAPER_SEQ_LEN, mode="truncate",
                                 mask_prob=MASK_PROB, seed=cfg.seed, global_batch_size=cfg.pretrain_batch)
    return [stream.next_batch() for _ in range(cfg.n_batches)]


def demo_batches(cfg: BenchConfig) -> list[dict]:
    """(c) the batches `python train.py` trains on: its default TrainConfig's data, mode, length, masking, batch."""
    t = train.TrainConfig()
    stream = data.PretrainStream(t.data, split="train", seq_len=t.seq_len, mode=t.data_mode, mask_prob=t.mask_prob,
                                 seed=t.seed, global_batch_size=cfg.demo_batch or t.micro_batch_size)
    return [stream.next_batch() for _ in range(cfg.n_batches)]


def glue_batches(cfg: BenchConfig) -> list[dict]:
    """(b) GLUE-like: random sentiment-sample sentences as [CLS] s [SEP], dynamically padded, 30% MLM masking."""
    sentences = [text for text, _ in data._sentiment_text()]
    rng, tok, batches = np.random.default_rng(cfg.seed), data.get_tokenizer(), []
    for k in range(cfg.n_batches):
        pick = rng.choice(len(sentences), cfg.glue_batch, replace=False)
        toks = tok.encode_batch([sentences[i] for i in pick], num_threads=1)
        n = [min(len(t), PAPER_SEQ_LEN - 2) for t in toks]  # [CLS] s [SEP], padded to the longest
        ids, mask = data._build_rows([[(r, 0, n[r])] for r in range(len(toks))], toks.__getitem__, max(n) + 2)
        inputs, labels = data.mlm_mask(ids, data.hash64(cfg.seed, 7, k, np.arange(len(toks))), MASK_PROB)
        batches.append(data._to_batch(inputs, mask, labels))
    return batches


def to_device_batches(batches: list[dict], device, trim: bool = False) -> list[dict]:
    """Batches on the device plus host-side counts. trim: cut to the batch's longest row (HF's dynamic padding)."""
    out = []
    for b in batches:
        real = b["attention_mask"] != 0
        S = int(real.sum(1).max()) if trim else real.shape[1]
        mask = real.long() if trim else b["attention_mask"]
        d = {k: v[:, :S].to(device) for k, v in dict(b, attention_mask=mask).items()}  # (B, S)
        out.append(dict(d, n_real=int(real.sum()), shape=tuple(d["input_ids"].shape)))
    return out


# --- Rows: what one timed step is, and the ladder, demo, peer and attention rows
@dataclass
class Row:
    name: str
    workload: str                       # pretrain | glue | demo | attention
    step: Callable[[int], int]          # runs step i (cycling its batches); returns real tokens
    warm: list                          # step indices run untimed first: every shape
    flops_per_token: float              # model training FLOPs per real token (model.flops_per_token)
    dtype: str                          # 'bfloat16' | 'float32': the matmul rate MFU is taken against
    state: Callable[[], int]            # persistent bytes this row owns (params + optimizer state)
    note: str = ""
    compiled: bool = False
    info: dict = field(default_factory=dict)
    skipped: str = ""                   # non-empty: not run; the reason
    times: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    warm_times: list = field(default_factory=list)
    peak_mem: Optional[int] = None      # state before the memory step + its high-water mark above its start
    step_mem_measured: bool = False     # False: the high-water mark could not be read (state only)


def skipped_row(name, workload, reason) -> Row:
    return Row(name, workload, None, [], 0.0, "float32", None, note=f"skipped: {reason}", skipped=reason)


def share_parameters(m: torch.nn.Module, pool: dict) -> torch.nn.Module:
    """Give m the pool's parameter wherever (path, name, shape, dtype) match: all rows' models share one set."""
    for path, mod in m.named_modules(remove_duplicate=False):
        mod._parameters.update({name: pool.setdefault((f"{path}.{name}", tuple(p.shape), p.dtype), p)
                                for name, p in mod._parameters.items() if p is not None})
    return m


def warm_indices(batches: list[dict], accum: int, every: bool) -> list[int]:
    """Step indices that cover every micro-batch shape once (every: all batches, for compiled rows)."""
    n, steps = len(batches), math.ceil(len(batches) / accum)
    if every:  # plus one more: the last warm-up step (memory) must not be the one that compiles
        return list(range(steps)) + [0]
    seen, out = set(), []
    for i in range(steps):
        shapes = {batches[(i * accum + j) % n]["shape"] for j in range(accum)}
        if not shapes <= seen:
            out.append(i)
            seen |= shapes
    return out


def mlm_row(name: str, workload: str, model, opt, bs: list[dict], accum: int, device, bf16: bool, fpt: float,
            note: str, info: dict, compiled: bool = False, loss_fn=train.mlm_loss) -> Row:
    """A row whose step i is train.mlm_step over accum micro-batches of bs (cycled), AdamW, zero_grad."""
    own, dtype = list(model.parameters()), "bfloat16" if bf16 else "float32"

    def step(i):
        micro = [bs[(i * accum + j) % len(bs)] for j in range(accum)]
        train.mlm_step(model, micro, amp=lambda: perf.autocast(device, dtype), loss_fn=loss_fn)
        opt.step()
        opt.zero_grad(set_to_none=True)  # each step updates only its own row's parameters
        return sum(b["n_real"] for b in micro)

    def state():  # parameters plus their AdamW moments, counted once each
        ts = [t for p in own for t in (p, *opt.state.get(p, {}).values()) if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in ts)

    return Row(name, workload, step, warm_indices(bs, accum, every=compiled), fpt, dtype, state, note=note,
               compiled=compiled, info=info)


BF16_ONLY = ("+bf16", "+lowp-layernorm", "bf16+lowp-layernorm")  # they measure bf16: run only where rows run in bf16
LADDER = [  # after bert-base and +bf16: (row name, the change to the config, note), cumulative
    ("+unpad", dict(unpad=True), "real tokens only"),
    ("+alibi", dict(position="alibi", attn_backend="auto", attn_dropout=0.0), "ALiBi, fused attention, attn dropout 0"),
    ("+geglu", dict(ffn="geglu"), "GeGLU MLP"),
    ("+lowp-layernorm", dict(low_precision_layernorm=True), "bf16 LayerNorm"),
    ("+sparse-pred", dict(sparse_prediction=True), "head on masked tokens only (= mosaic-bert-base eager)")]


def ladder(cfg: BenchConfig) -> list[tuple]:
    """(row name, ModelConfig, bf16, compile, note) from bert-base to mosaic-bert-base, one change at a time."""
    low, c = cfg.dtype == "bfloat16", modeling.ModelConfig.preset(f"bert-{cfg.size}")
    rows = [("bert-base", c, False, False, "padded, learned positions, GELU, dense head, fp32"),
            ("+bf16", c, low, False, "bf16 autocast, fp32 LayerNorm")]
    for name, change, note in LADDER:
        c = replace(c, **change)
        rows.append((name, c, low, False, note))
    # pooling is the classifier's choice (the small presets mean-pool for the demo); MLM steps never use it
    mosaic = replace(modeling.ModelConfig.preset(f"mosaic-bert-{cfg.size}"), pooling=c.pooling)
    assert c == mosaic, f"the ladder must end at the mosaic-bert-{cfg.size} preset:\n{c}\n!=\n{mosaic}"
    rows.append(("mosaic-bert-base", mosaic, low, cfg.compile,
                 "+ torch.compile: the full model" if cfg.compile else "eager (--compile=false)"))
    return rows


def ablations(cfg: BenchConfig) -> list[tuple]:
    """ABLATIONS: each change alone on top of bert-base + bf16 (unpad alone is the ladder's +unpad row)."""
    base, low = modeling.ModelConfig.preset(f"bert-{cfg.size}"), cfg.dtype == "bfloat16"
    p = "bf16" if low else "fp32"
    rows = [(("bf16" if name in BF16_ONLY else p) + name, replace(base, **change), False)
            for name, change, _ in LADDER[1:]]
    rows += [(f"{p}+compile", base, True)] if cfg.compile else []
    return [(n, c, low, comp, f"one change alone on bert-base+{p}") for n, c, comp in rows]


def model_rows(cfg: BenchConfig, device, dev_batches: dict, stats: dict) -> list[Row]:
    """The ladder (+ ablations) on every MLM workload: one model per (config, compiled), one parameter pool."""
    if not dev_batches:
        return []
    specs = ladder(cfg) + (ablations(cfg) if cfg.ablations else [])
    pool, models = {}, {}
    for _, mcfg, _, comp, _ in specs:
        if (repr(mcfg), comp) not in models:
            m = share_parameters(modeling.build(mcfg).to(device).train(), pool)
            models[repr(mcfg), comp] = modeling.compile_model(m) if comp else m
    opt = optimizer(list({id(p): p for p in pool.values()}.values()))
    quick_glue = {"bert-base", "+bf16", "+unpad", "mosaic-bert-base"}  # enough for the glue targets
    switches, rows = ("unpad", "position", "ffn", "low_precision_layernorm", "sparse_prediction", "attn_dropout"), []
    for workload, bs in dev_batches.items():
        st = stats[workload]
        for name, mcfg, bf16, comp, note in specs:
            if workload == "glue" and cfg.quick and name not in quick_glue:
                continue
            if name in BF16_ONLY and cfg.dtype != "bfloat16":
                rows.append(skipped_row(name, workload, "measures bf16; the rows run in float32 (dtype line)"))
                continue
            info = dict(bf16=bf16, compile=comp, **{k: getattr(mcfg, k) for k in switches},
                        attn_backend=kernels.resolve_backend(mcfg.attn_backend, device, mcfg.attn_dropout))
            rows.append(mlm_row(name, workload, models[repr(mcfg), comp], opt, bs, cfg.accum, device, bf16,
                                modeling.flops_per_token(mcfg, st.context, st.mask_frac), note, info, comp))
    return rows


def demo_rows(cfg: BenchConfig, device, dev_batches: dict, stats: dict) -> list[Row]:
    """The demo's step: train.py's default model, optimizer and --compile, in the rows' precision."""
    if "demo" not in dev_batches:
        return []
    t = train.TrainConfig(dtype=cfg.dtype)
    mcfg, bf16, st = train.model_config(t), t.dtype == "bfloat16", stats["demo"]
    comp = cfg.compile and train.resolve_compile(t.compile, device, train.planned_tokens(t))[0]
    m = modeling.build(mcfg).to(device).train()
    m = modeling.compile_model(m) if comp else m
    opt = train.build_optimizer(m, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    note = (f"python train.py's step: {mcfg.n_layers} layers, d={mcfg.d_model}, vocab {mcfg.padded_vocab_size}, "
            f"{st.shape}, {'compiled' if comp else 'eager'}")
    return [mlm_row(f"{t.model} (demo)", "demo", m, opt, dev_batches["demo"], 1, device, bf16,
                    modeling.flops_per_token(mcfg, t.seq_len, t.mask_prob), note, dict(bf16=bf16, compile=comp), comp)]


def hf_rows(cfg: BenchConfig, device, cpu_batches: dict, stats: dict) -> list[Row]:
    """The peer, transformers' BertForMaskedLM (bert-{size}'s shape) on every MLM workload, dynamically padded, in the
    rows' precision: SDPA attention, its eager attention (faster on some CPUs), in full mode fp32 (targets: fastest)."""
    c = modeling.ModelConfig.preset(f"bert-{cfg.size}")  # same shape and vocabulary: same FLOPs
    low = cfg.dtype == "bfloat16"  # the same precision as our rows: a ratio compares like with like
    variants = [("hf-bert-base", low, "sdpa"), ("hf-bert-base-eager", low, "eager")]
    variants += [] if cfg.quick or not low else [("hf-bert-base-fp32", False, "sdpa")]
    if not cpu_batches:
        return []
    transformers = hf.import_transformers()  # bench/test-only dependency; a clash with our kernels.py raises
    if transformers is None:
        return [skipped_row(name, w, "transformers not installed") for w in cpu_batches for name, _, _ in variants]
    m = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, intermediate_size=c.d_ff, max_position_embeddings=c.max_positions,
        type_vocab_size=c.type_vocab_size, hidden_dropout_prob=c.hidden_dropout,
        attention_probs_dropout_prob=c.attn_dropout, layer_norm_eps=c.layernorm_eps, attn_implementation="sdpa"))
    if getattr(m.config, "_attn_implementation", "sdpa") != "sdpa":
        raise RuntimeError(f"transformers chose attention {m.config._attn_implementation!r}, not sdpa")
    m = m.to(device).train()
    opt, rows = optimizer(m.parameters()), []
    for workload, cpu in cpu_batches.items():
        bs, st = to_device_batches(cpu, device, trim=True), stats[workload]  # each batch cut to its longest row
        for name, bf16, impl in variants:
            def loss_fn(model, mb, impl=impl):  # this row's attention, then transformers' loss
                if model.config._attn_implementation != impl:
                    model.set_attn_implementation(impl)
                return train.hf_mlm_loss(model, mb)

            note = (f"transformers {transformers.__version__}, {impl} attention, "
                    f"{'bf16 autocast' if bf16 else 'fp32'}, dynamic padding")
            rows.append(mlm_row(name, workload, m, opt, bs, cfg.accum, device, bf16,
                                modeling.flops_per_token(c, st.context, st.mask_frac), note,
                                dict(bf16=bf16, attn_implementation=impl), loss_fn=loss_fn))
    return rows


def tensor_bytes(*objs, depth: int = 2) -> int:
    """Storage bytes (each storage once) of the tensors in objs and, `depth` levels down, in their attributes."""
    def tensors(o, d):
        if torch.is_tensor(o):
            yield o
        elif d and hasattr(o, "__dict__"):
            for v in vars(o).values():
                yield from tensors(v, d - 1)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for o in objs for t in tensors(o, depth)}
    return sum(storages.values())


def attention_rows(cfg: BenchConfig, device) -> list[Row]:
    """(d) kernels.attention alone: packed qkv [nnz, 3, H, D] of n = tokens // L sequences of length L, ALiBi; the
    plan is built untimed (the model builds it once per batch). CPU: flex forward only (no flex backward there)."""
    c, dt, rows = modeling.ModelConfig.preset(f"mosaic-bert-{cfg.size}"), getattr(torch, cfg.dtype), []
    H, D, slopes = c.n_heads, c.d_model // c.n_heads, kernels.alibi_slopes(c.n_heads).to(device)
    passes = ([("fwd", False)] if device.type == "cpu" else []) + [("fwd+bwd", True)]
    for L in [int(x) for x in split_list(cfg.attn_lengths)]:
        n = max(1, cfg.attn_tokens // L)
        cu = torch.arange(0, (n + 1) * L, L, dtype=torch.int32, device=device)  # (n+1,)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        qkv0 = torch.randn(n * L, 3, H, D, generator=g, device=device).to(dt)  # (nnz, 3, H, D)
        dout = torch.randn(n * L, H, D, generator=g, device=device).to(dt)  # (nnz, H, D)
        for backend, (label, backward) in itertools.product(split_list(cfg.attn_backends), passes):
            if backward and backend == "flex" and device.type == "cpu":
                continue
            plan = kernels.plan_attention(cu, L, slopes, backend, (H, D), dt)
            qkv = qkv0.clone().requires_grad_(backward)

            def step(i, qkv=qkv, plan=plan, backward=backward, dout=dout):
                with torch.set_grad_enabled(backward):
                    out = kernels.attend(qkv, plan)  # (nnz, H, D)
                if backward:
                    out.backward(dout)
                    qkv.grad = None
                return qkv.shape[0]

            fpt = 4.0 * L * H * D * (3 if backward else 1)  # QK^T and PV: 2 x 2*L*d per token forward
            nbytes = tensor_bytes(qkv, dout, plan)  # inputs + plan (sdpa's (n, H, L, L) mask, flex's block mask)
            warm = [0, 0] if backend == "flex" else [0]  # flex compiles on its first call
            rows.append(Row(f"{backend}-{label}@{L}", "attention", step, warm, fpt, cfg.dtype, lambda b=nbytes: b,
                            note=f"{n} x {L} tokens, H={H} D={D}, ALiBi, {cfg.dtype}", compiled=backend == "flex",
                            info=dict(backend=backend, seq_len=L, n_seqs=n, backward=backward)))
    return rows


# --- Running: warm-up, memory, interleaved timed rounds
def run(rows: list[Row], repeats: int, device, peak: perf.MatmulPeak, log, keep_freed: bool = False) -> dict:
    live, t_start = [r for r in rows if not r.skipped], time.perf_counter()
    # train.py's CPU heap: freed memory kept for the next step; its bound is set after every row's warm-up
    heap = perf.BoundedHeap(keep_freed and device.type == "cpu", warmup=sum(len(r.warm) for r in live))

    def timed(r: Row, i: int, times: list) -> int:  # step i, the device synchronized around it; returns real tokens
        perf.sync(device)
        t0 = time.perf_counter()
        n = r.step(i)
        perf.sync(device)
        times.append(time.perf_counter() - t0)
        heap.after_step()
        return n

    for r in live:  # warm-up: every shape (every batch for compiled rows); memory on the last warm-up step
        for i in r.warm[:-1]:
            timed(r, i, r.warm_times)
        if r.warm:  # the persistent state before the step + the step's high-water mark above its start
            before, delta = r.state(), perf.high_water(lambda: timed(r, r.warm[-1], r.warm_times), device)
            r.peak_mem, r.step_mem_measured = before + (delta or 0), delta is not None
        log(f"  warm-up {r.workload:9s} {r.name:22s} {sum(r.warm_times):7.1f} s")
    dynamo = torch._dynamo.utils.counters["stats"]  # a new graph during the timed rounds is a recompile
    graphs = dynamo["unique_graphs"]
    peak.burst()
    for k in range(repeats):
        t0 = time.perf_counter()
        for r in live[k % len(live):] + live[:k % len(live)]:  # rotate: no row always first or last
            r.tokens.append(timed(r, k, r.times))  # round k: every row on the same batch
        peak.burst()
        log(f"  round {k + 1}/{repeats}: {time.perf_counter() - t0:.1f} s")
    recompiled = dynamo["unique_graphs"] != graphs
    return dict(total_s=time.perf_counter() - t_start, recompiled_during_timing=recompiled, heap_trims=heap.trims)


# --- Main
def bench(cfg: BenchConfig) -> dict:
    # --- setup: the device, its dtype, the workloads' batches
    flag, cfg = cfg.dtype, resolve(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = bench_device(cfg)
    dtype, why, warning = perf.resolve_dtype(flag, device)
    torch.manual_seed(cfg.seed)
    header = [f"device: {perf.device_name(device)} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
              f"{'quick' if cfg.quick else 'full'} mode, {cfg.size} size", f"dtype: {dtype} ({why})"]
    header += [f"warning: {warning}"] if warning else []
    print("\n".join(header), flush=True)
    print_config(cfg)
    t_all, cpu, dev, stats = time.perf_counter(), {}, {}, {}
    for w, make in (("pretrain", pretrain_batches), ("glue", glue_batches), ("demo", demo_batches)):
        if w in split_list(cfg.workloads):  # batches on the CPU and on the device, their BatchStats, a header line
            cpu[w] = make(cfg)
            dev[w] = to_device_batches(cpu[w], device)
            st = stats[w] = BatchStats.of(cpu[w])
            header.append(f"{w}: micro-batch {st.shape} x accum {cfg.accum}, {np.mean(st.n_real):,.0f} real tokens "
                          f"per batch, padding {st.pad_frac:.1%}, mean context {st.context:.1f}, masked "
                          f"{st.mask_frac:.1%} of real tokens, {cfg.n_batches} distinct batches")
            print(header[-1], flush=True)

    # --- measure: every row, interleaved with the matmul peak bursts
    t0, mlm = time.perf_counter(), lambda batches: {w: b for w, b in batches.items() if w != "demo"}
    rows = model_rows(cfg, device, mlm(dev), stats) + demo_rows(cfg, device, dev, stats)
    rows += hf_rows(cfg, device, mlm(cpu), stats) if cfg.hf else []
    rows += attention_rows(cfg, device) if "attention" in split_list(cfg.workloads) else []
    print(f"built {len(rows)} rows in {time.perf_counter() - t0:.1f} s; measuring "
          f"({cfg.repeats} interleaved rounds after warm-up)", flush=True)
    peak = perf.MatmulPeak(device, n=1024 if cfg.size == "tiny" else None,
                           dtypes=("bfloat16", "float32") if dtype == "bfloat16" else ("float32",))
    status = run(rows, cfg.repeats, device, peak, lambda s: print(s, flush=True), cfg.keep_freed_memory)

    # --- report: rows, targets, projection; Markdown, JSON, PNG
    sheet = perf.datasheet_peaks(device)
    results = [report.row_result(r, peak, sheet) for r in rows]
    report.add_speedups(results)
    tgts, proj = report.targets(results, stats), report.projection(results, stats, cfg.n_devices)
    md = report.markdown(results, tgts, proj, header + report.peak_lines(peak, sheet, device, status), sheet)
    print(f"\n{md}")
    out = dict(device=perf.device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
               matmul_peak_flops=peak.peak(dtype), matmul_peak_flops_by_dtype={k: peak.peak(k) for k in peak.rates},
               datasheet_peak_flops=sheet, config=config_dict(cfg),
               workloads={w: asdict(s) for w, s in stats.items()}, rows=results, targets=tgts, projection=proj,
               recompiled_during_timing=status["recompiled_during_timing"], heap_trims=status["heap_trims"],
               wall_s=time.perf_counter() - t_all)
    if cfg.json:
        report.write(out, md, cfg.json, cfg.markdown, cfg.png)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return out


def main(argv: Optional[list[str]] = None):
    bench(parse_config(BenchConfig, normalize_argv(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main_guard(main)
