"""Fine-tune and score a pretrained encoder on the eight GLUE tasks with the MosaicBERT paper's recipe.

    python glue.py                                   # offline demo: sentiment sample in assets/, vs a scratch control
    python glue.py --glue_dir=glue_data --tasks=all  # GLUE from download_glue_data.py's TSVs
    python glue.py --tasks=rte,mrpc                  # from the hub (nyu-mll/glue), two tasks
    python glue.py --init=hf --hf=path/to/bert-base-uncased --glue_dir=glue_data
    python glue.py --init=mosaicml --hf=path/to/mosaic-bert-base --glue_dir=glue_data   # MosaicML's published weights
    torchrun --nproc_per_node=8 glue.py --glue_dir=glue_data --tasks=mnli

Tasks, recipes, readers and metrics: glue_tasks.py. Here: the starting points; one run per (task, seed) with train.py's
AdamW and schedule (6% warmup, linear decay to 0); the sweep (RTE, MRPC, STS-B start from the MNLI-fine-tuned encoder,
as in the paper; results.json is rewritten after each run, so a sweep resumes); the demo vs a random-init control.
"""

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import data
import hf
import model
import perf
from checkpoint import atomic_save, atomic_write_json, latest_checkpoint
from config import ConfigError, config_dict, main_guard, parse_config, print_config
from glue_tasks import (FROM_MNLI, GLUE_TASKS, TASKS, Encoded, Examples, GlueError, Task, collate,  # noqa: F401
                        compute_metrics, describe, encode_examples, eval_splits, label_subset, load_task,
                        markdown_table, metric_names, read_tsv, summarize)
from train import all_gather, build_optimizer, init_distributed, lr_factor, resolve_compile, wrap_ddp


# --- config

@dataclass
class GlueConfig:
    tasks: str = ""              # comma list of GLUE tasks | all | sentiment (assets/); empty: all with --glue_dir
    glue_dir: str = ""           # GLUE TSVs in download_glue_data.py's layout; empty: the hub (nyu-mll/glue)
    init: str = "auto"           # ckpt | scratch | hf | mosaicml; auto: hf or mosaicml (by the folder) with --hf
    ckpt: str = "out/demo"       # a train.py checkpoint (.pt) or its out_dir (latest checkpoint)
    hf: str = ""                 # a Hugging Face BERT or MosaicML MosaicBERT folder (config.json, weights, vocab.txt)
    model: str = "mosaic-bert-small"  # model preset for --init=scratch when --ckpt does not exist
    out_dir: str = "out/glue"
    seeds: int = 0               # how many of the recipe's seeds to run (0: the recipe's count)
    seed: int = 0                # the first seed; seed i of a task is seed + i
    epochs: float = 0.0          # 0: the recipe's
    lr: float = 0.0              # peak learning rate, 0: the recipe's
    weight_decay: float = -1.0   # decoupled weight decay (absolute, at peak lr), -1: the recipe's
    batch_size: int = 0          # global batch size in sequences, 0: the recipe's
    max_steps: int = 0           # cap on optimizer steps per task/seed (smoke runs), 0: none
    max_train_examples: int = 0  # a fixed random subset of the training rows: 0 the recipe's label budget, -1 all
    max_len: int = 128           # recipe: sequences truncated to 128 tokens
    warmup: float = 0.06         # fraction of steps with linear warmup, then linear decay to 0
    dropout: float = 0.1         # hidden dropout while fine-tuning (the paper's 0.1), whatever pretraining used
    eval_batch_size: int = 128
    dtype: str = "auto"          # auto (bf16 where this device runs it fast, else float32) | bfloat16 | float32
    device: str = "auto"         # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
    parallel: str = "runs"       # under torchrun: runs (the ranks share out each task's seeds, no DDP) | batches
    compile: Optional[bool] = None  # regional torch.compile of the encoder layers; None (auto): on CUDA only
    from_mnli: bool = True       # start RTE, MRPC, STS-B from the MNLI-fine-tuned encoder when there is one
    control: Optional[bool] = None  # also fine-tune a from-scratch copy (default: only for the sentiment sample)
    skip_bad_rows: bool = False  # skip TSV rows with the wrong column count (counted, reported) instead of failing
    log_interval: int = 100


# --- distributed (torchrun) and device

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    master = property(lambda self: self.rank == 0)


def setup_distributed(device: str) -> Dist:
    """train.py's torchrun setup: DDP when RANK/WORLD_SIZE are set (nccl on CUDA, gloo on CPU), else one process."""
    if torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    torch.device("cuda", torch.cuda.current_device()) if device != "cpu" and torch.cuda.is_available()
                    else torch.device("cpu"))
    return Dist(*init_distributed(device))


# --- starting points: our pretrained checkpoint, random init, a HF BERT folder, or the MNLI-fine-tuned encoder

@dataclass
class Start:
    model_config: object       # model.ModelConfig
    weights: Optional[dict]    # {'bert': encoder state_dict, 'pooler': optional}; None: random init
    tokenizer: object
    source: dict               # what results.json records, to refuse mixing runs from different starts
    label: str                 # for humans


def load_start(cfg: GlueConfig, init: str) -> Start:
    if init in ("hf", "mosaicml"):
        what = "a HF BERT folder" if init == "hf" else "a MosaicBERT folder from MosaicML"
        if not cfg.hf:
            raise GlueError(f"--init={init} needs --hf=FOLDER ({what} with config.json, weights and vocab.txt)")
        try:
            tok = hf.WordPiece.from_folder(cfg.hf)
            mlm = hf.from_hf_bert(cfg.hf) if init == "hf" else hf.from_mosaicml(cfg.hf)
        except Exception as e:
            raise GlueError(f"could not load {what} from {cfg.hf}: {type(e).__name__}: {e}") from None
        if tok.n_tokens > mlm.config.vocab_size:
            raise GlueError(f"{Path(cfg.hf) / 'vocab.txt'} has {tok.n_tokens} tokens but {cfg.hf}/config.json says "
                            f"vocab_size={mlm.config.vocab_size}: use the vocab.txt saved with these weights.")
        return Start(mlm.config, encoder_weights(mlm), tok, {"init": init, "path": str(Path(cfg.hf).resolve())},
                     f"{'HF BERT' if init == 'hf' else 'MosaicBERT'} {cfg.hf}")
    if init == "scratch" and cfg.hf:  # the control of a HF run: its architecture and vocabulary, random weights
        start = load_start(cfg, "mosaicml" if hf.is_mosaicml(cfg.hf) else "hf")
        source = {"init": "scratch", "model_config": config_dict(start.model_config), "vocab": start.source}
        return dataclasses.replace(start, weights=None, source=source, label=f"random init (architecture of {cfg.hf})")
    tok = data.get_tokenizer()
    where = Path(cfg.ckpt)  # a train.py checkpoint, or its out_dir (the latest checkpoint there)
    path = None if not cfg.ckpt else latest_checkpoint(str(where)) if where.is_dir() else (
        str(where) if where.is_file() else None)
    if init == "scratch":  # the control: the checkpoint's architecture (else --model's), random weights
        mcfg = _load_ckpt(path, tok)[0].config if path is not None else model.ModelConfig.preset(cfg.model)
        return Start(mcfg, None, tok, {"init": "scratch", "model_config": config_dict(mcfg)},
                     f"random init ({f'architecture of {path}' if path is not None else cfg.model})")
    if path is None:
        how = "python train.py" if cfg.ckpt == GlueConfig.ckpt else f"python train.py --out_dir={cfg.ckpt}"
        raise GlueError(f"no pretrained checkpoint at {where}{' (no ckpt_*.pt inside)' if where.is_dir() else ''}: "
                        f"run `{how}` first (a few minutes on a CPU), or pass --ckpt=PATH to a train.py "
                        f"checkpoint or out_dir, or --init=scratch for a randomly initialized model.")
    mlm, ck = _load_ckpt(path, tok)
    return Start(mlm.config, encoder_weights(mlm), tok, {"init": "ckpt", "path": str(Path(path).resolve()),
                 "step": ck.get("step")}, f"pretrained {path} (step {ck.get('step')})")


def encoder_weights(m) -> dict:
    """What a classifier takes over: the encoder, and a trained [CLS] pooler (HF BERT, our MNLI classifier)."""
    return {"bert": m.bert.state_dict(), **({"pooler": m.pooler.state_dict()} if hasattr(m, "pooler") else {})}


def _load_ckpt(path: str, tok):
    try:
        mlm, ck = model.load_pretrained(path)
    except Exception as e:
        why = str(e)[:500].rstrip(". ")
        raise GlueError(f"could not load checkpoint {path}: {type(e).__name__}: {why}. It must be a checkpoint "
                        f"written by train.py whose weights match its model_config.") from None
    if ck.get("tokenizer", "gpt2") != "gpt2":
        raise GlueError(f"checkpoint {path} was trained with tokenizer {ck.get('tokenizer')!r}, glue.py encodes "
                        f"with GPT-2 BPE for train.py checkpoints. For a HF BERT folder use --init=hf --hf=FOLDER.")
    if mlm.config.vocab_size < tok.n_tokens:
        raise GlueError(f"checkpoint {path} has vocab_size={mlm.config.vocab_size} but the GPT-2 tokenizer with our "
                        f"special tokens needs {tok.n_tokens}: pretrain with train.py's default vocabulary.")
    return mlm, ck


@torch.no_grad()
def token_cosine(start: Start, n_sentences: int = 32) -> float:
    """Mean cosine similarity between the final hidden states of the real tokens of a few sentiment sentences:
    about 0.5 at random init, 1.0 for an encoder whose pretraining collapsed (every token the same vector)."""
    bert = model.Bert(start.model_config).eval()
    bert.load_state_dict(start.weights["bert"])
    ex = read_tsv(TASKS["sentiment"], Path(TASKS["sentiment"].folder) / TASKS["sentiment"].files["dev"])
    enc = encode_examples(Examples(ex.a[:n_sentences], None, ex.labels[:n_sentences], ""), start.tokenizer, 64)
    b = collate(enc, list(range(len(enc))), start.tokenizer.pad_id)
    h, lay = bert(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    h = h.reshape(-1, h.shape[-1]).float()  # [T, d]
    h = torch.nn.functional.normalize(h if lay.unpadded else h[lay.real_indices], dim=-1)  # [nnz, d]
    return float((h @ h.T).mean())


def warn_if_collapsed(start: Start):
    """The collapse detector: an encoder that maps every token to nearly the same vector cannot be fine-tuned."""
    if (cos := token_cosine(start)) > 0.99:
        print(f"warning: {start.label}: its encoder maps every token to nearly the same vector (mean cosine "
              f"{cos:.4f} between tokens of different sentences; about 0.5 at random init). Its pretraining "
              f"collapsed or never got going, and fine-tuning from it will likely not beat the majority class. "
              f"Pretrain longer or with a lower lr; --init=scratch is the control.", flush=True)


def mnli_encoder_path(out_dir) -> Path:
    return Path(out_dir) / "mnli_encoder.pt"


# --- fine-tuning one (task, seed)

def effective_recipe(cfg: GlueConfig, task: Task) -> dict:
    r = task.recipe
    return {"lr": cfg.lr or r.lr, "weight_decay": r.weight_decay if cfg.weight_decay < 0 else cfg.weight_decay,
            "epochs": cfg.epochs or r.epochs, "batch_size": cfg.batch_size or r.batch_size, "max_len": cfg.max_len,
            "warmup": cfg.warmup, "max_steps": cfg.max_steps, "max_train_examples": cfg.max_train_examples
            or r.train_examples, "dtype": cfg.dtype, "betas": [0.9, 0.98], "eps": 1e-6}


@torch.no_grad()
def predict(clf, data: Encoded, cfg: GlueConfig, pad_id: int, dist: Dist, regression: bool) -> np.ndarray:
    """Predictions for every row (class ids, or scores for regression); each rank does a share, then gathers."""
    clf.eval()
    mine = np.arange(dist.rank, len(data), dist.world)
    mine = mine[np.argsort([len(data.ids[i]) for i in mine], kind="stable")]  # similar lengths together
    out = []
    for s in range(0, len(mine), cfg.eval_batch_size):
        b = {k: v.to(dist.device) for k, v in collate(data, mine[s:s + cfg.eval_batch_size], pad_id).items()}
        with perf.autocast(dist.device, cfg.dtype):
            logits, _ = clf(b["input_ids"], b["attention_mask"], b["token_type_ids"])  # [B, num_labels]
        out.append(logits[:, 0].float() if regression else logits.argmax(-1))
    pred = torch.cat(out).cpu().numpy() if out else np.zeros(0)
    pairs = list(zip(mine.tolist(), pred.tolist()))
    pairs = [p for g in all_gather(pairs) for p in g] if dist.world > 1 else pairs
    result = np.zeros(len(data), np.float64 if regression else np.int64)
    result[[i for i, _ in pairs]] = [p for _, p in pairs]
    return result


def maybe_compile(clf, cfg: GlueConfig, device: torch.device) -> bool:
    """--compile (unset: on CUDA only, as in train.py): the encoder layers compiled in place, regionally."""
    on = resolve_compile(cfg.compile, device)[0]
    if on:
        model.compile_model(clf)
    return on


def build_classifier(cfg: GlueConfig, task: Task, start: Start, weights: Optional[dict], seed: int,
                     device: torch.device):
    """A SequenceClassifier with the encoder (and a trained [CLS] pooler) from `weights`, compiled if on."""
    torch.manual_seed(seed)  # the head's init and dropout
    clf = model.SequenceClassifier(dataclasses.replace(start.model_config, hidden_dropout=cfg.dropout),
                                   task.num_labels)
    if weights is not None:
        clf.bert.load_state_dict(weights["bert"])
        if "pooler" in weights and hasattr(clf, "pooler"):  # a trained [CLS] pooler, when the head pools [CLS]
            clf.pooler.load_state_dict(weights["pooler"])
    clf.to(device)
    maybe_compile(clf, cfg, device)  # before DDP; predict runs the same compiled layers
    return clf


def epoch_batches(n: int, B: int, world: int, seed: int, epochs: float, max_steps: int) -> tuple[int, list]:
    """(total steps, the global batches' rows): a new order each epoch; a partial last batch gives each rank a row."""
    starts = [s for s in range(0, n, B) if min(B, n - s) >= world]
    total = min(math.ceil(epochs * len(starts)), max_steps or math.inf)
    batches = []
    while len(batches) < total:
        perm = np.random.default_rng([seed, len(batches) // len(starts)]).permutation(n)
        batches += [perm[s:s + B] for s in starts][:total - len(batches)]
    return total, batches


def finetune(cfg: GlueConfig, task: Task, start: Start, weights: Optional[dict], seed: int,
             train_set: Encoded, evals: dict, dist: Dist) -> dict:
    """Fine-tune from `weights` (None: random init); return the final evaluation's metrics, speed, weights."""
    rec = effective_recipe(cfg, task)
    clf = build_classifier(cfg, task, start, weights, seed, dist.device)
    ddp = wrap_ddp(clf, dist.device) if dist.world > 1 else clf
    opt = build_optimizer(clf.parameters(), rec["lr"], rec["weight_decay"], betas=(0.9, 0.98), eps=1e-6)
    total, batches = epoch_batches(len(train_set), rec["batch_size"], dist.world, seed, rec["epochs"], cfg.max_steps)
    warmup = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, 0.0))
    tag = f"{task.name} seed {seed}"
    if dist.master:
        print(f"{tag} | {len(train_set):,} train rows, batch {rec['batch_size']}, {total} steps ({rec['epochs']:g} "
              f"epoch(s){', capped by --max_steps' if cfg.max_steps and total == cfg.max_steps else ''}), "
              f"lr {rec['lr']:g}, wd {rec['weight_decay']:g}, warmup {warmup}")
    t0 = time.perf_counter()
    tokens = train_steps(cfg, ddp, opt, sched, batches, train_set, start.tokenizer.pad_id, dist, tag)
    train_s = time.perf_counter() - t0
    result = score(task, evals, lambda d: predict(clf, d, cfg, start.tokenizer.pad_id, dist, task.classes is None))
    result.update(steps=total, train_seconds=round(train_s, 2), train_tokens=int(tokens),
                  train_tokens_per_s=round(tokens / max(train_s, 1e-9), 1))
    if dist.master:
        print(f"{tag} | final: " + ", ".join(f"{m} {result[m] * 100:.2f}" for m in metric_names(task))
              + f" | {result['train_tokens_per_s']:,.0f} tok/s over {train_s:.0f} s", flush=True)
    return {"metrics": result, "weights": encoder_weights(clf), "classifier": clf.classifier.state_dict()}


def train_steps(cfg: GlueConfig, ddp, opt, sched, batches: list, train_set: Encoded, pad_id: int, dist: Dist,
                tag: str) -> int:
    """One optimizer step per global batch; returns the real tokens trained on (all ranks)."""
    ddp.train()
    loss_acc = torch.zeros((), device=dist.device)
    tokens = tok_window = 0
    t0 = t_window = time.perf_counter()
    total = len(batches)
    for step, rows in enumerate(batches, 1):
        mine = np.array_split(rows, dist.world)[dist.rank]  # this rank's share of the global batch
        n_global = len(rows)
        b = collate(train_set, mine, pad_id)
        tok_window += int(b["attention_mask"].sum())  # real tokens, counted on the CPU copy (no sync)
        b = {k: v.to(dist.device, non_blocking=True) for k, v in b.items()}
        with perf.autocast(dist.device, cfg.dtype):
            _, loss = ddp(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"])
        # the model's loss is the mean over this rank's rows; DDP averages over ranks. Scale so the gradient
        # is the mean over the global batch, also when the last batch splits unevenly.
        (loss * (len(mine) * dist.world / n_global)).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach() * (len(mine) / n_global)  # summed over ranks below: the global batch's mean
        if step % cfg.log_interval == 0 or step == total:  # the only host syncs of the loop
            stats = torch.stack([loss_acc, torch.tensor(float(tok_window), device=dist.device)])
            if dist.world > 1:
                torch.distributed.all_reduce(stats)  # the global batches' mean losses, real tokens of all ranks
            loss_sum, n_tok = stats.tolist()
            dt, k = time.perf_counter() - t_window, step % cfg.log_interval or cfg.log_interval
            eta = (time.perf_counter() - t0) / step * (total - step)
            if dist.master:
                print(f"{tag} | step {step}/{total} | loss {loss_sum / k:.4f} | "
                      f"lr {sched.get_last_lr()[0]:.2e} | {dt / k * 1000:.0f} ms/step | {n_tok / dt:,.0f} tok/s | "
                      f"eta {int(eta // 60)}:{int(eta % 60):02d}", flush=True)
            loss_acc.zero_()
            tokens += n_tok
            tok_window, t_window = 0, time.perf_counter()
    return tokens


def score(task: Task, evals: dict, predict_split) -> dict:
    """The metrics of predict_split(data) on every eval split, named as in results.json (MNLI: accuracy_m, _mm)."""
    return {m if len(evals) == 1 else f"{m}_{split}": v for split, d in evals.items()
            for m, v in compute_metrics(task.name, predict_split(d), d.labels).items()}


def majority_baseline(task: Task, train: Examples, evals: dict) -> Optional[dict]:
    """Metrics of always predicting the training set's most frequent class (classification tasks only)."""
    if task.classes is None:
        return None
    major = int(np.bincount(train.labels).argmax())
    return score(task, evals, lambda ex: np.full(len(ex.labels), major))


def load_results(out_dir: Path, source: dict) -> dict:
    path = out_dir / "results.json"
    if not path.is_file():
        return {"source": source, "tasks": {}}
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GlueError(f"{path} is not valid JSON ({e}); delete it to start the sweep over.") from None
    if res.get("source") != source:
        raise GlueError(f"{path} holds results fine-tuned from {res.get('source')}, not from {source}. "
                        f"Pass another --out_dir (or delete {path}) to start a new sweep.")
    return res


# --- the sweep: results.json rewritten atomically after every finished (task, seed)

def check_config(cfg: GlueConfig):
    choices = dict(dtype=perf.DTYPES, device=("auto", "cpu", "cuda"), parallel=("runs", "batches"),
                   init=("auto", "ckpt", "scratch", "hf", "mosaicml"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    for key in ("seeds", "max_steps", "batch_size"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be >= 0 (0: the recipe's / no limit)")
    if (cfg.max_train_examples < -1 or cfg.epochs < 0 or cfg.lr < 0 or not 0 <= cfg.warmup < 1 or cfg.max_len < 8
            or cfg.eval_batch_size < 1):
        raise ConfigError("--max_train_examples must be -1 (all), 0 (the recipe's label budget) or a count; --epochs "
                          "and --lr >= 0 (0: the recipe's); --warmup in [0, 1); --max_len >= 8; --eval_batch_size >= 1")


def parse_tasks(cfg: GlueConfig) -> list[str]:
    text = cfg.tasks or ("all" if cfg.glue_dir else "sentiment")
    raw = [t.strip().lower().replace("-", "") for t in text.split(",")]
    names = [n for t in raw for n in (GLUE_TASKS if t == "all" else [t])]
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise ConfigError(f"--tasks: unknown task {', '.join(bad)}. Choose from {', '.join(TASKS)} or all")
    # MNLI first: RTE, MRPC and STS-B start from its fine-tuned encoder
    return sorted(dict.fromkeys(names), key=lambda t: (t != "mnli", names.index(t)))


def resolve_dtype(cfg: GlueConfig, dist: Dist, say: bool = False) -> GlueConfig:
    """--dtype=auto made concrete for this device (perf.resolve_dtype); with `say`, the choice is printed."""
    dtype, why, warning = perf.resolve_dtype(cfg.dtype, dist.device)
    if say:
        print(f"dtype: {dtype} ({why})" + (f"\nwarning: {warning}" if warning else ""), flush=True)
    return dataclasses.replace(cfg, dtype=dtype)


def run(cfg: GlueConfig, init: Optional[str] = None, dist: Optional[Dist] = None) -> dict:
    """Fine-tune every (task, seed) not yet in out_dir/results.json; return the summarized results."""
    check_config(cfg)
    init = init or cfg.init
    if init == "auto":
        init = ("mosaicml" if hf.is_mosaicml(cfg.hf) else "hf") if cfg.hf else "ckpt"
    tasks = parse_tasks(cfg)
    dist = dist or setup_distributed(cfg.device)
    cfg = resolve_dtype(cfg, dist)
    start = load_start(cfg, init)
    mc = start.model_config
    if getattr(mc, "position", "alibi") == "learned" and cfg.max_len > mc.max_positions:
        raise GlueError(f"--max_len={cfg.max_len} exceeds the checkpoint's {mc.max_positions} learned positions")
    if dist.master and start.weights is not None:
        warn_if_collapsed(start)
    out_dir, res = Path(cfg.out_dir), None
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            res = load_results(out_dir, start.source)
        except GlueError as e:
            res = e
        print(f"starting point: {start.label}; results in {out_dir / 'results.json'}")
    res = all_gather(res)[0] if dist.world > 1 else res  # rank 0's: every rank learns what is done (or the error)
    if isinstance(res, GlueError):
        raise res
    for name in tasks:
        run_task(cfg, TASKS[name], start, res, dist)
    res = summarize(res)
    if dist.master:
        table = markdown_table(res)
        (out_dir / "results.md").write_text(table + "\n")
        print("\n" + table + "\n")
    return res


def run_task(cfg: GlueConfig, task: Task, start: Start, res: dict, dist: Dist):
    """Fine-tune the task's seeds that results.json lacks, then record them there."""
    out_dir, name, rec = Path(cfg.out_dir), task.name, effective_recipe(cfg, task)
    seeds = [cfg.seed + i for i in range(cfg.seeds or task.recipe.seeds)]
    tr = res["tasks"].get(name)
    if tr is not None and tr["recipe"] != rec:
        raise GlueError(f"{out_dir / 'results.json'} has {name} results for another recipe ({tr['recipe']}); "
                        f"now {rec}. Pass another --out_dir to keep both.")
    todo = [s for s in seeds if tr is None or str(s) not in tr["seeds"]]
    if not todo:
        if dist.master:
            print(f"{name}: seeds {seeds} already in results.json, skipping")
        return
    weights, start_name = task_start(cfg, name, start, dist)
    if tr is not None and tr.get("start") != start_name:
        raise GlueError(f"{out_dir / 'results.json'} has {name} seeds started from {tr.get('start')}, this run "
                        f"would start from {start_name}; pass another --out_dir")
    splits, train_set, evals = load_encoded(cfg, task, start, rec["max_train_examples"], dist)
    tr = res["tasks"].setdefault(name, {"recipe": rec, "start": start_name, "seeds": {}})
    tr["majority"] = majority_baseline(task, splits["train"], {s: splits[s] for s in evals})
    found = {str(s): r["metrics"] for s in todo if (r := read_run(out_dir, name, s)) and r["recipe"] == rec
             and r["start"] == start_name}  # runs a rank finished before the sweep was interrupted
    if found:
        record_seeds(res, name, found, out_dir, dist)
        todo = [s for s in todo if str(s) not in found]
    # --parallel=runs under torchrun: rank r fine-tunes todo[r::world] alone on its device (no DDP, no gradient
    # all-reduce), exactly as a 1-process run would; rank 0 gathers the metrics. Else every rank runs every seed.
    solo = dist.world > 1 and cfg.parallel == "runs"
    mine = {}
    for seed in todo[dist.rank::dist.world] if solo else todo:
        out = finetune(cfg, task, start, weights, seed, train_set, evals, Dist(0, 1, dist.device) if solo else dist)
        if (solo or dist.master) and name == "mnli" and seed == seeds[0]:  # the encoder RTE, MRPC, STS-B start from
            atomic_save({"weights": out["weights"], "model_config": config_dict(start.model_config), "seed": seed,
                         "source": start.source, "classifier": out["classifier"]},  # the classifier: for hf.export
                        mnli_encoder_path(out_dir))
        mine[str(seed)] = out["metrics"]
        if solo or dist.master:  # each run's own file: a rank's finished runs survive an interrupted task
            atomic_write_json({"recipe": rec, "start": start_name, "metrics": out["metrics"]},
                              run_path(out_dir, name, seed))
        if not solo:
            record_seeds(res, name, mine, out_dir, dist)  # after every seed: an interrupted sweep resumes there
    if solo:
        record_seeds(res, name, {k: v for g in all_gather(mine) for k, v in g.items()}, out_dir, dist)


def run_path(out_dir: Path, name: str, seed: int) -> Path:
    (Path(out_dir) / "runs").mkdir(parents=True, exist_ok=True)
    return Path(out_dir) / "runs" / f"{name}_{seed}.json"


def read_run(out_dir: Path, name: str, seed: int) -> Optional[dict]:
    p = Path(out_dir) / "runs" / f"{name}_{seed}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def record_seeds(res: dict, name: str, done: dict, out_dir: Path, dist: Dist):
    """Rank 0 adds these seeds' metrics to results.json; every rank waits until it and the MNLI encoder are on disk."""
    if dist.master:
        res["tasks"][name]["seeds"].update(sorted(done.items(), key=lambda kv: int(kv[0])))  # in seed order
        atomic_write_json(summarize(res), out_dir / "results.json")
    if dist.world > 1:
        torch.distributed.barrier()


def task_start(cfg: GlueConfig, name: str, start: Start, dist: Dist) -> tuple[Optional[dict], str]:
    """Where the task starts: for RTE, MRPC, STS-B the encoder this out_dir's MNLI run fine-tuned from the same
    starting point, when there is one (the paper); else the starting point's weights."""
    start_name, p = ("pretrained" if start.weights is not None else "scratch"), mnli_encoder_path(cfg.out_dir)
    if name not in FROM_MNLI or not cfg.from_mnli:
        return start.weights, start_name
    if p.is_file():
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if ck.get("source") == start.source and ck.get("model_config") == config_dict(start.model_config):
            return ck["weights"], "mnli"
        print(f"note: {p} was fine-tuned from another starting point ({ck.get('source')}); not using it")
    if dist.master:
        print(f"note: {name} starts from the {start_name} model: no MNLI-fine-tuned encoder in {Path(cfg.out_dir)} "
              f"(run --tasks=mnli first, or include mnli in --tasks, to follow the paper)")
    return start.weights, start_name


def load_encoded(cfg: GlueConfig, task: Task, start: Start, budget: int, dist: Dist) -> tuple[dict, Encoded, dict]:
    """The task's splits (train cut to its label budget), and the train and eval splits encoded."""
    t0 = time.perf_counter()
    splits = load_task(task, cfg.glue_dir, cfg.skip_bad_rows)
    splits["train"] = label_subset(splits["train"], budget)
    train_set = encode_examples(splits["train"], start.tokenizer, cfg.max_len)
    evals = {s: encode_examples(splits[s], start.tokenizer, cfg.max_len) for s in eval_splits(task)}
    if dist.master:
        print(f"{task.name}: {len(train_set):,} train / " + ", ".join(f"{len(e):,} {s}" for s, e in evals.items())
              + f" examples from {splits['train'].origin} (tokenized in {time.perf_counter() - t0:.1f} s)")
    return splits, train_set, evals


# --- the sentiment demo and the command line

def demo_summary(main: dict, control: Optional[dict], main_label: str, out_dir: Path):
    """The demo's table: pretrained vs from-scratch control vs majority class (median over seeds, spread); with a
    control, out_dir/demo.json gets {"pretrained": [per seed], "scratch": [per seed], "majority": rate}."""
    tr = main["tasks"].get("sentiment")
    if not tr or "mean" not in tr:
        return
    accs = lambda t: [s["accuracy"] for s in t["seeds"].values()]
    rows = [(main_label, accs(tr))]
    ctl = control["tasks"].get("sentiment") if control else None
    if ctl and ctl["seeds"]:
        rows.append(("from scratch (control: same architecture and recipe)", accs(ctl)))
    majority, rec = tr["majority"]["accuracy"], tr["recipe"]
    print(f"Sentiment sample (Rotten Tomatoes, SST-2 layout) dev accuracy; fine-tuned on "
          f"{rec['max_train_examples'] if rec['max_train_examples'] > 0 else 'all'} labelled training sentences, "
          f"{rec['epochs']:g} epoch(s) at lr {rec['lr']:g}:\n\n"
          f"| model | median | seeds | spread (min-max) |\n|---|---:|---|---:|")
    for label, a in rows:
        print(f"| {label} | {np.median(a) * 100:.1f} | {', '.join(f'{x * 100:.1f}' for x in a)} | "
              f"{min(a) * 100:.1f}-{max(a) * 100:.1f} |")
    print(f"| majority class (of the training set) | {majority * 100:.1f} | | |")
    if len(rows) == 2:
        gap = (np.median(rows[0][1]) - np.median(rows[1][1])) * 100
        print(f"\npretraining buys {gap:+.1f} points (median over {len(rows[0][1])} fine-tuning seeds of one "
              f"pretraining run; the pretraining seed, train.py --seed, moves it as well)")
        atomic_write_json({"pretrained": rows[0][1], "scratch": rows[1][1], "majority": majority},
                          out_dir / "demo.json")
    if np.median(rows[0][1]) <= majority + 0.01:
        print("\nThe pretrained model does not beat the majority class: its pretraining was too short or collapsed "
              "(see the warning at the top, if any). Fine-tuning itself works: compare the control.")


def main(argv=None):
    cfg = parse_config(GlueConfig, sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    parse_tasks(cfg)
    dist = setup_distributed(cfg.device)
    cfg = resolve_dtype(cfg, dist, say=dist.master)
    if dist.master:
        print_config(cfg)
    try:
        t0 = time.perf_counter()
        res = run(cfg, dist=dist)
        control = None
        if cfg.control if cfg.control is not None else parse_tasks(cfg) == ["sentiment"]:
            ctl = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / "control"))
            if dist.master:
                print("\n--- control: the same recipe from a random initialization ---")
            control = run(ctl, init="scratch", dist=dist)
        if dist.master:
            demo_summary(res, control, describe(res["source"]), Path(cfg.out_dir))
            print(f"\ndone in {time.perf_counter() - t0:.0f} s; results in {Path(cfg.out_dir) / 'results.json'}")
        if dist.world > 1:
            torch.distributed.barrier()  # every rank done before any tears gloo down (else a rank may abort at exit)
    except GlueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
