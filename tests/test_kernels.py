"""kernels.py: every fast path against the naive reference, forward and gradients."""

import contextlib
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels as K

FAST = settings(deadline=None, max_examples=30)


def make_mask(lengths, S, doc_splits=()):
    """[B, S] mask: row b has lengths[b] real tokens; doc_splits[b] (if given) starts a second document."""
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        if b < len(doc_splits) and 0 < doc_splits[b] < n:
            mask[b, doc_splits[b]:n] = 2
    return mask


def cu_from_lengths(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# ---------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_exact_values():
    """Press et al.'s slopes: 2^(-8h/H) for powers of 2; interleaved extra slopes otherwise."""
    assert K.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    assert torch.equal(K.alibi_slopes(12), torch.tensor(twelve, dtype=torch.float32))
    assert torch.equal(K.alibi_slopes(16), torch.tensor([2.0 ** (-0.5 * i) for i in range(1, 17)]))
    assert K.alibi_slopes(1).tolist() == [2.0 ** -8]
    assert torch.equal(K.alibi_slopes(3), torch.tensor([2.0 ** -4, 2.0 ** -8, 2.0 ** -2]))


def test_alibi_bias_is_symmetric_distance():
    bias = K.alibi_bias(K.alibi_slopes(2), 4)
    assert bias[0, 0, 3] == bias[0, 3, 0] == -(2.0 ** -4) * 3
    assert bias[1, 2, 2] == 0 and bias[1, 1, 3] == -(2.0 ** -8) * 2


# ---------------------------------------------------------------------------- unpad / pad


@st.composite
def packed_rows(draw, B_max=4, S_max=12):
    """A drawn [B, S] mask with all-pad rows (length 0) and packed documents (a second id inside a row), and the
    lengths of its sequences in order, worked out here: (mask, seqlens)."""
    B, S = draw(st.integers(1, B_max)), draw(st.integers(1, S_max))
    lengths = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    splits = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    seqlens = []
    for n, c in zip(lengths, splits):
        seqlens += [c, n - c] if 0 < c < n else [n]  # a row of length 0 is one empty sequence
    return make_mask(lengths, S, splits), seqlens


@FAST
@given(drawn=packed_rows())
def test_pad_unpad_roundtrip_and_gradients(drawn):
    """pad(unpad(x)) == x at real tokens, zero at pads; the gradient reaches exactly the real tokens.
    cu_seqlens has one entry per document (two for a packed row) and a zero-length one per all-pad row;
    unpad_index given the counts (the model's sync-free path) finds the same indices and cu_seqlens."""
    mask, seqlens = drawn
    B, S = mask.shape
    x = torch.randn(B, S, 3, requires_grad=True)
    xu, idx, cu, max_len = K.unpad(x, mask)
    assert xu.shape == (sum(seqlens), 3) and cu.dtype == torch.int32 and cu.tolist() == cu_from_lengths(seqlens).tolist()
    assert max_len == max(seqlens)
    starts = K.document_starts(mask)  # the model's path: unpad_index with counts read beforehand, no host sync
    idx2, cu2 = K.unpad_index(mask, int((mask != 0).sum()), int(starts.sum()), starts)
    assert torch.equal(idx2, idx) and torch.equal(cu2, cu)
    y = K.pad(xu, idx, B, S)
    keep = (mask != 0)[..., None]
    assert torch.equal(y, torch.where(keep, x, torch.zeros(())))
    w = torch.randn(B, S, 3)
    (y * w).sum().backward()
    assert torch.equal(x.grad, torch.where(keep, w, torch.zeros(())))


def test_unpad_document_ids_split_sequences():
    """A packed row 1,1,1,2,2,0 holds two sequences; a plain 0/1 mask holds one per row."""
    mask = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3]])
    _, idx, cu, max_len = K.unpad(torch.zeros(4, 6, 1), mask)
    assert cu.tolist() == [0, 3, 5, 7, 7, 13] and max_len == 6


# ---------------------------------------------------------------------------- attention backends


def random_batch(lengths, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = cu_from_lengths(lengths)
    qkv = torch.randn(int(cu[-1]), 3, H, D, generator=g).to(dtype)
    return qkv, cu, max(lengths)


# sequence lengths of a packed batch: 0 is an all-pad row (an empty sequence in cu_seqlens)
lengths_st = st.lists(st.integers(0, 20), min_size=1, max_size=5).filter(lambda x: sum(x) > 0)
# The CPU sdpa path trains short sequences on SDPA's math kernel, longer ones on flash: test both.
CPU_KERNELS = {"math": 10**9, "flash": 0}


@contextlib.contextmanager
def cpu_sdpa_kernel(name):
    saved = K.CPU_MATH_MAX_SEQLEN
    K.CPU_MATH_MAX_SEQLEN = CPU_KERNELS[name]
    try:
        yield
    finally:
        K.CPU_MATH_MAX_SEQLEN = saved


@pytest.mark.parametrize("kernel", list(CPU_KERNELS))
@FAST
@given(lengths=lengths_st, H=st.sampled_from([1, 2, 3, 4, 6, 12]), D=st.sampled_from([4, 8, 16, 32]),
       alibi=st.booleans(), pad_extra=st.integers(0, 5))
def test_sdpa_matches_naive_fp32_forward_and_grad(kernel, lengths, H, D, alibi, pad_extra):
    """Varlen SDPA (re-pad, fused kernel, unpad) equals the explicit per-sequence reference in fp32,
    on either CPU kernel. Planning at a wider max_seqlen than needed (as the model does) changes nothing."""
    qkv, cu, L = random_batch(lengths, H, D)
    slopes = K.alibi_slopes(H) if alibi else None
    q1, q2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    ref = K.attention(q1, cu, L, slopes, "naive")
    with cpu_sdpa_kernel(kernel):
        out = K.attention(q2, cu, L + pad_extra, slopes, "sdpa")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(q2.grad, q1.grad, atol=2e-5, rtol=2e-4)


@FAST
@given(drawn=packed_rows(S_max=16), H=st.sampled_from([1, 3, 4]), alibi=st.booleans(), flash=st.booleans())
def test_sdpa_on_packed_rows_matches_padded_reference(drawn, H, alibi, flash):
    """From a drawn mask with packed documents and all-pad rows: unpad, then varlen sdpa (planned at the padded
    width S, as the model does) equals explicit attention computed per document here, forward and gradients."""
    mask, seqlens = drawn
    if sum(seqlens) == 0:
        return
    B, S = mask.shape
    D = 8
    qkv = torch.randn(B, S, 3, H, D)
    slopes = K.alibi_slopes(H) if alibi else None
    xu, idx, cu, _ = K.unpad(qkv, mask)
    q1 = xu.detach().clone().requires_grad_()
    with cpu_sdpa_kernel("flash" if flash else "math"):
        out = K.attention(q1, cu, S, slopes, "sdpa")
    ref = torch.zeros_like(out)
    q2 = xu.detach().clone().requires_grad_()
    rows = torch.div(idx, S, rounding_mode="floor")
    ids = mask.reshape(-1)[idx]
    pos = idx % S
    for r, doc in {(int(r), int(d)) for r, d in zip(rows, ids)}:
        sel = torch.nonzero((rows == r) & (ids == doc)).flatten()
        q, k, v = q2[sel].unbind(1)  # (n, H, D)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D)
        if alibi:
            scores = scores - slopes[:, None, None] * (pos[sel][:, None] - pos[sel][None, :]).abs()
        ref = ref.index_put((sel,), torch.einsum("hij,jhd->ihd", scores.softmax(-1), v))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(q1.grad, q2.grad, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("alibi", [True, False])
def test_sdpa_full_batch_without_padding(alibi):
    """Every sequence exactly max_seqlen long: the no-re-pad branch agrees with naive, with gradients."""
    qkv, cu, L = random_batch([9, 9, 9], 3, 8)
    slopes = K.alibi_slopes(3) if alibi else None
    q1, q2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    ref, out = K.attention(q1, cu, L, slopes, "naive"), K.attention(q2, cu, L, slopes, "sdpa")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(q2.grad, q1.grad, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("kernel", list(CPU_KERNELS))
@settings(deadline=None, max_examples=10)
@given(lengths=lengths_st, H=st.sampled_from([2, 3, 12]), D=st.sampled_from([16, 32]))
def test_sdpa_matches_naive_bf16(kernel, lengths, H, D):
    """bf16 inputs: same answer as the fp32 reference within bf16 tolerance, forward and gradients,
    on either CPU kernel."""
    qkv, cu, L = random_batch(lengths, H, D)
    slopes = K.alibi_slopes(H)
    q32, q16 = qkv.clone().requires_grad_(), qkv.to(torch.bfloat16).requires_grad_()
    ref = K.attention(q32, cu, L, slopes, "naive")
    with cpu_sdpa_kernel(kernel):
        out = K.attention(q16, cu, L, slopes, "sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g.to(torch.bfloat16))
    torch.testing.assert_close(q16.grad.float(), q32.grad, atol=6e-2, rtol=6e-2)


def test_cpu_training_on_short_sequences_picks_the_math_kernel(monkeypatch):
    """sdpa on the CPU asks for SDPA's math kernel exactly when it trains (grad needed) on sequences
    of at most CPU_MATH_MAX_SEQLEN; evaluation and longer sequences keep SDPA's own choice."""
    asked = []
    real = K.sdpa_kernel

    def spy(backends):
        asked.append(backends)
        return real(backends)

    monkeypatch.setattr(K, "sdpa_kernel", spy)
    L = K.CPU_MATH_MAX_SEQLEN
    for S, grad, expect in ((L, True, [K.SDPBackend.MATH]), (L + 1, True, []), (L, False, [])):
        asked.clear()
        qkv = torch.randn(2, S, 3, 2, 8, dtype=torch.bfloat16, requires_grad=grad)
        out = K.sdpa(qkv, torch.zeros(1, 1, S, S, dtype=torch.bfloat16))
        assert out.shape == (2, S, 2, 8) and asked == expect, (S, grad, asked)


def test_padding_never_leaks_through_padded_attention():
    """Real-token outputs are identical whether or not pad tokens (holding garbage) are appended."""
    torch.manual_seed(0)
    H, D = 3, 8
    slopes = K.alibi_slopes(H)
    qkv = torch.randn(2, 5, 3, H, D)
    mask = make_mask([5, 3], 5)
    out = K.sdpa(qkv, K.padded_attention_mask(mask, slopes, torch.float32))
    wider = torch.cat([qkv, 1e3 * torch.randn(2, 4, 3, H, D)], 1)
    out_wide = K.sdpa(wider, K.padded_attention_mask(make_mask([5, 3], 9), slopes, torch.float32))
    real = mask.bool()
    torch.testing.assert_close(out_wide[:, :5][real], out[real], atol=1e-6, rtol=1e-6)


def test_padded_sdpa_matches_naive_with_documents():
    """The padded-layout mask keeps packed documents apart (ALiBi distance within each document)."""
    torch.manual_seed(0)
    H, D = 2, 8
    slopes = K.alibi_slopes(H)
    mask = make_mask([7, 4, 6], 8, doc_splits=[3, 0, 1])
    qkv = torch.randn(3, 8, 3, H, D)
    out = K.sdpa(qkv, K.padded_attention_mask(mask, slopes, torch.float32))  # (B, S, H, D)
    xu, idx, cu, L = K.unpad(qkv, mask)
    ref = K.attention(xu, cu, L, slopes, "naive")
    torch.testing.assert_close(out.reshape(-1, H, D)[idx], ref, atol=2e-6, rtol=2e-5)


# ---------------------------------------------------------------------------- flex


def _listed_blocks(num, idx):  # (1, 1, nb), (1, 1, nb, nb) -> per row, the listed blocks in order
    return [idx[0, 0, r, :n].tolist() for r, n in enumerate(num[0, 0].tolist())]


def test_document_block_mask_q_blocks_equal_those_flex_would_transpose():
    """The backward reads the mask by q blocks; ours reuses the kv blocks (the mask is symmetric). They must be
    what BlockMask.from_kv_blocks computes by transposing, for the partial and the full blocks, in order."""
    from torch.nn.attention.flex_attention import BlockMask
    for lengths in ([5, 130, 1, 60], [128, 128], [300], [1] * 7 + [250], [200, 3, 500, 97]):
        ours = K.document_block_mask(cu_from_lengths(lengths))
        ref = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                       ours.full_kv_indices, BLOCK_SIZE=ours.BLOCK_SIZE, seq_lengths=ours.seq_lengths)
        assert torch.equal(ours.q_num_blocks, ref.q_num_blocks), lengths
        assert torch.equal(ours.full_q_num_blocks, ref.full_q_num_blocks), lengths
        assert _listed_blocks(ours.q_num_blocks, ours.q_indices) == _listed_blocks(ref.q_num_blocks, ref.q_indices)
        assert (_listed_blocks(ours.full_q_num_blocks, ours.full_q_indices)
                == _listed_blocks(ref.full_q_num_blocks, ref.full_q_indices))


def test_document_block_mask_is_a_few_dozen_ops():
    """Built once per batch, eagerly, while the GPU waits: each aten op is a kernel launch or more. The block
    mask takes under 50 (from_kv_blocks' transposes alone took about 70)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    cu = cu_from_lengths([100, 200, 1, 399, 300])
    with OpCounter() as c:
        K.document_block_mask(cu, nnz=1000)
    assert 0 < c.n <= 50, c.n


@pytest.fixture
def fresh_flex_compiles():
    """Start from no compiled flex functions: on the CPU this torch's inductor emits C++ that does not build
    ("cur_qSplitSize8 was not declared") when a dynamic flex graph that earlier tests (test_model.py) already
    compiled is recompiled here, so the test depended on which tests ran before it."""
    torch._dynamo.reset()
    K._compiled_flex.clear()
    yield
    torch._dynamo.reset()
    K._compiled_flex.clear()


@pytest.mark.parametrize("alibi", [True, False])
def test_flex_matches_naive_forward_compiled(alibi, fresh_flex_compiles):
    """FlexAttention (compiled, packed, document block mask, ALiBi score_mod) equals naive in forward.
    Several batches of different nnz go through one dynamic-shape compile."""
    H, D = 3, 16
    slopes = K.alibi_slopes(H) if alibi else None
    packed = make_mask([150, 0, 140, 9], 150, doc_splits=[20, 0, 139, 3])  # documents inside rows, an all-pad row
    _, _, packed_cu, _ = K.unpad(torch.zeros(4, 150, 1), packed)
    for seed, lengths in enumerate(([5, 130, 1, 60], [1], [128, 128, 7], (packed_cu[1:] - packed_cu[:-1]).tolist())):
        qkv, cu, L = random_batch(lengths, H, D, seed=seed)
        ref = K.attention(qkv, cu, L, slopes, "naive")
        with torch.no_grad():
            out = K.attention(qkv, cu, L, slopes, "flex")
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)


@settings(deadline=None, max_examples=20)
@given(drawn=packed_rows(B_max=5, S_max=60), seed=st.integers(0, 2**16), alibi=st.booleans())
def test_flex_on_packed_rows_matches_naive(drawn, seed, alibi):
    """FlexAttention (our document block mask and ALiBi score_mod) from a drawn mask with packed documents and
    all-pad rows (empty sequences in cu_seqlens), against naive. Run eagerly (set_stance force_eager): each
    compiled shape variant costs ~30 s here, and this torch's inductor fails to rebuild its CPU flex kernel for
    some drawn sizes ('cur_qSplitSize8 was not declared'); the compiled kernel is checked on fixed batches in
    test_flex_matches_naive_forward_compiled, masks with documents and all-pad rows included."""
    mask, seqlens = drawn
    if sum(seqlens) == 0:
        return
    _, _, cu, L = K.unpad(torch.zeros(*mask.shape, 1), mask)
    qkv = torch.randn(int(cu[-1]), 3, 3, 16, generator=torch.Generator().manual_seed(seed))
    slopes = K.alibi_slopes(3) if alibi else None
    ref = K.attention(qkv, cu, L, slopes, "naive")
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": on purpose here
        out = K.attention(qkv, cu, mask.shape[1], slopes, "flex")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)


def test_flex_backward_on_cpu_names_sdpa():
    qkv, cu, L = random_batch([4, 3], 2, 8)
    with pytest.raises(NotImplementedError, match="sdpa"):
        K.attention(qkv.requires_grad_(), cu, L, K.alibi_slopes(2), "flex")


def test_backend_resolution_and_errors():
    assert K.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert K.resolve_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="choose one of"):
        K.resolve_backend("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        K.attention(torch.zeros(4, 2, 2, 8), cu_from_lengths([4]), 4, None, "sdpa")


def test_auto_backend_on_cuda_avoids_flex_when_there_is_attention_dropout(capsys):
    """auto resolves on a CUDA device object (no GPU needed): flex without attention dropout, sdpa with it (flex
    has none), and the log line says which and why; the CPU stays on sdpa. plan_attention resolves `auto` with its
    dropout the same way."""
    K._say_auto_backend.cache_clear()
    cuda = torch.device("cuda")
    assert K.resolve_backend("auto", cuda, 0.1) == "sdpa"
    assert K.resolve_backend("auto", cuda, 0.0) == "flex"
    assert K.resolve_backend("auto", torch.device("cpu"), 0.1) == "sdpa"
    assert K.resolve_backend("flex", cuda, 0.1) == "flex"  # named explicitly: kept (plan_attention says why not)
    out = capsys.readouterr().out
    assert "auto -> sdpa on CUDA (flex has no attention dropout; attn_dropout=0.1)" in out
    assert "auto -> flex on CUDA" in out


def test_attention_dropout_only_in_sdpa_and_naive():
    qkv, cu, L = random_batch([4, 3], 2, 8)
    with pytest.raises(ValueError, match="dropout"):
        K.attention(qkv, cu, L, None, "flex", dropout_p=0.1)
    torch.manual_seed(0)
    out = K.attention(qkv, cu, L, None, "sdpa", dropout_p=0.5)
    assert torch.isfinite(out).all() and not math.isclose(
        out.abs().sum().item(), K.attention(qkv, cu, L, None, "sdpa").abs().sum().item())


# ---------------------------------------------------------------------------- fused decoder + cross-entropy


def _lce_case(M, d, V, n_ignored, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.5
    b = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (M,), generator=g)
    labels[torch.randperm(M, generator=g)[:n_ignored]] = -100
    return x, w, b, labels


def _lce_grads(fn, x, w, b, labels, scale=1.0):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    loss, correct = fn(x, w, b, labels)
    (loss * scale).backward()
    return loss.detach(), correct, x.grad, w.grad, b.grad


@FAST
@given(M=st.integers(1, 40), d=st.integers(1, 12), V=st.integers(1, 70), chunk=st.integers(1, 17),
       ignored=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_matches_naive_fp32(M, d, V, chunk, ignored, seed):
    """Loss, exact top-1 count and the gradients of x, the weight and the bias, any chunking."""
    x, w, b, labels = _lce_case(M, d, V, min(ignored, M), seed)
    fused = _lce_grads(lambda *a: K.linear_cross_entropy(*a, chunk_rows=chunk), x, w, b, labels, scale=0.37)
    ref = _lce_grads(K.linear_cross_entropy_naive, x, w, b, labels, scale=0.37)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-4)
    assert fused[1].item() == ref[1].item()
    for got, want in zip(fused[2:], ref[2:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@FAST
@given(M=st.integers(1, 40), chunk=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_matches_naive_bf16_autocast(M, chunk, seed):
    """Under bf16 autocast both run the matmuls in bf16: the top-1 count is exact (same logits), the rest close."""
    x, w, b, labels = _lce_case(M, 32, 200, M // 4, seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _lce_grads(lambda *a: K.linear_cross_entropy(*a, chunk_rows=chunk), x.bfloat16(), w, b, labels)
        ref = _lce_grads(K.linear_cross_entropy_naive, x.bfloat16(), w, b, labels)
    torch.testing.assert_close(fused[0], ref[0], rtol=2e-3, atol=1e-2)
    assert fused[1].item() == ref[1].item()
    assert fused[2].dtype == torch.bfloat16 and fused[3].dtype == fused[4].dtype == torch.float32
    # x's gradient reduces over the vocabulary, w's and b's over the rows: bf16 rounding (epsilon 2^-7) of each
    # term, summed in another order, grows with the square root of the reduction length.
    eps = torch.finfo(torch.bfloat16).eps
    for got, want, n in zip(fused[2:], ref[2:], (200, M, M)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=max(2e-3, eps * math.sqrt(n) / 4))


def test_linear_cross_entropy_chunk_is_chosen_per_device(monkeypatch):
    """256 rows suit the CPU's matmul; on CUDA they made ~20 chunks of ~25 small launches per micro-batch, so
    CUDA takes thousands. Checked on device objects (no GPU needed), and that the fused loss asks for its
    input's device when chunk_rows is not given."""
    assert K.default_chunk_rows(torch.device("cpu")) == 256
    for dev in (torch.device("cuda"), torch.device("cuda", 3), "cuda:1"):
        assert 2048 <= K.default_chunk_rows(dev) <= 4096, dev
    asked, seen = [], []
    monkeypatch.setattr(K, "default_chunk_rows", lambda d: asked.append(torch.device(d)) or 5)
    real_apply = K._LinearCrossEntropy.apply
    monkeypatch.setattr(K._LinearCrossEntropy, "apply", lambda *a: seen.append(a[4]) or real_apply(*a))
    x, w, b, labels = torch.randn(12, 4), torch.randn(9, 4), torch.zeros(9), torch.randint(0, 9, (12,))
    K.linear_cross_entropy(x, w, b, labels)
    assert asked == [torch.device("cpu")] and seen == [5]
    K.linear_cross_entropy(x, w, b, labels, chunk_rows=3)
    assert seen == [5, 3]


def test_linear_cross_entropy_all_ignored_and_no_grad():
    x, w, b, labels = _lce_case(6, 4, 9, 6, 0)
    loss, correct, gx, gw, gb = _lce_grads(K.linear_cross_entropy, x, w, b, labels)
    assert loss.item() == 0 and correct.item() == 0
    assert not gx.any() and not gw.any() and not gb.any()
    with torch.no_grad():  # evaluation: same numbers
        x, w, b, labels = _lce_case(6, 4, 9, 2, 1)
        got, want = K.linear_cross_entropy(x, w, b, labels), K.linear_cross_entropy_naive(x, w, b, labels)
    torch.testing.assert_close(got[0], want[0])
    assert got[1].item() == want[1].item()
    x, w, b, labels = _lce_case(1, 4, 9, 0, 2)  # no rows at all (a micro-batch without masked tokens)
    loss, correct, gx, gw, gb = _lce_grads(K.linear_cross_entropy, x[:0], w, b, labels[:0])
    assert loss.item() == 0 and correct.item() == 0 and gx.shape == (0, 4) and not gw.any() and not gb.any()


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_keeps_the_expected_fraction_with_the_right_scale(backend, p):
    """Attention dropout drops attention probabilities: with q = k = 0 (uniform probabilities 1/L) and v the
    identity (v_j = e_j), each output entry is one probability, so it is exactly 0 (dropped) or 1 / (L (1 - p))
    (kept, rescaled). Over 65k entries the dropped fraction is within 5 sigma of p."""
    n, L, H = 16, 32, 4
    qkv = torch.zeros(n * L, 3, H, L)
    qkv[:, 2] = torch.eye(L).repeat(n, 1)[:, None, :]  # v: token j of every sequence is e_j in every head
    torch.manual_seed(0)
    out = K.attention(qkv, cu_from_lengths([L] * n), L, None, backend, dropout_p=p)  # (n*L, H, L)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (L * (1 - p))), atol=1e-6, rtol=1e-5)
    sigma = (p * (1 - p) / out.numel()) ** 0.5
    assert abs((~kept).float().mean().item() - p) < 5 * sigma
    torch.testing.assert_close(K.attention(qkv, cu_from_lengths([L] * n), L, None, backend),
                               torch.full_like(out, 1 / L))  # no dropout: uniform
