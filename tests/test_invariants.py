"""Invariants that other tests pin on a reference path or with one crafted input, checked again on the
production path that training and evaluation actually run, with the same crafted inputs.

    invariant                                   production path checked here
    top-1: a label that only ties the max       kernels.linear_cross_entropy (fp32, bf16, bf16 autocast, chunk
           is wrong (first index wins)          sizes 1, 2, 3, 256) and BertForMaskedLM.forward's n_correct
    rows all -100, no masked token at all       linear_cross_entropy at every chunking; the model's forward
    loss normalised by the global count         linear_cross_entropy's gradient of loss_sum / N with uneven
                                                masked counts per chunk (through the model and
                                                train.mlm_step: test_train.py's global-mean tests)
    all-pad rows and one-token rows             attention: naive, sdpa (math and flash kernels), flex (its block
                                                mask and score_mod, run eagerly); the model's encoder per
                                                backend; mean_pool; the classifier ("mean" and "cls" pooling)
    packed documents at 128-token boundaries    document_block_mask, flex and sdpa on packed rows

The hypothesis strategies here are adversarial: logits from a few small integers (frequent ties,
exact in fp32 and bf16), label masks that are empty, full or single, lengths at the 128-token block boundary;
`example` pins the cases that must always run.
"""

import contextlib
import math
import warnings
from dataclasses import replace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

import kernels as K
import model as M
from test_scale import mask_from_rows

TINY = M.ModelConfig.preset("mosaic-bert-tiny", hidden_dropout=0.0, vocab_size=300)
BF16 = torch.bfloat16
CHUNKS = [1, 2, 3, 256]  # one row per chunk, uneven tails, and everything in one chunk


def first_argmax_hits(logits, labels) -> int:
    """Rows whose label is the *first* maximal logit, counted here without argmax: the label's logit is strictly
    greater than every logit before it and at least every logit after it. -100 rows never count."""
    hits = 0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        if y != -100 and all(row[y] > u for u in row[:y]) and all(row[y] >= u for u in row[y + 1:]):
            hits += 1
    return hits


# ---------------------------------------------------------------------------- top-1 with ties, fused

# x @ I + 0 gives exactly these logits in fp32 and in bf16 (small integers; 256 and 257 differ only in fp32)
TIES = torch.tensor([[1., 3., 3., 0.],      # label 2 ties token 1's max: wrong
                     [1., 3., 3., 0.],      # label 1 is the first max: right
                     [0., 0., 5., 5.],      # label 3 ties: wrong
                     [0., 9., 0., 0.],      # ignored (-100)
                     [2., 2., 2., 2.],      # all tied, label 0: right
                     [2., 2., 2., 2.],      # all tied, label 3: wrong
                     [7., 1., 7., 7.],      # label 0 is the first of three maxima: right
                     [256., 257., 0., 0.]])  # label 1: right in fp32; in bf16 257 rounds to 256, a tie: wrong
TIE_LABELS = torch.tensor([2, 1, 3, -100, 0, 3, 0, 1])
TIE_HITS = {"fp32": 4, "bf16": 3, "bf16_autocast": 3}


def run_lce(fn, x, w, b, labels, mode, scale=1.0):
    """fn(x, w, b, labels) in fp32, on bf16 tensors, or under bf16 autocast from fp32 tensors; returns the loss
    sum, the top-1 count and the gradients of x, w and b after backward of loss * scale."""
    cast = BF16 if mode == "bf16" else torch.float32
    x, w, b = (t.detach().to(cast).requires_grad_() for t in (x, w, b))
    with torch.autocast("cpu", dtype=BF16) if mode == "bf16_autocast" else contextlib.nullcontext():
        loss, correct = fn(x, w, b, labels)
    (loss * scale).backward()
    return loss.detach(), correct, x.grad, w.grad, b.grad


@pytest.mark.parametrize("mode", list(TIE_HITS))
def test_fused_top1_counts_a_label_that_only_ties_the_max_as_wrong(mode):
    """The fused head's exact top-1 at every chunking, in fp32, bf16 and bf16 autocast (where 256 and 257 tie):
    a label whose logit ties an earlier token's maximum is wrong; the count equals the hand count and the
    first-maximum count computed here without argmax. The loss matches the plain path on the same ties."""
    V = TIES.shape[1]
    w, b = torch.eye(V), torch.zeros(V)
    logits = TIES.to(BF16) if mode != "fp32" else TIES
    assert first_argmax_hits(logits, TIE_LABELS) == TIE_HITS[mode]
    ref = run_lce(K.linear_cross_entropy_naive, TIES, w, b, TIE_LABELS, mode)
    assert ref[1].item() == TIE_HITS[mode]
    for chunk in CHUNKS:
        got = run_lce(lambda *a: K.linear_cross_entropy(*a, chunk_rows=chunk), TIES, w, b, TIE_LABELS, mode)
        assert got[1].item() == TIE_HITS[mode], (chunk, got[1].item())
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-5)


def tied_model(cfg, tie=(5, 9)):
    """A model whose decoder gives tokens tie[0] < tie[1] exactly the same logit, far above every other token's:
    their decoder (= embedding) rows are zero and both biases are 30 (exact in bf16)."""
    torch.manual_seed(0)
    m = M.build(cfg).eval()
    with torch.no_grad():
        m.head.decoder_weight[list(tie)] = 0
        m.head.bias[list(tie)] = 30.0
    return m


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("sparse,unpad", [(True, True), (False, True), (True, False)])
def test_model_n_correct_counts_tied_labels_as_wrong(sparse, unpad, bf16):
    """BertForMaskedLM.forward (the fused head, as training and evaluation run it): with tokens 5 and 9 tied at the
    top of every row, masked labels 5 are right, labels 9 (only tied) and any other token are wrong."""
    m = tied_model(replace(TINY, sparse_prediction=sparse, unpad=unpad))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 300, (3, 8), generator=g)
    mask = (torch.arange(8)[None] < torch.tensor([8, 5, 1])[:, None]).long()
    labels = torch.full((3, 8), -100)
    labels[0, [0, 2, 5]] = torch.tensor([5, 9, 5])
    labels[1, [1, 4]] = torch.tensor([9, 123])
    labels[2, 0] = 5  # a one-token row
    with torch.autocast("cpu", dtype=BF16, enabled=bf16), torch.no_grad():
        out = m(ids, mask, labels)
    assert out.n_masked.item() == 6 and out.n_correct.item() == 3


# ---------------------------------------------------------------------------- adversarial fused head: ties, empty and full masks


@st.composite
def tied_lce_case(draw):
    """x, w, b from a few small integers (logits exact in fp32 and bf16, ties frequent) and labels drawn
    to be all ignored, none ignored, a single one kept, or any mix; M = 0 included."""
    M_, d, V = draw(st.integers(0, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    small = st.sampled_from([-1.0, 0.0, 1.0])

    def table(*shape):
        return torch.tensor(draw(st.lists(small, min_size=math.prod(shape), max_size=math.prod(shape)))).view(shape)

    x, w, b = table(M_, d), table(V, d), table(V)
    labels = torch.tensor(draw(st.lists(st.integers(0, V - 1), min_size=M_, max_size=M_)), dtype=torch.long)
    kept = draw(st.sampled_from(["none", "all", "one", "any"]))
    if kept == "none":
        labels[:] = -100
    elif kept == "one" and M_ > 0:
        keep = draw(st.integers(0, M_ - 1))
        labels[torch.arange(M_) != keep] = -100
    elif kept == "any":
        drop = torch.tensor(draw(st.lists(st.booleans(), min_size=M_, max_size=M_)), dtype=torch.bool)
        labels[drop] = -100
    return x, w, b, labels


def lce_example(rows, V=3, labels=None):
    """A fixed case for `example`: logits equal to the rows (w = I, b = 0)."""
    x = torch.tensor(rows, dtype=torch.float32).view(-1, V)
    return x, torch.eye(V), torch.zeros(V), torch.tensor(labels, dtype=torch.long)


@settings(deadline=None, max_examples=40)
@given(case=tied_lce_case(), chunk=st.sampled_from(CHUNKS), mode=st.sampled_from(list(TIE_HITS)))
@example(case=lce_example([[2, 2, 0], [2, 2, 0]], labels=[1, 0]), chunk=1, mode="fp32")  # tie: 1 wrong, 0 right
@example(case=lce_example([[2, 2, 0], [2, 2, 0]], labels=[1, 0]), chunk=1, mode="bf16")
@example(case=lce_example([[1, 0, 0]] * 5, labels=[-100] * 5), chunk=2, mode="fp32")  # every row ignored
@example(case=lce_example([], labels=[]), chunk=3, mode="bf16_autocast")  # no masked token at all
@example(case=lce_example([[0, 1, 1]] * 5, labels=[-100, -100, -100, -100, 2]), chunk=2, mode="fp32")  # one kept
def test_fused_head_matches_naive_on_tied_logits_and_degenerate_masks(case, chunk, mode):
    """The fused head against the plain path and against the first-maximum count computed here, on logits with
    many ties and on label masks that are empty, full or single: same top-1 count, loss and gradients; with no
    kept row the loss and every gradient are exactly zero."""
    x, w, b, labels = case
    cast = torch.float32 if mode == "fp32" else BF16
    logits = (x.to(cast) @ w.to(cast).T + b.to(cast)).float()  # exact: small integers
    got = run_lce(lambda *a: K.linear_cross_entropy(*a, chunk_rows=chunk), x, w, b, labels, mode, scale=0.37)
    ref = run_lce(K.linear_cross_entropy_naive, x, w, b, labels, mode, scale=0.37)
    assert got[1].item() == ref[1].item() == first_argmax_hits(logits, labels)
    # the loss: an fp32 log-sum-exp over V <= 6 terms per row, summed over <= 9 rows
    torch.testing.assert_close(got[0], ref[0], rtol=8 * 9 * 2.0 ** -23, atol=1e-5)
    # gradients: sums over <= 9 rows of softmax entries (<= 1) that the two paths round apart by a few units of
    # the compute dtype's last place: fp32 eps 2^-23, bf16 (the fused path keeps softmax - onehot in bf16) 2^-8
    eps = 2.0 ** -23 if mode == "fp32" else 2.0 ** -8
    tol = dict(rtol=4 * eps, atol=9 * 4 * eps) if mode == "fp32" else dict(rtol=2 * eps, atol=9 * eps)
    for g_got, g_ref in zip(got[2:], ref[2:]):
        torch.testing.assert_close(g_got.float(), g_ref.float(), **tol)
    if (labels == -100).all():
        assert got[0].item() == 0 and got[1].item() == 0 and not any(g.any() for g in got[2:])


# ---------------------------------------------------------------------------- loss normalisation, fused


@pytest.mark.parametrize("chunk", [1, 4, 256])
def test_fused_gradient_of_the_global_masked_mean_with_uneven_counts(chunk):
    """train.py backpropagates loss_sum * (1 / N_global). With 4, 0, 1 and 3 kept rows in the four chunks of 4
    rows, the fused head's loss and gradients equal those of F.cross_entropy's mean over the 8 kept rows (one
    formula over the whole batch): no per-chunk mean, no ignored row in the sum, the scale reaches every grad."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(16, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(11, generator=g)
    labels = torch.randint(0, 11, (16,), generator=g)
    labels[[4, 5, 6, 7, 9, 10, 11, 12]] = -100  # chunks of 4 keep 4, 0, 1, 3 rows
    n = int((labels != -100).sum())
    got = run_lce(lambda *a: K.linear_cross_entropy(*a, chunk_rows=chunk), x, w, b, labels, "fp32", scale=1 / n)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    keep = labels != -100
    mean = F.cross_entropy(F.linear(xr[keep], wr, br), labels[keep])
    mean.backward()
    torch.testing.assert_close(got[0] / n, mean.detach(), rtol=1e-6, atol=1e-6)
    for g_got, g_ref in zip(got[2:], (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def test_model_batch_without_masked_tokens_and_rows_all_ignored():
    """The model's forward (fused head, sparse and dense, both layouts): a batch without any masked token gives an
    exact zero loss, count and gradient; a batch whose rows are all -100 except a few equals cross-entropy and the
    first-maximum count computed here from the dense logits."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 300, (4, 6), generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([6, 0, 1, 4])[:, None]).long()
    labels = torch.full((4, 6), -100)
    for sparse, unpad in ((True, True), (False, True), (True, False), (False, False)):
        torch.manual_seed(0)
        m = M.build(replace(TINY, sparse_prediction=sparse, unpad=unpad)).train()
        out = m(ids, mask, labels)
        assert (out.loss_sum.item(), out.n_correct.item(), out.n_masked.item()) == (0, 0, 0)
        out.loss_sum.backward()
        assert all(p.grad is None or not p.grad.any() for p in m.parameters())
        some = labels.clone()
        some[0, [1, 4]] = ids[0, [1, 4]]
        some[2, 0] = ids[2, 0]  # rows 1 (all pad) and 3 stay all -100
        with torch.no_grad():
            out = m.eval()(ids, mask, some)
            logits = m.logits(ids, mask)[some != -100]  # (3, V)
        ref = F.cross_entropy(logits, some[some != -100], reduction="sum")
        torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
        assert out.n_masked.item() == 3 and out.n_correct.item() == first_argmax_hits(logits, some[some != -100])


# ---------------------------------------------------------------------------- attention: all-pad and one-token rows, block boundaries


@contextlib.contextmanager
def eager_flex():
    """Flex without compiling (each compiled CPU flex shape costs ~30 s): our block mask and ALiBi score_mod run
    through flex's dense eager path, which also gives CPU gradients once torch's device check is lifted."""
    with mock.patch.object(K.flex_module, "_validate_device", lambda *qkv: None), \
            torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": on purpose
        yield


def per_document_attention(qkv, cu, slopes):
    """softmax(q k^T / sqrt(D) - slope |i - j|) v per document, written here: qkv (nnz, 3, H, D) -> (nnz, H, D)."""
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = qkv[a:b].unbind(1)  # each (n, H, D)
        s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
        if slopes is not None:
            pos = torch.arange(b - a)
            s = s - slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        out.append(torch.einsum("hij,jhd->ihd", s.softmax(-1), v))
    return torch.cat(out)


def run_backend(backend, qkv, cu, L, slopes):
    """One backend's output and q/k/v gradient (for a fixed upstream gradient); sdpa as "sdpa-math" / "sdpa-flash"."""
    q = qkv.clone().requires_grad_()
    ctx = eager_flex() if backend == "flex" else contextlib.nullcontext()
    saved = K.CPU_MATH_MAX_SEQLEN
    K.CPU_MATH_MAX_SEQLEN = 10**9 if backend == "sdpa-math" else 0
    try:
        with ctx:
            out = K.attention(q, cu, L, slopes, backend.split("-")[0])
            out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view(out.shape))
    finally:
        K.CPU_MATH_MAX_SEQLEN = saved
    return out.detach(), q.grad


BACKENDS = ["naive", "sdpa-math", "sdpa-flash", "flex"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_all_pad_and_one_token_rows(backend):
    """A batch of empty sequences (all-pad rows) and one-token sequences between longer ones, planned at a wider
    max_seqlen as the model does: a one-token sequence's output is its own v (softmax over one key is 1), and
    everything equals attention computed here per document, forward and gradients, in every backend."""
    H, D = 3, 8
    lengths = [0, 1, 5, 0, 1, 3, 0]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, H, D, generator=torch.Generator().manual_seed(0))
    slopes = K.alibi_slopes(H)
    out, grad = run_backend(backend, qkv, cu, 7, slopes)
    q_ref = qkv.clone().requires_grad_()
    ref = per_document_attention(q_ref, cu, slopes)
    ref.backward(torch.cos(torch.arange(ref.numel(), dtype=torch.float32)).view(ref.shape))
    one_token = [0, 6]  # packed positions of the two one-token sequences
    torch.testing.assert_close(out[one_token], qkv[one_token, 2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref.detach(), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad, q_ref.grad, atol=2e-5, rtol=2e-4)


BOUNDARY_DOCS = [[127, 5], [127, 1, 128], [128, 1, 127, 2], [1, 127, 129], [255, 2, 1],
                 [5, 130, 1, 60], [128, 128], [300], [1] * 7 + [250]]


@pytest.mark.parametrize("docs", BOUNDARY_DOCS, ids=lambda d: "-".join(map(str, d)))
def test_document_block_mask_at_block_boundaries(docs):
    """Documents that end or start at a 128-token block's last or first token, and other packings: our block mask
    (partial and full blocks) equals FlexAttention's create_block_mask evaluated on every token pair."""
    from torch.nn.attention.flex_attention import create_block_mask
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    doc = K.document_ids(cu)
    nnz = doc.numel()
    ref = create_block_mask(lambda b, h, q, kv: doc[q] == doc[kv], None, None, nnz, nnz, device="cpu")
    ours = K.document_block_mask(cu)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)


@st.composite
def boundary_rows(draw):
    """A document-id mask of 1-3 rows, each packing 1-2 documents whose lengths sit at the 128-token block
    boundary or are tiny (0 = an all-pad row)."""
    rows = draw(st.lists(st.lists(st.sampled_from([1, 2, 126, 127, 128, 129]), min_size=0, max_size=2),
                         min_size=1, max_size=3).filter(lambda r: sum(map(sum, r)) > 0))
    return mask_from_rows(rows)


@settings(deadline=None, max_examples=6)
@given(mask=boundary_rows(), backend=st.sampled_from(["sdpa-math", "sdpa-flash", "flex"]), alibi=st.booleans())
@example(mask=torch.tensor([[1] * 127 + [2] * 5]), backend="flex", alibi=True)  # a document starts at token 127
@example(mask=torch.tensor([[1] * 127 + [2] * 2, [1] * 128 + [0]]), backend="sdpa-flash", alibi=True)
@example(mask=torch.tensor([[1] * 128 + [2] * 1, [0] * 129, [1] * 129]), backend="flex", alibi=False)
def test_packed_documents_at_block_boundaries_sdpa_and_flex(mask, backend, alibi):
    """Packed rows unpadded as the model does (cu_seqlens from document ids, planned at the padded width S),
    documents split at the 128-token block boundary, all-pad rows included: sdpa and flex equal attention
    computed here per document, forward and gradients."""
    H, D = 2, 8
    _, _, cu, _ = K.unpad(torch.zeros(*mask.shape, 1), mask)
    qkv = torch.randn(int(cu[-1]), 3, H, D, generator=torch.Generator().manual_seed(1))
    slopes = K.alibi_slopes(H) if alibi else None
    out, grad = run_backend(backend, qkv, cu, mask.shape[1], slopes)
    q_ref = qkv.clone().requires_grad_()
    ref = per_document_attention(q_ref, cu, slopes)
    ref.backward(torch.cos(torch.arange(ref.numel(), dtype=torch.float32)).view(ref.shape))
    torch.testing.assert_close(out, ref.detach(), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad, q_ref.grad, atol=2e-5, rtol=2e-4)


# ---------------------------------------------------------------------------- the model: encoder, mean_pool, classifier


def pad_and_one_token_batch():
    """Rows: full, all pad, one token, a packed row (documents 1, 2), one token again."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (5, 7), generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 0, 1, 6, 1])[:, None]).long()
    mask[3, 4:6] = 2
    return ids, mask, (torch.rand(5, 7, generator=g) < 0.5).long() * (mask > 0)


MODEL_BACKENDS = [("naive", True), ("sdpa", True), ("flex", True), ("sdpa", False)]


@pytest.mark.parametrize("backend,unpad", MODEL_BACKENDS)
def test_encoder_mean_pool_and_classifier_with_all_pad_and_one_token_rows(backend, unpad):
    """Through the model, per attention backend and layout: the encoder's hidden states equal the naive backend's;
    mean_pool gives an all-pad row exactly zero and a one-token row exactly that token's hidden state; the
    classifier ("mean" and "cls" pooling) gives an all-pad row the logits of a zero pooled input, and a one-token
    row the logits it has alone in its batch."""
    ids, mask, types = pad_and_one_token_batch()
    for pooling in ("mean", "cls"):
        torch.manual_seed(0)
        cfg = replace(TINY, n_layers=1, d_model=48, n_heads=3, d_ff=64, pooling=pooling)
        ref = M.SequenceClassifier(replace(cfg, attn_backend="naive"), 3).eval()
        clf = M.SequenceClassifier(replace(cfg, attn_backend=backend, unpad=unpad), 3).eval()
        clf.load_state_dict(ref.state_dict())
        with torch.no_grad(), eager_flex() if backend == "flex" else contextlib.nullcontext():
            h, lay = clf.bert(ids, mask, types)
            h_ref, lay_ref = ref.bert(ids, mask, types)
            logits, _ = clf(ids, mask, types)
            alone, _ = clf(ids[2:3], mask[2:3], types[2:3])
        hp = M.to_padded(h, lay)
        torch.testing.assert_close(hp, M.to_padded(h_ref, lay_ref), atol=2e-5, rtol=2e-5)
        if pooling == "mean":
            pooled = M.mean_pool(h, lay)
            assert not pooled[1].any()
            assert torch.equal(pooled[2], hp[2, 0]) and torch.equal(pooled[4], hp[4, 0])
            zero_logits = clf.classifier(torch.zeros(1, cfg.d_model))[0]
        else:
            zero_logits = clf.classifier(torch.tanh(clf.pooler(torch.zeros(1, cfg.d_model))))[0]
        torch.testing.assert_close(logits[1], zero_logits.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits[2], alone[0], atol=2e-5, rtol=2e-5)
