"""MosaicBERT and the BERT baseline as one model with independent switches.

Walk from BERT-base to MosaicBERT one change at a time (each a ModelConfig field):

    position                 "learned" absolute position embeddings (BERT)  ->  "alibi" (no position embeddings)
    ffn                      "gelu" MLP  ->  "geglu" gated linear unit
    unpad                    run every per-token layer on (nnz, d) real tokens instead of (B, S, d)
    low_precision_layernorm  under bf16 autocast, LayerNorm in bf16 instead of upcast to fp32
    sparse_prediction        the MLM head and loss only at the masked positions
    attn_backend             "sdpa" (fused, padded), "flex" (FlexAttention, packed), "naive" (reference)

A batch's path: Bert.layout unpads it once (kernels.unpad_index) and plans attention (kernels.plan_attention);
every EncoderLayer runs kernels.attend; BertForMaskedLM's sparse head runs kernels.linear_cross_entropy.
Shape legend: B batch, S padded length, d model dim, H heads, D head dim, nnz real tokens, V padded vocabulary,
T tokens in the current layout (nnz when unpadded, else B*S). Names follow Hugging Face BERT so that
`hf.from_hf_bert` maps them by rule (query/key/value fused into one `Wqkv`); this file knows nothing of HF.
"""

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
    vocab_multiple: int = 64          # vocab padded to a multiple of 64 (MosaicBERT): see padded_vocab_size
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
        if bad := [msg for ok, msg in checks if not ok]:
            raise ValueError(f"ModelConfig: {bad[0]}")

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded to a multiple of 64 (MosaicBERT: BERT's 30,522 -> 30,528): the embedding and decoder
        matmuls then tile evenly on the hardware, for free; the extra rows are never a target."""
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
    # small presets for CPU demos and tests; their classifiers pool the mean of the real tokens (SequenceClassifier)
    "mosaic-bert-small": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, pooling="mean"),
    "mosaic-bert-tiny": dict(n_layers=2, d_model=128, n_heads=2, d_ff=512, pooling="mean"),
    "bert-tiny": dict(n_layers=2, d_model=128, n_heads=2, d_ff=512, **_BERT),  # BERT's head: [CLS] + pooler
}


# ----------------------------------------------------------------------------------------
# Layers


class LayerNorm(nn.LayerNorm):
    """Low-precision LayerNorm (MosaicBERT): autocast runs LayerNorm in fp32; low_precision=True runs it on bf16
    input and weights: half the memory traffic of a memory-bound op and a bf16 residual stream, which the matmuls
    need not cast again (MosaicBERT reports no quality loss). Without autocast: an ordinary LayerNorm."""

    def __init__(self, d, eps, low_precision=False):
        super().__init__(d, eps=eps)
        self.low_precision = low_precision

    def forward(self, x):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # explicit on both paths: CPU autocast does not reliably upcast layer_norm, so CPU and GPU agree
            dt = torch.get_autocast_dtype(dev) if self.low_precision else torch.float32
            with torch.autocast(dev, enabled=False):
                return F.layer_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.bias.to(dt), self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Embeddings(nn.Module):
    """Token + token-type (+ learned position) embeddings, LayerNorm, dropout. With ALiBi there is no
    position table: position enters only as the attention bias."""

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
    """GeGLU feed-forward (Shazeer, 2020): out = W_o (GELU(x W_g) * (x W_v)). One fused (d -> 2*d_ff) matmul
    gives gate and value. MosaicBERT uses it for BERT's GELU MLP at the same d_ff: ~35% more FFN FLOPs, but
    better quality per step, which more than pays for itself in time-to-accuracy."""

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
    """Post-LN transformer layer with fused QKV: h = LN(h + Attn(h)); h = LN(h + FFN(h)). Runs in either layout:
    unpadded (nnz, d) with an AttentionPlan, or padded (B, S, d) with an additive mask (B, H|1, S, S)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.attn_dropout = cfg.n_heads, cfg.head_dim, cfg.attn_dropout
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
# The encoder: unpad once per batch, then the layers


@dataclass
class Layout:
    """Where a batch's real tokens are, once per batch for every layer. real_indices[nnz]: their flat positions
    (b * S + s). unpadded: hidden states (nnz, d), `attn` a kernels.AttentionPlan; else (B, S, d) and a mask."""
    B: int
    S: int
    unpadded: bool
    real_indices: torch.Tensor
    cu_seqlens: torch.Tensor
    attn: object
    n_counted: int = 0  # Bert.layout's `count`: its set entries among the positions the model keeps

    def cls_rows(self):
        """(B,) index of each row's first real token ([CLS]) in the flat hidden states, and (B,) whether the row
        has one (an all-pad row gets a placeholder index; its [CLS] counts as zero). No host sync."""
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


def layout_counts(attention_mask, count=None, unpad=True, starts=None) -> LayoutCounts:
    """The LayoutCounts of attention_mask[B, S] and count (bool [B, S] or None): one host read, which waits on
    nothing for a CPU batch before it goes to the GPU. starts: kernels.document_starts(attention_mask)."""
    real = attention_mask.reshape(-1) != 0  # (B*S,)
    starts = kernels.document_starts(attention_mask) if starts is None else starts  # (B, S)
    counted = torch.zeros((), dtype=torch.long, device=real.device) if count is None else (
        (count.reshape(-1) & real) if unpad else count.reshape(-1)).sum()
    return LayoutCounts(*torch.stack([real.sum(), starts.sum(), counted]).tolist())


class Bert(nn.Module):
    """Embeddings and the encoder stack. Returns hidden states in the layout it ran in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.register_buffer("alibi_slopes", kernels.alibi_slopes(cfg.n_heads), persistent=False)

    def layout(self, attention_mask, dtype, count=None, counts: LayoutCounts | None = None) -> Layout:
        """Unpad (kernels.unpad_index) and plan attention (kernels.plan_attention) once, before the layers. Every
        data-dependent shape comes from the LayoutCounts (of `count`: bool [B, S], e.g. the masked tokens): given
        `counts`, read on the CPU batch, nothing waits on the device; else the one host sync reads them."""
        cfg = self.config
        B, S = attention_mask.shape
        slopes = self.alibi_slopes if cfg.position == "alibi" else None
        starts = kernels.document_starts(attention_mask)  # (B, S)
        if counts is None:
            counts = layout_counts(attention_mask, count, cfg.unpad, starts)  # THE host sync
        nnz, n_inner, n_counted = counts
        if nnz == 0:
            raise ValueError("the batch has no real tokens: attention_mask is all zero")
        real_indices, cu_seqlens = kernels.unpad_index(attention_mask, nnz, n_inner, starts)  # (nnz,), (n+1,)
        if cfg.unpad:
            # planned at the padded width S (shapes depend only on B, S), the backend from the configured dropout
            p = cfg.attn_dropout if self.training else 0.0
            backend = kernels.resolve_backend(cfg.attn_backend, attention_mask.device, cfg.attn_dropout)
            attn = kernels.plan_attention(cu_seqlens, S, slopes, backend, (cfg.n_heads, cfg.head_dim), dtype, p,
                                          nnz=nnz)
        else:
            attn = kernels.padded_attention_mask(attention_mask, slopes, dtype)
        return Layout(B, S, cfg.unpad, real_indices, cu_seqlens, attn, n_counted)

    def forward(self, input_ids, attention_mask, token_type_ids=None, count=None, counts=None):
        """input_ids, attention_mask, token_type_ids: [B, S] -> (hidden [nnz, d] or [B, S, d], Layout).
        count (bool [B, S]) and counts (LayoutCounts, when known: no host sync then): see Bert.layout."""
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
        if lay.S > self.config.max_positions:  # the padded width (no sequence is longer): no host sync
            raise ValueError(f"rows of {lay.S} tokens are longer than max_positions="
                             f"{self.config.max_positions}; shorten seq_len or use position='alibi'")
        _, pos = kernels.positions_in_sequence(lay.cu_seqlens, lay.real_indices.numel())  # (nnz,)
        return pos if lay.unpadded else kernels.pad(pos, lay.real_indices, lay.B, lay.S)


def to_padded(h, lay: Layout):
    """Hidden states in either layout -> [B, S, d], with zero rows at the pad positions."""
    if lay.unpadded:
        return kernels.pad(h, lay.real_indices, lay.B, lay.S)
    ones = torch.ones(lay.real_indices.numel(), 1, device=h.device, dtype=h.dtype)  # (nnz, 1)
    return h * kernels.pad(ones, lay.real_indices, lay.B, lay.S)  # zero the pad rows


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
        return layout_counts(attention_mask, (labels != -100) if sparse else None, self.config.unpad)

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, counts=None) -> MLMOutput:
        """MLM loss. labels[B, S]: the original token at masked positions, -100 elsewhere. counts:
        self.layout_counts(attention_mask, labels) of this batch, when known (no host sync then).
        Sparse prediction: MosaicBERT runs the head (d x V decoder, the largest matmul at V=50304) only on
        the ~15-30% masked tokens, not on all of them: same loss, a fraction of the head's FLOPs and memory."""
        sparse = self.config.sparse_prediction
        h, lay = self.bert(input_ids, attention_mask, token_type_ids, count=(labels != -100) if sparse else None,
                           counts=counts)
        h = h.reshape(-1, h.shape[-1])  # (T, d), T = nnz or B*S
        labels = labels.reshape(-1)[lay.real_indices] if lay.unpadded else labels.reshape(-1)  # (T,)
        if sparse:  # M, the masked-token count, is the layout's n_counted
            picked = torch.nonzero_static(labels != -100, size=lay.n_counted).flatten()  # (M,)
            h, labels = h[picked], labels[picked]  # (M, d), (M,)
            torch._dynamo.maybe_mark_dynamic(h, 0)
        # decoder + loss fused chunk by chunk (reference: kernels.linear_cross_entropy_naive): the loss, its
        # gradients and the exact top-1 (argmax) count, never holding the fp32 (M, V) logits
        loss_sum, n_correct = kernels.linear_cross_entropy(self.head.transform(h), self.head.decoder_weight,
                                                           self.head.bias, labels)
        return MLMOutput(loss_sum, n_correct, (labels != -100).sum())


class SequenceClassifier(nn.Module):
    """Sequence classification / regression (num_labels == 1: MSE, else CE): a pooled vector, dropout, linear.
    Pooling "cls": BERT's tanh pooler on [CLS], the paper's head (untrained: MosaicBERT has no next-sentence
    task); "mean": the mean of the real tokens' states (Sentence-BERT, Cramming), every one of which MLM trained."""

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
        if labels is None:
            return logits, None
        if self.num_labels == 1:  # regression
            return logits, F.mse_loss(logits.float().squeeze(-1), labels.float())
        return logits, F.cross_entropy(logits.float(), labels)


def mean_pool(h, lay: Layout):
    """Hidden states in either layout -> (B, d): each row's mean over its real tokens (summed in fp32)."""
    flat = h.reshape(-1, h.shape[-1])  # (nnz, d) or (B * S, d)
    real = flat if lay.unpadded else flat[lay.real_indices]  # (nnz, d)
    row = torch.div(lay.real_indices, lay.S, rounding_mode="floor")  # (nnz,): the row of each real token
    # each row's sum and token count (the appended 1s) by index_add: bincount would size itself by a host sync
    sums = torch.zeros(lay.B, h.shape[-1] + 1, device=h.device, dtype=torch.float32)
    sums.index_add_(0, row, F.pad(real.float(), (0, 1), value=1.0))  # (B, d + 1)
    return (sums[:, :-1] / sums[:, -1:].clamp(min=1)).to(h.dtype)


def init_weights(module: nn.Module, std: float):
    """BERT init: normal(0, std) weights, zero biases, LayerNorm weight 1 and bias 0 (MLMHead.bias is created zero)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build(config: ModelConfig) -> BertForMaskedLM:
    return BertForMaskedLM(config)


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each encoder layer and the MLM head in place (state_dict keys unchanged). Unpadding and
    planning stay eager, so the regions see only the token count nnz, marked dynamic: no recompiles as it
    changes (flex: dynamic=True; check with TORCH_LOGS=recompiles). backend="eager": tests count graphs."""
    bert = model.bert if hasattr(model, "bert") else model
    cfg, device = bert.config, next(model.parameters()).device
    flex = cfg.unpad and kernels.resolve_backend(cfg.attn_backend, device, cfg.attn_dropout) == "flex"
    options = dict(backend=backend, dynamic=True if flex else None)
    for layer in bert.layers:
        layer.compile(**options)
    if isinstance(model, BertForMaskedLM):  # the head's dense, GELU and LayerNorm; the fused decoder + loss stays eager
        model.head.transform = torch.compile(model.head.transform, **options)
    return model


def n_params(model: nn.Module) -> int:
    """Distinct parameters (the tied decoder weight counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# FLOPs (for MFU) and loading a train.py checkpoint


def flops_per_token(cfg: ModelConfig, seq_len: int, mask_prob: float) -> float:
    """Training FLOPs (forward + backward = 3x forward) per real token, matmuls only. seq_len: the average context
    a token attends to. The MLM head counts for every token when dense, for mask_prob of them when sparse."""
    d, f, V = cfg.d_model, cfg.d_ff, cfg.padded_vocab_size
    ffn_in = 2 * f if cfg.ffn == "geglu" else f
    per_layer = 2 * d * 3 * d + 2 * 2 * d * seq_len + 2 * d * d + 2 * d * ffn_in + 2 * f * d
    head = (2 * d * d + 2 * d * V) * (mask_prob if cfg.sparse_prediction else 1.0)
    return 3.0 * (cfg.n_layers * per_layer + head)


def config_from_dict(d: dict) -> ModelConfig:
    unknown = set(d) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"checkpoint model_config has unknown fields {sorted(unknown)}: "
                         f"it was written by a different version of model.py")
    return ModelConfig(**d)


def load_pretrained(path: str, map_location="cpu"):
    """A train.py checkpoint (a .pt file or the out_dir holding them) -> (BertForMaskedLM, ckpt dict)."""
    if os.path.isdir(path):
        from checkpoint import latest_checkpoint  # noqa: PLC0415  (training-side code, not in an hf.export copy)
        if (found := latest_checkpoint(path)) is None:
            raise FileNotFoundError(f"no ckpt_*.pt checkpoint in {path}: run train.py with --out_dir={path} first")
        path = found
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a ckpt_*.pt file or a train.py --out_dir")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (no 'model' / 'model_config' entries)")
    model = build(config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


# ----------------------------------------------------------------------------------------
# CPU workarounds: speed only, the same dropout in distribution (timings in docs/log.md)


class Dropout(nn.Dropout):
    """nn.Dropout, with a cheaper mask on the CPU (elsewhere it is nn.Dropout): the CPU's generator draws one
    value per element, so one 64-bit draw here gives four 16-bit uniforms, against p quantized to 1/65536, and
    kept values are scaled by the exact 1 / P(keep) (unbiased). Seeded by torch.manual_seed like the rest."""

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
