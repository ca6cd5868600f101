"""Speed claims, measured: what each MosaicBERT change buys, against BERT, Hugging Face and the machine.

    python bench.py --quick                      # ~5 minutes on 2 CPU cores, base-size models
    python bench.py                              # full mode: bigger batches, more repeats, ablations
    python bench.py --quick --json=out/b.json    # (also `--json out/b.json`)
    python bench.py --quick --size=tiny          # tiny presets: the smoke test

Every MLM row times a full training step (train.mlm_step, train.build_optimizer's fused AdamW, zero_grad) on the
same batches: real (non-pad) tokens/s, step time, speedup over `bert-base`, MFU, peak memory. Grep the names:
LADDER (bert-base, then one MosaicBERT change at a time), ABLATIONS (each change alone), hf_rows (the Hugging Face
peer), WORKLOADS (pretrain, glue, demo, attention), run (warm-up on every shape, then interleaved rounds; medians),
targets and projection (from the measured numbers). docs/scripts.md says what each row and column means.
--dtype=auto runs every row in bf16 where this device runs it fast, else float32 (BF16_ONLY rows skipped).
Outputs: a Markdown table (stdout and --markdown), a JSON file (--json), a PNG chart (--png, with matplotlib).
"""

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import checkpoint
import data
import hf
import kernels
import model as modeling
import perf
import train
from config import ConfigError, config_dict, main_guard, parse_config, print_config


# The paper's recipe (mosaicml/examples v0.0.4 mosaic-bert-base-uncased.yaml; see train.py):
PAPER_STEPS, PAPER_BATCH, PAPER_SEQ_LEN = 70_000, 4096, 128
PAPER_LR, PAPER_BETAS, PAPER_EPS, PAPER_WD = 5e-4, (0.9, 0.98), 1e-6, 1e-5
MASK_PROB = 0.3  # MosaicBERT's masking rate, used for every row's batches (dense heads do not care)
# the paper's AdamW, as train.py builds it
optimizer = partial(train.build_optimizer, lr=PAPER_LR, weight_decay=PAPER_WD, betas=PAPER_BETAS, eps=PAPER_EPS)


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
SIZES = {  # our presets and the HF peer's shape
    "base": dict(bert="bert-base", mosaic="mosaic-bert-base", layers=12, d=768, heads=12, d_ff=3072),
    "tiny": dict(bert="bert-tiny", mosaic="mosaic-bert-tiny", layers=2, d=128, heads=2, d_ff=512),
}
WORKLOADS = ("pretrain", "glue", "demo", "attention")


def bench_device(cfg: BenchConfig) -> torch.device:
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                        "cpu" if cfg.device == "auto" else cfg.device)


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill the mode's defaults, make --dtype concrete for the device, and check the choices."""
    defaults = QUICK if cfg.quick else FULL
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    for key, allowed in dict(size=tuple(SIZES), device=("auto", "cpu", "cuda"), dtype=perf.DTYPES).items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    cfg = replace(cfg, dtype=perf.resolve_dtype(cfg.dtype, bench_device(cfg))[0])
    for key, allowed in dict(workloads=WORKLOADS, attn_backends=("naive", "sdpa", "flex")).items():
        bad = set(split_list(getattr(cfg, key))) - set(allowed)
        if bad:
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
        prev = out[-1] if out else ""
        if prev.startswith("--") and prev[2:].replace("-", "_") in takes_value and not a.startswith("--"):
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
    """(b) GLUE-like short sentences: random sentiment-sample sentences as [CLS] s [SEP] (at most 128 tokens),
    each batch padded to its longest row (dynamic padding), the same 30% MLM masking."""
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


@dataclass
class BatchStats:
    """What the rows' numbers are normalized by, computed from the batches themselves."""
    n_real: list           # real tokens per batch
    n_masked: list         # masked tokens per batch
    pad_frac: float        # padded positions / all positions
    context: float         # average context a real token attends to: sum(len^2) / sum(len)
    mask_frac: float       # masked / real tokens (the sparse head's share)
    shape: str             # e.g. "4 x 128" or "16 x 41..47"

    @classmethod
    def of(cls, batches: list[dict]) -> "BatchStats":
        sums = [data.attention_context(b["attention_mask"]) for b in batches]  # per-window, packed rows too
        n_real = [n for n, _ in sums]
        n_masked = [int((b["labels"] != -100).sum()) for b in batches]
        cells = sum(b["attention_mask"].numel() for b in batches)
        Ss = sorted({b["attention_mask"].shape[1] for b in batches})
        S = str(Ss[0]) if len(Ss) == 1 else f"{Ss[0]}..{Ss[-1]}"
        return cls(n_real, n_masked, 1 - sum(n_real) / cells, sum(sq for _, sq in sums) / sum(n_real),
                   sum(n_masked) / sum(n_real), f"{batches[0]['attention_mask'].shape[0]} x {S}")


def to_device_batches(batches: list[dict], device, trim: bool = False) -> list[dict]:
    """Batches on the device plus host-side counts. trim: cut to the batch's longest row (HF's dynamic padding)."""
    out = []
    for b in batches:
        real = b["attention_mask"] != 0
        S = int(real.sum(1).max()) if trim else real.shape[1]
        d = dict(input_ids=b["input_ids"][:, :S], labels=b["labels"][:, :S],
                 attention_mask=real[:, :S].long() if trim else b["attention_mask"])
        d = {k: v.to(device) for k, v in d.items()}
        out.append(dict(d, n_real=int(real.sum()), n_masked=int((b["labels"] != -100).sum()),
                        shape=tuple(d["input_ids"].shape)))
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
    return Row(name, workload, lambda i: 0, [], 0.0, "float32", lambda: 0, note=f"skipped: {reason}",
               skipped=reason)


def share_parameters(m: torch.nn.Module, pool: dict) -> torch.nn.Module:
    """Give m the pool's parameter wherever (module path, name, shape, dtype) match: every row's model shares one
    set, so memory stays at about one model and a half (a step's time does not depend on the weights' values)."""
    for path, mod in m.named_modules(remove_duplicate=False):
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = pool.setdefault((f"{path}.{name}", tuple(p.shape), p.dtype), p)
    return m


def warm_indices(batches: list[dict], accum: int, every: bool) -> list[int]:
    """Step indices that cover every micro-batch shape once (every: all batches, for compiled rows)."""
    n = len(batches)
    steps = math.ceil(n / accum)
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
    own = list(model.parameters())
    dtype = "bfloat16" if bf16 else "float32"

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


# Rows that measure bf16 itself: run only where the rows run in bf16 (--dtype resolved to bfloat16).
BF16_ONLY = ("+bf16", "+lowp-layernorm", "bf16+lowp-layernorm")
LADDER = [  # after bert-base and +bf16: (row name, the change to the config, note), cumulative
    ("+unpad", dict(unpad=True), "real tokens only"),
    ("+alibi", dict(position="alibi", attn_backend="auto", attn_dropout=0.0),
     "ALiBi, fused attention (no attention dropout)"),
    ("+geglu", dict(ffn="geglu"), "GeGLU MLP"),
    ("+lowp-layernorm", dict(low_precision_layernorm=True), "bf16 LayerNorm"),
    ("+sparse-pred", dict(sparse_prediction=True), "head on masked tokens only (= mosaic-bert-base eager)")]


def ladder(cfg: BenchConfig) -> list[tuple]:
    """(row name, ModelConfig, bf16, compile, note) from bert-base to mosaic-bert-base, one change at a time.
    In float32 (--dtype resolved so) every row after bert-base runs in float32, and BF16_ONLY rows are skipped."""
    size, low = SIZES[cfg.size], cfg.dtype == "bfloat16"
    c = modeling.ModelConfig.preset(size["bert"])
    rows = [("bert-base", c, False, False, "padded, learned positions, GELU, dense head, fp32"),
            ("+bf16", c, low, False, "bf16 autocast, fp32 LayerNorm")]
    for name, change, note in LADDER:
        c = replace(c, **change)
        rows.append((name, c, low, False, note))
    # pooling is the classifier's choice (the small presets mean-pool for the demo); MLM steps never use it
    mosaic = replace(modeling.ModelConfig.preset(size["mosaic"]), pooling=c.pooling)
    assert c == mosaic, f"the ladder must end at the {size['mosaic']} preset:\n{c}\n!=\n{mosaic}"
    rows.append(("mosaic-bert-base", mosaic, low, cfg.compile,
                 "+ torch.compile: the full model" if cfg.compile else "eager (--compile=false)"))
    return rows


def ablations(cfg: BenchConfig) -> list[tuple]:
    """ABLATIONS: each change alone on top of bert-base + bf16 (unpad alone is the ladder's +unpad row)."""
    base, low = modeling.ModelConfig.preset(SIZES[cfg.size]["bert"]), cfg.dtype == "bfloat16"
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
            m = models[repr(mcfg), comp] = share_parameters(modeling.build(mcfg).to(device).train(), pool)
            if comp:
                modeling.compile_model(m)
    opt = optimizer(list({id(p): p for p in pool.values()}.values()))
    quick_glue = {"bert-base", "+bf16", "+unpad", "mosaic-bert-base"}  # enough for the glue targets
    switches = ("unpad", "position", "ffn", "low_precision_layernorm", "sparse_prediction", "attn_dropout")
    rows = []
    for workload, bs in dev_batches.items():
        st = stats[workload]
        for name, mcfg, bf16, comp, note in specs:
            if workload == "glue" and cfg.quick and name not in quick_glue:
                continue
            if name in BF16_ONLY and cfg.dtype != "bfloat16":
                rows.append(skipped_row(name, workload, "measures bf16; the rows run in float32 "
                                                        "(the dtype line says why)"))
                continue
            info = dict(bf16=bf16, compile=comp, **{k: getattr(mcfg, k) for k in switches},
                        attn_backend=kernels.resolve_backend(mcfg.attn_backend, device, mcfg.attn_dropout))
            rows.append(mlm_row(name, workload, models[repr(mcfg), comp], opt, bs, cfg.accum, device, bf16,
                                modeling.flops_per_token(mcfg, st.context, st.mask_frac), note, info, comp))
    return rows


def demo_rows(cfg: BenchConfig, device, dev_batches: dict, stats: dict) -> list[Row]:
    """The demo's step: train.py's default model (its preset, overrides and dropout) and optimizer
    (train.build_optimizer), in the rows' precision, eager or compiled as train.py's default --compile says."""
    if "demo" not in dev_batches:
        return []
    t = train.TrainConfig(dtype=cfg.dtype)
    mcfg = train.model_config(t)
    comp = cfg.compile and train.resolve_compile(t.compile, device, train.planned_tokens(t))[0]
    m = modeling.build(mcfg).to(device).train()
    if comp:
        modeling.compile_model(m)
    opt = train.build_optimizer(m, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    bf16, st = t.dtype == "bfloat16", stats["demo"]
    note = (f"python train.py's step: {mcfg.n_layers} layers, d={mcfg.d_model}, vocab {mcfg.padded_vocab_size}, "
            f"{st.shape}, {'compiled' if comp else 'eager'}")
    return [mlm_row(f"{t.model} (demo)", "demo", m, opt, dev_batches["demo"], 1, device, bf16,
                    modeling.flops_per_token(mcfg, t.seq_len, t.mask_prob), note, dict(bf16=bf16, compile=comp),
                    comp)]


def hf_model(cfg: BenchConfig, vocab: int):
    """transformers' BertForMaskedLM at our size and padded vocabulary, SDPA attention. None if not installed."""
    transformers = hf.import_transformers()  # bench/test-only dependency; a clash with our kernels.py raises
    if transformers is None:
        return None
    s = SIZES[cfg.size]
    m = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab, hidden_size=s["d"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["d_ff"], max_position_embeddings=512, type_vocab_size=2, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, attn_implementation="sdpa"))
    if getattr(m.config, "_attn_implementation", "sdpa") != "sdpa":
        raise RuntimeError(f"transformers chose attention {m.config._attn_implementation!r}, not sdpa")
    return m


def hf_rows(cfg: BenchConfig, device, cpu_batches: dict, stats: dict) -> list[Row]:
    """The peer on every MLM workload, dynamically padded, in the rows' precision: SDPA attention (transformers'
    default), its eager attention (faster on some CPUs) and, in full mode, fp32. Targets take the fastest."""
    mcfg = modeling.ModelConfig.preset(SIZES[cfg.size]["bert"])  # same shape and vocabulary: same FLOPs
    low = cfg.dtype == "bfloat16"  # the same precision as our rows: a ratio compares like with like
    variants = [("hf-bert-base", low, "sdpa"), ("hf-bert-base-eager", low, "eager")]
    variants += [] if cfg.quick or not low else [("hf-bert-base-fp32", False, "sdpa")]
    if not cpu_batches:
        return []
    m = hf_model(cfg, mcfg.padded_vocab_size)
    if m is None:
        return [skipped_row(name, w, "transformers not installed") for w in cpu_batches for name, _, _ in variants]
    import transformers  # noqa: PLC0415  (installed: hf_model found it)
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
                                modeling.flops_per_token(mcfg, st.context, st.mask_frac), note,
                                dict(bf16=bf16, attn_implementation=impl), loss_fn=loss_fn))
    return rows


def tensor_bytes(*objs, depth: int = 2) -> int:
    """Storage bytes of the tensors in objs and, `depth` levels down, in their attributes (a plan, a BlockMask);
    each storage once (an expanded mask costs its storage, not its view)."""
    def tensors(o, d):
        if torch.is_tensor(o):
            yield o
        elif d and hasattr(o, "__dict__"):
            for v in vars(o).values():
                yield from tensors(v, d - 1)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for o in objs for t in tensors(o, depth)}
    return sum(storages.values())


def attention_rows(cfg: BenchConfig, device) -> list[Row]:
    """(d) kernels.attention alone: packed qkv [nnz, 3, H, D] of n = tokens // L sequences of length L, ALiBi. The
    plan (mask / block mask) is built outside the timing, as the model builds it once per batch for all layers.
    CPU: flex forward only (no flex backward on the CPU); GPU: every backend forward and backward."""
    s = SIZES[cfg.size]
    H, D = s["heads"], s["d"] // s["heads"]
    slopes = kernels.alibi_slopes(H).to(device)
    passes = ([("fwd", False)] if device.type == "cpu" else []) + [("fwd+bwd", True)]
    dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    rows = []
    for L in [int(x) for x in split_list(cfg.attn_lengths)]:
        n = max(1, cfg.attn_tokens // L)
        cu = torch.arange(0, (n + 1) * L, L, dtype=torch.int32, device=device)  # (n+1,)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        qkv0 = torch.randn(n * L, 3, H, D, generator=g, device=device).to(dt)  # (nnz, 3, H, D)
        dout = torch.randn(n * L, H, D, generator=g, device=device).to(dt)  # (nnz, H, D)
        for backend in split_list(cfg.attn_backends):
            for label, backward in passes:
                if backward and backend == "flex" and device.type == "cpu":
                    continue
                plan = kernels.plan_attention(cu, L, slopes, backend, (H, D), dt)
                qkv = qkv0.clone().requires_grad_(backward)

                def step(i, qkv=qkv, plan=plan, backward=backward, dout=dout):
                    if backward:
                        kernels.attend(qkv, plan).backward(dout)
                        qkv.grad = None
                    else:
                        with torch.no_grad():
                            kernels.attend(qkv, plan)
                    return qkv.shape[0]

                fpt = 4.0 * L * H * D * (3 if backward else 1)  # QK^T and PV: 2 x 2*L*d per token forward
                nbytes = tensor_bytes(qkv, dout, plan)  # inputs + plan (sdpa's (n, H, L, L) mask, flex's block mask)
                warm = [0, 0] if backend == "flex" else [0]  # flex compiles on its first call
                rows.append(Row(f"{backend}-{label}@{L}", "attention", step, warm, fpt, cfg.dtype,
                                lambda nbytes=nbytes: nbytes, note=f"{n} x {L} tokens, H={H} D={D}, ALiBi, {cfg.dtype}",
                                compiled=backend == "flex", info=dict(backend=backend, seq_len=L, n_seqs=n,
                                                                      backward=backward)))
    return rows


# --- Running: warm-up, memory, interleaved timed rounds
def dynamo_graphs() -> int:
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001  (a private counter: absent means unknown, not an error)
        return -1


def timed_step(r: Row, i: int, device) -> tuple[float, int]:
    """(seconds, real tokens) of the row's step i, the device synchronized around it."""
    perf.sync(device)
    t0 = time.perf_counter()
    n = r.step(i)
    perf.sync(device)
    return time.perf_counter() - t0, n


def run(rows: list[Row], repeats: int, device, peak: perf.MatmulPeak, log, keep_freed: bool = False) -> dict:
    live = [r for r in rows if not r.skipped]
    t_start = time.perf_counter()
    # train.py's CPU heap: freed memory kept for the next step; its bound is set after every row's warm-up
    heap = perf.BoundedHeap(keep_freed and device.type == "cpu", warmup=sum(len(r.warm) for r in live))

    def timed(r, i):
        r.warm_times.append(timed_step(r, i, device)[0])
        heap.after_step()

    for r in live:  # warm-up: every shape (every batch for compiled rows); memory on the last warm-up step
        for i in r.warm[:-1]:
            timed(r, i)
        if r.warm:  # the persistent state before the step + the step's high-water mark above its start
            before, delta = r.state(), perf.high_water(lambda: timed(r, r.warm[-1]), device)
            r.peak_mem, r.step_mem_measured = before + (delta or 0), delta is not None
        log(f"  warm-up {r.workload:9s} {r.name:22s} {sum(r.warm_times):7.1f} s")
    graphs = dynamo_graphs()
    peak.burst()
    for k in range(repeats):
        t0 = time.perf_counter()
        for r in live[k % len(live):] + live[:k % len(live)]:  # rotate: no row always first or last
            t, n = timed_step(r, k, device)  # round k: every row on the same batch
            r.times.append(t)
            r.tokens.append(n)
            heap.after_step()
        peak.burst()
        log(f"  round {k + 1}/{repeats}: {time.perf_counter() - t0:.1f} s")
    recompiled = graphs >= 0 and dynamo_graphs() != graphs
    return dict(total_s=time.perf_counter() - t_start, recompiled_during_timing=recompiled, heap_trims=heap.trims)


# --- Results: metrics, targets, projection
def row_result(r: Row, peak: perf.MatmulPeak, sheet: Optional[dict]) -> dict:
    base = dict(name=r.name, workload=r.workload, note=r.note)
    if r.skipped:
        return dict(base, tokens_per_s=None, step_ms=None, mfu=None, peak_mem_bytes=None, speedup=None)
    tok_s = statistics.median(n / t for n, t in zip(r.tokens, r.times))
    step_s = statistics.median(r.times)
    flops = r.flops_per_token * tok_s
    compile_s = max(0.0, sum(r.warm_times) - len(r.warm_times) * step_s) if r.compiled else None
    out = dict(base, tokens_per_s=tok_s, step_ms=1000 * step_s, mfu=flops / peak.peak(r.dtype),
               peak_mem_bytes=r.peak_mem, speedup=None, dtype=r.dtype, flops_per_token=r.flops_per_token,
               compile_s=compile_s, step_ms_all=[1000 * t for t in r.times], tokens_per_step=r.tokens[0],
               step_mem_measured=r.step_mem_measured, **r.info)
    if sheet:
        out["mfu_datasheet"] = flops / sheet[r.dtype]
    return out


def add_speedups(results: list[dict]):
    for w in ("pretrain", "glue"):
        base = next((x for x in results if x["workload"] == w and x["name"] == "bert-base"), None)
        for x in results:
            if x["workload"] == w and base and base["tokens_per_s"] and x["tokens_per_s"]:
                x["speedup"] = x["tokens_per_s"] / base["tokens_per_s"]


def targets(results: list[dict], stats: dict) -> list[dict]:
    """The speed targets, computed from this run's numbers (never hard-coded)."""
    ran = [x for x in results if x["tokens_per_s"]]
    out = []

    def get(w, name=None):
        return next((x for x in ran if x["workload"] == w and name in (None, x["name"])), None)

    def target(what, value, threshold, unit):
        out.append(dict(target=what, value=value, threshold=threshold,
                        met=None if value is None else bool(value >= threshold), unit=unit))

    for w, ratio in (("pretrain", 1.6), ("glue", 3.0)):
        m = get(w, "mosaic-bert-base")
        p = max((x for x in ran if x["workload"] == w and x["name"].startswith("hf-bert-base")),
                key=lambda x: x["tokens_per_s"], default=None)  # the fastest peer
        target(f"{w}: mosaic-bert-base tokens/s >= {ratio:g}x the HF peer" + (f" ({p['name']})" if p else ""),
               m["tokens_per_s"] / p["tokens_per_s"] if m and p else None, ratio, "x")
    m, d = get("pretrain", "mosaic-bert-base"), get("demo")
    target(f"pretrain: mosaic-bert-base MFU >= 75% of the measured {m['dtype'] if m else ''} matmul rate",
           m["mfu"] if m else None, 0.75, "mfu")
    if "demo" in stats:
        target(f"demo: python train.py's step MFU >= 40% of the measured {d['dtype'] if d else ''} matmul rate",
               d["mfu"] if d else None, 0.40, "mfu")
    for w in ("pretrain", "glue"):
        padded = "+bf16" if get(w, "+bf16") else "bert-base"  # in float32 the +bf16 row is skipped
        u, p = get(w, "+unpad"), get(w, padded)
        if w in stats:
            need = 0.8 / (1 - stats[w].pad_frac)
            target(f"{w}: +unpad >= 0.8 x 1/(1 - padding {stats[w].pad_frac:.1%}) = {need:.2f}x the padded "
                   f"{padded} row", u["tokens_per_s"] / p["tokens_per_s"] if u and p else None, need, "x")
    return out


def projection(results: list[dict], stats: dict, n_devices: int) -> dict:
    """The paper's recipe on n_devices like this one, from each pretrain row's real tokens/s
    (assuming the recipe's rows are as full as this workload's and perfect scaling across devices)."""
    if "pretrain" not in stats:
        return {}
    real = PAPER_STEPS * PAPER_BATCH * PAPER_SEQ_LEN * (1 - stats["pretrain"].pad_frac)
    rows = {x["name"]: real / (x["tokens_per_s"] * n_devices) / 3600
            for x in results if x["workload"] == "pretrain" and x["tokens_per_s"]}
    return dict(n_devices=n_devices, steps=PAPER_STEPS, global_batch=PAPER_BATCH, seq_len=PAPER_SEQ_LEN,
                real_tokens=real, hours=rows)


# --- Outputs: Markdown tables, the chart, JSON
def fmt(x, spec: str) -> str:
    """A table cell: '-' where there is no number; spec 'mem' for bytes."""
    if x is None:
        return "-"
    return (f"{x / 2**30:.2f} GiB" if x >= 2**28 else f"{x / 2**20:.1f} MiB") if spec == "mem" else format(x, spec)


def vs_target(v, unit: str, pct: str) -> str:
    return "-" if v is None else format(v, pct) if unit == "mfu" else f"{v:.2f}x"


MLM_COLS = [("real tok/s", "tokens_per_s", ",.0f"), ("step ms", "step_ms", ",.0f"), ("speedup", "speedup", ".2f"),
            ("MFU", "mfu", ".1%"), ("MFU (datasheet)", "mfu_datasheet", ".1%"), ("peak mem", "peak_mem_bytes", "mem"),
            ("compile s", "compile_s", ".1f")]  # (header, result key, format)
ATTENTION_COLS = [("seq len", "seq_len", "d"), ("tok/s", "tokens_per_s", ",.0f"), ("ms", "step_ms", ",.1f"),
                  ("MFU", "mfu", ".1%"), ("peak mem", "peak_mem_bytes", "mem"), ("compile s", "compile_s", ".1f")]
SECTIONS = (("pretrain", "(a) pretraining, seq_len 128"), ("glue", "(b) GLUE-like short sentences"),
            ("demo", "(c) the demo: `python train.py`'s step"))


def md_table(title: str, head: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown section (none without rows): align is 'l' (text) or 'r' (numbers) per column."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    bar = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return [f"### {title}", "", line(head).replace("|  |", "| |"), bar, *map(line, rows), ""] if rows else []


def markdown(results: list[dict], tgts: list[dict], proj: dict, header: list[str], sheet) -> str:
    lines, mlm = header + [""], [c for c in MLM_COLS if sheet or c[1] != "mfu_datasheet"]
    cells = lambda x, cols: [fmt(x.get(key), spec) for _, key, spec in cols]  # noqa: E731
    for w, title in SECTIONS:
        rows = [[x["name"], *cells(x, mlm), x["note"]] for x in results if x["workload"] == w]
        lines += md_table(title, ["row", *(h for h, _, _ in mlm), "note"], "l" + "r" * len(mlm) + "l", rows)
    attention = sorted((x for x in results if x["workload"] == "attention"),
                       key=lambda x: (x["backend"], not x["backward"], x["seq_len"]))
    rows = [[x["backend"], "fwd+bwd" if x["backward"] else "fwd", *cells(x, ATTENTION_COLS)] for x in attention]
    lines += md_table("(d) attention alone (ALiBi, bf16)", ["backend", "pass", *(h for h, _, _ in ATTENTION_COLS)],
                      "llrrrrrr", rows)
    rows = [[t["target"], vs_target(t["value"], t["unit"], ".1%"), vs_target(t["threshold"], t["unit"], ".0%"),
             "not evaluated" if t["met"] is None else "met" if t["met"] else "NOT MET"] for t in tgts]
    lines += md_table("Targets", ["target", "measured", "needed", ""], "lrrl", rows)
    if proj:
        lines += [f"### Projection: the paper's recipe ({proj['steps']:,} steps x {proj['global_batch']:,} x "
                  f"{proj['seq_len']}, {proj['real_tokens'] / 1e9:.1f}B real tokens) on {proj['n_devices']} "
                  "such devices, perfect scaling", ""]
        lines += [f"- {name}: {h:,.1f} h ({h / 24:,.1f} days)" for name, h in proj["hours"].items()] + [""]
    return "\n".join(lines)


def chart(results: list[dict], path: str) -> str:
    """A PNG of tokens/s per row and workload; returns a note."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "chart skipped: matplotlib not installed"
    panels = {w: [x for x in results if x["workload"] == w and x["tokens_per_s"]] for w in WORKLOADS}
    panels = {w: sel for w, sel in panels.items() if sel}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (w, sel) in zip(axes[0], panels.items()):
        if w == "attention":
            for key in sorted({(x["backend"], x["backward"]) for x in sel}):
                pts = sorted((x["seq_len"], x["tokens_per_s"]) for x in sel if (x["backend"], x["backward"]) == key)
                ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {'fwd+bwd' if key[1] else 'fwd'}")
            ax.set_xscale("log", base=2)
            ax.set(yscale="log", xlabel="sequence length")
            ax.legend()
        else:
            ax.barh([x["name"] for x in sel][::-1], [x["tokens_per_s"] for x in sel][::-1])
            ax.set_xlabel("real tokens/s")
        ax.set_title(w)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"


def peak_lines(peak: perf.MatmulPeak, sheet: Optional[dict], device, status: dict) -> list[str]:
    """The header lines that say what MFU and peak memory are measured against."""
    lines = [f"matmul peak (measured, median of {len(peak.rates['float32'])} bursts of {peak.n}^3): "
             + ", ".join(f"{k} {peak.peak(k) / 1e9:,.0f} GFLOP/s" for k in peak.rates)
             + (f"; datasheet bf16 {sheet['bfloat16'] / 1e12:,.0f}, fp32 {sheet['float32'] / 1e12:,.1f} TFLOP/s"
                if sheet else ""),
             "peak mem: the row's parameters + AdamW state + the step's high-water mark above its start ("
             + ("CUDA max_memory_allocated" if device.type == "cuda" else "CPU VmHWM via /proc/self/clear_refs") + ")"]
    if status["recompiled_during_timing"]:
        lines.append("WARNING: torch.compile recompiled during the timed rounds (TORCH_LOGS=recompiles shows why)")
    return lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    info = Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")),
                platform.processor() or platform.machine())
    return f"cpu: {name} ({os.cpu_count()} logical cores)"


# --- Main
def workload_batches(cfg: BenchConfig, device, header: list) -> tuple[dict, dict, dict]:
    """Each MLM workload's batches on the CPU and on the device, and their BatchStats (a header line each)."""
    cpu, dev, stats = {}, {}, {}
    for w, make in (("pretrain", pretrain_batches), ("glue", glue_batches), ("demo", demo_batches)):
        if w in split_list(cfg.workloads):
            cpu[w] = make(cfg)
            dev[w] = to_device_batches(cpu[w], device)
            st = stats[w] = BatchStats.of(cpu[w])
            header.append(f"{w}: micro-batch {st.shape} x accum {cfg.accum}, {np.mean(st.n_real):,.0f} real tokens "
                          f"per batch, padding {st.pad_frac:.1%}, mean context {st.context:.1f}, masked "
                          f"{st.mask_frac:.1%} of real tokens, {cfg.n_batches} distinct batches")
            print(header[-1], flush=True)
    return cpu, dev, stats


def all_rows(cfg: BenchConfig, device, cpu: dict, dev: dict, stats: dict) -> list[Row]:
    t0 = time.perf_counter()
    mlm = lambda batches: {w: b for w, b in batches.items() if w != "demo"}  # noqa: E731
    rows = model_rows(cfg, device, mlm(dev), stats) + demo_rows(cfg, device, dev, stats)
    rows += hf_rows(cfg, device, mlm(cpu), stats) if cfg.hf else []
    rows += attention_rows(cfg, device) if "attention" in split_list(cfg.workloads) else []
    print(f"built {len(rows)} rows in {time.perf_counter() - t0:.1f} s; measuring "
          f"({cfg.repeats} interleaved rounds after warm-up)", flush=True)
    return rows


def bench(cfg: BenchConfig) -> dict:
    # --- setup: the device, its dtype, the workloads' batches
    flag, cfg = cfg.dtype, resolve(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = bench_device(cfg)
    dtype, why, warning = perf.resolve_dtype(flag, device)
    torch.manual_seed(cfg.seed)
    header = [f"device: {device_name(device)} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
              f"{'quick' if cfg.quick else 'full'} mode, {cfg.size} size", f"dtype: {dtype} ({why})"]
    header += [f"warning: {warning}"] if warning else []
    print("\n".join(header), flush=True)
    print_config(cfg)
    t_all = time.perf_counter()
    cpu, dev, stats = workload_batches(cfg, device, header)

    # --- measure: every row, interleaved with the matmul peak bursts
    rows = all_rows(cfg, device, cpu, dev, stats)
    peak = perf.MatmulPeak(device, n=1024 if cfg.size == "tiny" else None,
                           dtypes=("bfloat16", "float32") if dtype == "bfloat16" else ("float32",))
    status = run(rows, cfg.repeats, device, peak, lambda s: print(s, flush=True), cfg.keep_freed_memory)

    # --- report: rows, targets, projection; Markdown, JSON, PNG
    sheet = perf.datasheet_peaks(device)
    results = [row_result(r, peak, sheet) for r in rows]
    add_speedups(results)
    tgts, proj = targets(results, stats), projection(results, stats, cfg.n_devices)
    md = markdown(results, tgts, proj, header + peak_lines(peak, sheet, device, status), sheet)
    print(f"\n{md}")
    out = dict(device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
               matmul_peak_flops=peak.peak(dtype), matmul_peak_flops_by_dtype={k: peak.peak(k) for k in peak.rates},
               datasheet_peak_flops=sheet, config=config_dict(cfg),
               workloads={w: asdict(s) for w, s in stats.items()}, rows=results, targets=tgts, projection=proj,
               recompiled_during_timing=status["recompiled_during_timing"], heap_trims=status["heap_trims"],
               wall_s=time.perf_counter() - t_all)
    if cfg.json:  # the Markdown and the chart beside it unless --markdown / --png say where
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(out, path)
        md_path = Path(cfg.markdown) if cfg.markdown else path.with_suffix(".md")
        md_path.write_text(md + "\n")
        png = chart(results, str(Path(cfg.png) if cfg.png else path.with_suffix(".png")))
        print(f"wrote {path} and {md_path}; {png}")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return out


def main(argv: Optional[list[str]] = None):
    bench(parse_config(BenchConfig, normalize_argv(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main_guard(main)
