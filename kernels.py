"""Attention kernels for MosaicBERT: ALiBi, unpadding, three interchangeable backends, the fused MLM loss.

Shape legend (used in every docstring and shape comment):
    B   sequences in the padded batch        S   padded sequence length
    H   attention heads                      D   head dimension
    nnz real (non-pad) tokens in the batch   n   sequences after unpadding (n = B for 0/1 masks)
    L   max_seqlen, the longest of the n sequences

Unpadding (MosaicBERT's "unpad"): every linear layer, LayerNorm and GeGLU is per token, so running them on the
packed (nnz, d) real tokens instead of (B*S, d) skips the pad tokens' work entirely. Only attention needs to know
where one sequence ends and the next begins: `cu_seqlens` [0, len_0, len_0+len_1, ..., nnz], as in FlashAttention's
varlen API. The model calls `unpad_index` (the core of `unpad`) with counts read on the CPU batch: no host sync.

ALiBi (Press et al., 2022): no position embeddings; each head h adds -slope_h * |i - j| to the score
of query i and key j (symmetric: the encoder form MosaicBERT uses). It extrapolates past the trained
length, costs no parameters, and is fast: part of one fused mask (sdpa) or a score_mod (flex).

Backends (packed qkv in, packed output out): naive, the reference (explicit softmax per sequence); sdpa, re-pad to
(n, H, L, D) for F.scaled_dot_product_attention's fused (flash) kernel, ALiBi and padding one additive mask; flex,
FlexAttention on the packed sequence (the role FlashAttention plays in MosaicBERT): ALiBi a `score_mod`, a document
block mask, so no FLOPs go to padding or across documents (GPU training; forward only on the CPU); auto, flex on
CUDA. The model plans once per batch (`plan_attention`), each layer calls `attend`; `attention()` does both.
"""

import contextlib
import functools
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.attention.flex_attention as flex_module

BACKENDS = ("naive", "sdpa", "flex", "auto")

# Additive bias for "may not attend": finite, so a pad query's all-masked row is uniform, not NaN; exp() is 0.
MASK_VALUE = -1e30


# ----------------------------------------------------------------------------------------
# ALiBi


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s ALiBi slopes, fp32 [H]: for a power of 2, head h (1-based) gets 2^(-8h/H); otherwise the
    slopes of the nearest lower power of 2, p, then every other slope of the 2p-head set (12 heads: 1/2 ... 1/256,
    then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)."""
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be >= 1, got {n_heads}")

    def power_of_2_slopes(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_2_slopes(p)
    if p < n_heads:
        slopes += power_of_2_slopes(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, L: int, device=None) -> torch.Tensor:
    """The symmetric ALiBi bias -slope_h * |i - j| as fp32 [H, L, L]."""
    pos = torch.arange(L, device=device)
    dist = (pos[:, None] - pos[None, :]).abs().float()  # (L, L)
    return -slopes.to(device=device, dtype=torch.float32)[:, None, None] * dist


# ----------------------------------------------------------------------------------------
# unpad / pad


def unpad(x: torch.Tensor, attention_mask: torch.Tensor):
    """Drop the pad tokens: x[B, S, ...] -> (x_unpadded[nnz, ...], indices[nnz], cu_seqlens, max_seqlen).
    attention_mask[B, S]: 0 marks padding, a nonzero value is a document id within its row: a plain 0/1
    mask gives one sequence per row (cu_seqlens int32 [B+1], empty rows as zero-length sequences), a
    packed row 1,1,1,2,2,0 two. indices: the flat positions (b * S + s) of the real tokens; `pad` is the
    exact inverse, and gradients flow through both. The reference form: it reads the counts from the
    device (host syncs, as FlashAttention's unpad_input); the model calls `unpad_index` with counts."""
    B, S = attention_mask.shape
    if x.shape[:2] != (B, S):
        raise ValueError(f"unpad: x has shape {tuple(x.shape)} but attention_mask is {(B, S)}")
    indices, cu_seqlens = unpad_index(attention_mask)
    x_unpadded = gather_rows(x.reshape(B * S, *x.shape[2:]), indices)  # (nnz, ...)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return x_unpadded, indices, cu_seqlens, max_seqlen


def unpad_index(attention_mask: torch.Tensor, nnz: int | None = None, n_inner: int | None = None,
                starts: torch.Tensor | None = None):
    """The index half of `unpad`, which the model calls: attention_mask[B, S] -> (indices[nnz], cu_seqlens [n+1]).
    Given nnz and n_inner (document_starts(mask).sum()), read on the CPU batch, nothing waits on the device."""
    starts = document_starts(attention_mask) if starts is None else starts  # (B, S)
    real = attention_mask.reshape(-1) != 0  # (B*S,)
    indices = (torch.nonzero(real) if nnz is None else torch.nonzero_static(real, size=nnz)).flatten()  # (nnz,)
    return indices, seqlens_from_mask(attention_mask, indices, n_inner, starts)


def seqlens_from_mask(attention_mask, indices, n_inner: int | None = None, doc_starts=None) -> torch.Tensor:
    """cu_seqlens (int32 [n+1]) of the sequences in attention_mask[B, S] (see `unpad_index`)."""
    row_lens = (attention_mask != 0).sum(1)  # (B,)
    row_starts = F.pad(row_lens.cumsum(0), (1, 0))  # (B+1,) the row boundaries, in real tokens
    doc_starts = document_starts(attention_mask) if doc_starts is None else doc_starts  # (B, S)
    starts = doc_starts.reshape(-1)[indices]  # (nnz,) in packed order
    # (n_inner,): the documents starting inside a row; without n_inner, a host sync
    inner = (torch.nonzero(starts) if n_inner is None else torch.nonzero_static(starts, size=n_inner)).flatten()
    if inner.numel() == 0:
        return row_starts.to(torch.int32)
    return torch.sort(torch.cat([row_starts, inner])).values.to(torch.int32)


def document_starts(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: the real tokens that start a new document inside their row, i.e. whose id differs
    from that of the previous real token of the same row (a row's first real token never does)."""
    B, S = attention_mask.shape
    real = attention_mask != 0
    pos = torch.arange(S, device=attention_mask.device).expand(B, S)
    last_real = torch.where(real, pos, -1).cummax(1).values  # (B, S): the last real position <= s
    prev = F.pad(last_real[:, :-1], (1, 0), value=-1)  # (B, S): the last real position < s, or -1
    prev_id = attention_mask.gather(1, prev.clamp(min=0))
    return real & (prev >= 0) & (prev_id != attention_mask)


def pad(x_unpadded: torch.Tensor, indices: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Scatter x_unpadded[nnz, ...] back to x[B, S, ...], with zeros at the pad positions."""
    return scatter_rows(x_unpadded, indices, B * S).view(B, S, *x_unpadded.shape[1:])


class _GatherRows(torch.autograd.Function):
    """out = x[index] for an index without repeats. The backward is a plain index_put, not index_select's
    scatter-add (index_add), which is much slower on the CPU and needless when no row is picked twice."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.n_rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return scatter_rows(grad, index, ctx.n_rows), None


class _ScatterRows(torch.autograd.Function):
    """out = zeros(n_rows, ...); out[index] = x, for an index without repeats. Backward: grad[index]."""

    @staticmethod
    def forward(ctx, x, index, n_rows):
        ctx.save_for_backward(index)
        return x.new_zeros((n_rows,) + x.shape[1:]).index_put_((index,), x)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return gather_rows(grad, index), None, None


gather_rows = _GatherRows.apply  # (x[N, ...], index[M]) -> x[index]; index must not repeat
scatter_rows = _ScatterRows.apply  # (x[M, ...], index[M], N) -> [N, ...], row index[i] = x[i], zeros elsewhere


def document_ids(cu_seqlens: torch.Tensor, nnz: int | None = None) -> torch.Tensor:
    """int32 [nnz]: the sequence (document) of every packed token; nnz, when known, saves a host sync."""
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    nnz = int(cu_seqlens[-1]) if nnz is None else nnz
    ids = torch.arange(seqlens.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, seqlens, output_size=nnz)


def positions_in_sequence(cu_seqlens: torch.Tensor, nnz: int | None = None):
    """(sequence index, position within that sequence) of every packed token: two int64 [nnz]."""
    seq = document_ids(cu_seqlens, nnz).long()
    return seq, torch.arange(seq.numel(), device=seq.device) - cu_seqlens.long()[seq]


# ----------------------------------------------------------------------------------------
# Per-batch attention plan


@dataclass
class AttentionPlan:
    """What attention needs that depends only on the batch layout, built once per batch. naive: the sequence
    bounds as ints; sdpa: pad_index[nnz] into the (n*L) padded layout and the additive mask [n, H or 1, L, L]
    (ALiBi plus padding) in the compute dtype; flex: the document BlockMask and the ALiBi score_mod."""
    backend: str
    cu_seqlens: torch.Tensor
    max_seqlen: int
    slopes: torch.Tensor | None
    dropout_p: float = 0.0
    bounds: list | None = None
    pad_index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    block_mask: object = None
    score_mod: object = None
    flex_fn: object = None


def resolve_backend(backend: str, device: torch.device, attn_dropout: float = 0.0) -> str:
    """The backend `backend` names on `device`. "auto": flex on CUDA (packed: no work on padding) unless the model
    has attention dropout, which flex lacks; sdpa elsewhere. On CUDA the choice is printed once, with its reason."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cuda":
        return "sdpa"
    chosen = "flex" if attn_dropout == 0 else "sdpa"
    _say_auto_backend(chosen, float(attn_dropout))
    return chosen


@functools.lru_cache(maxsize=None)
def _say_auto_backend(chosen: str, attn_dropout: float):
    why = "flex has no attention dropout" if chosen == "sdpa" else "no attention dropout"
    print(f"attention: auto -> {chosen} on CUDA ({why}; attn_dropout={attn_dropout:g})", flush=True)


def plan_attention(cu_seqlens, max_seqlen, slopes=None, backend="auto", head_shape=None,
                   dtype=torch.float32, dropout_p=0.0, nnz=None) -> AttentionPlan:
    """Build the per-batch AttentionPlan (see the class). `dtype` is the dtype q/k/v will have,
    head_shape their (H, D). max_seqlen and nnz (the real-token count) are Python ints: given them,
    the sdpa and flex plans never wait on the device (nnz=None reads it from cu_seqlens: a host sync)."""
    device = cu_seqlens.device
    backend = resolve_backend(backend, device, dropout_p)
    plan = AttentionPlan(backend, cu_seqlens, int(max_seqlen), slopes, dropout_p)
    nnz = int(cu_seqlens[-1]) if nnz is None else nnz
    if backend == "naive":
        plan.bounds = cu_seqlens.tolist()  # a host sync: the reference loops over sequences in Python
    elif backend == "sdpa":
        plan.pad_index, plan.mask = _sdpa_plan(cu_seqlens, int(max_seqlen), slopes, dtype, nnz)
    else:
        if dropout_p > 0:
            raise ValueError("the flex attention backend has no attention dropout; "
                             "set attn_dropout=0 or use attn_backend='sdpa'")
        plan.block_mask, plan.score_mod = _flex_plan(cu_seqlens, slopes, nnz)
        plan.flex_fn = compiled_flex_attention((slopes is not None, dtype, device.type, head_shape))  # eagerly
    return plan


def attend(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Attention of packed qkv[nnz, 3, H, D] under a plan -> [nnz, H, D]."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"attention expects packed qkv of shape (nnz, 3, H, D), got {tuple(qkv.shape)}")
    return {"naive": _naive, "sdpa": _sdpa_varlen, "flex": _flex}[plan.backend](qkv, plan)


def attention(qkv, cu_seqlens, max_seqlen, slopes=None, backend="auto", dropout_p=0.0):
    """Bidirectional attention within each sequence of the packed batch: qkv[nnz, 3, H, D], cu_seqlens int32
    [n+1], max_seqlen = L -> out[nnz, H, D]. slopes[H]: ALiBi (-slope_h * |i - j|); None: no bias (BERT)."""
    plan = plan_attention(cu_seqlens, max_seqlen, slopes, backend, tuple(qkv.shape[2:]), qkv.dtype, dropout_p)
    return attend(qkv, plan)


# ----------------------------------------------------------------------------------------
# naive: the reference


def _naive(qkv, plan):
    """Explicit softmax(q k^T / sqrt(D) + bias) v, one sequence at a time. Slow, obviously right."""
    D = qkv.shape[-1]
    outs = []
    for start, end in zip(plan.bounds[:-1], plan.bounds[1:]):
        q, k, v = qkv[start:end].unbind(1)  # each (len, H, D)
        scores = torch.einsum("ihd,jhd->hij", q.float(), k.float()) / math.sqrt(D)  # (H, len, len)
        if plan.slopes is not None:
            scores = scores + alibi_bias(plan.slopes, end - start, qkv.device)
        probs = torch.softmax(scores, dim=-1)
        probs = F.dropout(probs, plan.dropout_p, training=plan.dropout_p > 0)
        outs.append(torch.einsum("hij,jhd->ihd", probs, v.float()).to(qkv.dtype))  # (len, H, D)
    return torch.cat(outs, 0) if outs else qkv.new_zeros(0, *qkv.shape[2:])


# ----------------------------------------------------------------------------------------
# sdpa: re-pad and call the fused kernel


def padded_attention_mask(attention_mask: torch.Tensor, slopes, dtype) -> torch.Tensor:
    """Additive mask for the padded layout: attention_mask[B, S] -> [B, H or 1, S, S]. Query i may attend key j
    when both are real tokens of one document (same nonzero id), plus ALiBi when slopes is given. Pad queries
    attend nowhere (a row of MASK_VALUE: a uniform softmax over garbage that the caller discards)."""
    B, S = attention_mask.shape
    ids = attention_mask
    allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] != 0)  # (B, S, S)
    mask = torch.zeros(B, 1, S, S, device=ids.device, dtype=torch.float32)
    mask = mask.masked_fill(~allowed[:, None], MASK_VALUE)
    if slopes is not None:
        mask = mask + alibi_bias(slopes, S, ids.device)[None]  # (B, H, S, S)
    return mask.to(dtype)


def sdpa(qkv: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Padded attention: qkv[B, S, 3, H, D] and an additive mask [B, H or 1, S, S] -> [B, S, H, D].
    F.scaled_dot_product_attention picks its fused (flash) kernel; CPU training: see cpu_sdpa_kernel."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D)
    with cpu_sdpa_kernel(qkv):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, S, D)
    return out.transpose(1, 2)  # (B, S, H, D)


def _sdpa_plan(cu_seqlens, L, slopes, dtype, nnz):
    """pad_index[nnz]: where each packed token sits in the (n*L) padded layout; mask [n, H|1, L, L]."""
    n = cu_seqlens.numel() - 1
    if nnz == n * L:  # no padding at all (e.g. full-length pretraining rows): no re-pad needed
        if slopes is None:
            return None, None
        mask = alibi_bias(slopes, L, cu_seqlens.device)[None].expand(n, -1, -1, -1).to(dtype)  # (n, H, L, L)
        torch._dynamo.maybe_mark_dynamic(mask, 0)
        return None, mask
    seq_of_token, pos = positions_in_sequence(cu_seqlens, nnz)
    pad_index = seq_of_token * L + pos  # (nnz,)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (n,)
    key_is_real = torch.arange(L, device=cu_seqlens.device)[None, :] < seqlens[:, None]  # (n, L)
    mask = torch.zeros(n, 1, 1, L, device=cu_seqlens.device, dtype=torch.float32)
    mask = mask.masked_fill(~key_is_real[:, None, None, :], MASK_VALUE)
    if slopes is not None:
        mask = mask + alibi_bias(slopes, L, cu_seqlens.device)[None]  # (n, H, L, L)
    else:
        mask = mask.expand(n, 1, L, L)
    mask = mask.to(dtype)
    for t in (pad_index, mask):  # nnz (and n, for packed rows) vary per batch: no recompile
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return pad_index, mask


def _sdpa_varlen(qkv, plan):
    nnz, _, H, D = qkv.shape
    n, L = plan.cu_seqlens.numel() - 1, plan.max_seqlen
    mask = plan.mask if plan.mask is None or plan.mask.dtype == qkv.dtype else plan.mask.to(qkv.dtype)
    if plan.pad_index is None:  # every sequence is L long: the packed batch is already (n, L)
        return sdpa(qkv.view(n, L, 3, H, D), mask, plan.dropout_p).reshape(nnz, H, D)
    padded = scatter_rows(qkv, plan.pad_index, n * L)  # (n*L, 3, H, D)
    out = sdpa(padded.view(n, L, 3, H, D), mask, plan.dropout_p)  # (n, L, H, D)
    return gather_rows(out.reshape(n * L, H, D), plan.pad_index)  # (nnz, H, D)


# ----------------------------------------------------------------------------------------
# flex: FlexAttention on the packed sequence

FLEX_BLOCK = 128  # FlexAttention's sparse block size (both q and kv)
_compiled_flex = {}


def _flex_call(q, k, v, score_mod, block_mask):
    return flex_module.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


def compiled_flex_attention(variant: tuple):
    """flex_attention under torch.compile (eager flex materialises the whole score matrix), created on first
    use; dynamic=True: one kernel serves every nnz. One code object per variant (ALiBi or not, dtype, device):
    this torch's CPU inductor fails to build a dynamic flex graph recompiled for a second variant."""
    if variant not in _compiled_flex:
        name = "flex_" + "".join(c if c.isalnum() else "_" for c in str(variant))
        fn = types.FunctionType(_flex_call.__code__.replace(co_name=name), _flex_call.__globals__, name)
        _compiled_flex[variant] = torch.compile(fn, dynamic=True)
    return _compiled_flex[variant]


def document_block_mask(cu_seqlens: torch.Tensor, block: int = FLEX_BLOCK, nnz: int | None = None):
    """The document BlockMask over nnz packed tokens, from cu_seqlens. A (q block, kv block) pair is computed when
    the blocks share a document, "full" (no mask_mod call) when both lie wholly inside one: FlexAttention skips every
    other block, so no FLOPs go to padding or across documents. O((nnz/128)^2) tiny ops from block-level document
    ranges, not create_block_mask's nnz^2 token pairs; symmetric, so the q blocks are the kv blocks."""
    device = cu_seqlens.device
    doc = document_ids(cu_seqlens, nnz)  # (nnz,)
    nnz = doc.numel()
    nb = (nnz + block - 1) // block
    starts = torch.arange(0, nb * block, block, device=device)  # (nb,)
    ends = (starts + (block - 1)).clamp_(max=nnz - 1)  # (nb,) each block's last token
    first, last = doc[starts], doc[ends]  # (nb,) documents of each block's first and last token
    overlap = (first[None, :] <= last[:, None]) & (first[:, None] <= last[None, :])  # (nb, nb), symmetric
    one_doc = (first == last) & (ends - starts == block - 1)  # (nb,): a short last block is never full
    full = overlap & (one_doc[:, None] & one_doc[None, :]) & (first[:, None] == first[None, :])  # (nb, nb)

    # (nb, nb) bool -> num_blocks (1, 1, nb), indices (1, 1, nb, nb), set blocks first. Each its own tensor:
    # views into one stacked tensor made this torch's CPU inductor emit flex C++ that fails to build.
    def to_indices(blocks):
        num = blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort(blocks.logical_not().to(torch.uint8), dim=-1, stable=True).to(torch.int32)
        return num.view(1, 1, nb), order.view(1, 1, nb, nb)

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    part_num, part_idx = to_indices(overlap & ~full)
    full_num, full_idx = to_indices(full)
    return flex_module.BlockMask(seq_lengths=(nnz, nnz), kv_num_blocks=part_num, kv_indices=part_idx,
                                 full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=part_num,
                                 q_indices=part_idx, full_q_num_blocks=full_num, full_q_indices=full_idx,
                                 BLOCK_SIZE=(block, block), mask_mod=mask_mod)


def _flex_plan(cu_seqlens, slopes, nnz):
    block_mask = document_block_mask(cu_seqlens, nnz=nnz)
    if slopes is None:
        return block_mask, None
    slopes = slopes.to(device=cu_seqlens.device, dtype=torch.float32)

    def alibi_score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return block_mask, alibi_score_mod


def _flex(qkv, plan):
    q, k, v = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)  # each (1, H, nnz, D)
    if qkv.device.type == "cpu" and torch.is_grad_enabled() and qkv.requires_grad:
        try:  # torch's one check against flex's CPU backward (tests lift it), asked eagerly to say what to do
            flex_module._validate_device(q, k, v)
        except NotImplementedError as e:
            raise NotImplementedError("the flex attention backend has no backward pass on the CPU in this torch; use "
                                      "attn_backend='sdpa' to train on the CPU, or flex under torch.no_grad()") from e
    out = plan.flex_fn(q, k, v, plan.score_mod, plan.block_mask)  # (1, H, nnz, D)
    return out[0].transpose(0, 1)  # (nnz, H, D)


# ----------------------------------------------------------------------------------------
# The MLM head's decoder and cross-entropy, fused


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of CE(x W^T + b, labels) and the count of exact top-1 hits, chunk by chunk over the rows.

    The forward computes each chunk's logits (c, V) in the compute dtype, its fp32 log-sum-exp, argmax and
    the logits' gradient softmax - onehot, kept in the compute dtype: G (M, V). The backward is two matmuls,
    G @ W and G^T @ x, and a column sum. Never held: the fp32 (M, V) logits, log-softmax and gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk_rows, dtype, grad):  # (M, d), (V, d), (V,), (M,)
        (M, _), V = x.shape, weight.shape[0]
        xc, wc, bc = x.to(dtype), weight.to(dtype), bias.to(dtype)
        c = max(1, min(chunk_rows, M))  # M may be 0: a micro-batch without masked tokens
        logits_buf = torch.empty(c, V, dtype=dtype, device=x.device)  # (c, V), reused by every chunk
        z_buf = torch.empty(c, V, dtype=torch.float32, device=x.device)  # (c, V) fp32, reused
        # G's rows rounded up to a whole chunk: fewer distinct allocation sizes from step to step
        G = torch.empty(-(-M // c) * c, V, dtype=dtype, device=x.device)[:M] if grad else None  # (M, V)
        grad_bias = torch.zeros(V, dtype=torch.float32, device=x.device) if grad else None  # (V,)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        n_correct = torch.zeros((), dtype=torch.int64, device=x.device)
        for start in range(0, M, c):
            sl = slice(start, min(start + c, M))
            n = sl.stop - start
            y = labels[sl]  # (n,)
            valid = y != -100
            target = y.clamp(min=0)[:, None]  # (n, 1)
            logits = torch.addmm(bc, xc[sl], wc.t(), out=logits_buf[:n])  # (n, V) in the compute dtype
            z = z_buf[:n].copy_(logits)  # (n, V) fp32, exactly the logits' values
            # exact top-1 in the max's pass: max(dim) returns the first maximal index, argmax's rule; no host sync
            mx, top1 = z.max(-1, keepdim=True)  # (n, 1), (n, 1)
            z_label = z.gather(1, target)  # (n, 1)
            n_correct += ((top1.squeeze(1) == y) & valid).sum()
            g = z.sub_(mx).exp_()  # (n, V): exp(z - max)
            total = g.sum(-1, keepdim=True)  # (n, 1)
            lse = mx + total.log()
            loss += ((lse - z_label).squeeze(1) * valid).sum()
            if grad:  # softmax - onehot = (exp(z - max) - total * onehot) / total; ignored rows zero
                g.scatter_add_(1, target, -total)
                g.mul_(valid[:, None] / total)
                grad_bias += g.sum(0)
                G[sl] = g
        if grad:
            ctx.save_for_backward(G, xc, wc, grad_bias)
            ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(n_correct)
        return loss, n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        G, xc, wc, grad_bias = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        gx = ((G @ wc).float() * grad_loss).to(x_dtype) if need[0] else None  # (M, d)
        gw = ((G.t() @ xc).float() * grad_loss).to(w_dtype) if need[1] else None  # (V, d)
        gb = (grad_bias * grad_loss).to(b_dtype) if need[2] else None  # (V,)
        return gx, gw, gb, None, None, None, None


# Rows per chunk of the fused decoder + loss: the matmul near peak, few GPU launches, rows x V x 6 bytes of buffers
CHUNK_ROWS = {"cpu": 256, "cuda": 2048}


def default_chunk_rows(device: torch.device) -> int:
    """linear_cross_entropy's rows per chunk on this device (CHUNK_ROWS; other accelerators as CUDA)."""
    return CHUNK_ROWS.get(torch.device(device).type, CHUNK_ROWS["cuda"])


def linear_cross_entropy(x, weight, bias, labels, chunk_rows: int = 0):
    """Fused decoder + cross-entropy: (sum over rows of CE(x W^T + b), rows whose argmax is the label).

    x (M, d), weight (V, d), bias (V,), labels (M,) with -100 for rows to ignore -> the fp32 loss sum
    (differentiable) and the int64 count of rows whose argmax (first index on ties) is the label. Matmuls in
    autocast's dtype, as F.linear; log-sum-exp in fp32. chunk_rows 0: default_chunk_rows. Reference:
    linear_cross_entropy_naive. Sparse prediction's head: fast because the fp32 (M, V) logits are never held."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if chunk_rows <= 0:
        chunk_rows = default_chunk_rows(x.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))  # no G in evaluation
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, bias, labels, chunk_rows, dtype, grad)


def linear_cross_entropy_naive(x, weight, bias, labels):
    """The reference: full logits, fp32 cross-entropy, argmax."""
    logits = F.linear(x, weight, bias)  # (M, V)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    n_correct = ((logits.argmax(-1) == labels) & (labels != -100)).sum()
    return loss, n_correct


# ----------------------------------------------------------------------------------------
# CPU workarounds: speed only, the same attention either way (timings in docs/log.md)

CPU_MATH_MAX_SEQLEN = 128  # CPU training at sequence lengths up to this uses SDPA's math kernel


def cpu_sdpa_kernel(qkv: torch.Tensor):
    """SDPA's math kernel when training short sequences on the CPU (S <= CPU_MATH_MAX_SEQLEN), whose flash
    backward is tuned for long ones; a no-op context otherwise (evaluation keeps flash, GPUs choose)."""
    short = (qkv.device.type == "cpu" and qkv.shape[1] <= CPU_MATH_MAX_SEQLEN
             and torch.is_grad_enabled() and qkv.requires_grad)
    return sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext()
