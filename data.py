"""Pretraining data for MosaicBERT: tokenizer, text sources, rows, MLM masking, order and exact resumption.

Top to bottom:
  tokenizer  GPT-2 byte-level BPE (tiktoken, loaded offline from assets/gpt2.tiktoken) + [CLS] [SEP] [PAD] [MASK];
             the embedding table is padded to a multiple of 64 (50304), the paper's vocab-padding trick.
             (MosaicBERT itself used BERT's WordPiece vocab, 30522 padded to 30528; this repo uses GPT-2 BPE.)
  sources    'default'      assets/enwiki_sample.jsonl.gz, 1 article in 10 held out for validation (hash of the title)
             'sentiment'    the training sentences of the embedded sentiment sample (glue.py's demo task), labels
                            dropped, dev sentences never read; 1 in 10 held out for MLM validation
             'a+b'          local sources joined ('default+sentiment': the pretraining demo's in-domain mix)
             'c4'           allenai/c4 'en' streamed from the Hugging Face hub (the paper's corpus), sharded by rank and
                            DataLoader worker; its own 'validation' split
             PATH/GLOB/DIR  local .jsonl/.json (a `text` field), .txt (one document per line), .parquet (a `text`
                            column), optionally .gz/.bz2/.xz compressed, read with the `datasets` file loaders and
                            tokenized once at start-up (kept in memory); 1 document in 10 held out (hash of the text)
             'stream:PATH'  the same local files read like 'c4' (streamed, sharded, nothing tokenized up front)
  rows       'truncate'     [CLS] doc [SEP], one document per row, cut at seq_len (the paper: C4 at 128, no concatenation)
             'chunk'        consecutive windows of every document, each [CLS] ... [SEP] (the demo default: a small
                            corpus yields many rows)
             'pack'         windows packed back to back; attention_mask holds the window's number within the row
                            (1,2,3,...; 0 only for at most 2 trailing pads) so attention and positions stay per window
  masking    MLM at 30% (MosaicBERT's rate; BERT used 15%, which eval_batches keeps), of which 80% [MASK], 10% a random
             BPE token, 10% unchanged. Masks are a pure function of (seed, epoch, sample identity): a counter-based
             hash, not a stateful RNG, so any world size, worker count or resume draws the same masks.
  order      local sources: one global order, reshuffled each epoch with a seeded permutation; global batch k holds
             the same samples on 1 or 8 processes, rank r taking the r-th contiguous slice. Streams: per-shard order.
  resume     state_dict()/load_state_dict(): the next batches are exactly those of the uninterrupted run. A stream's
             position names its file, so a resume opens that file directly (cost: at most one file's records).

Bad input raises DataError (a ValueError) saying what to do, never a silent drop:
  errors         missing path, unknown file type, no `text` field, no documents left, a document over
                 MAX_DOC_CHARS characters or a line over MAX_LINE_BYTES bytes (checked before loading, so no OOM),
                 unparsable JSON/parquet (including non-UTF-8 JSON), unreachable hub.
  counted skips  empty or whitespace-only documents/lines, records whose text is null or missing, and .txt lines
                 with bytes that are not UTF-8 (read as U+FFFD, so a .txt line holding U+FFFD counts here too).
                 Each is counted per file and reported on stderr as one `data: warning:` line.

`python data.py --bench` measures the pipeline's tokens/s per worker and derives how many workers a given step
time needs.
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
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------------------
# Vocabulary. Every id the model sees:
#   0..50255       GPT-2 byte-level BPE tokens (the only ids that are ever masked or drawn as random replacements)
#   50256          <|endoftext|>, GPT-2's separator: never produced (encode() does not parse special tokens)
#   50257 [CLS]    first token of every sequence
#   50258 [SEP]    last token of every sequence
#   50259 [PAD]    trailing padding (attention_mask 0)
#   50260 [MASK]   replaces 80% of the tokens chosen for MLM
#   50261..50303   never used: the embedding table is padded to a multiple of 64 (50304 rows)
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
# GPT-2's pre-tokenizer split (OpenAI's encoder.py), carried here: tiktoken_ext.openai_public exports it as
# r50k_pat_str only in recent releases. tests/test_data.py checks the ids against tiktoken's own gpt2 definition.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """GPT-2 BPE with ids identical to tiktoken.get_encoding("gpt2"), plus [CLS] [SEP] [PAD] [MASK] (50257..50260).

    The ranks come from assets/gpt2.tiktoken (checked against its sha256), the split regex is GPT2_PATTERN.
    encode() treats every string as ordinary text: "[CLS]" in a document is five BPE tokens, never the special id.
    """

    cls_id, sep_id, pad_id, mask_id, eot_id = CLS_ID, SEP_ID, PAD_ID, MASK_ID, EOT_ID
    vocab_size = VOCAB_SIZE   # padded embedding size (50304)
    n_tokens = N_TOKENS       # ids that can occur (50261)

    def __init__(self):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(GPT2_FILE), expected_hash=GPT2_SHA256)
        specials = {"<|endoftext|>": EOT_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[PAD]": PAD_ID, "[MASK]": MASK_ID}
        self.enc = tiktoken.Encoding("gpt2-bert", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """encode() over many documents on several threads (tiktoken releases the GIL)."""
        if num_threads <= 1:   # tiktoken's batch call always goes through a thread pool: costly for short texts
            return [self.enc.encode_ordinary(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of `ids`; the specials decode as "[CLS]" etc. Ids 50261..50303 (unused padding) raise KeyError."""
        return self.enc.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()


_SAFE_CUT = re.compile(r" (?=[A-Za-z])")


def _safe_prefix(text: str, n_chars: int) -> str:
    """A prefix of at least n_chars characters whose tokens are exactly a prefix of the tokens of `text`.

    It ends just before a ' ' that precedes an ASCII letter: GPT-2's split regex always starts a new piece there
    (no piece can hold a space followed by a letter unless it starts with that space), so BPE on both sides is
    unchanged. Used in truncate mode, which needs only the first ~126 tokens of a document.
    """
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


# --------------------------------------------------------------------------------------------------------------
# Reading documents. Every reader yields one (text, key) per record, or (None, None) for a counted skip, so the
# record index stays a stable position in the file(s) for resumption. `key` (the title when there is one, else
# the text) decides the train/validation split and seeds streamed masks.
# --------------------------------------------------------------------------------------------------------------
_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SOURCES_HELP = ("--data takes 'default' (the embedded Wikipedia sample), 'sentiment' (the sentiment sample's training "
                 "sentences, unlabelled), local sources joined with '+', 'c4' (streams allenai/c4 'en' from the "
                 "Hugging Face hub), or local files: a path, directory or glob of .jsonl/.json (a 'text' field per "
                 "record), .txt (one document per line) or .parquet (a 'text' column), optionally .gz/.bz2/.xz; "
                 "prefix it with 'stream:' to stream and shard the files like c4 instead of tokenizing them up front")


def _split_ext(path: str) -> tuple[str, str]:
    """('.jsonl', '.gz') for 'x.jsonl.gz'; ('.txt', '') for 'x.txt'."""
    stem, ext = os.path.splitext(path.lower())
    if ext in _OPENERS:
        return os.path.splitext(stem)[1], ext
    return ext, ""


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
                reason = "records with non-UTF-8 bytes"
        if reason:
            pass
        elif text is None:
            reason = "records without text"
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
    """Every record of one local file, through the `datasets` loaders (the embedded sample without them:
    GPU machines may lack `datasets`, and the default data must work everywhere)."""
    if os.path.abspath(path) == os.path.abspath(DEFAULT_CORPUS):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        yield from _records({"text": [r.get("text") for r in rows], "title": [r.get("title") for r in rows]},
                            path, False, skipped)
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


# --------------------------------------------------------------------------------------------------------------
# Documents -> rows. A row is a list of segments (doc, a, b): tokens [a, b) of a document, written as
# [CLS] tokens [SEP]. `_plan_rows` is shared by the local and the streamed paths; the position it reports after
# each row, (doc, offset), is what a checkpoint stores for a stream.
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# MLM masking. Uniform numbers come from a counter-based hash (splitmix64) of (row identity, position, purpose):
# a pure function, vectorised over the batch, independent of batch composition, rank, workers and resumes.
# --------------------------------------------------------------------------------------------------------------
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
    """BERT's masking of a batch of rows -> (input_ids, labels), both [R, S] int64.

    ids: [R, S] int64 rows ([CLS] ... [SEP], pads); row_keys: [R] uint64, one identity per row.
    Only BPE tokens (ids < 50256) are candidates: [CLS], [SEP], [PAD] are never masked. A row with n candidates gets
    exactly round(mask_prob * n) masked tokens, at least 1 when n > 0 and mask_prob > 0 (as in BERT's
    create_pretraining_data; every row then contributes to the loss). Each chosen token becomes [MASK] with
    probability 0.8, a uniform random BPE token (0..50255, never a special) with 0.1, stays with 0.1.
    labels hold the original id at chosen positions and -100 elsewhere.
    """
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
    """(real tokens, sum over windows of length^2) of a batch's attention_mask [B, S] (0 at pads, else the
    window's number within its row: 1 in truncate/chunk rows, 1, 2, 3, ... in packed ones).

    A token attends to its own window only, so attention's work is proportional to sum(len^2), and the mean
    context a real token sees is the ratio of the two: what MFU counts for attention (model.flops_per_token)
    instead of the padded row length, which would overstate packed or short rows.
    """
    m = np.asarray(attention_mask, dtype=np.int64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"attention_mask must be a non-empty [B, S] array, got shape {m.shape}")
    window = (np.arange(m.shape[0], dtype=np.int64)[:, None] * (int(m.max()) + 1) + m)[m != 0]  # (nnz,)
    lens = np.bincount(window)
    return int(lens.sum()), int((lens * lens).sum())


def _to_batch(input_ids, attention_mask, labels) -> dict:
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}


# --------------------------------------------------------------------------------------------------------------
# Local sources: read and tokenize every document once (cached in memory for the process), plan all rows once.
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Corpus:
    """The tokenized documents of one split, concatenated: doc d is tokens[starts[d]:starts[d + 1]]."""
    tokens: np.ndarray     # int32 [total]
    starts: np.ndarray     # int64 [n_docs + 1]

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.starts[d]:self.starts[d + 1]]


_CORPORA: dict = {}


def _tokenize_all(texts: list[str]) -> _Corpus:
    parts = []
    for i in range(0, len(texts), 4096):   # bounded Python-int lists; int32 arrays kept
        parts += _encode_docs(texts[i:i + 4096])
    lengths = np.array([len(p) for p in parts], np.int64)
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return _Corpus(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def _sentiment_text():
    """(text, key) of each training sentence of the embedded sentiment sample, its label dropped. Unlabelled
    in-domain text for pretraining ("don't stop pretraining", Gururangan et al. 2020); the dev file is never read."""
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
        lengths = np.diff(corpus.starts)
        seg, ptr = [], [0]
        for segments, _ in _plan_rows(enumerate(lengths.tolist()), mode, seq_len):
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
        self.position = 0
        self._perms = {}

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
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise DataError(f"the data position in the checkpoint does not fit this data ({what}). Resume with the "
                        "same --data, mode, seq_len, seed (and, for streams, world size and num_workers).")


# --------------------------------------------------------------------------------------------------------------
# Streamed sources ('c4', 'stream:PATH'): the stream is split into world_size * max(1, num_workers) disjoint
# shards (whole files when their count divides evenly, else every n-th record of each file). Each DataLoader
# worker reads one shard and yields whole per-rank batches; its position (epoch, file * FILE_STRIDE + record,
# token offset) travels with each batch so the main process can checkpoint it, and a resume opens that file.
# --------------------------------------------------------------------------------------------------------------
def _is_streamed(source: str) -> bool:
    return source == "c4" or source.startswith("stream:")


def _open_stream(source: str, split: str):
    """(IterableDataset of the whole split, whether it is .txt): sharding happens in each reader."""
    if source == "c4":
        import datasets
        try:
            return datasets.load_dataset("allenai/c4", "en", split=split, streaming=True), False
        except Exception as e:
            raise DataError(
                f"--data=c4: could not reach allenai/c4 on the Hugging Face hub ({type(e).__name__}: {e}). Without "
                "network access, copy C4's en json.gz files to this machine and point --data at them: "
                "--data='stream:/path/c4/en/c4-train.*.json.gz' streams and shards them like c4; a plain path or "
                "glob tokenizes them at start-up (fine for a few files); --data=default uses the embedded "
                "Wikipedia sample.") from e
    files = resolve_files(source[len("stream:"):])
    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise DataError(f"--data={source}: mixes file types ({sorted(builders)}); stream one type at a time.")
    builder = builders.pop()
    return _load_dataset(builder, files), builder == "text"


FILE_STRIDE = 1 << 32   # a streamed record's index is file * FILE_STRIDE + record within the file


def _shard_records(src, source: str, split: str, shard: int, n_shards: int, skipped: collections.Counter,
                   start: int = 0):
    """(index, text, key) for every record of one shard, in order (text None for skips and the other split).

    Shard s of T: whole files (the s-th contiguous block) when T divides the file count, else record r of file f
    when (f + r) % T == s. index = file * FILE_STRIDE + record within the file, so resuming at index `start` opens
    file start // FILE_STRIDE directly: whole files before it are never read, and the cost of a resume is at most
    one file's records (read, not tokenized), however far into the stream the run was.
    """
    ds, from_txt = src
    n_files = ds.num_shards
    if n_files % n_shards == 0:
        per = n_files // n_shards
        files, keep = range(shard * per, (shard + 1) * per), None
    else:
        files, keep = range(n_files), shard
    try:
        for f in files:
            if f < start // FILE_STRIDE:
                continue                                     # skipped whole: never opened
            r0 = 0                                           # record number (in file f) of the batch's first
            for batch in ds.shard(num_shards=n_files, index=f, contiguous=True).iter(batch_size=256):
                n, rs = len(next(iter(batch.values()))), None
                if keep is not None:                         # this shard's records only
                    rs = [r for r in range(r0, r0 + n) if (f + r) % n_shards == keep]
                    batch = {k: [v[r - r0] for r in rs] for k, v in batch.items()}
                for r, (text, key) in zip(range(r0, r0 + n) if rs is None else rs, _records(batch, source, from_txt, skipped)):
                    if text is not None and source != "c4" and _is_validation(key) != (split == "validation"):
                        text = None                          # local streams split by hash, like local files
                    yield f * FILE_STRIDE + r, text, key
                r0 += n
    except Exception as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"--data={source}: reading the stream failed ({type(e).__name__}: {e}). For c4 check the "
                        "network (or use local files, see --data); for local files fix the file.") from e


def _stream_rows(src, source, split, mode, seq_len, shard, n_shards, position, skipped, num_threads):
    """Endless rows of one shard: (ids [S], doc ids [S], key parts, position after the row) from `position`.

    position = (epoch, record, offset). Epochs restart the shard from its first record.
    """
    epoch, start = position[0], (position[1], position[2])
    max_tokens = seq_len - 2 if mode == "truncate" else None
    while True:
        recent = {}                                          # index -> (tokens, key hash) of docs still needed

        def lengths():                                       # (index, n_tokens), tokenizing 64 docs at a time
            pending = []
            for i, text, key in _shard_records(src, source, split, shard, n_shards, skipped, start[0]):
                if text is not None and i >= start[0]:      # records before the resume point: read, not tokenized
                    pending.append((i, text, key))
                if len(pending) == 64:
                    yield from flush(pending)
                    pending = []
            yield from flush(pending)

        def flush(pending):
            encoded = _encode_docs([t for _, t, _ in pending], max_tokens, num_threads)
            for (i, _, key), ids in zip(pending, encoded):
                recent[i] = (ids, _key_hash(key))
                yield i, len(ids)

        produced = False
        for segments, nxt in _plan_rows(lengths(), mode, seq_len, start):
            ids, docs = _build_rows([segments], lambda d: recent[d][0], seq_len)
            d0, a0 = segments[0][0], segments[0][1]
            key = (epoch, recent[d0][1], a0)
            for d in [d for d in recent if d < nxt[0]]:
                del recent[d]
            produced = True
            yield ids[0], docs[0], key, (epoch, nxt[0], nxt[1])
        if not produced and start == (0, 0):
            raise DataError(f"--data={source}: shard {shard} of {n_shards} has no {split} documents. Use fewer "
                            "processes x DataLoader workers, or more data (more files shard better).")
        epoch, start = epoch + 1, (0, 0)


class _StreamReader(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or in-process with num_workers=0): yields (worker, batch, position, skipped).

    Physical worker p plays logical worker (p + rotate) % n: after a resume the DataLoader's round robin, which always
    starts at worker 0, then continues with the logical worker that was next in the uninterrupted run.
    """

    def __init__(self, src, cfg: dict, positions: list, rotate: int, num_threads: int):
        self.src, self.cfg, self.positions, self.rotate, self.num_threads = src, cfg, positions, rotate, num_threads

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        p, n = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            for sig in (signal.SIGTERM, signal.SIGUSR1):     # preemption is the training process's to handle
                signal.signal(sig, signal.SIG_IGN)           # (train.py finishes the step and saves); a worker
            try:                                             # killed by the signal would fail the next batch
                import fsspec.asyn
                fsspec.asyn.reset_lock()                     # as datasets does in workers (fsspec hangs otherwise)
            except Exception:
                pass
        c = self.cfg
        w = (p + self.rotate) % n
        skipped = collections.Counter()
        rows = _stream_rows(self.src, c["source"], c["split"], c["mode"], c["seq_len"], c["rank"] * n + w,
                            c["world_size"] * n, self.positions[w], skipped, self.num_threads)
        while True:
            got = [next(rows) for _ in range(c["rows"])]
            ids, docs = np.stack([g[0] for g in got]), np.stack([g[1] for g in got])
            keys = np.array([g[2] for g in got], dtype=object)
            row_keys = hash64(c["seed"], _TRAIN_TAG, keys[:, 0].astype(np.int64), keys[:, 1].astype(np.uint64),
                              keys[:, 2].astype(np.int64))
            inputs, labels = mlm_mask(ids, row_keys, c["mask_prob"])
            yield w, _to_batch(inputs, docs, labels), list(got[-1][3]), dict(skipped)


class _StreamedStream:
    def __init__(self, source, split, seq_len, mode, mask_prob, seed, global_batch_size, rank, world_size,
                 num_workers):
        self.cfg = dict(source=source, split=split, seq_len=seq_len, mode=mode, mask_prob=mask_prob, seed=seed,
                        rows=global_batch_size // world_size, rank=rank, world_size=world_size)
        self.num_workers, self.global_batch_size = num_workers, global_batch_size
        self.src = _open_stream(source, split)
        n_files, readers = self.src[0].num_shards, world_size * max(1, num_workers)
        if n_files % readers and rank == 0:
            print(f"data: warning: {source} has {n_files} files, not a multiple of {readers} readers (ranks x "
                  f"workers): every reader reads all files and keeps 1 record in {readers}. Pick a world_size x "
                  "num_workers that divides the file count (c4: 1024 train / 8 validation files).", file=sys.stderr)
        self.positions = [[0, 0, 0] for _ in range(max(1, num_workers))]   # per logical worker
        self.threads = 1 if num_workers else 8                             # tokenizer threads per reader
        self.batches = 0
        self._it = None
        self._skipped, self._reported = {}, 0

    def _start(self):
        reader = _StreamReader(self.src, self.cfg, [list(p) for p in self.positions],
                               self.batches % max(1, self.num_workers), self.threads)
        if self.num_workers == 0:
            return iter(reader)
        return iter(torch.utils.data.DataLoader(reader, batch_size=None, num_workers=self.num_workers,
                                                prefetch_factor=2))

    def next_batch(self) -> dict:
        if self._it is None:
            self._it = self._start()
        w, batch, position, skipped = next(self._it)
        self.positions[w], self._skipped[w] = position, skipped
        self.batches += 1
        total = sum(sum(s.values()) for s in self._skipped.values())
        if total > 2 * self._reported and self.cfg["rank"] == 0:       # log lines grow like log2(skips)
            merged = sum((collections.Counter(s) for s in self._skipped.values()), collections.Counter())
            _warn_skipped(f"{self.cfg['source']} (rank 0, so far)", merged)
            self._reported = total
        return batch

    def _identity(self) -> dict:
        c = self.cfg
        return {"kind": "stream", "source": c["source"], "split": c["split"], "mode": c["mode"],
                "seq_len": c["seq_len"], "seed": c["seed"], "world_size": c["world_size"],
                "num_workers": self.num_workers, "record_index": "file * 2**32 + record"}

    def state_dict(self, gather: bool = False) -> dict:
        mine = [list(p) for p in self.positions]
        ranks = [None] * self.cfg["world_size"]                    # [rank][logical worker] = [epoch, record, offset]
        ranks[self.cfg["rank"]] = mine
        if gather and self.cfg["world_size"] > 1:
            torch.distributed.all_gather_object(ranks, mine)       # a collective: every rank must call it
        return {**self._identity(), "batches": self.batches, "positions": ranks}

    def load_state_dict(self, state: dict):
        _check_identity(self._identity(), state)
        ranks = state["positions"]
        if ranks[self.cfg["rank"]] is None:
            raise DataError(f"the checkpoint holds no stream position for rank {self.cfg['rank']}: with a streamed source and several processes, save "
                            "state_dict(gather=True), called on every rank.")
        self.positions = [list(p) for p in ranks[self.cfg["rank"]]]
        self.batches = int(state["batches"])
        self._it = None

    def describe(self) -> str:
        c = self.cfg
        return (f"data: {c['source']} ({c['split']}), streamed, {c['mode']} mode, rows of {c['seq_len']}: "
                f"{c['world_size'] * max(1, self.num_workers)} shards (ranks x workers), {c['rows']} rows per rank")


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
class PretrainStream:
    """Masked pretraining batches of one rank: see the module docstring.

    next_batch() -> {'input_ids', 'attention_mask', 'labels'}: CPU int64 [global_batch_size // world_size, seq_len],
    this rank's contiguous share of the next global batch. For local sources num_workers is ignored (batch assembly
    is a gather plus vectorised masking); for streams it is the number of DataLoader workers per rank.
    """

    def __init__(self, source: str = "default", split: str = "train", seq_len: int = 128, mode: str = "chunk",
                 mask_prob: float = 0.3, seed: int = 0, global_batch_size: int = 4096, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        _check_args(source, split, seq_len, mode, mask_prob, seed)
        if world_size < 1 or not 0 <= rank < world_size or global_batch_size < world_size \
                or global_batch_size % world_size:
            raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                            f"world_size={world_size} (and 0 <= rank={rank} < world_size).")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0")
        self.source, self.split, self.seq_len, self.mode = source, split, seq_len, mode
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        args = (source, split, seq_len, mode, mask_prob, seed, global_batch_size, rank, world_size)
        self._impl = _StreamedStream(*args, num_workers) if _is_streamed(source) else _LocalStream(*args)

    def next_batch(self) -> dict:
        return self._impl.next_batch()

    def state_dict(self, gather: bool = False) -> dict:
        """The data position (primitives only, fine for torch.load(weights_only=True)).

        Local sources: one global position, the same on every rank, so rank 0's dict resumes any world size.
        Streams: each rank has its own positions; gather=True all-gathers them (a collective: call it on every rank)
        so that rank 0's dict resumes all ranks. It is a no-op for local sources and single processes.
        """
        return self._impl.state_dict(gather) if isinstance(self._impl, _StreamedStream) else self._impl.state_dict()

    def load_state_dict(self, state: dict):
        self._impl.load_state_dict(state)

    def describe(self) -> str:
        """One line for the log: documents, rows, tokens, epoch length."""
        return self._impl.describe()

    @property
    def epoch(self) -> float | None:
        """Epochs done so far (fractional) for local sources; None for streams."""
        impl = self._impl
        return impl.position / impl.rows.n if isinstance(impl, _LocalStream) else None


def _check_args(source, split, seq_len, mode, mask_prob, seed):
    if not isinstance(source, str) or not source:
        raise DataError(f"empty --data. {_SOURCES_HELP}.")
    if split not in ("train", "validation"):
        raise DataError(f"split={split!r}: use 'train' or 'validation'")
    if mode not in MODES:
        raise DataError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    if seq_len < 3:
        raise DataError(f"seq_len={seq_len}: needs room for [CLS], one token and [SEP] (>= 3)")
    if not 0 <= mask_prob < 1:
        raise DataError(f"mask_prob={mask_prob}: must be in [0, 1)")
    if seed < 0:
        raise DataError(f"seed={seed}: must be >= 0")


def eval_batches(source: str = "default", seq_len: int = 128, mode: str = "chunk", batch_size: int = 32,
                 max_batches: int | None = None, mask_prob: float = 0.15, seed: int = 0) -> list[dict]:
    """Validation batches with fixed masks (15%, BERT's rate, by default): the same list on every call and rank.

    Rows come in corpus order (no shuffle); sample j's mask depends on (seed, j) only. Every batch holds batch_size
    rows except possibly the last, when the split runs out. max_batches=None takes the whole split (local
    sources only; streams need a limit).
    """
    _check_args(source, "validation", seq_len, mode, mask_prob, seed)
    if _is_streamed(source):
        if max_batches is None:
            raise DataError(f"eval_batches(--data={source}) needs max_batches: a streamed split is read in order")
        src, skipped = _open_stream(source, "validation"), collections.Counter()
        rows = _stream_rows(src, source, "validation", mode, seq_len, 0, 1, (0, 0, 0), skipped, 8)
        want, got = max_batches * batch_size, []
        for r in rows:
            if r[3][0] > 0 or len(got) == want:                   # one pass at most
                break
            got.append(r)
        if not got:
            raise DataError(f"--data={source}: the validation split is empty")
        ids, docs = np.stack([g[0] for g in got]), np.stack([g[1] for g in got])
    else:
        rows = _LocalRows(_local_corpus(source, "validation"), mode, seq_len)
        n = rows.n if max_batches is None else min(rows.n, max_batches * batch_size)
        ids, docs = rows.build(np.arange(n))
    inputs, labels = mlm_mask(ids, hash64(seed, _EVAL_TAG, np.arange(len(ids))), mask_prob)
    return [_to_batch(inputs[i:i + batch_size], docs[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, len(ids), batch_size)]


# --------------------------------------------------------------------------------------------------------------
# Benchmark: python data.py --bench [--source=...] [--steps=70000 --hours=1.13] (fields of BenchConfig)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchConfig:
    bench: bool = False            # run the benchmark (otherwise: print what the default data looks like)
    source: str = "default"        # local source to read; the per-worker test streams the same files
    seq_len: int = 128
    seconds: float = 3.0           # time spent per measurement
    global_batch_size: int = 4096  # the paper's batch: 4096 x 128 tokens per step
    gpus: int = 8
    steps: int = 70_000            # a schedule to derive a step time from: `steps` in `hours`
    hours: float = 1.13
    doc_chars: int = 2200          # document length of the streamed test corpus (C4 en averages roughly this)
    params: float = 137e6          # model parameters, only for the 6*N*tokens FLOP sanity line
    peak_tflops: float = 312.0     # per GPU, only for that line (A100 bf16 dense peak)


def _c4_like(texts: list[str], doc_chars: int, path: str):
    """Regroup articles' paragraphs into documents of about doc_chars characters (C4-like lengths) in a .jsonl."""
    import json
    with open(path, "w") as f:
        doc = ""
        for para in (p for t in texts for p in t.split("\n") if p.strip()):
            doc = f"{doc}\n{para}" if doc else para
            if len(doc) >= doc_chars:
                f.write(json.dumps({"text": doc}) + "\n")
                doc = ""


def _bench(cfg: BenchConfig):
    import tempfile
    files = [str(DEFAULT_CORPUS)] if cfg.source == "default" else resolve_files(cfg.source.removeprefix("stream:"))
    t = time.perf_counter()
    texts = [text for f in files for text, _ in _read_file(f, collections.Counter()) if text]
    t_read = time.perf_counter() - t
    n_chars = sum(map(len, texts))
    for threads in (1, 8):
        t = time.perf_counter()
        n_tok = sum(len(x) for x in get_tokenizer().encode_batch(texts, threads))
        dt = time.perf_counter() - t
        print(f"tokenize  {len(texts)} docs, {n_chars / 1e6:.1f}M chars: {n_tok / dt / 1e6:6.2f}M tokens/s "
              f"({threads} thread{'s' if threads > 1 else ''}; reading the files took {t_read:.2f} s)")
    tmp = tempfile.TemporaryDirectory()
    stream_source = "stream:" + os.path.join(tmp.name, "c4_like.jsonl")
    _c4_like(texts, cfg.doc_chars, stream_source[len("stream:"):])
    print(f"worker    = one reader streaming the same text regrouped into ~{cfg.doc_chars:,}-character documents "
          "(C4-like), tokenizing on 1 thread")

    rate = {}
    for mode in MODES:
        # one worker = the reader in this process, tokenizing on 1 thread: read + tokenize + rows + mask + tensors
        s = _StreamedStream(stream_source, "train", cfg.seq_len, mode, 0.3, 0, 256, 0, 1, num_workers=0)
        s.threads = 1
        s.next_batch()
        t, n, real = time.perf_counter(), 0, 0
        while time.perf_counter() - t < cfg.seconds:
            b = s.next_batch()
            n += b["input_ids"].numel()
            real += int((b["attention_mask"] > 0).sum())
        rate[mode] = n / (time.perf_counter() - t)
        print(f"worker    {mode:8s} {rate[mode] / 1e6:6.2f}M tokens/s per worker ({real / n:.0%} non-pad; "
              "stream read + tokenize + rows + mask)")
        local = PretrainStream(cfg.source.removeprefix("stream:"), "train", cfg.seq_len, mode, 0.3, 0, 512)
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < cfg.seconds / 2:
            n += local.next_batch()["input_ids"].numel()
        print(f"local     {mode:8s} {n / (time.perf_counter() - t) / 1e6:6.2f}M tokens/s in the training process "
              "(pre-tokenized corpus: gather + mask)")

    per_step = cfg.global_batch_size * cfg.seq_len
    step_time = cfg.hours * 3600 / cfg.steps
    need = per_step / step_time
    print(f"\nA global batch is {cfg.global_batch_size} x {cfg.seq_len} = {per_step:,} tokens.")
    print(f"{cfg.steps:,} steps in {cfg.hours} h -> {step_time * 1e3:.0f} ms/step -> {need / 1e6:.2f}M tokens/s in "
          f"all, {need / cfg.gpus / 1e6:.2f}M per GPU ({cfg.gpus} GPUs).")
    flops = 6 * cfg.params * need / cfg.gpus / 1e12
    print(f"  sanity: that is {flops:,.0f} TFLOP/s per GPU at 6 x {cfg.params / 1e6:.0f}M params x tokens/s "
          f"(peak {cfg.peak_tflops:.0f}){'  <- above peak: not a real schedule' if flops > cfg.peak_tflops else ''}")
    print("DataLoader workers needed to keep up (per GPU / in all), from the measured per-worker rates:")
    print("  step time    " + "".join(f"{m:>14s}" for m in MODES))
    for st in sorted({step_time, 0.1, 0.25, 0.5, 1.0}):
        need_gpu = per_step / st / cfg.gpus
        cells = "".join(f"{math.ceil(need_gpu / rate[m]):>7d} / {math.ceil(need_gpu / rate[m]) * cfg.gpus:<4d}"
                        for m in MODES)
        print(f"  {st * 1e3:7.0f} ms  {cells}")
    print("(Reading C4 over the network, or its json.gz decompression at scale, is not measured here.)")
    tmp.cleanup()


def main():
    import config
    cfg = config.parse_config(BenchConfig, sys.argv[1:])
    try:
        if cfg.bench:
            _bench(cfg)
        else:
            tok = get_tokenizer()
            for mode in MODES:
                s = PretrainStream(cfg.source, "train", cfg.seq_len, mode, global_batch_size=32)
                print(s.describe())
            b = PretrainStream(cfg.source, "train", cfg.seq_len, "pack", global_batch_size=2).next_batch()
            print("pack row 0:", tok.decode(b["input_ids"][0].tolist())[:300], "...")
            print("run `python data.py --bench` for throughput")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    import config
    config.main_guard(main)
