"""Pretraining data for MosaicBERT: tokenizer, text sources, rows, MLM masking, order and exact resumption.

  tokenizer  GPT-2 byte-level BPE (tiktoken, offline from assets/gpt2.tiktoken) + [CLS] [SEP] [PAD] [MASK]; the
             embedding table is padded to a multiple of 64 (50304): the paper's vocab-padding trick.
  sources    'default' (assets/enwiki_sample.jsonl.gz), 'sentiment' (glue.py's demo sentences, unlabelled),
             'a+b' (local sources joined), 'c4' (streamed from the hub, the paper's corpus), PATH/GLOB/DIR of
             .jsonl/.json/.txt/.parquet (optionally .gz/.bz2/.xz; tokenized once at start-up), 'stream:PATH'
             (the same files streamed like c4: stream.py). Local sources hold out 1 document in 10 (hash of its key).
  rows       'truncate' [CLS] doc [SEP] cut at seq_len (the paper) | 'chunk' every window of every document |
             'pack' windows back to back, attention_mask = the window's number within the row (1,2,3,...; 0 = pad)
  masking    30% (MosaicBERT's rate; eval_batches keeps BERT's 15%): 80% [MASK], 10% random BPE, 10% unchanged,
             a pure function of (seed, epoch, sample): any world size, worker count or resume draws the same masks.
  order      one global order per epoch (seeded permutation); global batch k is the same on 1 or 8 processes.
  resume     state_dict()/load_state_dict(): the next batches are exactly those of the uninterrupted run.

Bad input raises DataError saying what to do; skipped empty/null/non-UTF-8 records are counted and reported on
stderr as one `data: warning:` line per file, never dropped silently.
"""

import bz2
import collections
import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

# --- Vocabulary: 0..50255 GPT-2 BPE (the only ids masked or drawn as random replacements), 50256 <|endoftext|>
# (never produced), 50257 [CLS], 50258 [SEP], 50259 [PAD], 50260 [MASK]; 50261..50303 unused padding (see top).
ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_FILE = ASSETS / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
DEFAULT_CORPUS = ASSETS / "enwiki_sample.jsonl.gz"
SENTIMENT_TRAIN = ASSETS / "rotten_tomatoes_train.tsv.gz"   # source 'sentiment': its sentences, labels dropped
N_BPE = 50256
EOT_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID = 50256, 50257, 50258, 50259, 50260
N_TOKENS = 50261                             # real vocabulary: GPT-2's 50257 + 4 specials
VOCAB_SIZE = (N_TOKENS + 63) // 64 * 64      # 50304 embedding rows
IGNORE = -100                                # labels at unmasked positions (F.cross_entropy's ignore_index)
MODES = ("truncate", "chunk", "pack")
MAX_DOC_CHARS = 10_000_000                   # a longer "document" is almost surely a file in the wrong format
MAX_LINE_BYTES = 64 << 20                    # line-based files are scanned for this before loading (no OOM)
VAL_EVERY = 10                               # local sources: a document is validation if hash(key) % 10 == 0
_TRAIN_TAG, _EVAL_TAG, _PERM_TAG = 1, 2, 3   # keep the hash streams of training masks, eval masks, shuffles apart


class DataError(ValueError):
    """Bad input data (missing path, empty corpus, unreachable hub, ...). The message says what to do."""


# --- Tokenizer. GPT-2's split regex (OpenAI's encoder.py), carried here: older tiktoken releases do not export it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """GPT-2 BPE (ids as tiktoken's "gpt2", ranks from assets/gpt2.tiktoken, sha256-checked) + [CLS] [SEP] [PAD]
    [MASK]. encode() reads every string as ordinary text: "[CLS]" in a document is BPE tokens, never the special."""

    cls_id, sep_id, pad_id, mask_id, eot_id = CLS_ID, SEP_ID, PAD_ID, MASK_ID, EOT_ID
    vocab_size = VOCAB_SIZE   # padded embedding size (50304)
    n_tokens = N_TOKENS       # ids that can occur (50261)

    def __init__(self):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe(str(GPT2_FILE), expected_hash=GPT2_SHA256)
        specials = {"<|endoftext|>": EOT_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[PAD]": PAD_ID, "[MASK]": MASK_ID}
        self.enc = tiktoken.Encoding("gpt2-bert", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """encode() over many documents on several threads (tiktoken releases the GIL)."""
        if num_threads <= 1:   # tiktoken's batch call always goes through a thread pool: costly for short texts
            return [self.enc.encode_ordinary(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:   # specials decode as "[CLS]" etc.; the unused ids 50261..50303 raise KeyError
        return self.enc.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()


_SAFE_CUT = re.compile(r" (?=[A-Za-z])")


def _safe_prefix(text: str, n_chars: int) -> str:
    """A prefix (>= n_chars) whose tokens are a prefix of text's: it ends before a ' ' + ASCII letter, where GPT-2's
    split regex always starts a new piece. Truncate mode needs only a document's first ~126 tokens."""
    if len(text) <= n_chars:
        return text
    m = _SAFE_CUT.search(text, n_chars)
    return text if m is None else text[:m.start()]


def _encode_docs(texts: list[str], max_tokens: int | None = None, num_threads: int = 8) -> list[np.ndarray]:
    """Token ids of each document as int32 arrays; with max_tokens, only the first max_tokens (cheaply)."""
    tok = get_tokenizer()
    if max_tokens is None:
        return [np.asarray(ids, np.int32) for ids in tok.encode_batch(texts, num_threads)]
    cuts = [_safe_prefix(t, 6 * max_tokens) for t in texts]
    out = tok.encode_batch(cuts, num_threads)
    for i, (text, cut) in enumerate(zip(texts, cuts)):
        if len(out[i]) < max_tokens and len(cut) < len(text):   # rare: very long tokens, cut too early
            out[i] = tok.encode(text)
    return [np.asarray(ids[:max_tokens], np.int32) for ids in out]


# --- Reading documents: one (text, key) per record, (None, None) for a counted skip (record indices stay stable
# positions for resumption). key (the title, else the text) picks the split and seeds streamed masks.
_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SOURCES_HELP = ("--data takes 'default' (the embedded Wikipedia sample), 'sentiment' (the sentiment sample's training "
                 "sentences, unlabelled), local sources joined with '+', 'c4' (streams allenai/c4 'en' from the "
                 "Hugging Face hub), or local files: a path, directory or glob of .jsonl/.json (a 'text' field per "
                 "record), .txt (one document per line) or .parquet (a 'text' column), optionally .gz/.bz2/.xz; "
                 "prefix it with 'stream:' to stream and shard the files like c4 instead of tokenizing them up front")


def _split_ext(path: str) -> tuple[str, str]:   # ('.jsonl', '.gz') for 'x.jsonl.gz'; ('.txt', '') for 'x.txt'
    stem, ext = os.path.splitext(path.lower())
    return (os.path.splitext(stem)[1], ext) if ext in _OPENERS else (ext, "")


def _builder_for(path: str) -> str:
    fmt, _ = _split_ext(path)
    if fmt not in _FORMATS:
        raise DataError(f"{path}: unsupported file type {fmt or '(none)'!r}. {_SOURCES_HELP}.")
    return _FORMATS[fmt]


def resolve_files(pattern: str) -> list[str]:
    """The sorted files named by a path, a directory (searched recursively) or a glob."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        files = [str(p) for p in Path(pattern).rglob("*") if p.is_file() and _split_ext(str(p))[0] in _FORMATS]
    else:
        files = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"--data={pattern}: no such file, or no data files match. {_SOURCES_HELP}.")
    return sorted(files)


def _check_line_lengths(path: str):
    """Fail fast on a line longer than MAX_LINE_BYTES, before a loader tries to hold it in memory."""
    opener = _OPENERS.get(_split_ext(path)[1], open)
    run = 0   # bytes since the last newline
    with opener(path, "rb") as f:
        while block := f.read(16 << 20):
            first = block.find(b"\n")
            if first < 0:
                run += len(block)
            elif run + first > MAX_LINE_BYTES:
                run += first
            else:
                run = len(block) - block.rfind(b"\n") - 1
            if run > MAX_LINE_BYTES:
                raise DataError(f"{path}: a line is longer than {MAX_LINE_BYTES >> 20} MiB. Line-based files hold "
                                "one document per line; split the document (or check the file's format).")


def _records(batch: dict, where: str, from_txt: bool, skipped: collections.Counter):
    """(text, key) for each record of a `datasets` batch (dict of columns), (None, None) for a counted skip."""
    if "text" not in batch:
        raise DataError(f"{where}: the records have no 'text' field (fields: {sorted(batch)}). Store each "
                        "document's text under 'text'.")
    texts = batch["text"]
    titles = batch.get("title") or [None] * len(texts)
    for text, title in zip(texts, titles):
        reason = None
        if isinstance(text, bytes):             # a binary parquet column
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                text, reason = None, "records with non-UTF-8 bytes"
        if text is None:
            reason = reason or "records without text"
        elif not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}.")
        elif from_txt and "\ufffd" in text:
            reason = "lines with non-UTF-8 bytes"
        elif not text.strip():
            reason = "empty documents/lines"
        elif len(text) > MAX_DOC_CHARS:
            raise DataError(f"{where}: a document has {len(text):,} characters (limit {MAX_DOC_CHARS:,}). That is "
                            "usually a file in the wrong format (e.g. text without line breaks): split it into "
                            "documents, one per line (.txt) or one JSON record per line (.jsonl).")
        if reason:
            skipped[reason] += 1
            yield None, None
        else:
            yield text, (title if isinstance(title, str) and title else text)


def _load_dataset(builder: str, files: list[str], **kwargs):
    import datasets
    if builder == "text":
        kwargs["encoding_errors"] = "replace"   # bad bytes -> U+FFFD -> a counted skip, not a crash
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)


def _read_file(path: str, skipped: collections.Counter):
    """Every record of one local file via `datasets` (the embedded sample without it: the default works anywhere)."""
    if os.path.abspath(path) == os.path.abspath(DEFAULT_CORPUS):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        yield from _records({k: [r.get(k) for r in rows] for k in ("text", "title")}, path, False, skipped)
        return
    builder = _builder_for(path)
    if builder in ("json", "text") and not path.lower().endswith(".json"):
        _check_line_lengths(path)
    try:
        for batch in _load_dataset(builder, [path]).iter(batch_size=1024):
            yield from _records(batch, path, builder == "text", skipped)
    except Exception as e:   # JSON syntax, non-UTF-8 JSON, corrupt parquet or gzip, ...
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: could not be read as {builder} ({type(e).__name__}: {e}). Fix or remove the file; "
                        "text must be UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from e


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "little")


def _is_validation(key: str) -> bool:
    return _key_hash(key) % VAL_EVERY == 0


def _warn_skipped(where: str, skipped: collections.Counter, kept: int | None = None):
    if skipped:
        what = ", ".join(f"{n:,} {reason}" for reason, n in sorted(skipped.items()))
        tail = "" if kept is None else f" (kept {kept:,} documents)"
        print(f"data: warning: {where}: skipped {what}{tail}", file=sys.stderr)


# --- Documents -> rows: a row is segments (doc, a, b), tokens [a, b) of a document as [CLS] tokens [SEP]. The
# position _plan_rows reports after each row, (doc, offset), is what a checkpoint stores for a stream.
def _plan_rows(docs, mode: str, seq_len: int, start=(0, 0)):
    """Yield (segments, next_start) for the rows of `mode`; docs: (doc_index, n_tokens) in increasing index order."""
    W = seq_len - 2                      # text tokens per [CLS] ... [SEP] window
    row, free, nxt = [], seq_len, None
    for d, n in docs:
        a = start[1] if d == start[0] else 0
        if d < start[0] or a >= n:       # before the resume point, or empty
            continue
        if mode == "truncate":
            yield [(d, 0, min(n, W))], (d + 1, 0)
            continue
        while a < n:
            b = min(n, a + (W if mode == "chunk" else free - 2))
            seg, a = (d, a, b), b
            nxt = (d, b) if b < n else (d + 1, 0)
            if mode == "chunk":
                yield [seg], nxt
                continue
            row.append(seg)              # pack: fill the row, then start the next one
            free -= seg[2] - seg[1] + 2
            if free < 3:                 # no room for [CLS] t [SEP]: at most 2 trailing pads
                yield row, nxt
                row, free = [], seq_len
    if row:
        yield row, nxt


def _build_rows(rows: list, tokens_of, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [R, S] int64 of planned rows; tokens_of(doc) -> that document's ids."""
    ids = np.full((len(rows), seq_len), PAD_ID, np.int64)
    docs = np.zeros((len(rows), seq_len), np.int64)
    for r, segments in enumerate(rows):
        p = 0
        for k, (d, a, b) in enumerate(segments, start=1):
            n = b - a
            ids[r, p] = CLS_ID
            ids[r, p + 1:p + 1 + n] = tokens_of(d)[a:b]
            ids[r, p + 1 + n] = SEP_ID
            docs[r, p:p + n + 2] = k     # 1,1,1,2,2,... per window; 0 stays on pads
            p += n + 2
    return ids, docs


# --- MLM masking. Uniforms come from a counter-based hash (splitmix64) of (row identity, position, purpose): a
# pure, vectorised function, independent of batch composition, rank, workers and resumes.
_U64 = np.uint64


def _mix64(x):
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def hash64(*parts) -> np.ndarray:
    """A uint64 hash of non-negative integers / integer arrays (broadcast together)."""
    h = np.zeros((), _U64)
    with np.errstate(over="ignore"):
        for p in parts:
            p = np.asarray(p)
            p = p.astype(_U64) if p.dtype.kind in "iub" else np.asarray(p, dtype=_U64)
            h = _mix64(h ^ (p + _U64(0x9E3779B97F4A7C15)))
    return h


def _uniform(h: np.ndarray) -> np.ndarray:
    return (h >> _U64(11)).astype(np.float64) * 2.0 ** -53       # [0, 1)


def mlm_mask(ids: np.ndarray, row_keys: np.ndarray, mask_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: ids [R, S], row_keys [R] uint64 -> (input_ids, labels [R, S], -100 where not chosen). Only
    BPE ids are candidates; a row of n gets exactly round(mask_prob * n), at least 1 (BERT's create_pretraining_data:
    every row feeds the loss); each becomes [MASK] 80%, a random BPE token 10%, itself 10%."""
    R, S = ids.shape
    key = np.asarray(row_keys, _U64)[:, None]
    pos = np.arange(S, dtype=_U64)[None, :]
    u_pick, u_kind = _uniform(hash64(key, pos, 1)), _uniform(hash64(key, pos, 2))
    random_ids = (hash64(key, pos, 3) % _U64(N_BPE)).astype(np.int64)
    cand = ids < N_BPE
    n = cand.sum(1)
    k = np.floor(mask_prob * n + 0.5).astype(np.int64)
    k = np.where((n > 0) & (mask_prob > 0), np.maximum(k, 1), 0)
    order = np.argsort(np.where(cand, u_pick, 2.0), axis=1, kind="stable")   # candidates first, random order
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(S)[None, :].repeat(R, 0), axis=1)
    chosen = rank < k[:, None]
    labels = np.where(chosen, ids, IGNORE)
    out = ids.copy()
    out[chosen & (u_kind < 0.8)] = MASK_ID
    swap = chosen & (u_kind >= 0.8) & (u_kind < 0.9)
    out[swap] = random_ids[swap]
    return out, labels


def attention_context(attention_mask) -> tuple[int, int]:
    """(real tokens, sum of window length^2) of an attention_mask [B, S] (0 pad, else the window's number in its row).
    A token attends within its window, so the ratio is the mean context MFU counts (model.flops_per_token)."""
    m = np.asarray(attention_mask, dtype=np.int64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"attention_mask must be a non-empty [B, S] array, got shape {m.shape}")
    window = (np.arange(m.shape[0], dtype=np.int64)[:, None] * (int(m.max()) + 1) + m)[m != 0]  # (nnz,)
    lens = np.bincount(window)
    return int(lens.sum()), int((lens * lens).sum())


def _to_batch(input_ids, attention_mask, labels) -> dict:
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}


# --- Local sources: read and tokenize every document once (cached for the process), plan all rows once.
@dataclasses.dataclass
class _Corpus:
    tokens: np.ndarray     # int32 [total]: one split's documents, concatenated
    starts: np.ndarray     # int64 [n_docs + 1]: doc d is tokens[starts[d]:starts[d + 1]]

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.starts[d]:self.starts[d + 1]]


_CORPORA: dict = {}


def _tokenize_all(texts: list[str]) -> _Corpus:
    parts = [a for i in range(0, len(texts), 4096) for a in _encode_docs(texts[i:i + 4096])]  # bounded int lists
    lengths = np.array([len(p) for p in parts], np.int64)
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return _Corpus(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def _sentiment_text():
    """(text, key) of each sentiment training sentence, unlabelled (in-domain pretraining); never the dev file."""
    with gzip.open(SENTIMENT_TRAIN, "rt", encoding="utf-8") as f:
        next(f)  # header: sentence<TAB>label
        for line in f:
            text = line.rstrip("\n").rsplit("\t", 1)[0]
            if text.strip():
                yield text, text


def _local_files(source: str) -> list[str]:
    """Every file a local source reads; 'a+b' joins sources ('default+sentiment': the demo's)."""
    named = {"default": [str(DEFAULT_CORPUS)], "sentiment": [str(SENTIMENT_TRAIN)]}
    return [f for part in source.split("+") for f in (named.get(part) or resolve_files(part))]


def _local_corpus(source: str, split: str) -> _Corpus:
    files = _local_files(source)
    signature = (source, tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files))
    if signature not in _CORPORA:
        texts = {"train": [], "validation": []}
        for f in files:
            skipped, kept = collections.Counter(), 0
            for text, key in _sentiment_text() if f == str(SENTIMENT_TRAIN) else _read_file(f, skipped):
                if text is not None:
                    texts["validation" if _is_validation(key) else "train"].append(text)
                    kept += 1
            _warn_skipped(f, skipped, kept)
        if not texts["train"] and not texts["validation"]:
            raise DataError(f"--data={source}: no documents in {len(files)} file(s) ({', '.join(files[:3])}"
                            f"{', ...' if len(files) > 3 else ''}). Give files with non-empty text.")
        _CORPORA[signature] = {s: _tokenize_all(t) for s, t in texts.items()}
    corpus = _CORPORA[signature][split]
    if len(corpus.starts) == 1:
        raise DataError(f"--data={source}: the {split} split is empty (1 document in {VAL_EVERY} is held out for "
                        "validation, chosen by a hash of its title or text). Give more documents.")
    return corpus


class _LocalRows:
    """All rows of a split, planned once: row j is segments seg[ptr[j]:ptr[j + 1]] (doc, a, b)."""

    def __init__(self, corpus: _Corpus, mode: str, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len
        seg, ptr = [], [0]
        for segments, _ in _plan_rows(enumerate(np.diff(corpus.starts).tolist()), mode, seq_len):
            seg += segments
            ptr.append(len(seg))
        self.seg, self.ptr = np.array(seg, np.int64).reshape(-1, 3), np.array(ptr, np.int64)
        self.n = len(ptr) - 1
        self.n_tokens = int((self.seg[:, 2] - self.seg[:, 1]).sum())        # text tokens
        self.n_real = self.n_tokens + 2 * len(self.seg)                     # + [CLS] and [SEP]

    def build(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.seg[self.ptr[j]:self.ptr[j + 1]].tolist() for j in idx]
        return _build_rows(rows, self.corpus.doc, self.seq_len)


class _LocalStream:
    """Global sample order: position p (counted over the whole run) is sample perm_e[p % N] of epoch e = p // N."""

    def __init__(self, source, split, seq_len, mode, mask_prob, seed, global_batch_size, rank, world_size):
        self.source, self.split, self.seq_len, self.mode, self.mask_prob, self.seed = \
            source, split, seq_len, mode, mask_prob, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.rows = _LocalRows(_local_corpus(source, split), mode, seq_len)
        self.position, self._perms = 0, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, _PERM_TAG, epoch]).permutation(self.rows.n)
        return self._perms[epoch]

    def next_batch(self) -> dict:
        local = self.global_batch_size // self.world_size
        p = self.position + self.rank * local + np.arange(local)     # this rank's contiguous slice
        epoch, within = p // self.rows.n, p % self.rows.n
        idx = np.array([self._perm(e)[i] for e, i in zip(epoch.tolist(), within.tolist())], np.int64)
        ids, docs = self.rows.build(idx)
        inputs, labels = mlm_mask(ids, hash64(self.seed, _TRAIN_TAG, epoch, idx), self.mask_prob)
        self.position += self.global_batch_size
        return _to_batch(inputs, docs, labels)

    def _identity(self) -> dict:
        return {"kind": "local", "source": self.source, "split": self.split, "mode": self.mode,
                "seq_len": self.seq_len, "seed": self.seed, "n_samples": self.rows.n}

    def state_dict(self) -> dict:
        return {**self._identity(), "position": self.position}

    def load_state_dict(self, state: dict):
        _check_identity(self._identity(), state)
        self.position = int(state["position"])

    def describe(self) -> str:
        real = self.rows.n_real / max(1, self.rows.n * self.seq_len)
        return (f"data: {self.source} ({self.split}), {self.mode} mode: {len(self.rows.corpus.starts) - 1:,} documents "
                f"-> {self.rows.n:,} rows of {self.seq_len} ({self.rows.n_tokens / 1e6:.2f}M text tokens, "
                f"{real:.1%} not padding); 1 epoch = {self.rows.n / self.global_batch_size:.1f} global batches of "
                f"{self.global_batch_size}")


def _check_identity(mine: dict, state: dict):
    if diff := {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise DataError(f"the data position in the checkpoint does not fit this data ({what}). Resume with the "
                        "same --data, mode, seq_len, seed (and, for streams, world size and num_workers).")


# --- Public API. Streamed sources ('c4', 'stream:PATH': sharded over ranks and DataLoader workers): stream.py.
def _is_streamed(source: str) -> bool:
    return source == "c4" or source.startswith("stream:")


class PretrainStream:
    """Masked pretraining batches of one rank. next_batch() -> {'input_ids', 'attention_mask', 'labels'}: CPU int64
    [global_batch_size // world_size, seq_len], this rank's contiguous share of the next global batch.
    num_workers: DataLoader workers per rank for streams (local sources assemble batches in-process)."""

    def __init__(self, source: str = "default", split: str = "train", seq_len: int = 128, mode: str = "chunk",
                 mask_prob: float = 0.3, seed: int = 0, global_batch_size: int = 4096, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        _check_args(source, split, seq_len, mode, mask_prob, seed)
        if not 0 <= rank < world_size or global_batch_size < world_size or global_batch_size % world_size:
            raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                            f"world_size={world_size} (and 0 <= rank={rank} < world_size).")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0")
        self.source, self.split, self.seq_len, self.mode = source, split, seq_len, mode
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        args = (source, split, seq_len, mode, mask_prob, seed, global_batch_size, rank, world_size)
        self.streamed = _is_streamed(source)
        import stream  # noqa: PLC0415  (on use: stream.py imports data)
        self._impl = stream.StreamedStream(*args, num_workers) if self.streamed else _LocalStream(*args)

    def next_batch(self) -> dict:
        return self._impl.next_batch()

    def state_dict(self, gather: bool = False) -> dict:
        """The data position (primitives only: weights_only-loadable). Local sources: one global position (rank 0's
        resumes any world size). Streams: per-rank positions; gather=True all-gathers them (call it on every rank)."""
        return self._impl.state_dict(gather) if self.streamed else self._impl.state_dict()

    def load_state_dict(self, state: dict):
        self._impl.load_state_dict(state)

    def describe(self) -> str:   # one line for the log: documents, rows, tokens, epoch length
        return self._impl.describe()


def _check_args(source, split, seq_len, mode, mask_prob, seed):
    checks = ((not isinstance(source, str) or not source, f"empty --data. {_SOURCES_HELP}."),
              (split not in ("train", "validation"), f"split={split!r}: use 'train' or 'validation'"),
              (mode not in MODES, f"mode={mode!r}: use one of {', '.join(MODES)}"),
              (seq_len < 3, f"seq_len={seq_len}: needs room for [CLS], one token and [SEP] (>= 3)"),
              (not 0 <= mask_prob < 1, f"mask_prob={mask_prob}: must be in [0, 1)"),
              (seed < 0, f"seed={seed}: must be >= 0"))
    if msg := next((msg for bad, msg in checks if bad), None):
        raise DataError(msg)


def eval_batches(source: str = "default", seq_len: int = 128, mode: str = "chunk", batch_size: int = 32,
                 max_batches: int | None = None, mask_prob: float = 0.15, seed: int = 0) -> list[dict]:
    """Validation batches with fixed masks (BERT's 15% by default), in corpus order: the same on every call and rank.
    Sample j's mask depends on (seed, j) only. max_batches=None takes the whole split (streams need a limit)."""
    _check_args(source, "validation", seq_len, mode, mask_prob, seed)
    if _is_streamed(source):
        if max_batches is None:
            raise DataError(f"eval_batches(--data={source}) needs max_batches: a streamed split is read in order")
        import stream  # noqa: PLC0415
        ids, docs = stream.eval_rows(source, mode, seq_len, max_batches * batch_size)
    else:
        rows = _LocalRows(_local_corpus(source, "validation"), mode, seq_len)
        n = rows.n if max_batches is None else min(rows.n, max_batches * batch_size)
        ids, docs = rows.build(np.arange(n))
    inputs, labels = mlm_mask(ids, hash64(seed, _EVAL_TAG, np.arange(len(ids))), mask_prob)
    return [_to_batch(inputs[i:i + batch_size], docs[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, len(ids), batch_size)]
