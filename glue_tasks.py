"""The GLUE tasks as the MosaicBERT paper fine-tunes them: the task table with each task's recipe (lr, decoupled
weight decay, epochs, batch size, seeds), readers for GLUE's TSVs and the hub, the [CLS] a [SEP] b [SEP] encoding,
the metrics in numpy (fractions; x100 when printed) and a sweep's scores (the GLUE average). glue.py runs them."""

import csv
import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

GLUE_TASKS = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")
FROM_MNLI = ("rte", "mrpc", "stsb")  # these start from the MNLI-fine-tuned encoder


class GlueError(ValueError):
    """Bad input (a malformed TSV, a missing file, a mismatched checkpoint). The message says what to do."""


# --- tasks and the paper's recipe

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
    folder: str                          # GLUE TSV layout: the task's folder,
    files: dict                          # split -> file name (eval splits: every key but 'train'),
    cols: tuple[int, Optional[int], int] # the columns of a, b, label (-1: last),
    n_cols: int = 0                      # the column count of header-less files (0: a header row gives it)
    hub: tuple[str, Optional[str]] = ("sentence", None)  # hub layout: column names of a and b, split names
    hub_splits: Optional[dict] = None

    @property
    def num_labels(self) -> int:
        return 1 if self.classes is None else len(self.classes)


BIN = ("0", "1")
TASKS = {t.name: t for t in [
    Task("mnli", ("accuracy",), ("entailment", "neutral", "contradiction"), Recipe(5e-5, 5e-6, 3, 48, 1),
         "MNLI", {"train": "train.tsv", "m": "dev_matched.tsv", "mm": "dev_mismatched.tsv"}, (8, 9, -1),
         hub=("premise", "hypothesis"),
         hub_splits={"train": "train", "m": "validation_matched", "mm": "validation_mismatched"}),
    Task("qqp", ("accuracy", "f1"), BIN, Recipe(3e-5, 3e-6, 5, 16, 1),
         "QQP", {"train": "train.tsv", "dev": "dev.tsv"}, (3, 4, 5), hub=("question1", "question2")),
    Task("qnli", ("accuracy",), ("entailment", "not_entailment"), Recipe(1e-5, 1e-6, 10, 16, 1),
         "QNLI", {"train": "train.tsv", "dev": "dev.tsv"}, (1, 2, 3), hub=("question", "sentence")),
    Task("sst2", ("accuracy",), BIN, Recipe(3e-5, 3e-6, 3, 16, 3),
         "SST-2", {"train": "train.tsv", "dev": "dev.tsv"}, (0, None, 1)),
    Task("cola", ("mcc",), BIN, Recipe(5e-5, 5e-6, 10, 32, 4),
         "CoLA", {"train": "train.tsv", "dev": "dev.tsv"}, (3, None, 1), n_cols=4),
    Task("stsb", ("pearson", "spearman"), None, Recipe(3e-5, 3e-6, 10, 32, 5),
         "STS-B", {"train": "train.tsv", "dev": "dev.tsv"}, (7, 8, -1), hub=("sentence1", "sentence2")),
    Task("mrpc", ("accuracy", "f1"), BIN, Recipe(8e-5, 8e-6, 10, 32, 5),
         "MRPC", {"train": "train.tsv", "dev": "dev.tsv"}, (3, 4, 0), hub=("sentence1", "sentence2")),
    Task("rte", ("accuracy",), ("entailment", "not_entailment"), Recipe(1e-5, 1e-5, 3, 16, 5),
         "RTE", {"train": "train.tsv", "dev": "dev.tsv"}, (1, 2, 3), hub=("sentence1", "sentence2")),
    # Not GLUE: the offline demo, Rotten Tomatoes (assets/); 1,000 of its 11,752 labels: few, where pretraining counts
    Task("sentiment", ("accuracy",), BIN, Recipe(2e-4, 2e-6, 5, 32, 3, train_examples=1000),
         str(Path(__file__).resolve().parent / "assets"),
         {"train": "rotten_tomatoes_train.tsv.gz", "dev": "rotten_tomatoes_dev.tsv.gz"}, (0, None, 1)),
]}


def eval_splits(task: Task) -> list[str]:
    return [s for s in task.files if s != "train"]


def metric_names(task: Task) -> list[str]:
    """Names in results.json: MNLI's accuracy is reported per dev set (accuracy_m, accuracy_mm)."""
    return list(task.metrics) if len(task.files) == 2 else [f"{m}_{s}" for s in eval_splits(task) for m in task.metrics]


# --- metrics (numpy)

def accuracy(pred, label) -> float:
    return float(np.mean(pred == label)) if len(label) else 0.0


def f1_binary(pred, label) -> float:
    """F1 of the positive class (1). 0.0 when there are no positive predictions and no positive labels."""
    tp, fp = int(np.sum((pred == 1) & (label == 1))), int(np.sum((pred == 1) & (label != 1)))
    fn = int(np.sum((pred != 1) & (label == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corr(pred, label) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004; the binary phi coefficient for two classes).
    A constant predictor (or constant labels) makes the denominator 0: we return 0.0, the GLUE/sklearn convention."""
    classes = np.union1d(pred, label)
    p, t, k = np.searchsorted(classes, pred), np.searchsorted(classes, label), len(classes)
    conf = np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.float64)  # [true, pred]
    s, c, t_sum, p_sum = conf.sum(), np.trace(conf), conf.sum(1), conf.sum(0)
    den = math.sqrt((s * s - p_sum @ p_sum) * (s * s - t_sum @ t_sum))
    return float((c * s - t_sum @ p_sum) / den) if den > 0 else 0.0


def pearson_corr(x, y) -> float:
    """Pearson correlation. 0.0 when either side is constant (the correlation is undefined there)."""
    x, y = (np.asarray(v, np.float64) - np.mean(v) for v in (x, y))
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / den) if den > 0 else 0.0


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (scipy.stats.rankdata's 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = np.asarray(x)[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(xs), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman_corr(x, y) -> float:
    """Spearman correlation: Pearson of the (average-tie) ranks. 0.0 when either side is constant."""
    return pearson_corr(rankdata(x), rankdata(y)) if len(x) else 0.0


METRICS = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corr, "pearson": pearson_corr,
           "spearman": spearman_corr}


def compute_metrics(task: str, predictions, labels) -> dict:
    """The task's GLUE metrics as fractions: {'accuracy'}, {'accuracy', 'f1'}, {'mcc'} or {'pearson', 'spearman'}.
    predictions: class ids [N], or logits [N, C] (argmax taken); for stsb, scores [N] or [N, 1]. Degenerate cases
    (a constant side, no positives) give 0.0, not NaN; NaN or inf predictions raise ValueError (training diverged)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    t, pred, label = TASKS[task], np.asarray(predictions), np.asarray(labels)
    if t.classes is None:
        pred = pred.reshape(len(pred), -1)[:, 0].astype(np.float64) if pred.ndim > 1 else pred.astype(np.float64)
        label = label.astype(np.float64)
    elif pred.ndim == 2:
        pred = pred.argmax(-1)
    if pred.shape != label.shape or pred.ndim != 1:
        raise ValueError(f"{task}: predictions {pred.shape} and labels {label.shape} must be [N] (or logits [N, C])")
    if pred.dtype.kind == "f" and not np.all(np.isfinite(pred)):
        raise ValueError(f"{task}: predictions contain NaN or inf (did training diverge? try a lower --lr)")
    return {m: METRICS[m](pred, label) for m in t.metrics}


# --- reading GLUE: the distributed TSVs (download_glue_data.py layout) or the hub

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
            score = math.nan
        if not math.isfinite(score):
            raise GlueError(f"{where}: the {task.name} score {raw!r} is not a number. Fix the line (STS-B scores are "
                            f"numbers from 0 to 5 in the last column) or re-download the data.")
        return score
    if raw not in task.classes:
        raise GlueError(f"{where}: label {raw!r} is not one of {', '.join(task.classes)} for {task.name}. Fix the "
                        f"line, or check that the file is {task.name}'s (a test.tsv has no labels).")
    return task.classes.index(raw)


def read_tsv(task: Task, path: Path, skip_bad_rows: bool = False) -> Examples:
    """One split from its GLUE TSV, read with csv.QUOTE_NONE: sentences contain `"`, which merge lines otherwise."""
    if not path.is_file():
        raise GlueError(f"{path} not found. --glue_dir must hold GLUE in download_glue_data.py's layout ({task.folder}/"
                        f"{', '.join(task.files.values())}), or leave it empty to read the hub (nyu-mll/glue).")
    ia, ib, il = task.cols
    pairs, labels, skipped = [], [], 0
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        n_cols = task.n_cols or len(next(reader, []))
        if max(ia, ib or 0, il) >= n_cols:  # a header-less task's n_cols always fits
            raise GlueError(f"{path}, line 1: the header has {n_cols} columns (0: the file is empty), {task.name} "
                            f"needs at least {max(ia, ib or 0, il) + 1}. Is this {task.name}'s file?")
        for row in filter(None, reader):  # blank lines skipped
            where = f"{path}, line {reader.line_num}"
            if len(row) != n_cols:
                if skip_bad_rows:
                    skipped += 1
                    continue
                raise GlueError(f"{where}: expected {n_cols} tab-separated columns"
                                f"{'' if task.n_cols else ' (as in the header)'}, found {len(row)}. Fix or delete "
                                f"the line (a stray tab or newline in a sentence), or pass --skip_bad_rows.")
            pairs.append((row[ia], None if ib is None else row[ib]))
            labels.append(_parse_label(task, row[il], where))
    if skipped:
        print(f"warning: {path}: skipped {skipped} rows with a column count other than {n_cols} (--skip_bad_rows)")
    if not pairs:
        raise GlueError(f"{path}: no examples. Check that it is {task.name}'s file in GLUE's layout.")
    a, b = map(list, zip(*pairs))
    labels = np.asarray(labels, np.float32 if task.classes is None else np.int64)
    return Examples(a, b if ib is not None else None, labels, str(path))


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
    if not glue_dir and task.name != "sentiment":
        return {s: read_hub(task, s) for s in task.files}
    base = Path(task.folder) if task.name == "sentiment" else Path(glue_dir) / task.folder
    return {s: read_tsv(task, base / f, skip_bad_rows) for s, f in task.files.items()}


def label_subset(ex: Examples, budget: int) -> Examples:
    """A label budget: a fixed random subset of `budget` rows (the same for every seed, run and start; kept in file
    order), or all rows when budget <= 0 or the split is smaller. The linear probes in docs/log.md used it too."""
    if budget <= 0 or len(ex.a) <= budget:
        return ex
    keep = np.sort(np.random.default_rng(0).permutation(len(ex.a))[:budget])
    return Examples([ex.a[i] for i in keep], [ex.b[i] for i in keep] if ex.b else None, ex.labels[keep], ex.origin)


# --- encoding: GPT-2 BPE (data.get_tokenizer) for our checkpoints; BERT WordPiece (hf.WordPiece) for HF checkpoints

def truncate_pair(a: list, b: list, budget: int) -> tuple[list, list]:
    """Longest-first truncation to len(a) + len(b) <= budget, as HF's fast tokenizers (what the paper used): the
    shorter segment keeps min(its length, budget // 2) tokens, the longer one the rest; on a tie a is the shorter."""
    na = min(len(a), budget // 2) if len(a) <= len(b) else budget - min(len(b), budget // 2)
    return a[:na], b[:budget - na]


@dataclass
class Encoded:
    ids: list            # per example: int32 array [CLS] a [SEP] (b [SEP])
    n_first: np.ndarray  # tokens with token type 0 ([CLS] a [SEP])
    labels: np.ndarray

    def __len__(self):
        return len(self.ids)


def encode_examples(ex: Examples, tok, max_len: int) -> Encoded:
    """[CLS] a [SEP] b [SEP] with token types 0 (through the first [SEP]) and 1, truncated to max_len."""
    enc = getattr(tok, "encode_batch", None) or (lambda texts: [tok.encode(t) for t in texts])
    ta, tb = enc(ex.a), (enc(ex.b) if ex.b is not None else None)
    ids, n_first = [], np.empty(len(ta), np.int64)
    for i, a in enumerate(ta):
        a, b = (a[:max_len - 2], None) if tb is None else truncate_pair(a, tb[i], max_len - 3)
        seq = [tok.cls_id, *a, tok.sep_id] + ([*b, tok.sep_id] if b is not None else [])
        ids.append(np.asarray(seq, np.int32))
        n_first[i] = len(a) + 2
    return Encoded(ids, n_first, ex.labels)


def collate(data: Encoded, idx, pad_id: int) -> dict:
    """Pad the rows idx to their longest (the model unpads): input_ids, attention_mask, token_type_ids [B, S]."""
    idx = np.asarray(idx, dtype=np.int64)
    rows = [torch.from_numpy(data.ids[i].astype(np.int64)) for i in idx]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)  # [B, S]
    pos = torch.arange(input_ids.shape[1])[None, :]  # [1, S]
    mask = (pos < torch.tensor([len(r) for r in rows])[:, None]).long()
    types = (pos >= torch.from_numpy(data.n_first[idx])[:, None]).long() * mask  # 1 from b on, 0 on padding
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.from_numpy(data.labels[idx])}


# --- scoring a sweep: task scores, the GLUE average, the results table

def summarize(res: dict) -> dict:
    """Per task: the mean of each metric over the finished seeds, and the task score (the mean of those means).
    The GLUE average, as in the paper: the mean over tasks of the task scores (MNLI: mean of m and mm)."""
    scores = {}
    for name, tr in res["tasks"].items():
        names = metric_names(TASKS[name])
        if not tr["seeds"]:
            continue
        tr["mean"] = {m: float(np.mean([s[m] for s in tr["seeds"].values()])) for m in names}
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
    name = {"hf": "HF BERT", "mosaicml": "MosaicBERT"}.get(source["init"])
    return f"{name} {source['path']}" if name else f"pretrained {source['path']} (step {source.get('step')})"


def markdown_table(res: dict) -> str:
    lines = [f"Fine-tuned from {describe(res['source'])}", "",
             "| task | start | seed | metrics (x100) | score |", "|---|---|---|---|---|"]
    for name, tr in res["tasks"].items():
        names = metric_names(TASKS[name])
        fmt = lambda d: ", ".join(f"{m} {d[m] * 100:.2f}" for m in names)
        score = lambda d: np.mean([d[m] for m in names]) * 100
        for seed, s in tr["seeds"].items():
            lines.append(f"| {name} | {tr.get('start', '')} | {seed} | {fmt(s)} | {score(s):.2f} |")
        if "mean" in tr:
            lines.append(f"| **{name}** | | mean of {len(tr['seeds'])} | {fmt(tr['mean'])} | "
                         f"**{tr['score'] * 100:.2f}** |")
        if tr.get("majority"):
            lines.append(f"| {name} | majority class | | {fmt(tr['majority'])} | {score(tr['majority']):.2f} |")
    if res.get("glue_average") is not None:
        n = len(res["glue_tasks"])
        lines += ["", f"**GLUE average: {res['glue_average'] * 100:.2f}**" + (
            "" if res["glue_complete"] else f" (partial: {n}/8 tasks: {', '.join(res['glue_tasks'])})")]
    return "\n".join(lines)
