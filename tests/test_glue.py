"""glue.py and glue_tasks.py: metrics against hand-worked values, every GLUE TSV layout, bad-input errors, the
WordPiece tokenizer (hf.WordPiece) against transformers, fine-tuning that learns, resuming a sweep, the MNLI -> RTE
start, HF and DDP runs.

The fixtures in tests/fixtures/glue/ are small files in GLUE's distributed layouts (download_glue_data.py):
headers, column counts and label spellings as in the real files, and sentences with unbalanced `"` quotes.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoint
import glue
import glue_tasks
import hf
import model
from conftest import require_transformers

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures" / "glue"
TINY = dict(init="scratch", ckpt="", model="mosaic-bert-tiny", max_steps=2, log_interval=1000, eval_batch_size=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain little from a second thread, and on a machine whose two cores are shared, two OpenMP
    threads waiting on each other were measured 20-50x slower per step (26 ms vs 580-1370 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_accuracy_and_f1_hand_worked():
    # tp=2 (rows 0, 3), tn=1 (row 1), fp=1 (row 2), fn=1 (row 4): acc 3/5, F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    m = glue.compute_metrics("mrpc", [1, 0, 1, 1, 0], [1, 0, 0, 1, 1])
    assert m == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert glue.compute_metrics("qqp", [0, 0, 0], [0, 0, 0]) == {"accuracy": 1.0, "f1": 0.0}  # no positives at all
    assert glue.compute_metrics("qqp", [1, 1, 1, 1], [1, 0, 0, 1])["f1"] == pytest.approx(2 * 2 / (4 + 2))
    for t in ("mnli", "qnli", "sst2", "rte", "sentiment"):
        assert glue.compute_metrics(t, [2, 1, 0, 1], [2, 1, 1, 1]) == {"accuracy": 0.75}


def test_matthews_hand_worked_and_degenerate():
    # same confusion as above: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2-1)/sqrt(3*3*2*2) = 1/6
    assert glue.compute_metrics("cola", [1, 0, 1, 1, 0], [1, 0, 0, 1, 1])["mcc"] == pytest.approx(1 / 6)
    assert glue.compute_metrics("cola", [1, 0, 1, 0], [1, 0, 1, 0])["mcc"] == pytest.approx(1.0)
    assert glue.compute_metrics("cola", [0, 1, 0, 1], [1, 0, 1, 0])["mcc"] == pytest.approx(-1.0)
    # a constant predictor: the denominator is 0; GLUE's convention (and sklearn's) is MCC = 0, not NaN
    assert glue.compute_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0]) == {"mcc": 0.0}
    assert glue.compute_metrics("cola", [0, 0, 0], [0, 0, 0]) == {"mcc": 0.0}
    # logits are accepted: argmax over the last axis
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0], [0.5, 0.4]])
    assert glue.compute_metrics("cola", logits, [1, 0, 1, 0])["mcc"] == pytest.approx(1.0)


def test_correlations_hand_worked_and_degenerate():
    assert glue.compute_metrics("stsb", [1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    # deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): sum of products 4, sums of squares 5 and 5 -> 0.8
    assert glue.compute_metrics("stsb", [1, 2, 3, 4], [1, 3, 2, 4])["pearson"] == pytest.approx(0.8)
    # Spearman with a tie: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    m = glue.compute_metrics("stsb", np.array([[1.0], [2.0], [2.0], [3.0]]), [0.5, 1.0, 4.0, 5.0])
    assert m["spearman"] == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert m["pearson"] == pytest.approx(np.corrcoef([1, 2, 2, 3], [0.5, 1.0, 4.0, 5.0])[0, 1])
    # monotone but non-linear: Spearman 1, Pearson below 1
    m = glue.compute_metrics("stsb", [1, 2, 3, 10], [1, 2, 3, 4])
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.99
    # a constant predictor: correlation is undefined; we return 0.0, never NaN
    assert glue.compute_metrics("stsb", [2.5, 2.5, 2.5], [1.0, 2.0, 5.0]) == {"pearson": 0.0, "spearman": 0.0}
    np.testing.assert_allclose(glue_tasks.rankdata([3, 1, 3, 2, 3]), [4, 1, 4, 2, 4])


# Independent second formulas (written differently from glue.py's) and hypothesis-drawn predictions and labels:
# multi-class, constant predictors (drawn often: `constant`), small value sets for ties.


def ref_f1(pred, label):
    """F1 from precision and recall of class 1; 0 when nothing is predicted or labelled positive."""
    tp = sum(p == 1 and t == 1 for p, t in zip(pred, label))
    predicted, actual = sum(p == 1 for p in pred), sum(t == 1 for t in label)
    if tp == 0:
        return 0.0
    precision, recall = tp / predicted, tp / actual
    return 2 * precision * recall / (precision + recall)


def ref_mcc_binary(pred, label):
    """The phi coefficient from the explicit confusion counts of a {0, 1} problem."""
    tp = sum(p == 1 and t == 1 for p, t in zip(pred, label))
    tn = sum(p == 0 and t == 0 for p, t in zip(pred, label))
    fp = sum(p == 1 and t == 0 for p, t in zip(pred, label))
    fn = sum(p == 0 and t == 1 for p, t in zip(pred, label))
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / den if den else 0.0


def ref_mcc_cov(pred, label, k):
    """Multi-class MCC as a correlation of one-hot matrices: cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)),
    cov(A, B) = sum over classes of the covariance of column k of A with column k of B."""
    X, Y = np.eye(k)[pred], np.eye(k)[label]  # [N, K] one-hot
    Xc, Y_c = X - X.mean(0), Y - Y.mean(0)
    cxy, cxx, cyy = (Xc * Y_c).sum(), (Xc * Xc).sum(), (Y_c * Y_c).sum()
    return cxy / np.sqrt(cxx * cyy) if cxx * cyy > 0 else 0.0


def ref_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def ref_ranks(x):
    """Average ranks by counting: rank = #smaller + (#equal + 1) / 2."""
    return [sum(b < a for b in x) + (sum(b == a for b in x) + 1) / 2 for a in x]


@st.composite
def class_predictions(draw, k_max=4):
    k = draw(st.integers(2, k_max))
    n = draw(st.integers(1, 40))
    label = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    if draw(st.booleans()) and draw(st.booleans()):  # a constant predictor, a quarter of the time
        pred = [draw(st.integers(0, k - 1))] * n
    else:
        pred = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return k, pred, label


METRICS = settings(deadline=None, max_examples=150)


@METRICS
@given(class_predictions(k_max=2))
def test_binary_metrics_equal_second_formulas(case):
    """Accuracy, F1 (precision/recall form) and MCC (tp/tn/fp/fn form) on drawn binary predictions."""
    _, pred, label = case
    m = glue.compute_metrics("mrpc", pred, label)
    assert m["accuracy"] == pytest.approx(sum(p == t for p, t in zip(pred, label)) / len(label))
    assert m["f1"] == pytest.approx(ref_f1(pred, label), abs=1e-12)
    assert glue.compute_metrics("cola", pred, label)["mcc"] == pytest.approx(ref_mcc_binary(pred, label), abs=1e-12)


@METRICS
@given(class_predictions(k_max=5))
def test_multiclass_mcc_and_accuracy_equal_the_covariance_form(case):
    k, pred, label = case
    assert glue_tasks.matthews_corr(np.array(pred), np.array(label)) == pytest.approx(ref_mcc_cov(pred, label, k),
                                                                                   abs=1e-12)
    acc = glue.compute_metrics("mnli", np.eye(k)[pred] * 2.0 - 1.0, label)["accuracy"]  # logits: argmax taken
    assert acc == pytest.approx(np.mean(np.array(pred) == np.array(label)))


values_st = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.5, 3.0, 5.0]), min_size=2, max_size=30)  # ties galore


@METRICS
@given(x=values_st, data=st.data())
def test_correlations_equal_second_formulas_with_ties(x, data):
    y = data.draw(st.lists(st.sampled_from([0.0, 1.0, 1.5, 4.0, 5.0]), min_size=len(x), max_size=len(x)))
    m = glue.compute_metrics("stsb", x, y)
    assert m["pearson"] == pytest.approx(ref_pearson(x, y), abs=1e-9)
    assert m["spearman"] == pytest.approx(ref_pearson(ref_ranks(x), ref_ranks(y)), abs=1e-9)


@settings(deadline=None, max_examples=60)
@given(x=values_st, data=st.data())
def test_metrics_match_scipy(x, data):
    stats = pytest.importorskip("scipy.stats")  # optional, test-only
    y = data.draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=len(x), max_size=len(x)))
    m = glue.compute_metrics("stsb", x, y)
    np.testing.assert_allclose(glue_tasks.rankdata(x), stats.rankdata(x))
    if len(set(x)) > 1 and len(set(y)) > 1:
        assert m["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)
        assert m["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)


@settings(deadline=None, max_examples=60)
@given(class_predictions(k_max=4))
def test_metrics_match_sklearn(case):
    metrics = pytest.importorskip("sklearn.metrics")  # optional, test-only (not in requirements.txt)
    k, pred, label = case
    assert glue_tasks.matthews_corr(np.array(pred), np.array(label)) == pytest.approx(
        metrics.matthews_corrcoef(label, pred), abs=1e-12)
    assert glue_tasks.accuracy(np.array(pred), np.array(label)) == pytest.approx(metrics.accuracy_score(label, pred))
    if k == 2:
        assert glue.compute_metrics("qqp", pred, label)["f1"] == pytest.approx(
            metrics.f1_score(label, pred, zero_division=0.0), abs=1e-12)


def test_compute_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown task"):
        glue.compute_metrics("wnli", [1], [1])
    with pytest.raises(ValueError, match="predictions"):
        glue.compute_metrics("rte", [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        glue.compute_metrics("stsb", [1.0, float("nan")], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------------------------
# GLUE's TSV layouts


EXPECTED = {  # task: (train rows, dev rows per split, first train example (a, b, label))
    "mnli": (9, {"m": 6, "mm": 6}, ("The cat sat on the mat all afternoon.", "A cat was sitting.", 0)),
    "qqp": (8, {"dev": 6}, ("How do I learn to cook rice?", "What is the best way to cook rice?", 1)),
    "qnli": (8, {"dev": 6}, ("When did the war end?", "The war ended in 1945 after six years.", 0)),
    "sst2": (8, {"dev": 6}, ("hide new secretions from the parental units ", None, 0)),
    "cola": (8, {"dev": 6}, ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1)),
    "stsb": (8, {"dev": 6}, ("A plane is taking off.", "An air plane is taking off.", 5.0)),
    "mrpc": (8, {"dev": 6}, ("Amrozi accused his brother, whom he called \"the witness\", of distorting his evidence.",
                             "Referring to him as only \"the witness\", Amrozi accused his brother of distorting "
                             "his evidence.", 1)),
    "rte": (8, {"dev": 6}, ("Dana Reeve, the widow of the actor, died on Monday.", "Dana Reeve died.", 0)),
}


@pytest.mark.parametrize("task", glue.GLUE_TASKS)
def test_every_task_layout_parses(task):
    """Each fixture is in the real layout: header (or CoLA's none), column positions, label spellings. Rows whose
    sentences open a `"` without closing it stay separate rows (csv.QUOTE_NONE)."""
    splits = glue.load_task(glue.TASKS[task], str(FIX))
    n_train, n_dev, (a, b, label) = EXPECTED[task]
    assert len(splits["train"].a) == len(splits["train"].labels) == n_train
    assert {s: len(e.a) for s, e in splits.items() if s != "train"} == n_dev
    ex = splits["train"]
    assert (ex.a[0], ex.b[0] if ex.b else None, ex.labels[0].item()) == (a, b, pytest.approx(label))
    if task == "stsb":
        assert ex.labels.dtype == np.float32
    else:
        assert ex.labels.dtype == np.int64 and set(ex.labels.tolist()) == set(range(glue.TASKS[task].num_labels))


def test_sentiment_sample_and_quotes():
    sp = glue.load_task(glue.TASKS["sentiment"], "")
    assert len(sp["train"].a) == 11752 and len(sp["dev"].a) == 1000
    assert sp["dev"].labels.mean() == pytest.approx(0.588)
    # MNLI's second row opens a quote it never closes; a quoting reader would swallow the following lines
    mnli = glue.load_task(glue.TASKS["mnli"], str(FIX))["train"]
    assert mnli.a[1] == "\"We never open on Sundays, the owner said." and mnli.labels.tolist()[:3] == [0, 0, 2]


def _copy_task(tmp_path, folder):
    shutil.copytree(FIX / folder, tmp_path / folder)
    return tmp_path / folder


def _append(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def test_wrong_column_count_names_file_line_and_fix(tmp_path):
    d = _copy_task(tmp_path, "RTE")
    _append(d / "train.tsv", "8\tA sentence with a stray\ttab.\tAnother one.\tentailment")
    with pytest.raises(glue.GlueError) as e:
        glue.load_task(glue.TASKS["rte"], str(tmp_path))
    msg = str(e.value)
    assert str(d / "train.tsv") in msg and "line 10" in msg and "expected 4" in msg and "found 5" in msg
    assert "--skip_bad_rows" in msg
    ex = glue.load_task(glue.TASKS["rte"], str(tmp_path), skip_bad_rows=True)["train"]
    assert len(ex.a) == 8
    # CoLA has no header: four columns expected
    d = _copy_task(tmp_path, "CoLA")
    _append(d / "dev.tsv", "gj04\t1\tno original label column")
    with pytest.raises(glue.GlueError, match=r"dev.tsv, line 7: expected 4 tab-separated columns, found 3"):
        glue.load_task(glue.TASKS["cola"], str(tmp_path))


@pytest.mark.parametrize("folder, task, file, row, error", [
    ("STS-B", "stsb", "dev.tsv", "6\tmain-captions\tMSRvid\t2012test\t0007\tnone\tnone\tA man.\tA woman.\tabout four",
     r"STS-B/dev.tsv, line 8: the stsb score 'about four' is not a number"),
    ("RTE", "rte", "dev.tsv", "6\tA man sleeps.\tA man is awake.\tcontradiction",
     r"RTE/dev.tsv, line 8: label 'contradiction' is not one of entailment, not_entailment"),
    ("SST-2", "sst2", "train.tsv", "a fine film\tpositive",
     r"SST-2/train.tsv, line 10: label 'positive' is not one of 0, 1"),
])
def test_bad_labels(tmp_path, folder, task, file, row, error):
    d = _copy_task(tmp_path, folder)
    _append(d / file, row)
    with pytest.raises(glue.GlueError, match=error):
        glue.load_task(glue.TASKS[task], str(tmp_path))


def test_missing_task_file(tmp_path):
    d = _copy_task(tmp_path, "MNLI")
    (d / "dev_mismatched.tsv").unlink()
    with pytest.raises(glue.GlueError, match=r"MNLI/dev_mismatched.tsv not found.*download_glue_data.py"):
        glue.load_task(glue.TASKS["mnli"], str(tmp_path))


def test_hub_errors_say_what_to_do(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(glue.GlueError, match=r"rte from the hub.*--glue_dir"):
        glue.load_task(glue.TASKS["rte"], "")
    calls = []

    def fake(name, task, split):  # the hub's column names and split names
        calls.append((name, task, split))
        return {"premise": ["p"], "hypothesis": ["h"], "label": [2]}
    monkeypatch.setattr(datasets, "load_dataset", fake)
    sp = glue.load_task(glue.TASKS["mnli"], "")
    assert [c[2] for c in calls] == ["train", "validation_matched", "validation_mismatched"]
    assert (sp["mm"].a, sp["mm"].b, sp["mm"].labels.tolist()) == (["p"], ["h"], [2])


# ---------------------------------------------------------------------------------------------------------------
# tokenization


def test_truncate_pair_is_longest_first():
    for la in range(0, 12):
        for lb in range(0, 12):
            for budget in range(0, 14):
                a, b = list(range(la)), list(range(100, 100 + lb))
                ta, tb = glue_tasks.truncate_pair(a, b, budget)
                assert ta == a[:len(ta)] and tb == b[:len(tb)]  # cut from the end
                assert len(ta) + len(tb) == min(la + lb, budget)
                short, long_, kept_short = (la, lb, len(ta)) if la <= lb else (lb, la, len(tb))
                assert kept_short == min(short, budget // 2)  # the longer segment is cut first
                if la + lb > budget:
                    assert len(ta) + len(tb) == budget


def test_pair_encoding_layout():
    class Tok:  # one id per character
        cls_id, sep_id, pad_id = 1, 2, 0

        def encode(self, text):
            return [ord(c) for c in text]
    ex = glue.Examples(["abc", "abcdefgh"], ["xy", "uvwxyz"], np.array([0, 1]), "test")
    enc = glue.encode_examples(ex, Tok(), max_len=10)
    assert enc.ids[0].tolist() == [1, 97, 98, 99, 2, 120, 121, 2] and enc.n_first[0] == 5
    # 8 + 6 tokens, budget 7: b keeps 3 (half), a keeps 4
    assert enc.ids[1].tolist() == [1, 97, 98, 99, 100, 2, 117, 118, 119, 2]
    b = glue.collate(enc, [0, 1], pad_id=0)
    assert b["input_ids"].shape == (2, 10) and b["attention_mask"][0].tolist() == [1] * 8 + [0] * 2
    assert b["token_type_ids"][0].tolist() == [0] * 5 + [1] * 3 + [0] * 2
    assert b["token_type_ids"][1].tolist() == [0] * 6 + [1] * 4
    single = glue.encode_examples(glue.Examples(["a" * 20], None, np.array([1]), "t"), Tok(), max_len=8)
    assert single.ids[0].tolist() == [1] + [97] * 6 + [2] and single.n_first[0] == 8


SENTENCES = [
    "Hello, World! This isn't a test... or is it?",
    "Héllo Wörld: naïve café résumé, ÀÉÎÕÜ façade",
    "中文字符 mixed with English and 日本語",
    "tabs\tand\u00a0non-breaking\u3000spaces\nnewlines",
    "control\x00chars\x07and zero\u200bwidth \ufffd replacement",
    "emoji 😀 and symbols ©®™ $100 & 50% off! #hashtag @user",
    "a" * 120 + " long-word and un-believ-ably hyphen-ated",
    "UPPER lower MiXeD Ünïcödé İstanbul straße",
    "\"Quoted\" 'single' (parens) [brackets] {braces} <angle> ~tilde` ^caret_under|bar\\slash",
    "numbers 3.14159 1,000,000 2nd 3rd 4th 10:30pm",
]


def _make_vocab(folder: Path, texts, lower: bool):
    """A small but real WordPiece vocabulary: specials, frequent whole words, every character alone and as
    a '##' continuation, and a few sub-word pieces, so greedy longest-match has work to do."""
    import re
    import collections
    words = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower() if lower else t))
    chars = sorted({c for t in texts for c in (t.lower() if lower else t) if not c.isspace()} - set("😀"))
    pieces = ["##ing", "##ed", "##s", "##ly", "##er", "##able", "##ment", "un", "re", "##ion", "##ation", "film",
              "##ful", "movie", "good", "bad", "the", "and", "##'", "believ"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, n in words.most_common() if n >= 3]
    vocab += chars + ["##" + c for c in chars] + pieces
    vocab = list(dict.fromkeys(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    return vocab


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_matches_transformers(tmp_path, lower):
    transformers = require_transformers()
    sample = glue.load_task(glue.TASKS["sentiment"], "")["dev"].a[:300]
    _make_vocab(tmp_path, sample[:200] + SENTENCES, lower)
    ours = hf.WordPiece.from_folder(tmp_path)
    theirs = transformers.BertTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert ours.lower == lower and theirs.do_lower_case == lower
    texts = SENTENCES + sample
    n_pieces = 0
    for t in texts:
        mine = ours.tokenize(t)
        assert mine == theirs.tokenize(t), t
        n_pieces += sum(p.startswith("##") for p in mine)
    assert n_pieces > 50  # the vocabulary really exercises WordPiece continuations
    # pairs: [CLS] a [SEP] b [SEP], token types, longest-first truncation to max_len
    ex = glue.Examples(texts[:-1], texts[1:], np.zeros(len(texts) - 1, np.int64), "t")
    enc = glue.encode_examples(ex, ours, max_len=24)
    for i in range(len(ex.a)):
        ref = theirs(ex.a[i], ex.b[i], truncation=True, max_length=24)
        assert enc.ids[i].tolist() == ref["input_ids"], (ex.a[i], ex.b[i])
        types = [0] * enc.n_first[i] + [1] * (len(enc.ids[i]) - enc.n_first[i])
        assert types == ref["token_type_ids"]


def test_pair_truncation_matches_transformers(tmp_path):
    transformers = require_transformers()
    _make_vocab(tmp_path, ["hello world"], lower=True)
    theirs = transformers.BertTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ours = hf.WordPiece.from_folder(tmp_path)
    for la in range(1, 8):
        for lb in range(1, 8):
            ex = glue.Examples([" ".join(["hello"] * la)], [" ".join(["world"] * lb)], np.zeros(1, np.int64), "t")
            for max_len in range(3, 13):
                ids = glue.encode_examples(ex, ours, max_len).ids[0].tolist()
                assert ids == theirs(ex.a[0], ex.b[0], truncation=True, max_length=max_len)["input_ids"]


def test_wordpiece_accent_options(tmp_path):
    _make_vocab(tmp_path, ["Cafe café"], lower=False)
    vocab = tmp_path / "vocab.txt"
    assert hf.WordPiece(vocab, do_lower_case=False).tokenize("Café") == ["C", "##a", "##f", "##é"]
    assert hf.WordPiece(vocab, do_lower_case=False, strip_accents=True).tokenize("Café") == [
        "C", "##a", "##f", "##e"]
    assert hf.WordPiece(vocab, do_lower_case=True).tokenize("CAFÉ!") == ["c", "##a", "##f", "##e", "[UNK]"]
    assert hf.WordPiece(vocab, do_lower_case=True, strip_accents=False).tokenize("CAFÉ") == [
        "c", "##a", "##f", "##é"]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _save_ckpt(path: Path, mcfg, state=None, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = model.build(mcfg)
    ck = {"model": state if state is not None else m.state_dict(), "model_config": dataclasses.asdict(mcfg),
          "step": 7, "tokenizer": "gpt2", **extra}
    checkpoint.atomic_save(ck, str(path))
    return path


def test_checkpoint_mismatches_are_clear(tmp_path):
    cfg = glue.GlueConfig(out_dir=str(tmp_path / "o"))
    small = model.ModelConfig.preset("mosaic-bert-tiny", vocab_size=1000)
    p = _save_ckpt(tmp_path / "v" / "ckpt_0000007.pt", small)
    with pytest.raises(glue.GlueError, match=r"ckpt_0000007.pt has vocab_size=1000 .* needs 50261"):
        glue.load_start(dataclasses.replace(cfg, ckpt=str(tmp_path / "v")), "ckpt")
    tiny = model.ModelConfig.preset("mosaic-bert-tiny")
    p = _save_ckpt(tmp_path / "t" / "ckpt_0000007.pt", tiny, tokenizer="bert-wordpiece")
    with pytest.raises(glue.GlueError, match=r"trained with tokenizer 'bert-wordpiece'.*--init=hf"):
        glue.load_start(dataclasses.replace(cfg, ckpt=str(p)), "ckpt")
    wrong = model.build(model.ModelConfig.preset("mosaic-bert-tiny", n_layers=1)).state_dict()
    p = _save_ckpt(tmp_path / "w" / "ckpt_0000007.pt", tiny, state=wrong)
    with pytest.raises(glue.GlueError, match=r"(?s)could not load checkpoint .*w/ckpt_0000007.pt.*Missing key"):
        glue.load_start(dataclasses.replace(cfg, ckpt=str(p)), "ckpt")
    with pytest.raises(glue.GlueError, match=r"no pretrained checkpoint at .*nowhere: "
                                             r"run `python train.py --out_dir=.*nowhere` first"):
        glue.load_start(dataclasses.replace(cfg, ckpt=str(tmp_path / "nowhere")), "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(glue.GlueError, match=r"no ckpt_\*.pt inside"):
        glue.load_start(dataclasses.replace(cfg, ckpt=str(tmp_path / "empty")), "ckpt")


def test_collapsed_pretraining_is_flagged(tmp_path, capsys):
    """A checkpoint whose encoder gives every token the same vector (what a diverged or collapsed pretraining
    leaves) gets a warning instead of a silent majority-class score."""
    tiny = model.ModelConfig.preset("mosaic-bert-tiny")
    torch.manual_seed(0)
    m = model.build(tiny)
    fresh = _save_ckpt(tmp_path / "fresh" / "ckpt_0000007.pt", tiny, state=m.state_dict())
    with torch.no_grad():  # the last LayerNorm outputs its bias whatever the input
        m.bert.layers[-1].mlp_norm.weight.zero_()
        m.bert.layers[-1].mlp_norm.bias.fill_(1.0)
    collapsed = _save_ckpt(tmp_path / "collapsed" / "ckpt_0000007.pt", tiny, state=m.state_dict())
    cfg = glue.GlueConfig(ckpt=str(fresh), out_dir=str(tmp_path / "o"))
    assert glue.token_cosine(glue.load_start(cfg, "ckpt")) < 0.9
    assert glue.token_cosine(glue.load_start(dataclasses.replace(cfg, ckpt=str(collapsed)), "ckpt")) > 0.999
    glue.run(dataclasses.replace(cfg, ckpt=str(collapsed), tasks="rte", glue_dir=str(FIX), seeds=1, max_steps=1,
                                 log_interval=1000))
    assert "maps every token to nearly the same vector" in capsys.readouterr().out


def test_demo_without_checkpoint_tells_to_run_train(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "glue.py"), f"--ckpt={tmp_path / 'none'}",
                        f"--out_dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"run `python train.py --out_dir={tmp_path / 'none'}` first" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "glue.py"), "--tasks=wnli"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown task wnli" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning


def test_finetuning_beats_the_majority_class(tmp_path):
    """The recipe's machinery learns: a tiny MosaicBERT fine-tuned on 6,000 sentences of the sentiment sample
    for one epoch clearly beats always answering the majority class (58.8% of the dev set). From a random init:
    a pretraining of a few dozen steps, all the test budget allows, does not help a tiny model (it was measured
    to be slower to fine-tune), so the control is the honest test of the fine-tuning loop."""
    cfg = glue.GlueConfig(tasks="sentiment", out_dir=str(tmp_path), init="scratch", ckpt="", model="mosaic-bert-tiny",
                          epochs=1, lr=1e-3, batch_size=16, max_train_examples=6000, seeds=1, log_interval=100)
    res = glue.run(cfg)
    tr = res["tasks"]["sentiment"]
    assert tr["majority"]["accuracy"] == pytest.approx(0.588)
    assert tr["mean"]["accuracy"] > tr["majority"]["accuracy"] + 0.05, tr
    assert tr["seeds"]["0"]["train_tokens_per_s"] > 0 and tr["seeds"]["0"]["steps"] == 375


def test_demo_label_budget_summary_and_demo_json(tmp_path, capsys):
    """The sentiment demo fine-tunes on its recipe's label budget (-1: all); demo_summary prints the medians, the
    per-seed scores and their spread, and writes demo.json as fractions."""
    task = glue.TASKS["sentiment"]
    assert glue.effective_recipe(glue.GlueConfig(), task)["max_train_examples"] == task.recipe.train_examples == 1000
    assert glue.effective_recipe(glue.GlueConfig(max_train_examples=-1), task)["max_train_examples"] == -1
    assert glue.effective_recipe(glue.GlueConfig(), glue.TASKS["rte"])["max_train_examples"] == 0
    with pytest.raises(glue.ConfigError, match="max_train_examples"):
        glue.check_config(glue.GlueConfig(max_train_examples=-2))
    rec = glue.effective_recipe(glue.GlueConfig(), task)
    res = lambda accs: {"tasks": {"sentiment": {"recipe": rec, "mean": {"accuracy": float(np.mean(accs))},
                                                "majority": {"accuracy": 0.588},
                                                "seeds": {str(i): {"accuracy": a} for i, a in enumerate(accs)}}}}
    glue.demo_summary(res([0.70, 0.74, 0.71]), res([0.60, 0.66, 0.65]), "pretrained", tmp_path)
    out = capsys.readouterr().out
    assert "| pretrained | 71.0 | 70.0, 74.0, 71.0 | 70.0-74.0 |" in out and "| 65.0 |" in out and "58.8" in out
    assert "pretraining buys +6.0 points" in out and "1000 labelled" in out
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo == {"pretrained": [0.70, 0.74, 0.71], "scratch": [0.60, 0.66, 0.65], "majority": 0.588}


def test_sweep_resumes_without_redoing_finished_pairs(tmp_path, monkeypatch):
    cfg = glue.GlueConfig(tasks="rte,mrpc", glue_dir=str(FIX), out_dir=str(tmp_path), seeds=2, **TINY)
    real = glue.finetune
    calls = []

    def crash_on_second_mrpc(cfg_, task, start, weights, seed, *a):
        if task.name == "mrpc" and seed == 1:
            raise KeyboardInterrupt  # the sweep is interrupted here
        calls.append((task.name, seed))
        return real(cfg_, task, start, weights, seed, *a)
    monkeypatch.setattr(glue, "finetune", crash_on_second_mrpc)
    with pytest.raises(KeyboardInterrupt):
        glue.run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(saved["tasks"]["rte"]["seeds"]) == ["0", "1"] and list(saved["tasks"]["mrpc"]["seeds"]) == ["0"]
    assert calls == [("rte", 0), ("rte", 1), ("mrpc", 0)]

    calls.clear()
    monkeypatch.setattr(glue, "finetune", lambda *a: calls.append((a[1].name, a[4])) or real(*a))
    res = glue.run(cfg)
    assert calls == [("mrpc", 1)]  # only the missing pair
    assert sorted(res["tasks"]["mrpc"]["seeds"]) == ["0", "1"]
    assert not list(tmp_path.glob("*.tmp"))
    calls.clear()
    glue.run(cfg)
    assert calls == []
    # a changed recipe is not mixed into the same results
    with pytest.raises(glue.GlueError, match="another recipe"):
        glue.run(dataclasses.replace(cfg, lr=1e-3))


def test_each_run_has_its_own_result_file_and_resume_reads_it(tmp_path, monkeypatch):
    """Every finished (task, seed) writes out_dir/runs/<task>_<seed>.json. A run whose metrics never reached
    results.json (under torchrun another rank ran it, and the job died before rank 0 gathered the task) is taken
    from its file on resume, not run again; a file from another recipe is not."""
    cfg = glue.GlueConfig(tasks="rte", glue_dir=str(FIX), out_dir=str(tmp_path), seeds=2, **TINY)
    first = glue.run(cfg)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rte_0.json", "rte_1.json"]
    saved = json.loads((tmp_path / "results.json").read_text())
    del saved["tasks"]["rte"]["seeds"]["1"]  # as if the task was interrupted before the gather
    (tmp_path / "results.json").write_text(json.dumps(saved))
    real, calls = glue.finetune, []
    monkeypatch.setattr(glue, "finetune", lambda *a: calls.append((a[1].name, a[4])) or real(*a))
    res = glue.run(cfg)
    assert calls == []
    assert res["tasks"]["rte"]["seeds"]["1"] == first["tasks"]["rte"]["seeds"]["1"]
    run = json.loads((tmp_path / "runs" / "rte_1.json").read_text())
    run["recipe"]["lr"] = 123.0  # another recipe's file: ignored, the seed runs again
    (tmp_path / "runs" / "rte_1.json").write_text(json.dumps(run))
    (tmp_path / "results.json").write_text(json.dumps(saved))
    glue.run(cfg)
    assert calls == [("rte", 1)]


def test_all_tasks_results_json_schema_and_mnli_start(tmp_path, capsys):
    """--tasks=all on the fixtures: every task runs, RTE/MRPC/STS-B start from the MNLI-fine-tuned encoder,
    results.json holds per-seed values, means and the GLUE average over the eight tasks."""
    cfg = glue.GlueConfig(tasks="rte,all", glue_dir=str(FIX), out_dir=str(tmp_path), seeds=1, **TINY)
    res = glue.run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert list(saved["tasks"]) == ["mnli", "rte", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc"]
    assert (tmp_path / "mnli_encoder.pt").is_file()
    for name, tr in saved["tasks"].items():
        task = glue.TASKS[name]
        assert tr["start"] == ("mnli" if name in glue.FROM_MNLI else "scratch")
        assert set(tr["mean"]) == set(glue.metric_names(task))
        assert set(tr["seeds"]["0"]) >= set(glue.metric_names(task)) | {"train_tokens_per_s", "steps"}
        assert tr["recipe"]["lr"] == task.recipe.lr and tr["recipe"]["batch_size"] == task.recipe.batch_size
        assert tr["score"] == pytest.approx(np.mean([tr["mean"][m] for m in glue.metric_names(task)]))
    assert set(saved["tasks"]["mnli"]["mean"]) == {"accuracy_m", "accuracy_mm"}
    assert saved["tasks"]["stsb"]["majority"] is None
    assert saved["glue_complete"] and saved["glue_average"] == pytest.approx(
        np.mean([saved["tasks"][t]["score"] for t in glue.GLUE_TASKS]))
    out = capsys.readouterr().out
    assert "| **mnli** |" in out and "GLUE average:" in out and (tmp_path / "results.md").is_file()


def test_mnli_start_missing_is_said(tmp_path, capsys):
    cfg = glue.GlueConfig(tasks="rte", glue_dir=str(FIX), out_dir=str(tmp_path), seeds=1, **TINY)
    res = glue.run(cfg)
    assert res["tasks"]["rte"]["start"] == "scratch" and not res["glue_complete"]
    assert "no MNLI-fine-tuned encoder" in capsys.readouterr().out
    # an out_dir holding results from another starting point is refused
    other = dataclasses.replace(cfg, model="bert-tiny")
    with pytest.raises(glue.GlueError, match="holds results fine-tuned from"):
        glue.run(other)


def _tiny_hf_folder(folder: Path, vocab_extra=0):
    transformers = require_transformers()
    texts = [*glue.load_task(glue.TASKS["rte"], str(FIX))["train"].a, *SENTENCES]
    vocab = _make_vocab(folder, texts, lower=True)
    config = transformers.BertConfig(vocab_size=len(vocab) - vocab_extra, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertForPreTraining(config).save_pretrained(str(folder))  # as bert-base-uncased: with a pooler


def test_hf_bert_folder_fine_tunes_with_its_wordpiece_vocab(tmp_path, monkeypatch):
    """--hf: the run fine-tunes the folder's weights, pooler included, on the folder's WordPiece ids. At a
    negligible lr the dev logits glue.py scores equal those of transformers' own BertModel (its pooler) on the
    same ids, followed by the classification layer; and those ids are transformers' BertTokenizer's for the
    dev pairs. Fails if the weights, the pooler or the vocabulary are not the folder's."""
    transformers = require_transformers()
    _tiny_hf_folder(tmp_path / "hf")
    cfg = glue.GlueConfig(tasks="rte", glue_dir=str(FIX), hf=str(tmp_path / "hf"), out_dir=str(tmp_path / "o"),
                          seeds=1, max_steps=2, log_interval=1000, lr=1e-12, dtype="float32", eval_batch_size=4)
    start = glue.load_start(cfg, "hf")
    assert isinstance(start.tokenizer, hf.WordPiece) and "pooler" in start.weights
    seen = []  # (input_ids, attention_mask, token_type_ids, logits) of every evaluation batch
    forward = model.SequenceClassifier.forward

    def spy(self, ids, mask, types=None, labels=None):
        logits, loss = forward(self, ids, mask, types, labels)
        if labels is None:
            seen.append((ids, mask, types, logits.detach(), self.classifier))
        return logits, loss
    monkeypatch.setattr(model.SequenceClassifier, "forward", spy)
    res = glue.run(cfg)  # --init=auto picks hf when --hf is given
    assert res["source"]["init"] == "hf" and res["tasks"]["rte"]["seeds"]["0"]["steps"] == 2
    hf_bert = transformers.BertModel.from_pretrained(str(tmp_path / "hf")).eval()
    theirs = transformers.BertTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    dev = glue.load_task(glue.TASKS["rte"], str(FIX))["dev"]
    expected_ids = sorted(theirs(a, b, truncation=True, max_length=128)["input_ids"] for a, b in zip(dev.a, dev.b))
    got_ids = sorted(ids[m.bool()].tolist() for ids, mask, *_ in seen for ids, m in zip(ids, mask))
    assert got_ids == expected_ids
    with torch.no_grad():
        for ids, mask, types, logits, classifier in seen:
            pooled = hf_bert(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
            torch.testing.assert_close(logits, classifier(pooled), atol=1e-4, rtol=1e-4)
    _tiny_hf_folder(tmp_path / "bad", vocab_extra=5)  # config.json's vocab_size smaller than vocab.txt
    with pytest.raises(glue.GlueError, match=r"vocab.txt has \d+ tokens but .*vocab_size="):
        glue.load_start(dataclasses.replace(cfg, hf=str(tmp_path / "bad")), "hf")


# Runs glue.py's main (under torchrun or alone) and records, per process, each training forward's loss and row
# count and every array of predictions scored, by wrapping SequenceClassifier.forward and glue.compute_metrics.
GLUE_RECORDER = """
import json, os, sys
sys.path.insert(0, {root!r})
import numpy as np, torch, glue, model
torch.set_num_threads(1)
record = {{"losses": [], "preds": []}}
forward, metrics = model.SequenceClassifier.forward, glue.compute_metrics
def spy_forward(self, *a, **k):
    logits, loss = forward(self, *a, **k)
    if loss is not None:
        record["losses"].append([loss.item(), len(logits)])
    return logits, loss
def spy_metrics(task, pred, label):
    record["preds"].append(np.asarray(pred).tolist())
    return metrics(task, pred, label)
model.SequenceClassifier.forward, glue.compute_metrics = spy_forward, spy_metrics
glue.main(sys.argv[2:])
with open(sys.argv[1] + "." + os.environ.get("RANK", "0"), "w") as f:
    json.dump(record, f)
"""


def free_port() -> int:  # a fixed port collides with another checkout's tests running on the same machine
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks_then_one_process(tmp_path, args):
    """glue.py with `args` through the recorder script, under torchrun on 2 gloo ranks, then in 1 process:
    yields (name, stdout, out_dir, each process's record)."""
    script = tmp_path / "recorder.py"
    script.write_text(GLUE_RECORDER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    f"--master_port={free_port()}"]), ("one", [sys.executable])):
        out = tmp_path / name
        r = subprocess.run(launcher + [str(script), str(out / "rec"), f"--out_dir={out}"] + args,
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        yield name, r.stdout, out, [json.loads(p.read_text()) for p in sorted(out.glob("rec.*"))]


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """The DDP path: two CPU processes (gloo) split each global batch (unevenly: 8 rows in batches of 5 give 3+2
    and 2+1 rows) and the evaluation. Dropout off and fp32, the per-step loss of the global batch, the logged
    loss and the final dev predictions equal a 1-process run's. Catches an unweighted mean of per-rank losses,
    in the gradient or in the log."""
    args = ["--tasks=rte", f"--glue_dir={FIX}", "--init=scratch", "--ckpt=", "--model=mosaic-bert-tiny",
            "--max_steps=4", "--epochs=3", "--batch_size=5", "--seeds=1", "--device=cpu", "--dropout=0",
            "--dtype=float32", "--log_interval=1", "--eval_batch_size=4", "--parallel=batches"]
    runs = {}
    for name, stdout, out, recs in two_ranks_then_one_process(tmp_path, args):
        assert stdout.count("final:") == 1
        # the global batch's mean loss per step, from each rank's mean over its rows
        per_rank = [np.array(rec["losses"]) for rec in recs]
        rows_per_step = sum(x[:, 1] for x in per_rank)
        step_loss = sum(x[:, 0] * x[:, 1] for x in per_rank) / rows_per_step
        logged = [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]
        runs[name] = dict(step_loss=step_loss, rows=rows_per_step, logged=logged, preds=recs[0]["preds"],
                          res=json.loads((out / "results.json").read_text())["tasks"]["rte"]["seeds"]["0"])
    one, two = runs["one"], runs["two"]
    assert one["rows"].tolist() == two["rows"].tolist() == [5, 3, 5, 3]
    assert [len(x) for x in (one["logged"], two["logged"])] == [4, 4]
    np.testing.assert_allclose(two["step_loss"], one["step_loss"], rtol=1e-5)
    for run in (one, two):
        np.testing.assert_allclose(run["logged"], run["step_loss"], atol=6e-5)  # printed with 4 decimals
    assert one["preds"] == two["preds"] and len(one["preds"]) >= 1
    assert one["res"]["accuracy"] == two["res"]["accuracy"] and one["res"]["steps"] == two["res"]["steps"] == 4


def test_torchrun_two_ranks_split_the_runs_and_equal_one_process(tmp_path):
    """--parallel=runs (the default under torchrun): 2 gloo ranks share a task's 3 seeds, each run fine-tuned
    alone on its rank (no DDP). Every (task, seed) trains exactly once, on one rank, and results.json holds the
    same metrics as a 1-process run's (dropout on: each run's RNG comes from its seed, not from its rank)."""
    args = ["--tasks=rte", f"--glue_dir={FIX}", "--init=scratch", "--ckpt=", "--model=mosaic-bert-tiny",
            "--max_steps=2", "--batch_size=8", "--seeds=3", "--device=cpu", "--dtype=float32", "--log_interval=1",
            "--eval_batch_size=16"]
    runs = {}
    for name, stdout, out, recs in two_ranks_then_one_process(tmp_path, args):
        assert [stdout.count(f"rte seed {s} | final:") for s in range(3)] == [1, 1, 1], stdout[-3000:]
        runs[name] = dict(losses=[[x[0] for x in rec["losses"]] for rec in recs],
                          preds=[rec["preds"] for rec in recs],
                          seeds=json.loads((out / "results.json").read_text())["tasks"]["rte"]["seeds"])
    (one,), (rank0, rank1) = runs["one"]["losses"], runs["two"]["losses"]  # 2 training forwards per seed
    assert len(one) == 6 and rank0 == one[0:2] + one[4:6] and rank1 == one[2:4]  # seeds 0, 2 on rank 0; 1 on rank 1
    # each seed's dev predictions, after the majority-class baseline's (scored once per task on every rank)
    (p_one,), (p0, p1) = runs["one"]["preds"], runs["two"]["preds"]
    assert len(p_one) == 4 and p0 == [p_one[0], p_one[1], p_one[3]] and p1 == [p_one[0], p_one[2]]
    assert list(runs["two"]["seeds"]) == list(runs["one"]["seeds"]) == ["0", "1", "2"]
    for seed, one in runs["one"]["seeds"].items():
        two = runs["two"]["seeds"][seed]
        for key in ("accuracy", "steps", "train_tokens"):
            assert two[key] == one[key], (seed, key, two[key], one[key])


def test_fine_tuning_compiles_on_cuda_by_default(monkeypatch):
    """glue.py compiles the encoder layers on CUDA unless told not to (as train.py does); the CPU stays eager.
    Checked on device objects: the compile itself is replaced, so no GPU is needed."""
    seen = []
    monkeypatch.setattr(glue.model, "compile_model", lambda m: seen.append(m))
    clf = object()
    cfg = glue.GlueConfig()
    assert glue.maybe_compile(clf, cfg, torch.device("cuda", 0)) and seen == [clf]
    assert not glue.maybe_compile(clf, cfg, torch.device("cpu")) and seen == [clf]
    assert not glue.maybe_compile(clf, dataclasses.replace(cfg, compile=False), torch.device("cuda", 0))
    assert glue.maybe_compile(clf, dataclasses.replace(cfg, compile=True), torch.device("cpu")) and len(seen) == 2
