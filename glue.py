"""Fine-tune and score a pretrained encoder on the eight GLUE tasks with the MosaicBERT paper's recipe.

    python glue.py                                   # offline demo: sentiment sample in assets/, vs a scratch control
    python glue.py --glue_dir=glue_data --tasks=all  # GLUE from download_glue_data.py's TSVs
    python glue.py --tasks=rte,mrpc                  # from the hub (nyu-mll/glue), two tasks
    python glue.py --init=hf --hf=path/to/bert-base-uncased --glue_dir=glue_data
    python glue.py --init=mosaicml --hf=path/to/mosaic-bert-base --glue_dir=glue_data   # MosaicML's published weights
    torchrun --nproc_per_node=8 glue.py --glue_dir=glue_data --tasks=mnli

What is here, top to bottom:
- the recipe (per-task lr, decoupled weight decay, epochs, batch size, seeds; AdamW betas (0.9, 0.98), eps 1e-6,
  6% warmup then linear decay to 0, bf16 autocast, max length 128) and the metrics, in numpy;
- readers for GLUE's distributed TSV layouts (csv.QUOTE_NONE: the sentences contain `"`) and for the hub;
- tokenization: data.get_tokenizer() (GPT-2 BPE) for our checkpoints, hf.WordPiece (the `tokenizers` library)
  for HF and MosaicML checkpoints; pairs become [CLS] a [SEP] b [SEP] (token types 0, 1), longest segment
  truncated first;
- one fine-tuning run per (task, seed), batches padded to their longest row (the model unpads); under torchrun
  the ranks share out the runs (--parallel=batches: DDP splits each batch instead);
- RTE, MRPC and STS-B start from the MNLI-fine-tuned encoder, as in the paper;
- out_dir/results.json, updated atomically after every finished (task, seed): an interrupted sweep resumes.
Results are those of the final evaluation, not the best one. Metrics are stored as fractions (x100 when printed).

The demo (no flags) fine-tunes train.py's default checkpoint (out/demo) on the Rotten Tomatoes sample in assets/
(SST-2 layout) with a demo-sized recipe (a label budget of 1,000 sentences, 3 seeds), then the same architecture
from a random init (the control), and prints both (median, per seed, spread) beside the majority-class rate; it
writes them to out_dir/demo.json. A checkpoint whose encoder collapsed (every token the same vector) is flagged.
"""

import csv
import dataclasses
import gzip
import json
import math
import os
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
from config import ConfigError, config_dict, main_guard, parse_config, print_config
from train import init_distributed, resolve_compile, wrap_ddp

ROOT = Path(__file__).resolve().parent
GLUE_TASKS = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")
FROM_MNLI = ("rte", "mrpc", "stsb")  # these start from the MNLI-fine-tuned encoder


class GlueError(ValueError):
    """Bad input (a malformed TSV, a missing file, a mismatched checkpoint). The message says what to do."""


# --------------------------------------------------------------------------------------------------------------
# config


@dataclass
class GlueConfig:
    tasks: str = ""              # comma list of mnli,qqp,qnli,sst2,cola,stsb,mrpc,rte | all | sentiment (the
                                 # offline sample in assets/). Empty: all with --glue_dir, else sentiment.
    glue_dir: str = ""           # GLUE TSVs in download_glue_data.py's layout; empty: the hub (nyu-mll/glue)
    init: str = "auto"           # ckpt | scratch | hf | mosaicml; auto: hf or mosaicml (by the folder) when --hf
                                 # is given, else ckpt
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
    max_train_examples: int = 0  # a fixed random subset of the training set: 0 the recipe's label budget
                                 # (all for GLUE tasks, 1,000 for the sentiment demo), -1 all
    max_len: int = 128           # recipe: sequences truncated to 128 tokens
    warmup: float = 0.06         # fraction of steps with linear warmup, then linear decay to 0
    dropout: float = 0.1         # hidden dropout while fine-tuning (the paper's 0.1), whatever pretraining used
    eval_batch_size: int = 128
    dtype: str = "auto"          # auto (bf16 where this device runs it fast, else float32) | bfloat16 | float32
    device: str = "auto"         # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
    parallel: str = "runs"       # under torchrun: runs (each rank fine-tunes its share of each task's seeds alone,
                                 # no DDP; the recipe's 16-48 row batches are too small to split) | batches (DDP)
    compile: Optional[bool] = None  # regional torch.compile of the encoder layers; None (auto): on CUDA only
    from_mnli: bool = True       # start RTE, MRPC, STS-B from the MNLI-fine-tuned encoder when there is one
    control: Optional[bool] = None  # also fine-tune a from-scratch copy (default: only for the sentiment sample)
    skip_bad_rows: bool = False  # skip TSV rows with the wrong column count (counted, reported) instead of failing
    log_interval: int = 100


# --------------------------------------------------------------------------------------------------------------
# tasks and the paper's recipe


@dataclass(frozen=True)
class Recipe:
    lr: float
    weight_decay: float  # decoupled: the absolute decay per step at peak lr, scaled by lr/peak_lr
    epochs: float
    batch_size: int
    seeds: int
    train_examples: int = 0  # label budget: a fixed random subset of this many training rows, 0: all


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple[str, ...]
    classes: Optional[tuple[str, ...]]   # label strings in the TSVs, in the hub's id order; None = regression
    recipe: Recipe
    # GLUE TSV layout: folder, file per split, whether there is a header, column of a, b, label (-1: last)
    folder: str
    files: dict                          # split -> file name; eval splits are every key but 'train'
    header: bool
    cols: tuple[int, Optional[int], int]
    n_cols: int = 0                      # expected column count for header-less files
    # hub layout: column names of a and b, eval split names
    hub: tuple[str, Optional[str]] = ("sentence", None)
    hub_splits: Optional[dict] = None

    @property
    def num_labels(self) -> int:
        return 1 if self.classes is None else len(self.classes)


BIN = ("0", "1")
TASKS = {t.name: t for t in [
    Task("mnli", ("accuracy",), ("entailment", "neutral", "contradiction"), Recipe(5e-5, 5e-6, 3, 48, 1),
         "MNLI", {"train": "train.tsv", "m": "dev_matched.tsv", "mm": "dev_mismatched.tsv"}, True, (8, 9, -1),
         hub=("premise", "hypothesis"),
         hub_splits={"train": "train", "m": "validation_matched", "mm": "validation_mismatched"}),
    Task("qqp", ("accuracy", "f1"), BIN, Recipe(3e-5, 3e-6, 5, 16, 1),
         "QQP", {"train": "train.tsv", "dev": "dev.tsv"}, True, (3, 4, 5), hub=("question1", "question2")),
    Task("qnli", ("accuracy",), ("entailment", "not_entailment"), Recipe(1e-5, 1e-6, 10, 16, 1),
         "QNLI", {"train": "train.tsv", "dev": "dev.tsv"}, True, (1, 2, 3), hub=("question", "sentence")),
    Task("sst2", ("accuracy",), BIN, Recipe(3e-5, 3e-6, 3, 16, 3),
         "SST-2", {"train": "train.tsv", "dev": "dev.tsv"}, True, (0, None, 1)),
    Task("cola", ("mcc",), BIN, Recipe(5e-5, 5e-6, 10, 32, 4),
         "CoLA", {"train": "train.tsv", "dev": "dev.tsv"}, False, (3, None, 1), n_cols=4),
    Task("stsb", ("pearson", "spearman"), None, Recipe(3e-5, 3e-6, 10, 32, 5),
         "STS-B", {"train": "train.tsv", "dev": "dev.tsv"}, True, (7, 8, -1), hub=("sentence1", "sentence2")),
    Task("mrpc", ("accuracy", "f1"), BIN, Recipe(8e-5, 8e-6, 10, 32, 5),
         "MRPC", {"train": "train.tsv", "dev": "dev.tsv"}, True, (3, 4, 0), hub=("sentence1", "sentence2")),
    Task("rte", ("accuracy",), ("entailment", "not_entailment"), Recipe(1e-5, 1e-5, 3, 16, 5),
         "RTE", {"train": "train.tsv", "dev": "dev.tsv"}, True, (1, 2, 3), hub=("sentence1", "sentence2")),
    # Not GLUE: the offline demo. Rotten Tomatoes sentences in SST-2's layout (assets/). A demo-sized recipe that
    # shows what pretraining buys: a label budget of 1,000 sentences (of 11,752; pretraining matters most when
    # labels are few), 5 epochs (160 steps), lr 2e-4 (the all-labels recipe, 1 epoch at 5e-4, measured 75.6
    # pretrained vs 76.2 from scratch: with 11,752 labels a small model learns the task from scratch), 3 seeds.
    Task("sentiment", ("accuracy",), BIN, Recipe(2e-4, 2e-6, 5, 32, 3, train_examples=1000),
         str(ROOT / "assets"), {"train": "rotten_tomatoes_train.tsv.gz", "dev": "rotten_tomatoes_dev.tsv.gz"},
         True, (0, None, 1)),
]}


def eval_splits(task: Task) -> list[str]:
    return [s for s in task.files if s != "train"]


def metric_names(task: Task) -> list[str]:
    """Names in results.json: MNLI's accuracy is reported per dev set (accuracy_m, accuracy_mm)."""
    splits = eval_splits(task)
    if len(splits) == 1:
        return list(task.metrics)
    return [f"{m}_{s}" for s in splits for m in task.metrics]


# --------------------------------------------------------------------------------------------------------------
# metrics (numpy)


def accuracy(pred, label) -> float:
    return float(np.mean(pred == label)) if len(label) else 0.0


def f1_binary(pred, label) -> float:
    """F1 of the positive class (1). 0.0 when there are no positive predictions and no positive labels."""
    tp = int(np.sum((pred == 1) & (label == 1)))
    fp = int(np.sum((pred == 1) & (label != 1)))
    fn = int(np.sum((pred != 1) & (label == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corr(pred, label) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004; the binary phi coefficient for two classes).
    A constant predictor (or constant labels) makes the denominator 0: we return 0.0, the GLUE/sklearn convention."""
    classes = np.union1d(pred, label)
    p = np.searchsorted(classes, pred)
    t = np.searchsorted(classes, label)
    k = len(classes)
    conf = np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.float64)  # [true, pred]
    s, c = conf.sum(), np.trace(conf)
    t_sum, p_sum = conf.sum(1), conf.sum(0)
    den = math.sqrt((s * s - p_sum @ p_sum) * (s * s - t_sum @ t_sum))
    return float((c * s - t_sum @ p_sum) / den) if den > 0 else 0.0


def pearson_corr(x, y) -> float:
    """Pearson correlation. 0.0 when either side is constant (the correlation is undefined there)."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / den) if den > 0 else 0.0


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman_corr(x, y) -> float:
    """Spearman correlation: Pearson of the (average-tie) ranks. 0.0 when either side is constant."""
    return pearson_corr(rankdata(x), rankdata(y)) if len(x) else 0.0


def compute_metrics(task: str, predictions, labels) -> dict:
    """The task's GLUE metrics as fractions: {'accuracy'}, {'accuracy', 'f1'}, {'mcc'} or {'pearson', 'spearman'}.

    predictions: class ids [N], or logits [N, C] (argmax taken); for stsb, scores [N] or [N, 1].
    Degenerate cases return 0.0 rather than NaN: MCC of a constant predictor, correlation with a constant side,
    F1 with no positives anywhere. NaN or inf predictions raise ValueError (training diverged).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    t = TASKS[task]
    pred = np.asarray(predictions)
    label = np.asarray(labels)
    if t.classes is None:
        pred = pred.reshape(len(pred), -1)[:, 0].astype(np.float64) if pred.ndim > 1 else pred.astype(np.float64)
        label = label.astype(np.float64)
    elif pred.ndim == 2:
        pred = pred.argmax(-1)
    if pred.shape != label.shape or pred.ndim != 1:
        raise ValueError(f"{task}: predictions {pred.shape} and labels {label.shape} must be [N] (or logits [N, C])")
    if pred.dtype.kind == "f" and not np.all(np.isfinite(pred)):
        raise ValueError(f"{task}: predictions contain NaN or inf (did training diverge? try a lower --lr)")
    out = {}
    for m in t.metrics:
        if m == "accuracy":
            out[m] = accuracy(pred, label)
        elif m == "f1":
            out[m] = f1_binary(pred, label)
        elif m == "mcc":
            out[m] = matthews_corr(pred, label)
        elif m == "pearson":
            out[m] = pearson_corr(pred, label)
        elif m == "spearman":
            out[m] = spearman_corr(pred, label)
    return out


# --------------------------------------------------------------------------------------------------------------
# reading GLUE: the distributed TSVs (download_glue_data.py layout) or the hub


@dataclass
class Examples:
    a: list
    b: Optional[list]
    labels: np.ndarray  # int64 class ids, or float32 scores (STS-B)
    origin: str         # where they came from, for messages


def _parse_label(task: Task, raw: str, where: str):
    if task.classes is None:
        try:
            score = float(raw)
        except ValueError:
            score = float("nan")
        if not math.isfinite(score):
            raise GlueError(f"{where}: the {task.name} score {raw!r} is not a number. Fix the line (STS-B scores are "
                            f"numbers from 0 to 5 in the last column) or re-download the data.")
        return score
    if raw not in task.classes:
        raise GlueError(f"{where}: label {raw!r} is not one of {', '.join(task.classes)} for {task.name}. Fix the "
                        f"line, or check that the file is {task.name}'s (a test.tsv has no labels).")
    return task.classes.index(raw)


def read_tsv(task: Task, path: Path, skip_bad_rows: bool = False) -> Examples:
    """One split of a task from its GLUE TSV. Read with csv.QUOTE_NONE: the sentences contain `"`, and a
    quoting reader merges lines silently. Every row must have the header's column count (or n_cols)."""
    if not path.is_file():
        raise GlueError(f"{path} not found. --glue_dir must hold GLUE in download_glue_data.py's layout "
                        f"({task.folder}/{', '.join(task.files.values())}); download it with that script, "
                        f"or leave --glue_dir empty to read the hub (nyu-mll/glue).")
    opener = gzip.open if path.suffix == ".gz" else open
    ia, ib, il = task.cols
    a, b, labels, skipped = [], [] if ib is not None else None, [], 0
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        n_cols = task.n_cols
        if task.header:
            header = next(reader, None)
            if header is None:
                raise GlueError(f"{path}: the file is empty; it should start with {task.name}'s header row.")
            n_cols = len(header)
            if max(ia, ib or 0, il) >= n_cols:
                raise GlueError(f"{path}, line 1: the header has {n_cols} columns, {task.name} needs at least "
                                f"{max(ia, ib or 0, il) + 1}. Is this {task.name}'s file?")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if not row:
                continue
            if len(row) != n_cols:
                if skip_bad_rows:
                    skipped += 1
                    continue
                raise GlueError(f"{where}: expected {n_cols} tab-separated columns"
                                f"{' (as in the header)' if task.header else ''}, found {len(row)}. Fix or delete "
                                f"the line (a stray tab or newline in a sentence), or pass --skip_bad_rows.")
            a.append(row[ia])
            if ib is not None:
                b.append(row[ib])
            labels.append(_parse_label(task, row[il], where))
    if skipped:
        print(f"warning: {path}: skipped {skipped} rows with a column count other than {n_cols} (--skip_bad_rows)")
    if not a:
        raise GlueError(f"{path}: no examples. Check that it is {task.name}'s file in GLUE's layout.")
    dtype = np.float32 if task.classes is None else np.int64
    return Examples(a, b, np.asarray(labels, dtype), str(path))


def read_hub(task: Task, split: str) -> Examples:
    """One split from the hub (datasets.load_dataset('nyu-mll/glue', task)); the label ids match ours."""
    hub_split = (task.hub_splits or {"train": "train", "dev": "validation"})[split]
    try:
        import datasets
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=hub_split)
    except Exception as e:  # DNS / connection / offline-mode errors all end up here
        raise GlueError(f"could not load {task.name} from the hub (nyu-mll/glue): {type(e).__name__}: {e}. "
                        f"Offline? Pass --glue_dir=DIR with GLUE's TSVs (download_glue_data.py's layout).") from None
    ka, kb = task.hub
    return Examples(list(ds[ka]), list(ds[kb]) if kb else None,
                    np.asarray(ds["label"], np.float32 if task.classes is None else np.int64),
                    f"nyu-mll/glue {task.name} {split}")


def load_task(task: Task, glue_dir: str, skip_bad_rows: bool = False) -> dict:
    """{split: Examples} for 'train' and each eval split."""
    if task.name == "sentiment":
        base = Path(task.folder)
    elif glue_dir:
        base = Path(glue_dir) / task.folder
    else:
        return {s: read_hub(task, s) for s in task.files}
    return {s: read_tsv(task, base / f, skip_bad_rows) for s, f in task.files.items()}


def label_subset(ex: Examples, budget: int) -> Examples:
    """A label budget: a fixed random subset of `budget` rows (the same for every seed, run and start; kept in file
    order), or all rows when budget <= 0 or the split is smaller. probe.py fits its probes on the same subset."""
    if budget <= 0 or len(ex.a) <= budget:
        return ex
    keep = np.sort(np.random.default_rng(0).permutation(len(ex.a))[:budget])
    return Examples([ex.a[i] for i in keep], [ex.b[i] for i in keep] if ex.b else None, ex.labels[keep], ex.origin)


# --------------------------------------------------------------------------------------------------------------
# tokenization: GPT-2 BPE (data.get_tokenizer) for our checkpoints; BERT WordPiece (hf.WordPiece) for HF checkpoints


def truncate_pair(a: list, b: list, budget: int) -> tuple[list, list]:
    """Longest-first truncation to len(a) + len(b) <= budget, as Hugging Face's fast tokenizers do it
    (truncation='longest_first', what the paper's fine-tuning used): the shorter segment keeps
    min(its length, budget // 2) tokens, the longer one the rest; on equal lengths a counts as the shorter.
    (BERT's original one-token-at-a-time loop differs only when both are cut: by one token, on odd budgets.)"""
    if len(a) + len(b) <= budget:
        return a, b
    if len(a) <= len(b):
        na = min(len(a), budget // 2)
        return a[:na], b[:budget - na]
    nb = min(len(b), budget // 2)
    return a[:budget - nb], b[:nb]


@dataclass
class Encoded:
    ids: list            # per example: int32 array [CLS] a [SEP] (b [SEP])
    n_first: np.ndarray  # tokens with token type 0 ([CLS] a [SEP])
    labels: np.ndarray

    def __len__(self):
        return len(self.ids)


def encode_examples(ex: Examples, tok, max_len: int) -> Encoded:
    """[CLS] a [SEP] b [SEP] with token types 0 (through the first [SEP]) and 1, truncated to max_len."""
    enc = getattr(tok, "encode_batch", None)
    ta = enc(ex.a) if enc else [tok.encode(t) for t in ex.a]
    tb = (enc(ex.b) if enc else [tok.encode(t) for t in ex.b]) if ex.b is not None else None
    ids, n_first = [], np.empty(len(ta), np.int64)
    for i, a in enumerate(ta):
        if tb is None:
            a, b = a[:max_len - 2], None
        else:
            a, b = truncate_pair(a, tb[i], max_len - 3)
        seq = [tok.cls_id, *a, tok.sep_id] + ([*b, tok.sep_id] if b is not None else [])
        ids.append(np.asarray(seq, np.int32))
        n_first[i] = len(a) + 2
    return Encoded(ids, n_first, ex.labels)


def collate(data: Encoded, idx, pad_id: int) -> dict:
    """Pad the rows idx to their longest (the model unpads): input_ids, attention_mask, token_type_ids [B, S]."""
    lens = [len(data.ids[i]) for i in idx]
    B, S = len(idx), max(lens)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    types = torch.zeros((B, S), dtype=torch.long)
    for r, i in enumerate(idx):
        n = lens[r]
        input_ids[r, :n] = torch.from_numpy(data.ids[i].astype(np.int64))
        mask[r, :n] = 1
        types[r, data.n_first[i]:n] = 1
    labels = torch.from_numpy(data.labels[np.asarray(idx, dtype=np.int64)])
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


# --------------------------------------------------------------------------------------------------------------
# distributed (torchrun) and device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """train.py's torchrun setup: DDP when RANK/WORLD_SIZE are set (nccl on CUDA, gloo on CPU), else one process."""
    if torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    torch.device("cuda", torch.cuda.current_device()) if device != "cpu" and torch.cuda.is_available()
                    else torch.device("cpu"))
    return Dist(*init_distributed(device))


def broadcast_object(obj, dist: Dist):
    if dist.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------------------
# starting points: our pretrained checkpoint, random init, a HF BERT folder, or the MNLI-fine-tuned encoder


@dataclass
class Start:
    model_config: object       # model.ModelConfig
    weights: Optional[dict]    # {'bert': encoder state_dict, 'pooler': optional}; None: random init
    tokenizer: object
    source: dict               # what results.json records, to refuse mixing runs from different starts
    label: str                 # for humans


def _resolve_ckpt(path: str) -> Optional[str]:
    p = Path(path)
    if p.is_dir():
        return model.latest_checkpoint(str(p))
    return str(p) if p.is_file() else None


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
                            f"vocab_size={mlm.config.vocab_size}: the vocabulary does not match the weights. Use the "
                            f"vocab.txt saved with this checkpoint.")
        src = {"init": init, "path": str(Path(cfg.hf).resolve())}
        label = f"{'HF BERT' if init == 'hf' else 'MosaicBERT'} {cfg.hf}"
        return Start(mlm.config, encoder_weights(mlm), tok, src, label)

    if init == "scratch" and cfg.hf:  # the control of a HF run: its architecture and vocabulary, random weights
        start = load_start(cfg, "mosaicml" if hf.is_mosaicml(cfg.hf) else "hf")
        start.source = {"init": "scratch", "model_config": config_dict(start.model_config), "vocab": start.source}
        start.weights, start.label = None, f"random init (architecture of {cfg.hf})"
        return start
    tok = data.get_tokenizer()
    path = _resolve_ckpt(cfg.ckpt) if cfg.ckpt else None
    if init == "scratch":
        if path is not None:  # the control: same architecture as the checkpoint, random weights
            mcfg = _load_ckpt(path, tok)[0].config
            src = {"init": "scratch", "model_config": config_dict(mcfg)}
            return Start(mcfg, None, tok, src, f"random init (architecture of {path})")
        mcfg = model.ModelConfig.preset(cfg.model)
        return Start(mcfg, None, tok, {"init": "scratch", "model_config": config_dict(mcfg)},
                     f"random init ({cfg.model})")
    if init != "ckpt":
        raise ConfigError(f"--init={init}: choose ckpt, scratch, hf or mosaicml")
    if path is None:
        where = Path(cfg.ckpt)
        how = "python train.py" if cfg.ckpt == GlueConfig.ckpt else f"python train.py --out_dir={cfg.ckpt}"
        raise GlueError(f"no pretrained checkpoint at {where}{' (no ckpt_*.pt inside)' if where.is_dir() else ''}: "
                        f"run `{how}` first (a few minutes on a CPU), or pass --ckpt=PATH to a train.py "
                        f"checkpoint or out_dir, or --init=scratch for a randomly initialized model.")
    mlm, ck = _load_ckpt(path, tok)
    src = {"init": "ckpt", "path": str(Path(path).resolve()), "step": ck.get("step")}
    return Start(mlm.config, encoder_weights(mlm), tok, src, f"pretrained {path} (step {ck.get('step')})")


def encoder_weights(m) -> dict:
    """What a classifier takes over: the encoder, and the [CLS] pooler when there is a trained one (HF BERT,
    or our MNLI-fine-tuned classifier). The classification layer is always new."""
    out = {"bert": m.bert.state_dict()}
    if hasattr(m, "pooler"):
        out["pooler"] = m.pooler.state_dict()
    return out


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
                        f"special tokens needs {tok.n_tokens}: the vocabulary does not match. Pretrain with "
                        f"train.py's default vocabulary, or use --init=hf for a WordPiece BERT folder.")
    return mlm, ck


@torch.no_grad()
def token_cosine(start: Start, n_sentences: int = 32) -> float:
    """Mean cosine similarity between the final hidden states of all real tokens of a few sentences of the
    sentiment sample. Random init gives about 0.5; an encoder whose pretraining collapsed (every token mapped
    to the same vector, the MLM predicting unigram frequencies) gives 1.0, and fine-tuning cannot use it."""
    bert = model.Bert(start.model_config).eval()
    bert.load_state_dict(start.weights["bert"])
    ex = read_tsv(TASKS["sentiment"], Path(TASKS["sentiment"].folder) / TASKS["sentiment"].files["dev"])
    enc = encode_examples(Examples(ex.a[:n_sentences], None, ex.labels[:n_sentences], ""), start.tokenizer, 64)
    b = collate(enc, list(range(len(enc))), start.tokenizer.pad_id)
    h, lay = bert(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    h = h.reshape(-1, h.shape[-1]).float()  # [T, d]
    h = h if lay.unpadded else h[lay.real_indices]  # [nnz, d]
    h = torch.nn.functional.normalize(h, dim=-1)
    return float((h @ h.T).mean())


def mnli_encoder_path(out_dir) -> Path:
    return Path(out_dir) / "mnli_encoder.pt"


def load_mnli_encoder(out_dir, start: Start) -> Optional[dict]:
    """The MNLI-fine-tuned encoder saved by this out_dir's MNLI run, if it started from the same place."""
    p = mnli_encoder_path(out_dir)
    if not p.is_file():
        return None
    ck = torch.load(p, map_location="cpu", weights_only=True)
    if ck.get("source") != start.source or ck.get("model_config") != config_dict(start.model_config):
        print(f"note: {p} was fine-tuned from another starting point ({ck.get('source')}); not using it")
        return None
    return ck["weights"]


# --------------------------------------------------------------------------------------------------------------
# fine-tuning one (task, seed)


def effective_recipe(cfg: GlueConfig, task: Task) -> dict:
    r = task.recipe
    return {"lr": cfg.lr or r.lr, "weight_decay": r.weight_decay if cfg.weight_decay < 0 else cfg.weight_decay,
            "epochs": cfg.epochs or r.epochs, "batch_size": cfg.batch_size or r.batch_size, "max_len": cfg.max_len,
            "warmup": cfg.warmup, "max_steps": cfg.max_steps,
            "max_train_examples": cfg.max_train_examples or r.train_examples,
            "dtype": cfg.dtype, "betas": [0.9, 0.98], "eps": 1e-6}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total`. step counts from 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def predict(clf, data: Encoded, cfg: GlueConfig, pad_id: int, dist: Dist, regression: bool) -> np.ndarray:
    """Predictions for every row (class ids, or scores for regression); each rank does a share, then gathers."""
    clf.eval()
    mine = np.arange(dist.rank, len(data), dist.world)
    mine = mine[np.argsort([len(data.ids[i]) for i in mine], kind="stable")]  # similar lengths together
    out = []
    for s in range(0, len(mine), cfg.eval_batch_size):
        idx = mine[s:s + cfg.eval_batch_size]
        b = collate(data, idx, pad_id)
        with perf.autocast(dist.device, cfg.dtype):
            logits, _ = clf(b["input_ids"].to(dist.device), b["attention_mask"].to(dist.device),
                            b["token_type_ids"].to(dist.device))
        logits = logits.float()  # [B, num_labels]
        out.append(logits[:, 0] if regression else logits.argmax(-1))
    pred = torch.cat(out).cpu().numpy() if out else np.zeros(0)
    pairs = list(zip(mine.tolist(), pred.tolist()))
    if dist.world > 1:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, pairs)
        pairs = [p for g in gathered for p in g]
    result = np.zeros(len(data), np.float64 if regression else np.int64)
    for i, p in pairs:
        result[i] = p
    return result


def maybe_compile(clf, cfg: GlueConfig, device: torch.device) -> bool:
    """--compile (unset: on CUDA only, as in train.py): the encoder layers compiled in place, regionally."""
    on = resolve_compile(cfg.compile, device)[0]
    if on:
        model.compile_model(clf)
    return on


def finetune(cfg: GlueConfig, task: Task, start: Start, weights: Optional[dict], seed: int,
             train: Encoded, evals: dict, dist: Dist) -> dict:
    """Fine-tune from `weights` (None: random init); return the final evaluation's metrics, speed, weights."""
    rec = effective_recipe(cfg, task)
    torch.manual_seed(seed)  # the head's init and dropout
    clf = model.SequenceClassifier(dataclasses.replace(start.model_config, hidden_dropout=cfg.dropout),
                                   task.num_labels)
    if weights is not None:
        clf.bert.load_state_dict(weights["bert"])
        if "pooler" in weights and hasattr(clf, "pooler"):  # a trained [CLS] pooler, when the head pools [CLS]
            clf.pooler.load_state_dict(weights["pooler"])
    clf.to(dist.device)
    maybe_compile(clf, cfg, dist.device)  # before DDP; predict runs the same compiled layers
    ddp = wrap_ddp(clf, dist.device) if dist.world > 1 else clf

    # decoupled weight decay: torch's AdamW decays by lr * weight_decay, so weight_decay = wd / peak_lr
    # gives a decay of wd * lr / peak_lr per step. As in train.py, biases and LayerNorm are not decayed.
    params = list(clf.parameters())
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=rec["weight_decay"] / rec["lr"]),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=rec["lr"], betas=(0.9, 0.98), eps=1e-6,
                            fused=dist.device.type in ("cuda", "cpu"))
    B, n = rec["batch_size"], len(train)
    # batch starts of an epoch; the last batch may be partial (under DDP it must still give every rank a row)
    starts = [s for s in range(0, n, B) if min(B, n - s) >= dist.world]
    steps_per_epoch = len(starts)
    total = math.ceil(rec["epochs"] * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    tag = f"{task.name} seed {seed}"
    if dist.master:
        print(f"{tag} | {n:,} train rows, batch {B}, {total} steps ({rec['epochs']:g} epoch(s)"
              f"{', capped by --max_steps' if cfg.max_steps and total == cfg.max_steps else ''}), "
              f"lr {rec['lr']:g}, wd {rec['weight_decay']:g}, warmup {warmup}")
    clf.train()
    loss_acc = torch.zeros((), device=dist.device)
    tokens = tok_window = 0
    t0 = t_window = time.perf_counter()
    step = 0
    while step < total:
        perm = np.random.default_rng([seed, step // steps_per_epoch]).permutation(n)  # new order each epoch
        for s in starts:
            if step >= total:
                break
            mine = np.array_split(perm[s:s + B], dist.world)[dist.rank]  # this rank's share of the global batch
            n_global = len(perm[s:s + B])
            b = collate(train, mine, start.tokenizer.pad_id)
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
            step += 1
            if step % cfg.log_interval == 0 or step == total:  # the only host syncs of the loop
                stats = torch.stack([loss_acc, torch.tensor(float(tok_window), device=dist.device)])
                if dist.world > 1:
                    torch.distributed.all_reduce(stats)  # the global batches' mean losses, real tokens of all ranks
                loss_sum, n_tok = stats.tolist()
                dt = time.perf_counter() - t_window
                k = step % cfg.log_interval or cfg.log_interval
                eta = (time.perf_counter() - t0) / step * (total - step)
                if dist.master:
                    print(f"{tag} | step {step}/{total} | loss {loss_sum / k:.4f} | "
                          f"lr {sched.get_last_lr()[0]:.2e} | {dt / k * 1000:.0f} ms/step | {n_tok / dt:,.0f} tok/s | "
                          f"eta {int(eta // 60)}:{int(eta % 60):02d}", flush=True)
                loss_acc.zero_()
                tokens += n_tok
                tok_window, t_window = 0, time.perf_counter()
    train_s = time.perf_counter() - t0
    result = {}
    for split, split_data in evals.items():
        pred = predict(clf, split_data, cfg, start.tokenizer.pad_id, dist, task.classes is None)
        for m, v in compute_metrics(task.name, pred, split_data.labels).items():
            result[m if len(evals) == 1 else f"{m}_{split}"] = v
    result.update(steps=total, train_seconds=round(train_s, 2), train_tokens=int(tokens),
                  train_tokens_per_s=round(tokens / max(train_s, 1e-9), 1))
    if dist.master:
        print(f"{tag} | final: " + ", ".join(f"{m} {result[m] * 100:.2f}" for m in metric_names(task))
              + f" | {result['train_tokens_per_s']:,.0f} tok/s over {train_s:.0f} s", flush=True)
    return {"metrics": result, "weights": encoder_weights(clf), "classifier": clf.classifier.state_dict()}


def majority_baseline(task: Task, train: Examples, evals: dict) -> Optional[dict]:
    """Metrics of always predicting the training set's most frequent class (classification tasks only)."""
    if task.classes is None:
        return None
    major = int(np.bincount(train.labels).argmax())
    out = {}
    for split, ex in evals.items():
        for m, v in compute_metrics(task.name, np.full(len(ex.labels), major), ex.labels).items():
            out[m if len(evals) == 1 else f"{m}_{split}"] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# results.json: written atomically after every finished (task, seed)


def atomic_write_json(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def summarize(res: dict) -> dict:
    """Per task: the mean of each metric over the finished seeds, and the task score (the mean of those means).
    The GLUE average, as in the paper: the mean over tasks of the task scores (MNLI: mean of m and mm)."""
    scores = {}
    for name, tr in res["tasks"].items():
        names = metric_names(TASKS[name])
        seeds = [s for s in tr["seeds"].values()]
        if not seeds:
            continue
        tr["mean"] = {m: float(np.mean([s[m] for s in seeds])) for m in names}
        tr["score"] = float(np.mean([tr["mean"][m] for m in names]))
        if name in GLUE_TASKS:
            scores[name] = tr["score"]
    res["glue_average"] = float(np.mean(list(scores.values()))) if scores else None
    res["glue_tasks"] = [t for t in GLUE_TASKS if t in scores]
    res["glue_complete"] = len(scores) == len(GLUE_TASKS)
    return res


def describe(source: dict) -> str:
    if source["init"] == "scratch":
        mc = source["model_config"]
        return f"random init ({mc['n_layers']} layers, d_model {mc['d_model']})"
    if source["init"] == "hf":
        return f"HF BERT {source['path']}"
    if source["init"] == "mosaicml":
        return f"MosaicBERT {source['path']}"
    return f"pretrained {source['path']} (step {source.get('step')})"


def markdown_table(res: dict) -> str:
    lines = [f"Fine-tuned from {describe(res['source'])}", "",
             "| task | start | seed | metrics (x100) | score |", "|---|---|---|---|---|"]
    for name, tr in res["tasks"].items():
        names = metric_names(TASKS[name])
        fmt = lambda d: ", ".join(f"{m} {d[m] * 100:.2f}" for m in names)
        for seed, s in tr["seeds"].items():
            lines.append(f"| {name} | {tr.get('start', '')} | {seed} | {fmt(s)} | "
                         f"{np.mean([s[m] for m in names]) * 100:.2f} |")
        if "mean" in tr:
            lines.append(f"| **{name}** | | mean of {len(tr['seeds'])} | {fmt(tr['mean'])} | "
                         f"**{tr['score'] * 100:.2f}** |")
        if tr.get("majority"):
            lines.append(f"| {name} | majority class | | {fmt(tr['majority'])} | "
                         f"{np.mean([tr['majority'][m] for m in names]) * 100:.2f} |")
    if res.get("glue_average") is not None:
        n = len(res["glue_tasks"])
        lines += ["", f"**GLUE average: {res['glue_average'] * 100:.2f}**" + (
            "" if res["glue_complete"] else f" (partial: {n}/8 tasks: {', '.join(res['glue_tasks'])})")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# the sweep


def check_config(cfg: GlueConfig):
    choices = dict(dtype=perf.DTYPES, device=("auto", "cpu", "cuda"), parallel=("runs", "batches"),
                   init=("auto", "ckpt", "scratch", "hf", "mosaicml"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    for key in ("seeds", "max_steps", "batch_size"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be >= 0 (0: the recipe's / no limit)")
    if cfg.max_train_examples < -1:
        raise ConfigError("--max_train_examples must be -1 (all), 0 (the recipe's label budget) or a count")
    if cfg.epochs < 0 or cfg.lr < 0 or not 0 <= cfg.warmup < 1 or cfg.max_len < 8 or cfg.eval_batch_size < 1:
        raise ConfigError("--epochs and --lr must be >= 0 (0: the recipe's), --warmup in [0, 1), --max_len >= 8, "
                          "--eval_batch_size >= 1")


def parse_tasks(cfg: GlueConfig) -> list[str]:
    text = cfg.tasks or ("all" if cfg.glue_dir else "sentiment")
    names = []
    for t in text.split(","):
        t = t.strip().lower().replace("-", "")
        names += list(GLUE_TASKS) if t == "all" else [t]
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


def save_mnli_encoder(out: dict, start: Start, seed: int, out_dir: Path):
    """The MNLI-fine-tuned encoder RTE, MRPC and STS-B start from (the classifier: for hf.export only)."""
    model.atomic_save({"weights": out["weights"], "model_config": config_dict(start.model_config),
                       "source": start.source, "seed": seed, "classifier": out["classifier"]},
                      str(mnli_encoder_path(out_dir)))


def finetune_seeds_across_ranks(cfg: GlueConfig, task: Task, start: Start, weights: Optional[dict], seeds: list,
                                todo: list, train: Encoded, evals: dict, dist: Dist, res: dict):
    """--parallel=runs under torchrun: rank r fine-tunes todo[r::world], each run alone on its own device (no DDP,
    no gradient all-reduce), exactly as a 1-process run would. Rank 0 gathers the metrics into results.json."""
    out_dir = Path(cfg.out_dir)
    solo = Dist(0, 1, dist.device)
    mine = {}
    for seed in todo[dist.rank::dist.world]:
        out = finetune(cfg, task, start, weights, seed, train, evals, solo)
        if task.name == "mnli" and seed == seeds[0]:  # whichever rank ran it writes it
            save_mnli_encoder(out, start, seed, out_dir)
        mine[str(seed)] = out["metrics"]
    gathered = [None] * dist.world
    torch.distributed.all_gather_object(gathered, mine)
    if dist.master:
        done = {k: v for g in gathered for k, v in g.items()}
        res["tasks"][task.name]["seeds"].update({str(s): done[str(s)] for s in todo})  # in seed order
        atomic_write_json(summarize(res), out_dir / "results.json")
    torch.distributed.barrier()  # the results and the MNLI encoder are on disk before the next task


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
    out_dir = Path(cfg.out_dir)
    res = None
    if dist.master and start.weights is not None:
        cos = token_cosine(start)
        if cos > 0.99:
            print(f"warning: {start.label}: its encoder maps every token to nearly the same vector (mean cosine "
                  f"{cos:.4f} between tokens of different sentences; about 0.5 at random init). Its pretraining "
                  f"collapsed or never got going, and fine-tuning from it will likely not beat the majority class. "
                  f"Pretrain longer or with a lower lr; --init=scratch is the control.", flush=True)
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            res = load_results(out_dir, start.source)
        except GlueError as e:
            res = e
        print(f"starting point: {start.label}; results in {out_dir / 'results.json'}")
    res = broadcast_object(res, dist)  # rank 0 read it; every rank learns what is done (or the error)
    if isinstance(res, GlueError):
        raise res

    for name in tasks:
        task = TASKS[name]
        rec = effective_recipe(cfg, task)
        n_seeds = cfg.seeds or task.recipe.seeds
        seeds = [cfg.seed + i for i in range(n_seeds)]
        tr = res["tasks"].get(name)
        if tr is not None and tr["recipe"] != rec:
            raise GlueError(f"{out_dir / 'results.json'} has {name} results for another recipe ({tr['recipe']}); "
                            f"now {rec}. Pass another --out_dir to keep both.")
        todo = [s for s in seeds if tr is None or str(s) not in tr["seeds"]]
        if not todo:
            if dist.master:
                print(f"{name}: seeds {seeds} already in results.json, skipping")
            continue
        # where it starts: the MNLI-fine-tuned encoder for RTE, MRPC, STS-B when there is one
        weights, start_name = start.weights, ("pretrained" if start.weights is not None else "scratch")
        if name in FROM_MNLI and cfg.from_mnli:
            mnli = load_mnli_encoder(out_dir, start)
            if mnli is not None:
                weights, start_name = mnli, "mnli"
            elif dist.master:
                print(f"note: {name} starts from the {start_name} model: no MNLI-fine-tuned encoder in {out_dir} "
                      f"(run --tasks=mnli first, or include mnli in --tasks, to follow the paper)")
        if tr is not None and tr.get("start") != start_name:
            raise GlueError(f"{out_dir / 'results.json'} has {name} seeds started from {tr.get('start')}, this run "
                            f"would start from {start_name}; pass another --out_dir")
        t0 = time.perf_counter()
        splits = load_task(task, cfg.glue_dir, cfg.skip_bad_rows)
        splits["train"] = label_subset(splits["train"], rec["max_train_examples"])
        train = encode_examples(splits["train"], start.tokenizer, cfg.max_len)
        evals = {s: encode_examples(splits[s], start.tokenizer, cfg.max_len) for s in eval_splits(task)}
        if dist.master:
            print(f"{name}: {len(train):,} train / " + ", ".join(f"{len(e):,} {s}" for s, e in evals.items())
                  + f" examples from {splits['train'].origin} (tokenized in {time.perf_counter() - t0:.1f} s)")
        tr = res["tasks"].setdefault(name, {"recipe": rec, "start": start_name, "seeds": {}})
        tr["majority"] = majority_baseline(task, splits["train"], {s: splits[s] for s in evals})
        if dist.world > 1 and cfg.parallel == "runs":
            finetune_seeds_across_ranks(cfg, task, start, weights, seeds, todo, train, evals, dist, res)
            continue
        for seed in todo:
            out = finetune(cfg, task, start, weights, seed, train, evals, dist)
            if dist.master:
                if name == "mnli" and seed == seeds[0]:  # the encoder RTE, MRPC, STS-B start from
                    save_mnli_encoder(out, start, seed, out_dir)
                tr["seeds"][str(seed)] = out["metrics"]
                atomic_write_json(summarize(res), out_dir / "results.json")
            if dist.world > 1:
                torch.distributed.barrier()  # the MNLI encoder is on disk before any rank looks for it
    res = summarize(res)
    if dist.master:
        table = markdown_table(res)
        (out_dir / "results.md").write_text(table + "\n")
        print("\n" + table + "\n")
    return res


def demo_summary(main: dict, control: Optional[dict], main_label: str, out_dir: Optional[Path] = None):
    """The sentiment demo's comparison: pretrained vs from-scratch control vs majority class, as the median over
    seeds with the spread; written to out_dir/demo.json as fractions ({"pretrained": [per seed], "scratch": [...],
    "majority": rate}) when there is a control."""
    tr = main["tasks"].get("sentiment")
    if not tr or "mean" not in tr:
        return
    accs = lambda t: [s["accuracy"] for s in t["seeds"].values()]
    rows = [(main_label, accs(tr))]
    ctl = control["tasks"].get("sentiment") if control else None
    if ctl and ctl["seeds"]:
        rows.append(("from scratch (control: same architecture and recipe)", accs(ctl)))
    majority = tr["majority"]["accuracy"]
    rec = tr["recipe"]
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
        if out_dir is not None:
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
