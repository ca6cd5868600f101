"""MosaicBERT and the BERT baseline as one model with independent switches.

Walk from BERT-base to MosaicBERT one change at a time (each a ModelConfig field):

    position                 "learned" absolute position embeddings (BERT)  ->  "alibi" (no position embeddings)
    ffn                      "gelu" MLP  ->  "geglu" gated linear unit
    unpad                    run every per-token layer on (nnz, d) real tokens instead of (B, S, d)
    low_precision_layernorm  under bf16 autocast, LayerNorm in bf16 instead of upcast to fp32
    sparse_prediction        the MLM head and loss only at the masked positions
    attn_backend             "sdpa" (fused, padded), "flex" (FlexAttention, packed), "naive" (reference)

Shape legend: B batch, S padded length, d model dim, H heads, D head dim, nnz real tokens,
V padded vocabulary, T tokens in the current layout (nnz when unpadded, else B*S).
Module and parameter names follow Hugging Face BERT closely enough that `hf.from_hf_bert`
maps them by rule (query/key/value are fused into one `Wqkv`). This file knows nothing of Hugging Face.
"""

import glob
import os
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# ----------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 50261           # real token ids (GPT-2's 50257 + [CLS] [SEP] [PAD] [MASK])
    vocab_multiple: int = 64          # the embedding is padded to a multiple of this (MosaicBERT: 64)
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    max_positions: int = 512          # learned position table size ("learned" only)
    type_vocab_size: int = 2
    position: str = "alibi"           # "alibi" | "learned"
    ffn: str = "geglu"                # "geglu" | "gelu"
    unpad: bool = True
    low_precision_layernorm: bool = True
    sparse_prediction: bool = True
    attn_backend: str = "auto"        # "auto" | "sdpa" | "flex" | "naive"
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.0
    layernorm_eps: float = 1e-12
    init_std: float = 0.02
    pooler: bool = False              # keep a pretrained [CLS] pooler (set by hf.from_hf_bert)
    pooling: str = "cls"              # classifier input: "cls" (tanh pooler on [CLS]) | "mean" (mean of real tokens)

    def __post_init__(self):
        checks = [
            (self.position in ("alibi", "learned"), f"position must be 'alibi' or 'learned', got {self.position!r}"),
            (self.ffn in ("geglu", "gelu"), f"ffn must be 'geglu' or 'gelu', got {self.ffn!r}"),
            (self.pooling in ("cls", "mean"), f"pooling must be 'cls' or 'mean', got {self.pooling!r}"),
            (self.attn_backend in kernels.BACKENDS, f"attn_backend must be one of {kernels.BACKENDS}"),
            (self.d_model % self.n_heads == 0, f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}"),
            (self.vocab_size > 0 and self.vocab_multiple > 0, "vocab_size and vocab_multiple must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of 64: the embedding and decoder matmuls tile evenly."""
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_BERT = dict(position="learned", ffn="gelu", unpad=False, low_precision_layernorm=False,
             sparse_prediction=False, attn_backend="sdpa", hidden_dropout=0.1, attn_dropout=0.1)
PRESETS = {
    "mosaic-bert-base": dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072),
    "mosaic-bert-large": dict(n_layers=24, d_model=1024, n_heads=16, d_ff=4096),
    "bert-base": dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, **_BERT),
    "bert-large": dict(n_layers=24, d_model=1024, n_heads=16, d_ff=4096, **_BERT),
    # small presets for CPU demos and tests. The MosaicBERT ones' classifiers pool the mean of the real tokens:
    # without a next-sentence task MLM never trains [CLS]'s output (it is never masked), and at CPU scale a fresh
    # pooler on an untrained [CLS] was measured to waste some of what pretraining learned (SequenceClassifier).
    "mosaic-bert-small": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, pooling="mean"),
    "mosaic-bert-tiny": dict(n_layers=2, d_model=128, n_heads=2, d_ff=512, pooling="mean"),
    "bert-tiny": dict(n_layers=2, d_model=128, n_heads=2, d_ff=512, **_BERT),  # BERT's head: [CLS] + pooler
}


# ----------------------------------------------------------------------------------------
# Layers


class LayerNorm(nn.LayerNorm):
    """LayerNorm with MosaicBERT's low-precision option.

    Low-precision LayerNorm: autocast normally runs layer_norm in fp32 (CUDA autocast upcasts it;
    here the fp32 path is explicit so CPU and GPU agree), so the residual stream is fp32 and every
    matmul casts its input down again. With low_precision=True
    and autocast active, the LayerNorm runs on bf16 input and bf16 weights instead: half the
    memory traffic for a memory-bound op, and the residual stream stays bf16 end to end.
    (MosaicBERT reports no quality loss from it.) Without autocast it is an ordinary LayerNorm.
    """

    def __init__(self, d, eps, low_precision=False):
        super().__init__(d, eps=eps)
        self.low_precision = low_precision

    def forward(self, x):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Explicit on both paths: CPU autocast does not reliably upcast layer_norm (a bf16 input
            # with fp32 weights comes out bf16), so "fp32 LayerNorm" is spelled out here too.
            dt = torch.get_autocast_dtype(dev) if self.low_precision else torch.float32
            with torch.autocast(dev, enabled=False):
                return F.layer_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.bias.to(dt), self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Dropout(nn.Dropout):
    """nn.Dropout with a faster mask on the CPU (on other devices it is nn.Dropout).

    The CPU's generator is sequential, so a dropout mask costs one draw per element: F.dropout
    (bernoulli_) takes ~5.5 ns per element on this CPU, 5% of a MosaicBERT-base training step.
    Here one 64-bit draw gives four 16-bit uniforms, compared against p quantized to 1/65536
    (p = 0.1 keeps with probability 1 - 6554/65536 = 0.89999), and the kept values are scaled by
    the exact 1 / P(keep), so the layer stays unbiased: ~2.3 ns per element. Seeded by
    torch.manual_seed like everything else; backward multiplies by the same saved mask.
    """

    def forward(self, x):
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return cpu_dropout(x, self.p)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with 16-bit uniforms, four per 64-bit draw (see Dropout)."""
    drop = round(p * 65536)  # out of 65536
    if drop >= 65536:
        return torch.zeros_like(x)
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform16 = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    keep = uniform16 >= drop - 32768  # P(keep) = (65536 - drop) / 65536
    return torch.where(keep, x * (65536 / (65536 - drop)), 0)  # the scale applied in fp32, then rounded


class Embeddings(nn.Module):
    """Token + token-type (+ learned position) embeddings, then LayerNorm and dropout.

    With ALiBi there is no position table at all: position enters only as the attention bias.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.LayerNorm = LayerNorm(cfg.d_model, cfg.layernorm_eps, cfg.low_precision_layernorm)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids, token_type_ids, position_ids):  # any shape (...,) -> (..., d)
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if position_ids is not None:
            h = h + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(h))


class GeGLU(nn.Module):
    """GeGLU feed-forward (Shazeer, 2020): out = W_o (GELU(x W_g) * (x W_v)).

    One fused (d -> 2*d_ff) matmul gives both the gate and the value. MosaicBERT uses it in
    place of BERT's GELU MLP at the same d_ff: ~35% more FFN parameters and FLOPs, but better
    quality per step, which more than pays for itself in time-to-accuracy.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated_layers = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):  # (T, d) -> (T, d)
        gate, value = self.gated_layers(x).chunk(2, dim=-1)  # each (T, d_ff)
        return self.wo(F.gelu(gate) * value)


class GeluMLP(nn.Module):
    """BERT's feed-forward: dense (d -> d_ff), exact erf GELU, dense (d_ff -> d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = nn.Linear(cfg.d_model, cfg.d_ff)
        self.output = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):  # (T, d) -> (T, d)
        return self.output(F.gelu(self.intermediate(x)))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer with fused QKV: h = LN(h + Attn(h)); h = LN(h + FFN(h)).

    Runs on whatever layout it is given: unpadded (nnz, d) tokens with an AttentionPlan, or the
    padded (B, S, d) batch with an additive attention mask. Every op except attention is per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.attn_dropout = cfg.attn_dropout
        self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_norm = LayerNorm(cfg.d_model, cfg.layernorm_eps, cfg.low_precision_layernorm)
        self.mlp = GeGLU(cfg) if cfg.ffn == "geglu" else GeluMLP(cfg)
        self.mlp_norm = LayerNorm(cfg.d_model, cfg.layernorm_eps, cfg.low_precision_layernorm)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, h, attn):
        H, D = self.n_heads, self.head_dim
        qkv = self.Wqkv(h)  # (T, 3d) or (B, S, 3d)
        if isinstance(attn, kernels.AttentionPlan):  # unpadded
            a = kernels.attend(qkv.view(-1, 3, H, D), attn)  # (nnz, H, D)
        else:  # padded; attn is the additive mask (B, H|1, S, S)
            B, S = h.shape[:2]
            p = self.attn_dropout if self.training else 0.0
            a = kernels.sdpa(qkv.view(B, S, 3, H, D), attn.to(qkv.dtype), p)  # (B, S, H, D)
        a = a.reshape(h.shape[:-1] + (H * D,))  # (T, d)
        h = self.attn_norm(h + self.dropout(self.attn_out(a)))
        return self.mlp_norm(h + self.dropout(self.mlp(h)))


# ----------------------------------------------------------------------------------------
# The encoder



@dataclass
class Layout:
    """Where the real tokens of a batch are: computed once per batch, shared by every layer.

    real_indices[nnz]: flat positions (b * S + s) of the real tokens.
    unpadded: hidden states are (nnz, d) and `attn` is a kernels.AttentionPlan;
    otherwise they are (B, S, d) and `attn` is the additive mask (B, H|1, S, S).
    """
    B: int
    S: int
    unpadded: bool
    real_indices: torch.Tensor
    cu_seqlens: torch.Tensor
    attn: object
    n_counted: int = 0  # Bert.layout's `count`: its set entries among the positions the model keeps

    def cls_rows(self):
        """(B,) index of each row's first real token ([CLS]) in the flattened hidden states, and (B,) whether
        the row has one (an all-pad row gets a valid placeholder index; its [CLS] vector counts as zero).
        Sorted searches, not a nonzero: no host sync."""
        row_of = torch.div(self.real_indices, self.S, rounding_mode="floor")  # (nnz,)
        rows = torch.arange(self.B, device=row_of.device)
        idx = torch.searchsorted(row_of, rows)  # (B,) the row's first token (its end, when the row is empty)
        has_token = torch.searchsorted(row_of, rows, right=True) > idx  # (B,)
        idx = idx.clamp(max=row_of.numel() - 1)
        return (idx if self.unpadded else self.real_indices[idx]), has_token


class LayoutCounts(NamedTuple):
    """The three ints a batch's layout is sized by (Bert.layout)."""
    nnz: int        # real tokens
    n_inner: int    # documents that start inside a row (packed document ids)
    n_counted: int  # set entries of the layout's `count` among the positions the model keeps


def layout_counts(attention_mask, count=None, unpad=True, starts=None) -> torch.Tensor:
    """int64 [3]: the LayoutCounts of attention_mask[B, S] and count (bool [B, S] or None), as a tensor on
    attention_mask's device. On a CPU batch, before it goes to the GPU, reading it waits on nothing.
    starts: kernels.document_starts(attention_mask), when the caller has it."""
    real = attention_mask.reshape(-1) != 0  # (B*S,)
    starts = kernels.document_starts(attention_mask) if starts is None else starts  # (B, S)
    counted = torch.zeros((), dtype=torch.long, device=real.device) if count is None else (
        (count.reshape(-1) & real) if unpad else count.reshape(-1)).sum()
    return torch.stack([real.sum(), starts.sum(), counted])


class Bert(nn.Module):
    """Embeddings and the encoder stack. Returns hidden states in the layout it ran in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.register_buffer("alibi_slopes", kernels.alibi_slopes(cfg.n_heads), persistent=False)

    def layout(self, attention_mask, dtype, count=None, counts: LayoutCounts | None = None) -> Layout:
        """Unpad and plan attention for this batch: eager, done before the layers run.

        Every data-dependent shape is built from three counts (see LayoutCounts): the real tokens (nnz), the
        documents that start inside a row (packed ids), and the set entries of `count` (bool [B, S], e.g. the
        masked tokens sparse prediction keeps) among the positions the model keeps. Given `counts` (read from
        the CPU batch by layout_counts before it went to the device), the layout never waits on the device;
        without them, it reads them in its one host sync.
        """
        cfg = self.config
        B, S = attention_mask.shape
        slopes = self.alibi_slopes if cfg.position == "alibi" else None
        starts = kernels.document_starts(attention_mask)  # (B, S)
        if counts is None:
            counts = LayoutCounts(*layout_counts(attention_mask, count, cfg.unpad, starts).tolist())  # THE host sync
        nnz, n_inner, n_counted = counts
        if nnz == 0:
            raise ValueError("the batch has no real tokens: attention_mask is all zero")
        real_indices = torch.nonzero_static(attention_mask.reshape(-1), size=nnz).flatten()  # (nnz,)
        cu_seqlens = kernels.seqlens_from_mask(attention_mask, real_indices, n_inner, starts)
        if cfg.unpad:
            # Plan attention at the padded width S, not the batch's true longest sequence:
            # the shapes then depend only on (B, S), which torch.compile can treat as static.
            p = cfg.attn_dropout if self.training else 0.0
            # resolved from the configured dropout, not p: training and evaluation run the same backend
            backend = kernels.resolve_backend(cfg.attn_backend, attention_mask.device, cfg.attn_dropout)
            attn = kernels.plan_attention(cu_seqlens, S, slopes, backend, (cfg.n_heads, cfg.head_dim), dtype, p,
                                          nnz=nnz)
        else:
            attn = kernels.padded_attention_mask(attention_mask, slopes, dtype)
        return Layout(B, S, cfg.unpad, real_indices, cu_seqlens, attn, n_counted)

    def forward(self, input_ids, attention_mask, token_type_ids=None, count=None, counts=None):
        """input_ids, attention_mask, token_type_ids: [B, S] -> (hidden [nnz, d] or [B, S, d], Layout).
        count: an optional bool [B, S] whose set entries the layout counts (n_counted).
        counts: the batch's LayoutCounts, when known (then no host sync; see Bert.layout)."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [B, S]")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        dev = input_ids.device
        dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                 else self.embeddings.word_embeddings.weight.dtype)
        lay = self.layout(attention_mask, dtype, count, counts)
        pos = self._positions(lay)
        if lay.unpadded:  # unpad: embed only the real tokens
            flat = lay.real_indices
            h = self.embeddings(input_ids.reshape(-1)[flat], token_type_ids.reshape(-1)[flat], pos)  # (nnz, d)
        else:
            h = self.embeddings(input_ids, token_type_ids, pos)  # (B, S, d)
        for layer in self.layers:
            if lay.unpadded:  # nnz varies per batch: each (compiled) layer sees it as dynamic from the start
                torch._dynamo.maybe_mark_dynamic(h, 0)
            h = layer(h, lay.attn)
        return h, lay

    def _positions(self, lay: Layout):
        """Position of each token within its own sequence (learned positions only; 0 at pads)."""
        if self.config.position != "learned":
            return None
        # checked on the padded width S (no sequence is longer), not the longest sequence: no host sync
        if lay.S > self.config.max_positions:
            raise ValueError(f"rows of {lay.S} tokens are longer than max_positions="
                             f"{self.config.max_positions}; shorten seq_len or use position='alibi'")
        _, pos = kernels.positions_in_sequence(lay.cu_seqlens, lay.real_indices.numel())  # (nnz,)
        return pos if lay.unpadded else kernels.pad(pos, lay.real_indices, lay.B, lay.S)


def to_padded(h, lay: Layout):
    """Hidden states in either layout -> [B, S, d], with zero rows at the pad positions."""
    if lay.unpadded:
        return kernels.pad(h, lay.real_indices, lay.B, lay.S)
    keep = torch.zeros(lay.B * lay.S, 1, device=h.device, dtype=h.dtype)
    keep[lay.real_indices] = 1
    return h * keep.view(lay.B, lay.S, 1)


# ----------------------------------------------------------------------------------------
# Heads


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the token embedding (with its own bias)."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.LayerNorm = LayerNorm(cfg.d_model, cfg.layernorm_eps, cfg.low_precision_layernorm)
        self.decoder_weight = word_embeddings.weight  # tied: the same Parameter
        self.bias = nn.Parameter(torch.zeros(cfg.padded_vocab_size))

    def transform(self, h):  # (M, d) -> (M, d): everything before the decoder
        return self.LayerNorm(F.gelu(self.dense(h)))

    def forward(self, h):  # (M, d) -> (M, V)
        return F.linear(self.transform(h), self.decoder_weight, self.bias)


class MLMOutput(NamedTuple):
    loss_sum: torch.Tensor   # fp32 sum of cross-entropy over the masked tokens (divide by the global count)
    n_correct: torch.Tensor  # masked tokens predicted right
    n_masked: torch.Tensor   # masked tokens in this batch


class BertForMaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg)
        self.head = MLMHead(cfg, self.bert.embeddings.word_embeddings)
        if cfg.pooler:
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        init_weights(self, cfg.init_std)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        """Final hidden states [B, S, d]; the rows at pad positions are zero."""
        h, lay = self.bert(input_ids, attention_mask, token_type_ids)
        return to_padded(h, lay)

    def logits(self, input_ids, attention_mask, token_type_ids=None):
        """Dense MLM logits [B, S, V] at every position (zeros at pads). For tests and inspection."""
        h = self.encode(input_ids, attention_mask, token_type_ids)
        return self.head(h) * (attention_mask != 0)[..., None]

    def layout_counts(self, attention_mask, labels) -> LayoutCounts:
        """The LayoutCounts forward needs for this batch: call it on the CPU batch, before it goes to the
        device, and pass the result as forward's `counts`; the forward then never waits on the device."""
        sparse = self.config.sparse_prediction
        return LayoutCounts(*layout_counts(attention_mask, (labels != -100) if sparse else None,
                                           self.config.unpad).tolist())

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, counts=None) -> MLMOutput:
        """MLM loss. labels[B, S]: the original token at masked positions, -100 elsewhere.
        counts: self.layout_counts(attention_mask, labels) of this batch, when known (no host sync then).

        Sparse prediction: MosaicBERT runs the head (d x V decoder, the largest matmul in the
        model at V=50304) only on the ~15-30% of tokens that are masked, instead of on all of
        them and discarding the rest. Same loss, a fraction of the head's FLOPs and memory.
        """
        sparse = self.config.sparse_prediction
        h, lay = self.bert(input_ids, attention_mask, token_type_ids, count=(labels != -100) if sparse else None,
                           counts=counts)
        h = h.reshape(-1, h.shape[-1])  # (T, d), T = nnz or B*S
        labels = labels.reshape(-1)[lay.real_indices] if lay.unpadded else labels.reshape(-1)  # (T,)
        if sparse:  # M, the masked-token count, is the layout's n_counted
            picked = torch.nonzero_static(labels != -100, size=lay.n_counted).flatten()  # (M,)
            h, labels = h[picked], labels[picked]  # (M, d), (M,)
            torch._dynamo.maybe_mark_dynamic(h, 0)
        # The decoder and the loss fused, chunk by chunk (kernels.linear_cross_entropy): the loss and
        # gradients of self._loss(self.head(h), labels) and the exact top-1 (argmax) count, without
        # ever holding the fp32 (M, V) logits.
        loss_sum, n_correct = kernels.linear_cross_entropy(self.head.transform(h), self.head.decoder_weight,
                                                           self.head.bias, labels)
        return MLMOutput(loss_sum, n_correct, (labels != -100).sum())

    @staticmethod
    def _loss(logits, labels) -> MLMOutput:  # (M, V), (M,)
        loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        masked = labels != -100
        with torch.no_grad():  # exact top-1: a label that only ties another token's maximum (common in bf16) is wrong
            n_correct = ((logits.argmax(-1) == labels) & masked).sum()
        return MLMOutput(loss_sum, n_correct, masked.sum())


class SequenceClassifier(nn.Module):
    """Sequence classification / regression: a pooled vector per sequence, dropout, linear.

    Pooling (`config.pooling`):
    - "cls": BERT's tanh pooler (dense + tanh) on the [CLS] token's final hidden state. The paper's fine-tuning
      head (Hugging Face's BertForSequenceClassification). BERT pretrains [CLS] with next-sentence prediction;
      MosaicBERT has no such task, so the pooler and [CLS]'s output start untrained.
    - "mean": the mean of the final hidden states of each sequence's real tokens (no pooler), as in
      Sentence-BERT (Reimers and Gurevych, 2019) and Cramming (Geiping and Goldstein, 2022). Every token's state
      is one MLM trained, so a tiny pretraining run hands the classifier more of what it learned.
    num_labels == 1 is regression (MSE, e.g. STS-B); otherwise cross-entropy.
    """

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.bert = Bert(cfg)
        if cfg.pooling == "cls":
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.classifier = nn.Linear(cfg.d_model, num_labels)
        init_weights(self, cfg.init_std)

    @classmethod
    def from_mlm(cls, mlm: BertForMaskedLM, num_labels: int) -> "SequenceClassifier":
        """A classifier whose encoder (and pooler, when the MLM model has a pretrained one) is a copy of mlm's."""
        clf = cls(replace(mlm.config, pooler=False), num_labels)
        clf.bert.load_state_dict(mlm.bert.state_dict())
        if hasattr(mlm, "pooler") and hasattr(clf, "pooler"):
            clf.pooler.load_state_dict(mlm.pooler.state_dict())
        return clf.to(next(mlm.parameters()).device)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        """-> (logits [B, num_labels], loss or None)."""
        h, lay = self.bert(input_ids, attention_mask, token_type_ids)
        if hasattr(self, "pooler"):  # pooling="cls" (read from the modules: hf.py's wrappers reuse this forward)
            rows, has_token = lay.cls_rows()
            cls = h.reshape(-1, h.shape[-1])[rows] * has_token[:, None]  # (B, d): each row's first token, [CLS]
            pooled = torch.tanh(self.pooler(cls))
        else:
            pooled = mean_pool(h, lay)  # (B, d)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return logits, loss


def mean_pool(h, lay: Layout):
    """Hidden states in either layout -> (B, d): each row's mean over its real tokens (summed in fp32)."""
    flat = h.reshape(-1, h.shape[-1])  # (nnz, d) or (B * S, d)
    real = flat if lay.unpadded else flat[lay.real_indices]  # (nnz, d)
    row = torch.div(lay.real_indices, lay.S, rounding_mode="floor")  # (nnz,): the row of each real token
    sums = torch.zeros(lay.B, h.shape[-1], device=h.device, dtype=torch.float32).index_add_(0, row, real.float())
    # tokens per row by index_add, not bincount: bincount sizes its output from max(row), a host sync on CUDA
    ones = torch.ones(row.numel(), 1, device=h.device, dtype=torch.float32)  # (nnz, 1)
    counts = torch.zeros(lay.B, 1, device=h.device, dtype=torch.float32).index_add_(0, row, ones).clamp(min=1)  # (B, 1)
    return (sums / counts).to(h.dtype)


def init_weights(module: nn.Module, std: float):
    """BERT init: normal(0, std) weights, zero biases, LayerNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if isinstance(module, BertForMaskedLM):
        nn.init.zeros_(module.head.bias)


def build(config: ModelConfig) -> BertForMaskedLM:
    return BertForMaskedLM(config)


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile, regionally: each encoder layer and the MLM head, in place.

    Unpadding and planning attention (data-dependent shapes, one host sync) stay eager, so the
    compiled regions see only the varying token count nnz, marked dynamic: one compile per
    region, reused by all 12 layers, and no recompiles as nnz changes from batch to batch.
    With FlexAttention the regions compile with dynamic=True: its BlockMask carries nnz as Python
    ints (seq_lengths), which a default compile specializes on the first batch, recompiling on the
    second. Check with TORCH_LOGS=recompiles. Returns the same module (its state_dict keys unchanged).
    `backend`: torch.compile's ("eager" lets tests count graphs without building kernels).
    """
    bert = model.bert if hasattr(model, "bert") else model
    cfg, device = bert.config, next(model.parameters()).device
    flex = cfg.unpad and kernels.resolve_backend(cfg.attn_backend, device, cfg.attn_dropout) == "flex"
    options = dict(backend=backend, dynamic=True if flex else None)
    for layer in bert.layers:
        layer.compile(**options)
    if isinstance(model, BertForMaskedLM):  # the head's dense, GELU and LayerNorm; the fused decoder + loss stays eager
        model.head.transform = torch.compile(model.head.transform, **options)
    return model


# ----------------------------------------------------------------------------------------
# FLOPs (for MFU)


def flops_per_token(cfg: ModelConfig, seq_len: int, mask_prob: float) -> float:
    """Training FLOPs (forward + backward = 3x forward) per real token, counting matmuls only.

    Per layer: QKV 2*d*3d, attention scores and values 2 * 2*d*seq_len (seq_len: the average
    context a token attends to), output projection 2*d*d, FFN 2*d*f*(2 if GeGLU else 1) + 2*f*d.
    The MLM head (2*d*d + 2*d*V) counts for every token when dense, for the masked fraction
    (mask_prob) under sparse prediction: the work each configuration must do, not a common
    "useful work" yardstick, so MFU compares how well each runs its own matmuls.
    """
    d, f, V = cfg.d_model, cfg.d_ff, cfg.padded_vocab_size
    ffn_in = 2 * f if cfg.ffn == "geglu" else f
    per_layer = 2 * d * 3 * d + 2 * 2 * d * seq_len + 2 * d * d + 2 * d * ffn_in + 2 * f * d
    head = (2 * d * d + 2 * d * V) * (mask_prob if cfg.sparse_prediction else 1.0)
    return 3.0 * (cfg.n_layers * per_layer + head)


def n_params(model: nn.Module) -> int:
    """Distinct parameters (the tied decoder weight counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path: str):
    """torch.save to path.tmp in the same directory, fsync, then os.replace: a crash leaves the
    previous file or the new one, never half of one."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def latest_checkpoint(out_dir: str) -> str | None:
    """The highest-step `ckpt_{step:07d}.pt` in out_dir, or None."""
    paths = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))
    return paths[-1] if paths else None


def config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"checkpoint model_config has unknown fields {sorted(unknown)}: "
                         f"it was written by a different version of model.py")
    return ModelConfig(**d)


def load_pretrained(path: str, map_location="cpu"):
    """A train.py checkpoint (a .pt file or the out_dir holding them) -> (BertForMaskedLM, ckpt dict)."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no ckpt_*.pt checkpoint in {path}: run train.py with --out_dir={path} first")
        path = found
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a ckpt_*.pt file or the --out_dir "
                                f"of a train.py run")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (no 'model' / 'model_config' entries)")
    model = build(config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt
