"""Tests for data.py and stream.py: tokenizer ids, masking statistics, world-size invariance, exact resumption,
loaders, bad input, C4 offline error and stream sharding. CPU only and offline (conftest.py sets HF_*_OFFLINE); ~5 s."""

import collections
import gzip
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import stream


def _sample_texts(n_chars=300_000):
    texts, total = [], 0
    with gzip.open(data.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            total += len(texts[-1])
            if total > n_chars:
                break
    return texts


def _write_jsonl(path, texts, **extra):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, **extra}) + "\n")
    return str(path)


def _words(i, n=40):
    return " ".join(f"w{i}x{j}" for j in range(n))


def _row_texts(batch):
    """The text of each [CLS] ... [SEP] window of each row (decode of unmasked rows)."""
    tok, out = data.get_tokenizer(), []
    for ids, am in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        for k in sorted(set(am) - {0}):
            window = [i for i, m in zip(ids, am) if m == k]
            assert window[0] == data.CLS_ID and window[-1] == data.SEP_ID
            out.append(tok.decode(window[1:-1]))
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_ids_equal_tiktoken_gpt2(monkeypatch):
    """Ids equal an Encoding built from tiktoken_ext.openai_public.gpt2()'s own parameters (ranks from the file,
    as the network is unreachable), on a slice of the embedded Wikipedia sample."""
    import tiktoken
    import tiktoken_ext.openai_public as public
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setattr(public, "data_gym_to_mergeable_bpe_ranks",
                        lambda **kw: load_tiktoken_bpe(str(data.GPT2_FILE)))
    params = public.gpt2()
    assert params["special_tokens"] == {"<|endoftext|>": 50256} and params["explicit_n_vocab"] == 50257
    ref = tiktoken.Encoding(**params)
    tok = data.get_tokenizer()
    texts = _sample_texts()
    assert tok.encode_batch(texts) == ref.encode_ordinary_batch(texts)
    assert [tok.encode(t) for t in texts[:3]] == [ref.encode_ordinary(t) for t in texts[:3]]
    assert tok.encode("Hello world") == [15496, 995]          # well-known GPT-2 ids
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_tokenizer_needs_no_pattern_from_tiktoken_ext(monkeypatch):
    """data.Tokenizer carries GPT-2's split regex (older tiktoken releases lack tiktoken_ext's r50k_pat_str): it
    builds without that name, and splits whitespace, contractions and digits as tiktoken's own pattern does."""
    import tiktoken
    import tiktoken_ext.openai_public as public
    from tiktoken.load import load_tiktoken_bpe

    ref_pattern = getattr(public, "r50k_pat_str", None)
    if ref_pattern is not None:
        monkeypatch.delattr(public, "r50k_pat_str")
    tok = data.Tokenizer()  # a fresh one (get_tokenizer caches), built without tiktoken_ext's pattern
    if ref_pattern is None:
        pytest.skip("this tiktoken has no r50k_pat_str to compare with (the tokenizer built without it)")
    ref = tiktoken.Encoding("ref", pat_str=ref_pattern, mergeable_ranks=load_tiktoken_bpe(str(data.GPT2_FILE)),
                            special_tokens={})
    texts = ["trailing   ", "  two\n\n\nlines \t\n end\n", "it's we'll they've I'd you're", "x  1234567 89",
             "\u00a0nbsp\u3000ideographic  ", "ésß中 -- ...!?", "'s'S 'll", "a\r\n b", " ", ""]
    assert [tok.encode(t) for t in texts] == [ref.encode_ordinary(t) for t in texts]


def test_special_ids_and_vocab():
    tok = data.get_tokenizer()
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (50257, 50258, 50259, 50260)
    assert tok.n_tokens == 50261 and tok.vocab_size == 50304 and tok.vocab_size % 64 == 0
    assert tok.decode([tok.cls_id, 15496, tok.mask_id, tok.sep_id, tok.pad_id]) == "[CLS]Hello[MASK][SEP][PAD]"
    # special-token text in a document is ordinary text, never a special id
    assert max(tok.encode("[CLS] <|endoftext|> [MASK]")) < 50256


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Z9'.,\n\t  ésß中-")), max_size=300), st.integers(0, 300))
def test_safe_prefix_tokens_are_a_prefix(text, n):
    """Truncate mode encodes only a prefix of long documents: its tokens must be exactly the document's first tokens."""
    tok = data.get_tokenizer()
    head = tok.encode(data._safe_prefix(text, n))
    assert head == tok.encode(text)[:len(head)]


def test_encode_docs_truncated_equals_full():
    texts = _sample_texts(100_000)
    full = data._encode_docs(texts)
    cut = data._encode_docs(texts, max_tokens=126)
    assert all(np.array_equal(c, f[:126]) for c, f in zip(cut, full))


# ---------------------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------------------
def test_masking_statistics():
    """30% of maskable tokens per row; of them 80% [MASK], 10% random BPE token, 10% unchanged."""
    rows = data._LocalRows(data._local_corpus("default", "train"), "chunk", 128)
    ids, _ = rows.build(np.arange(2000))
    inputs, labels = data.mlm_mask(ids, data.hash64(0, 1, 0, np.arange(2000)), 0.3)
    cand = ids < data.N_BPE
    chosen = labels != -100
    assert not chosen[~cand].any()
    assert abs(chosen.sum() / cand.sum() - 0.3) < 0.003
    assert (chosen.sum(1) >= 1).all()
    was, now = ids[chosen], inputs[chosen]
    frac_mask = (now == data.MASK_ID).mean()
    frac_same = (now == was).mean()
    frac_rand = ((now != was) & (now != data.MASK_ID)).mean()
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_same - 0.1) < 0.01 and abs(frac_rand - 0.1) < 0.01
    assert now[now != data.MASK_ID].max() < data.N_BPE                 # random tokens are never special
    assert np.array_equal(inputs[~chosen], ids[~chosen])
    assert np.array_equal(labels[chosen], ids[chosen])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(3, 40), st.floats(0.0, 0.99), st.integers(0, 2**63), st.data())
def test_masking_never_touches_specials(R, S, p, seed, draw):
    """Whatever the rows hold, [CLS]/[SEP]/[PAD]/[MASK]/<|endoftext|> are never chosen, labels hold the original id,
    and a row with n maskable tokens gets round(p * n) of them (at least 1 when p > 0)."""
    ids = np.array(draw.draw(st.lists(st.lists(
        st.one_of(st.integers(0, 50255), st.sampled_from([50256, 50257, 50258, 50259, 50260])),
        min_size=S, max_size=S), min_size=R, max_size=R)), np.int64)
    keys = data.hash64(seed, np.arange(R))
    inputs, labels = data.mlm_mask(ids, keys, p)
    chosen = labels != -100
    assert not chosen[ids >= data.N_BPE].any()
    assert np.array_equal(labels[chosen], ids[chosen]) and np.array_equal(inputs[~chosen], ids[~chosen])
    assert ((inputs[chosen] == data.MASK_ID) | (inputs[chosen] < data.N_BPE)).all()
    n = (ids < data.N_BPE).sum(1)
    want = np.where((n > 0) & (p > 0), np.maximum(np.floor(p * n + 0.5), 1), 0)
    assert np.array_equal(chosen.sum(1), want)
    again = data.mlm_mask(ids, keys, p)
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], labels)


def test_masks_change_with_epoch_but_not_with_batching():
    """A sample's mask depends on (seed, epoch, sample index) only: a new one each epoch, the same in any batch."""
    s = data.PretrainStream("default", mode="truncate", global_batch_size=95)   # 95 rows: one batch = one epoch
    e0, e1 = s.next_batch(), s.next_batch()
    orig = [[tuple(r) for r in torch.where(b["labels"] == -100, b["input_ids"], b["labels"]).tolist()]
            for b in (e0, e1)]
    assert sorted(orig[0]) == sorted(orig[1]) and orig[0] != orig[1]   # same 95 samples, reshuffled
    masks = [dict(zip(o, b["labels"])) for o, b in zip(orig, (e0, e1))]
    same = sum(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert same <= 2                                                  # fresh masks each epoch
    small = data.PretrainStream("default", mode="truncate", global_batch_size=5)
    parts = [small.next_batch() for _ in range(19)]
    assert _equal(e0, {k: torch.cat([p[k] for p in parts]) for k in e0})


# ---------------------------------------------------------------------------------------------------------------
# Order, world size, resumption
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", data.MODES)
def test_world_size_1_vs_2_and_4(mode):
    one = data.PretrainStream("default", mode=mode, global_batch_size=8, seed=3)
    many = {w: [data.PretrainStream("default", mode=mode, global_batch_size=8, seed=3, rank=r, world_size=w)
                for r in range(w)] for w in (2, 4)}
    for _ in range(3):
        ref = one.next_batch()
        for streams in many.values():
            parts = [s.next_batch() for s in streams]
            assert _equal(ref, {k: torch.cat([p[k] for p in parts]) for k in ref})


def test_resume_is_exact_local(tmp_path):
    """Stop, checkpoint (torch.save / weights_only load), resume: the same batches, across epoch boundaries and
    even on another world size."""
    src = _write_jsonl(tmp_path / "c.jsonl", [_words(i, 10 + 3 * i) for i in range(12)])
    kw = dict(mode="chunk", global_batch_size=6, seed=1)
    run = data.PretrainStream(src, **kw)
    head = [run.next_batch() for _ in range(7)]
    torch.save({"data": run.state_dict()}, tmp_path / "ck.pt")
    tail = [run.next_batch() for _ in range(12)]                  # crosses at least one epoch boundary
    assert run._impl.position > run._impl.rows.n          # (epochs done > 1)
    state = torch.load(tmp_path / "ck.pt", weights_only=True)["data"]
    resumed = data.PretrainStream(src, **kw)
    resumed.load_state_dict(state)
    assert all(_equal(a, resumed.next_batch()) for a in tail)
    ranks = [data.PretrainStream(src, **kw, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for a in tail:
        parts = [r.next_batch() for r in ranks]
        assert _equal(a, {k: torch.cat([p[k] for p in parts]) for k in a})
    assert len(head) == 7
    with pytest.raises(data.DataError, match="does not fit"):
        data.PretrainStream(src, mode="pack", global_batch_size=6, seed=1).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_stream(tmp_path, num_workers):
    """Streamed sources (here local files through the c4 code path) resume exactly, DataLoader workers included."""
    for k in range(2):
        _write_jsonl(tmp_path / f"s{k}.jsonl", [_words(10 * k + i, 20 + 13 * i) for i in range(10)])
    kw = dict(mode="pack", seq_len=32, global_batch_size=3, num_workers=num_workers)
    run = data.PretrainStream(f"stream:{tmp_path}/s*.jsonl", **kw)
    for _ in range(5):
        run.next_batch()
    state = run.state_dict()
    tail = [run.next_batch() for _ in range(7)]
    resumed = data.PretrainStream(f"stream:{tmp_path}/s*.jsonl", **kw)
    resumed.load_state_dict(state)
    assert all(_equal(a, resumed.next_batch()) for a in tail)
    other_rank = data.PretrainStream(f"stream:{tmp_path}/s*.jsonl", **{**kw, "global_batch_size": 4}, rank=1,
                                     world_size=2)
    with pytest.raises(data.DataError, match="does not fit"):            # another world size
        other_rank.load_state_dict(state)
    with pytest.raises(data.DataError, match="no stream position for rank 1"):
        other_rank.load_state_dict({**state, "world_size": 2, "positions": [state["positions"][0], None]})


def test_stream_resume_cost_does_not_grow_with_position(tmp_path, monkeypatch):
    """Resuming a stream reads at most about one file of records before its first batch, however far the run had
    got (whole files before the position are never opened); the resumed batches equal the uninterrupted run's."""
    for f in range(10):
        _write_jsonl(tmp_path / f"r{f}.jsonl", [f"doc {f} {i} " + _words(40 * f + i, 8) for i in range(40)])
    src, kw = f"stream:{tmp_path}/r*.jsonl", dict(mode="truncate", seq_len=32, global_batch_size=8)
    run, states, batches = data.PretrainStream(src, **kw), [], []
    for _ in range(36):                               # ~290 of the 400 records: into the 8th file
        states.append(run.state_dict())
        batches.append(run.next_batch())
    reads, real = [], stream._records

    def counting(batch, *args):                       # every record the reader gets from `datasets`
        reads.append(len(batch["text"]))
        return real(batch, *args)

    monkeypatch.setattr(stream, "_records", counting)
    cost = {}
    for k in (1, 33):
        reads.clear()
        resumed = data.PretrainStream(src, **kw)
        resumed.load_state_dict(states[k])
        assert all(_equal(batches[j], resumed.next_batch()) for j in range(k, k + 3))
        cost[k] = sum(reads)
    # the position's file, the 64 documents tokenized ahead and the 24 rows: not the ~290 records before the position
    assert cost[33] <= cost[1] + 40 and cost[33] <= 160, cost


def test_stream_workers_ignore_preemption_signals(tmp_path):
    """A scheduler's SIGTERM/SIGUSR1 to the whole process group must not kill DataLoader workers: train.py finishes
    the step (which needs the next batch) and saves before it exits."""
    import os
    import signal
    import time
    for f in range(2):
        _write_jsonl(tmp_path / f"w{f}.jsonl", [_words(40 * f + i, 8) for i in range(20)])
    s = data.PretrainStream(f"stream:{tmp_path}/w*.jsonl", mode="truncate", seq_len=32, global_batch_size=2,
                            num_workers=2)
    for _ in range(2):                                # one batch from each worker: both have run their init
        s.next_batch()
    for w, sig in zip(s._impl._it._workers, (signal.SIGTERM, signal.SIGUSR1)):
        os.kill(w.pid, sig)
    time.sleep(0.5)
    for _ in range(4):                                # both workers' batches (round robin)
        assert s.next_batch()["input_ids"].shape == (2, 32)


# ---------------------------------------------------------------------------------------------------------------
# Rows: truncate, chunk, pack
# ---------------------------------------------------------------------------------------------------------------
def test_row_modes(tmp_path):
    texts = [_words(i, n) for i, n in enumerate([5, 100, 250, 1, 40])]
    src = _write_jsonl(tmp_path / "d.jsonl", texts)
    corpus = data._local_corpus(src, "train")
    docs = [corpus.doc(d).tolist() for d in range(len(corpus.starts) - 1)]
    S = 32
    for mode in data.MODES:
        rows = data._LocalRows(corpus, mode, S)
        ids, am = rows.build(np.arange(rows.n))
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(am)}
        windows = _row_texts(batch)                   # also checks [CLS] ... [SEP] around every window
        tok = data.get_tokenizer()
        if mode == "truncate":
            assert rows.n == len(docs) and windows == [tok.decode(d[:S - 2]) for d in docs]
            continue
        assert "".join(windows) == "".join(tok.decode(d) for d in docs)   # every token once, in order
        if mode == "chunk":
            assert rows.n == sum(-(-len(d) // (S - 2)) for d in docs) and (am <= 1).all()
        else:
            assert rows.n < sum(-(-len(d) // (S - 2)) for d in docs)
            for row in am:                            # ids 1,2,3,... in order; 0 only as <= 2 trailing pads
                real = row[row > 0]
                assert (np.diff(real) >= 0).all() and real[0] == 1 and set(np.diff(real)) <= {0, 1}
                assert (row[:len(real)] > 0).all() and (row[len(real):] == 0).all()
            assert (am[:-1] == 0).sum(1).max() <= 2


def test_stream_rows_match_local_rows(tmp_path):
    """One shard of the streamed path cuts the same rows as the local path (shared _plan_rows)."""
    src = _write_jsonl(tmp_path / "d.jsonl", [_words(i, 10 + 9 * i) for i in range(12)])
    rows = data._LocalRows(data._local_corpus(src, "train"), "pack", 24)
    ids, am = rows.build(np.arange(rows.n))
    got = stream.stream_rows(stream.open_stream("stream:" + src, "train"), "stream:" + src, "train", "pack", 24,
                            0, 1, (0, 0, 0), collections.Counter(), 1)
    streamed = [next(got) for _ in range(rows.n)]
    assert np.array_equal(np.stack([g[0] for g in streamed]), ids)
    assert np.array_equal(np.stack([g[1] for g in streamed]), am)
    assert next(got)[2][0] == 1                       # then the next epoch starts


# ---------------------------------------------------------------------------------------------------------------
# Local loaders and bad input
# ---------------------------------------------------------------------------------------------------------------
def _all_text(source, mode="truncate"):
    rows = data._LocalRows(data._local_corpus(source, "train"), mode, 512)
    ids, am = rows.build(np.arange(rows.n))
    return set(_row_texts({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(am)}))


def _train_texts(texts):
    return {t for t in texts if not data._is_validation(t)}


def test_local_loaders_jsonl_txt_parquet_dir_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"document {i} says {_words(i, 5)}" for i in range(20)]
    _write_jsonl(tmp_path / "a.jsonl", texts[:10], title=None)
    (tmp_path / "b.txt").write_text("\n".join(texts[10:15]) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(texts[15:18]) + "\n")
    pq.write_table(pa.table({"text": texts[18:], "n": [1, 2]}), tmp_path / "d.parquet")
    assert _all_text(str(tmp_path / "a.jsonl")) == _train_texts(texts[:10])
    assert _all_text(str(tmp_path / "b.txt")) == _train_texts(texts[10:15])
    assert _all_text(str(tmp_path / "c.txt.gz")) == _train_texts(texts[15:18])
    assert _all_text(str(tmp_path / "*.parquet")) == _train_texts(texts[18:])
    assert _all_text(str(tmp_path)) == _train_texts(texts)
    batch = data.PretrainStream(str(tmp_path), global_batch_size=4).next_batch()
    assert batch["input_ids"].shape == (4, 128) and batch["input_ids"].dtype == torch.int64


def test_default_split_is_deterministic_and_disjoint():
    """The embedded sample's 106 articles, read here straight from the gzip (no `datasets`): validation holds
    exactly the articles whose title hashes (blake2b) to 0 mod 10, in file order, train exactly the others;
    no article is in both or lost, and rebuilding the corpus gives the same tokens."""
    import hashlib
    with gzip.open(data.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert len(records) == 106

    def held_out(title):
        return int.from_bytes(hashlib.blake2b(title.encode(), digest_size=8).digest(), "little") % 10 == 0

    def docs(corpus):
        return [corpus.doc(d).tolist() for d in range(len(corpus.starts) - 1)]

    train, val = data._local_corpus("default", "train"), data._local_corpus("default", "validation")
    tokenize = data.get_tokenizer().encode
    for corpus, want in ((val, True), (train, False)):
        expected = [r["text"] for r in records if held_out(r["title"]) == want]
        assert [data.get_tokenizer().decode(d) for d in docs(corpus)] == expected
        assert docs(corpus)[:3] == [tokenize(t) for t in expected[:3]]
    assert 5 <= len(docs(val)) <= 20 and not {tuple(d) for d in docs(val)} & {tuple(d) for d in docs(train)}
    data._CORPORA.clear()
    assert docs(data._local_corpus("default", "train")) == docs(train)


def test_sentiment_source_is_the_training_sentences_without_labels():
    """'sentiment': every training sentence of the sentiment sample, split 9:1 by a hash of its text, never a dev
    sentence and never a label; 'default+sentiment' holds both sources' documents."""
    tok = data.get_tokenizer()
    train, val = data._local_corpus("sentiment", "train"), data._local_corpus("sentiment", "validation")
    with gzip.open(data.ASSETS / "rotten_tomatoes_train.tsv.gz", "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").rsplit("\t", 1) for line in list(f)[1:]]
    assert len(train.starts) - 1 + len(val.starts) - 1 == len(rows) and 0.07 < (len(val.starts) - 1) / len(rows) < 0.13
    got = {tok.decode(train.doc(d).tolist()) for d in range(len(train.starts) - 1)}
    assert got <= {text for text, _ in rows} and not any(text in ("0", "1") for text in got)
    with gzip.open(data.ASSETS / "rotten_tomatoes_dev.tsv.gz", "rt", encoding="utf-8") as f:
        dev = {line.rstrip("\n").rsplit("\t", 1)[0] for line in list(f)[1:]}
    assert not got & (dev - {text for text, _ in rows})
    both = data._local_corpus("default+sentiment", "train")
    assert len(both.starts) - 1 == len(train.starts) - 1 + len(data._local_corpus("default", "train").starts) - 1
    assert len(both.tokens) == len(train.tokens) + len(data._local_corpus("default", "train").tokens)


def test_missing_path_and_bad_types(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.PretrainStream(str(tmp_path / "nope*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.PretrainStream(str(tmp_path / "x.csv"))
    _write_jsonl(tmp_path / "y.jsonl", [])
    with open(tmp_path / "y.jsonl", "w") as f:
        f.write('{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match="no 'text' field"):
        data.PretrainStream(str(tmp_path / "y.jsonl"))
    with pytest.raises(data.DataError, match="multiple of"):
        data.PretrainStream("default", global_batch_size=6, world_size=4)


def test_empty_corpus_is_an_error(tmp_path, capsys):
    (tmp_path / "e.txt").write_text("\n  \n\n")
    with pytest.raises(data.DataError, match="no documents"):
        data.PretrainStream(str(tmp_path / "e.txt"))
    assert "skipped 3 empty documents/lines" in capsys.readouterr().err
    with pytest.raises(data.DataError, match="split is empty"):
        data.PretrainStream(_write_jsonl(tmp_path / "one.jsonl", ["x"]), split="validation")


def test_non_utf8_and_empty_lines_are_counted_skips(tmp_path, capsys):
    good = [f"line {i} is fine" for i in range(12)]
    raw = b"\n".join([g.encode() for g in good[:6]] + [b"bad \xff\xfe bytes", b"", b"caf\xe9"] +
                     [g.encode() for g in good[6:]]) + b"\n"
    (tmp_path / "t.txt").write_bytes(raw)
    assert _all_text(str(tmp_path / "t.txt")) == _train_texts(good)
    err = capsys.readouterr().err
    assert "1 empty documents/lines" in err and "2 lines with non-UTF-8 bytes" in err and "kept 12" in err
    (tmp_path / "j.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match="j.jsonl.*UTF-8"):
        data.PretrainStream(str(tmp_path / "j.jsonl"))


def test_enormous_line(tmp_path, monkeypatch):
    """A >10M-character document is an error (not a hang); a line too long to load is refused before loading."""
    with open(tmp_path / "big.txt", "w") as f:
        f.write("short doc\n" + "a" * (data.MAX_DOC_CHARS + 1) + "\nanother\n")
    with pytest.raises(data.DataError, match="characters"):
        data.PretrainStream(str(tmp_path / "big.txt"))
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "b " * 2000}) + "\n")
    with pytest.raises(data.DataError, match="line is longer"):
        data.PretrainStream(str(tmp_path / "long.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# C4 and stream sharding
# ---------------------------------------------------------------------------------------------------------------
def test_c4_offline_error_says_what_to_do(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(data.DataError) as e:
        data.PretrainStream("c4", global_batch_size=8)
    assert "allenai/c4" in str(e.value) and "--data='stream:" in str(e.value) and "--data=default" in str(e.value)


def test_stream_shards_are_disjoint_and_complete(tmp_path):
    """split by (rank, worker) -> shard s of T: whole files when T divides the file count, else every T-th record."""
    texts = [_words(i, 3) for i in range(40)]
    for k in range(4):
        _write_jsonl(tmp_path / f"p{k}.jsonl", texts[10 * k:10 * k + 10])
    src = stream.open_stream(f"stream:{tmp_path}/p*.jsonl", "train")
    for T in (1, 2, 3, 4, 5, 8):
        seen = [[key for _, _, key in stream.shard_records(src, "stream:x", "train", s, T, collections.Counter())]
                for s in range(T)]
        flat = [k for part in seen for k in part]
        assert sorted(flat) == sorted(texts), T                        # complete and disjoint


def test_stream_ranks_and_workers_see_different_documents(tmp_path):
    texts = [f"doc {i} " + _words(i, 3) for i in range(80)]
    for k in range(4):
        _write_jsonl(tmp_path / f"p{k}.jsonl", texts[20 * k:20 * k + 20])
    seen = {}
    for rank in range(2):
        s = data.PretrainStream(f"stream:{tmp_path}/p*.jsonl", mode="truncate", mask_prob=0.0,
                                global_batch_size=4, rank=rank, world_size=2, num_workers=2)
        for b in range(4):                           # round robin: batch b comes from worker b % 2
            for t in _row_texts(s.next_batch()):
                seen.setdefault((rank, b % 2), []).append(int(t.split()[1]))
    files = {reader: {i // 20 for i in ids} for reader, ids in seen.items()}
    assert all(len(f) == 1 for f in files.values())                    # one file per (rank, worker) ...
    assert len(set.union(*files.values())) == 4                        # ... and four different files
    flat = [i for ids in seen.values() for i in ids]
    assert len(flat) == len(set(flat)) == 16


# ---------------------------------------------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------------------------------------------
def test_eval_batches_fixed_masks_at_15_percent():
    a = data.eval_batches("default", 128, "chunk", 16, 6)
    b = data.eval_batches("default", 128, "chunk", 16, 6)
    assert len(a) == 6 and all(_equal(x, y) for x, y in zip(a, b))
    assert all(x["input_ids"].shape == (16, 128) for x in a)
    labels = torch.cat([x["labels"] for x in a])
    ids = torch.cat([x["input_ids"] for x in a])
    maskable = (labels != -100) | (ids < data.N_BPE)
    assert abs((labels != -100).sum() / maskable.sum() - 0.15) < 0.01
    every = data.eval_batches("default", 128, "chunk", 16)             # the whole split, last batch partial
    assert sum(len(x["input_ids"]) for x in every) == data._LocalRows(
        data._local_corpus("default", "validation"), "chunk", 128).n


# ---------------------------------------------------------------------------- attention context (for MFU)


def _context_naive(mask: np.ndarray) -> tuple[int, int]:
    """Walk each row, cutting it into runs of one window number: (real tokens, sum of squared run lengths)."""
    n = sq = 0
    for row in mask.tolist():
        for w in set(row) - {0}:
            length = sum(1 for x in row if x == w)
            n, sq = n + length, sq + length * length
    return n, sq


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=5), min_size=1, max_size=5),
       st.integers(0, 3))
def test_attention_context_matches_a_naive_walk(row_windows, trailing_pads):
    """Rows of consecutive windows (lengths drawn, 0-length windows skipped) plus trailing pads, as pack builds
    them: attention_context agrees with walking the rows window by window."""
    rows = []
    for lengths in row_windows:
        row = [w + 1 for w, L in enumerate(x for x in lengths if x) for _ in range(L)] + [0] * trailing_pads
        rows.append(row)
    S = max(1, max(len(r) for r in rows))  # an all-pad batch is legal: (0, 0)
    mask = np.array([r + [0] * (S - len(r)) for r in rows], np.int64)
    assert data.attention_context(mask) == _context_naive(mask)
    assert data.attention_context(torch.from_numpy(mask)) == _context_naive(mask)


def test_attention_context_of_packed_and_chunked_batches():
    """Chunked rows are one window each (context = row lengths); packed rows hold several, so their mean context
    is shorter than the row; real tokens always equal the attention_mask's non-zeros."""
    for mode in ("chunk", "pack"):
        b = data.PretrainStream("default+sentiment", mode=mode, seq_len=64, global_batch_size=8, seed=0).next_batch()
        m = b["attention_mask"]
        n, sq = data.attention_context(m)
        assert n == int((m != 0).sum())
        lens = (m != 0).sum(1).numpy()
        if mode == "chunk":
            assert sq == int((lens ** 2).sum())
        else:
            assert int(m.max()) > 1 and sq < int((lens ** 2).sum())
    for bad in (np.ones(5, np.int64), np.zeros((2, 0), np.int64)):
        with pytest.raises(ValueError, match=r"\[B, S\]"):
            data.attention_context(bad)
