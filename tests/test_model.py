"""model.py: each MosaicBERT switch preserves the function it computes; sizes; training."""

from dataclasses import asdict, replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

import model as M

TINY = M.ModelConfig.preset("mosaic-bert-tiny", hidden_dropout=0.0, vocab_size=300)


def batch(B, S, lengths=None, vocab=300, seed=0, mask_prob=0.3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    if lengths is None:
        lengths = torch.randint(1, S + 1, (B,), generator=g).tolist()
    mask = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()
    labels = torch.where((torch.rand(B, S, generator=g) < mask_prob) & (mask > 0), ids, -100)
    labels[:, 0] = ids[:, 0]  # at least one prediction per row
    types = (torch.arange(S)[None] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return ids, mask, labels, types


def twin(cfg, src, **changes):
    """A model with `changes` applied to cfg, holding src's weights."""
    m = M.build(replace(cfg, **changes)).eval()
    m.load_state_dict(src.state_dict())
    return m


# ---------------------------------------------------------------------------- sizes and init


@pytest.mark.parametrize("preset,expected", [("mosaic-bert-base", 137.4e6), ("bert-base", 109.5e6)])
def test_parameter_counts_match_published_sizes(preset, expected):
    """With vocab 30528: MosaicBERT-base ~137M, BERT-base ~110M (MLM models, tied decoder counted once;
    HF's BertForMaskedLM for bert-base-uncased has 109.5M with its 30522 vocab)."""
    with torch.device("meta"):
        m = M.build(M.ModelConfig.preset(preset, vocab_size=30528))
    assert abs(M.n_params(m) - expected) / expected < 0.005, M.n_params(m)


def test_vocab_padded_to_multiple_of_64_and_init():
    cfg = M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=50261)
    assert cfg.padded_vocab_size == 50304
    m = M.build(cfg)
    assert m.bert.embeddings.word_embeddings.weight.shape[0] == 50304
    assert m.head.decoder_weight is m.bert.embeddings.word_embeddings.weight  # tied
    w = m.bert.layers[0].Wqkv.weight
    assert abs(w.std().item() - 0.02) < 0.002 and (m.bert.layers[0].Wqkv.bias == 0).all()
    assert (m.bert.layers[0].attn_norm.weight == 1).all() and (m.head.bias == 0).all()


def test_bad_config_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="position"):
        M.ModelConfig(position="rotary")
    with pytest.raises(ValueError, match="divisible"):
        M.ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="choose one of"):
        M.ModelConfig.preset("bert-huge")


# ---------------------------------------------------------------------------- unpadding


@settings(deadline=None, max_examples=12)
@given(position=st.sampled_from(["alibi", "learned"]), ffn=st.sampled_from(["geglu", "gelu"]),
       B=st.integers(1, 4), S=st.integers(1, 12), seed=st.integers(0, 1000))
def test_unpadded_forward_equals_padded_forward(position, ffn, B, S, seed):
    """Running the layers on (nnz, d) real tokens gives the padded model's output at real tokens,
    and the same gradients."""
    torch.manual_seed(seed)
    cfg = replace(TINY, position=position, ffn=ffn)
    unpadded = M.build(cfg).eval()
    padded = twin(cfg, unpadded, unpad=False)
    ids, mask, labels, types = batch(B, S, seed=seed)
    h1 = unpadded.encode(ids, mask, types)
    h2 = padded.encode(ids, mask, types)
    torch.testing.assert_close(h1, h2, atol=2e-5, rtol=2e-5)
    assert (h1[mask == 0] == 0).all() and (h2[mask == 0] == 0).all()  # pad rows are zero
    unpadded(ids, mask, labels, types).loss_sum.backward()
    padded(ids, mask, labels, types).loss_sum.backward()
    for (name, p1), p2 in zip(unpadded.named_parameters(), padded.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("unpad", [True, False])
def test_appending_padding_changes_nothing(unpad):
    m = M.build(replace(TINY, unpad=unpad)).eval()
    ids, mask, labels, _ = batch(3, 8)
    h = m.encode(ids, mask)
    wide = lambda t, v: torch.cat([t, torch.full((3, 5), v)], 1)
    h_wide = m.encode(wide(ids, 7), wide(mask, 0))
    torch.testing.assert_close(h_wide[:, :8], h, atol=1e-6, rtol=1e-6)
    out, out_wide = m(ids, mask, labels), m(wide(ids, 7), wide(mask, 0), wide(labels, -100))
    torch.testing.assert_close(out_wide.loss_sum, out.loss_sum)


@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_packed_documents_equal_separate_rows(position):
    """data.py's pack mode: documents 1,1,1,2,2 in one row compute exactly what two rows would."""
    m = M.build(replace(TINY, position=position)).eval()
    ids = torch.randint(0, 300, (1, 6))
    packed = m.encode(ids, torch.tensor([[1, 1, 1, 2, 2, 0]]))
    rows = m.encode(torch.stack([ids[0, :3], torch.cat([ids[0, 3:5], ids[0, :1]])]),
                    torch.tensor([[1, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(packed[0, :3], rows[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 3:5], rows[1, :2], atol=1e-5, rtol=1e-5)


def test_all_padding_batch_is_an_error():
    m = M.build(TINY)
    with pytest.raises(ValueError, match="no real tokens"):
        m.encode(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------- heads


@pytest.mark.parametrize("unpad", [True, False])
def test_sparse_prediction_equals_dense_logits_at_masked_positions(unpad):
    m = M.build(replace(TINY, unpad=unpad)).eval()
    dense = twin(TINY, m, unpad=unpad, sparse_prediction=False)
    ids, mask, labels, _ = batch(4, 10)
    sparse_out, dense_out = m(ids, mask, labels), dense(ids, mask, labels)
    torch.testing.assert_close(sparse_out.loss_sum, dense_out.loss_sum, atol=1e-4, rtol=1e-5)
    assert sparse_out.n_correct == dense_out.n_correct and sparse_out.n_masked == (labels != -100).sum()
    logits = m.logits(ids, mask)  # (B, S, V)
    picked = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[picked], labels[picked], reduction="sum")
    torch.testing.assert_close(sparse_out.loss_sum, ref, atol=1e-4, rtol=1e-5)


def test_classifier_and_regression_heads():
    mlm = M.build(TINY).eval()
    ids, mask, _, types = batch(3, 7)
    clf = M.SequenceClassifier.from_mlm(mlm, 3).eval()
    assert torch.equal(clf.bert.layers[0].Wqkv.weight, mlm.bert.layers[0].Wqkv.weight)
    logits, loss = clf(ids, mask, types, labels=torch.tensor([0, 2, 1]))
    assert logits.shape == (3, 3)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1])))
    # the pooled token is each row's [CLS]: padded and unpadded layouts agree
    padded = M.SequenceClassifier(replace(TINY, unpad=False), 3).eval()
    padded.load_state_dict(clf.state_dict())
    torch.testing.assert_close(padded(ids, mask, types)[0], logits, atol=1e-5, rtol=1e-5)
    reg = M.SequenceClassifier.from_mlm(mlm, 1)
    pred, mse = reg(ids, mask, types, labels=torch.tensor([0.5, 4.0, 2.5]))
    assert pred.shape == (3, 1)
    torch.testing.assert_close(mse, ((pred.squeeze(-1) - torch.tensor([0.5, 4.0, 2.5])) ** 2).mean())


def test_mean_pooling_is_the_mean_of_real_tokens_in_both_layouts():
    """pooling="mean": the classifier reads each row's mean final hidden state over its real tokens (no pooler);
    checked against a masked mean over the padded hidden states, for the unpadded and the padded encoder."""
    ids, mask, _, types = batch(4, 9, lengths=[9, 1, 5, 3])
    for unpad in (True, False):
        clf = M.SequenceClassifier(replace(TINY, pooling="mean", unpad=unpad), 2).eval()
        assert not hasattr(clf, "pooler")
        h, lay = clf.bert(ids, mask, types)
        hp = M.to_padded(h, lay).float()  # (B, S, d), zeros at pads
        m = (mask != 0).float().unsqueeze(-1)
        ref = (hp * m).sum(1) / m.sum(1)  # (B, d)
        torch.testing.assert_close(M.mean_pool(h, lay).float(), ref, atol=1e-5, rtol=1e-5)
        logits, _ = clf(ids, mask, types)
        torch.testing.assert_close(logits, clf.classifier(ref), atol=1e-5, rtol=1e-5)
    cls = M.SequenceClassifier(replace(TINY, pooling="cls"), 2)
    assert hasattr(cls, "pooler")
    with pytest.raises(ValueError, match="pooling"):
        replace(TINY, pooling="max")


# ---------------------------------------------------------------------------- precision


def test_low_precision_layernorm_runs_in_bf16_under_autocast():
    """Low-precision LayerNorm: bf16 out under autocast when on; fp32 (autocast's default) when off."""
    ln = M.LayerNorm(16, 1e-12, low_precision=True)
    ln_fp32 = M.LayerNorm(16, 1e-12, low_precision=False)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        y, y32 = ln(x), ln_fp32(x)
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    assert ln(x.float()).dtype == torch.float32  # no autocast: an ordinary LayerNorm


def test_bf16_autocast_forward_close_to_fp32():
    m = M.build(TINY).eval()
    ids, mask, labels, _ = batch(4, 12)
    ref = m(ids, mask, labels)
    with torch.autocast("cpu", torch.bfloat16):
        out = m(ids, mask, labels)
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=2e-2, atol=0)


# ---------------------------------------------------------------------------- compile


@settings(deadline=None, max_examples=25)
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), p=st.floats(0.0, 0.95),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_dropout_keeps_or_zeroes_and_scales_exactly(shape, p, bf16, seed):
    """model.Dropout's fast CPU mask (16-bit uniforms) against the definition of dropout: every output
    is 0 or x / P(keep) (P(keep) = 1 - p quantized to 1/65536), the gradient is the same mask times
    the same scale, the same seed gives the same mask, and eval mode is the identity."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = (torch.rand(shape) + 0.5).to(dtype).requires_grad_()  # never 0: a dropped element is visible
    drop = M.Dropout(p)
    torch.manual_seed(seed)
    y = drop(x)
    keep_p = 1 - round(p * 65536) / 65536
    kept = y != 0
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, torch.where(kept, x * (1 / keep_p), 0), atol=0, rtol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, torch.full_like(x, 1 / keep_p), 0), atol=0, rtol=0)
    torch.manual_seed(seed)
    assert torch.equal(drop(x), y)
    assert drop.eval()(x) is x


def test_cpu_dropout_rate_and_unbiasedness():
    """Over 4M elements the kept fraction and the mean of dropout(1) are within 5 sigma of 1 - p and 1,
    for p from 0.05 to 0.9; p = 1 drops everything (as nn.Dropout)."""
    n = 4_000_000
    ones = torch.ones(n)
    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.3, 0.5, 0.9):
        y = M.Dropout(p)(ones)
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs((y != 0).float().mean().item() - (1 - p)) < 5 * sigma, p
        assert abs(y.double().mean().item() - 1) < 5 * sigma / (1 - p), p
    assert torch.equal(M.Dropout(1.0)(ones[:10]), torch.zeros(10))


def test_cpu_dropout_compiles_without_graph_breaks():
    """The fast mask traces into one graph (torch.randint, not the in-place random_ Dynamo breaks on)."""
    from torch._dynamo.utils import counters
    import torch._dynamo
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(M.Dropout(0.25), dynamic=True)
    for n in (1000, 1003):
        x = torch.rand(n, 8) + 0.5
        y = f(x)
        kept = y != 0
        torch.testing.assert_close(y, torch.where(kept, x / 0.75, 0))
        assert 0.6 < kept.float().mean() < 0.9
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_training_step_matches_eager_without_recompiles():
    """compile_model: same loss and gradients as eager, and no recompile as nnz changes (sdpa)."""
    from torch._dynamo.utils import counters
    import torch._dynamo
    torch._dynamo.reset()
    counters.clear()
    cfg = replace(TINY, attn_backend="sdpa")
    eager = M.build(cfg)
    compiled = twin(cfg, eager).train()
    eager.train()
    M.compile_model(compiled)
    for seed in range(4):  # a full batch (no padding: the no-re-pad branch), then three different nnz
        ids, mask, labels, _ = batch(6, 16, seed=seed, lengths=[16] * 6 if seed == 0 else None)
        a, b = eager(ids, mask, labels), compiled(ids, mask, labels)
        torch.testing.assert_close(b.loss_sum, a.loss_sum, atol=1e-3, rtol=1e-4)
        a.loss_sum.backward()
        b.loss_sum.backward()
    torch.testing.assert_close(compiled.bert.layers[0].Wqkv.weight.grad, eager.bert.layers[0].Wqkv.weight.grad,
                               atol=1e-3, rtol=1e-3)
    # one layer graph per attention branch (re-padded or not) and one head graph; no shape recompiles
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_flex_backend_in_model_matches_naive_in_inference():
    m = M.build(replace(TINY, attn_backend="flex")).eval()
    ref = twin(TINY, m, attn_backend="naive")
    ids, mask, _, _ = batch(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(ids, mask), ref.encode(ids, mask), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------- training


def test_tiny_model_learns_a_synthetic_task():
    """A few dozen AdamW steps on 'each row repeats one token; predict the masked one' lower the loss."""
    torch.manual_seed(0)
    m = M.build(replace(TINY, n_layers=1, vocab_size=64, hidden_dropout=0.0)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        ids = torch.randint(0, 16, (16, 1)).expand(16, 8).clone()  # a copy-from-context task
        labels = torch.full_like(ids, -100)
        labels[:, 5] = ids[:, 5]
        inp = ids.clone()
        inp[:, 5] = 63  # the mask token
        out = m(inp, torch.ones_like(ids), labels)
        loss = out.loss_sum / out.n_masked
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------------------- checkpoints


def test_atomic_save_and_load_pretrained_roundtrip(tmp_path):
    m = M.build(TINY)
    ckpt = {"model": m.state_dict(), "model_config": asdict(TINY), "step": 3}
    M.atomic_save(ckpt, tmp_path / "ckpt_0000003.pt")
    assert M.latest_checkpoint(str(tmp_path)).endswith("ckpt_0000003.pt")
    loaded, raw = M.load_pretrained(str(tmp_path))
    assert raw["step"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(FileNotFoundError, match="train.py"):
        M.load_pretrained(str(tmp_path / "nowhere"))
