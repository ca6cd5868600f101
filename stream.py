"""Streamed pretraining sources ('c4', 'stream:PATH') for data.PretrainStream: shards, workers, resume.

The stream splits into world_size * max(1, num_workers) disjoint shards (whole files when their count divides, else
every n-th record); each worker yields whole per-rank batches with its position (epoch, file * FILE_STRIDE + record,
token offset), and a resume opens that file directly.
"""

import collections
import itertools
import signal
import sys

import numpy as np
import torch

from data import (_TRAIN_TAG, DataError, _build_rows, _builder_for, _check_identity, _encode_docs, _is_validation,
                  _key_hash, _load_dataset, _plan_rows, _records, _to_batch, _warn_skipped, hash64, mlm_mask,
                  resolve_files)


def open_stream(source: str, split: str):
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


def shard_records(src, source: str, split: str, shard: int, n_shards: int, skipped: collections.Counter,
                  start: int = 0):
    """(index, text, key) for every record of one shard, in order (text None for skips and the other split).
    Shard s of T: the s-th block of whole files when T divides the file count, else record r of file f when
    (f + r) % T == s. Resuming at index `start` opens file start // FILE_STRIDE directly (files before it are
    never read): a resume costs at most one file's records, however far into the stream the run was."""
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
                records = _records(batch, source, from_txt, skipped)
                for r, (text, key) in zip(range(r0, r0 + n) if rs is None else rs, records):
                    if text is not None and source != "c4" and _is_validation(key) != (split == "validation"):
                        text = None                          # local streams split by hash, like local files
                    yield f * FILE_STRIDE + r, text, key
                r0 += n
    except Exception as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"--data={source}: reading the stream failed ({type(e).__name__}: {e}). For c4 check the "
                        "network (or use local files, see --data); for local files fix the file.") from e


def stream_rows(src, source, split, mode, seq_len, shard, n_shards, position, skipped, num_threads):
    """Endless rows of one shard from position (epoch, record, offset): (ids [S], doc ids [S], key parts, position
    after the row). Epochs restart the shard from its first record."""
    epoch, start = position[0], (position[1], position[2])
    max_tokens = seq_len - 2 if mode == "truncate" else None
    while True:
        recent = {}                                          # index -> (tokens, key hash) of docs still needed

        def lengths():                                       # (index, n_tokens), tokenizing 64 docs at a time
            pending = []
            for i, text, key in shard_records(src, source, split, shard, n_shards, skipped, start[0]):
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


class StreamReader(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or in-process with num_workers=0): yields (worker, batch, position, skipped).
    Physical worker p plays logical worker (p + rotate) % n, so after a resume the DataLoader's round robin (always
    from worker 0) continues with the logical worker that was next in the uninterrupted run."""

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
        rows = stream_rows(self.src, c["source"], c["split"], c["mode"], c["seq_len"], c["rank"] * n + w,
                           c["world_size"] * n, self.positions[w], skipped, self.num_threads)
        while True:
            got = [next(rows) for _ in range(c["rows"])]
            ids, docs = np.stack([g[0] for g in got]), np.stack([g[1] for g in got])
            keys = np.array([g[2] for g in got], dtype=object)
            row_keys = hash64(c["seed"], _TRAIN_TAG, keys[:, 0].astype(np.int64), keys[:, 1].astype(np.uint64),
                              keys[:, 2].astype(np.int64))
            inputs, labels = mlm_mask(ids, row_keys, c["mask_prob"])
            yield w, _to_batch(inputs, docs, labels), list(got[-1][3]), dict(skipped)


class StreamedStream:
    def __init__(self, source, split, seq_len, mode, mask_prob, seed, global_batch_size, rank, world_size,
                 num_workers):
        self.cfg = dict(source=source, split=split, seq_len=seq_len, mode=mode, mask_prob=mask_prob, seed=seed,
                        rows=global_batch_size // world_size, rank=rank, world_size=world_size)
        self.num_workers, self.global_batch_size = num_workers, global_batch_size
        self.src = open_stream(source, split)
        n_files, readers = self.src[0].num_shards, world_size * max(1, num_workers)
        if n_files % readers and rank == 0:
            print(f"data: warning: {source} has {n_files} files, not a multiple of {readers} readers (ranks x "
                  f"workers): every reader reads all files and keeps 1 record in {readers}. Pick a world_size x "
                  "num_workers that divides the file count (c4: 1024 train / 8 validation files).", file=sys.stderr)
        self.positions = [[0, 0, 0] for _ in range(max(1, num_workers))]   # per logical worker
        self.threads = 1 if num_workers else 8                             # tokenizer threads per reader
        self.batches, self._it = 0, None
        self._skipped, self._reported = {}, 0

    def _start(self):
        reader = StreamReader(self.src, self.cfg, [list(p) for p in self.positions],
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
            raise DataError(f"the checkpoint holds no stream position for rank {self.cfg['rank']}: with a streamed "
                            "source and several processes, save state_dict(gather=True), called on every rank.")
        self.positions = [list(p) for p in ranks[self.cfg["rank"]]]
        self.batches = int(state["batches"])
        self._it = None

    def describe(self) -> str:
        c = self.cfg
        return (f"data: {c['source']} ({c['split']}), streamed, {c['mode']} mode, rows of {c['seq_len']}: "
                f"{c['world_size'] * max(1, self.num_workers)} shards (ranks x workers), {c['rows']} rows per rank")


def eval_rows(source: str, mode: str, seq_len: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows (ids, doc ids) of a stream's validation split, in order, one pass at most."""
    rows = stream_rows(open_stream(source, "validation"), source, "validation", mode, seq_len, 0, 1, (0, 0, 0),
                       collections.Counter(), 8)
    got = list(itertools.takewhile(lambda r: r[3][0] == 0, itertools.islice(rows, n)))   # one pass at most
    if not got:
        raise DataError(f"--data={source}: the validation split is empty")
    return np.stack([g[0] for g in got]), np.stack([g[1] for g in got])
