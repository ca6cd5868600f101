"""What would break or crawl at the paper's scale, checked on the CPU.

Evaluation through the compiled flex function, FlexAttention's backward against naive, host syncs
per forward, the datasheet peak table, exact MLM accuracy, and compile-by-default on CUDA.
"""

import pytest
import torch

import model as M
import perf

# ---------------------------------------------------------------------------- MLM accuracy (exact top-1)


def test_mlm_accuracy_is_exact_top1_and_ties_are_wrong():
    """A label whose logit only ties another token's maximum is not a correct prediction (bf16 logits
    tie often); argmax picks the first maximal token, and -100 rows never count."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],    # label 2 ties token 1's max: wrong (argmax is 1)
                           [1.0, 3.0, 3.0, 0.0],    # label 1 is the argmax: right
                           [0.0, 0.0, 5.0, 5.0],    # label 3 ties: wrong
                           [0.0, 9.0, 0.0, 0.0],    # not masked
                           [2.0, 2.0, 2.0, 2.0]],   # all tied, label 0 = argmax: right
                          dtype=torch.bfloat16)
    labels = torch.tensor([2, 1, 3, -100, 0])
    eye, zero = torch.eye(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)  # x W^T + b = logits
    for fn in (K.linear_cross_entropy_naive, K.linear_cross_entropy):  # the reference and the model's fused path
        _, n_correct = fn(logits, eye, zero, labels)
        assert n_correct.item() == 2, fn.__name__


# ---------------------------------------------------------------------------- MFU: the data-sheet peak table


@pytest.mark.parametrize("name,bf16,fp32", [
    ("NVIDIA A100-SXM4-80GB", 312, 19.5), ("NVIDIA A100-PCIE-40GB", 312, 19.5),
    ("NVIDIA H100 80GB HBM3", 989, 67), ("NVIDIA H100 PCIe", 756, 51), ("NVIDIA H100 NVL", 835, 60),
    ("NVIDIA H200", 989, 67), ("NVIDIA H200 NVL", 835, 60), ("NVIDIA GH200 480GB", 989, 67),
    ("NVIDIA L4", 121, 30.3), ("NVIDIA L40", 181, 90.5), ("NVIDIA L40S", 362, 91.6),
    ("NVIDIA B200", 2250, 75), ("NVIDIA GB200", 2500, 80),
    ("NVIDIA H800", 989, 67), ("NVIDIA H800 PCIe", 756, 51), ("NVIDIA A800-SXM4-80GB", 312, 19.5),
    ("NVIDIA A800 80GB PCIe", 312, 19.5), ("NVIDIA H20", 148, 44), ("NVIDIA A10G", 70, 31.2),
    ("NVIDIA GeForce RTX 4090", 165.2, 82.6), ("NVIDIA RTX 6000 Ada Generation", 364.2, 91.1),
])
def test_datasheet_peak_matches_whole_names_longest_first_per_dtype(name, bf16, fp32, monkeypatch):
    """Each data-sheet name gets its own entry ("L40" is not an "L4", "GB200" not a "B200", the NVL parts
    not the SXM figure) and float32 runs are measured against the fp32 peak (TF32 when allowed)."""
    assert perf.datasheet_peak(name, "bfloat16") == bf16 * 1e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert perf.datasheet_peak(name, "float32") == fp32 * 1e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert perf.datasheet_peak(name, "float32") == bf16 / 2 * 1e12


def test_unknown_gpu_has_no_peak_and_train_and_bench_share_the_table(monkeypatch):
    """An unknown name (or a near miss) gives None, not a neighbour's figure; bench.py's per-dtype peaks
    (perf.datasheet_peaks) and train.py's MFU reference (perf.peak_flops) read the same table, for the
    device name torch reports."""
    for name in ("NVIDIA GeForce RTX 4080", "NVIDIA L20", "NVIDIA A10", "Quadro RTX 6000", "NVIDIA RTX A6000"):
        assert perf.datasheet_peak(name, "bfloat16") is None, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert perf.datasheet_peaks(torch.device("cuda")) == {"bfloat16": 362e12, "float32": perf.datasheet_peak(
        "NVIDIA L40S", "float32")}
    assert perf.peak_flops(torch.device("cuda"), "bfloat16") == 362e12
    assert perf.datasheet_peaks(torch.device("cpu")) is None


# ---------------------------------------------------------------------------- evaluation through the compiled flex


@pytest.fixture
def flex_warnings(monkeypatch):
    """Records every time flex_attention runs outside torch.compile (it then warns "flex_attention called
    without torch.compile()" and builds the full score matrix). The compiled flex function is swapped for
    one compiled with dynamo's "eager" backend: the same tracing as inductor's, without its 30 s C++ build."""
    import torch.nn.attention.flex_attention as flex_module

    import kernels as K
    seen = []
    real = flex_module._warn_once
    monkeypatch.setattr(flex_module, "_warn_once", lambda warning_id, *a, **k: (seen.append(warning_id),
                                                                                  real(warning_id, *a, **k)))
    fn = torch.compile(K._flex_call, backend="eager", dynamic=True)
    monkeypatch.setattr(K, "compiled_flex_attention", lambda variant: fn)
    return seen


def test_evaluate_runs_flex_compiled(flex_warnings):
    """train.evaluate with attn_backend="flex" goes through the compiled flex_attention: no eager flex call
    (set_stance("force_eager") used to switch it off)."""
    import contextlib

    import train
    from test_model import TINY, batch
    net = M.build(M.ModelConfig(**{**TINY.__dict__, "attn_backend": "flex"}))
    batches = []
    for seed in range(2):
        ids, mask, labels, _ = batch(3, 20, seed=seed)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    loss, acc = train.evaluate(net, batches, torch.device("cpu"), contextlib.nullcontext, 0, 1)
    assert 0 < loss < 20 and 0 <= acc <= 1 and net.training
    assert "flex_attention_performance" not in flex_warnings


def test_glue_predict_runs_flex_compiled(flex_warnings):
    """glue.predict (GLUE dev scoring) likewise stays on the compiled flex function."""
    import numpy as np

    import glue
    from test_model import TINY
    clf = M.SequenceClassifier(M.ModelConfig(**{**TINY.__dict__, "attn_backend": "flex"}), 2)
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 300, n).astype(np.int32) for n in (7, 12, 3, 9)]
    enc = glue.Encoded(ids, np.array([3, 5, 2, 4]), np.array([0, 1, 0, 1]))
    cfg = glue.GlueConfig(eval_batch_size=2, dtype="bfloat16")
    pred = glue.predict(clf, enc, cfg, 0, glue.Dist(), regression=False)
    assert pred.shape == (4,) and set(pred.tolist()) <= {0, 1}
    assert "flex_attention_performance" not in flex_warnings


# ---------------------------------------------------------------------------- compile by default where it pays


def test_paper_presets_compile_on_cuda_by_default_with_an_opt_out():
    """--preset=mosaic-bert-base compiles on CUDA unless --compile=false; the CPU stays eager by default;
    an explicit --compile (bare or =true) always compiles."""
    import train
    from config import parse_config
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for preset in ("mosaic-bert-base", "bert-base"):
        cfg = parse_config(train.TrainConfig, [f"--preset={preset}"], presets=train.TRAIN_PRESETS)
        assert train.resolve_compile(cfg.compile, cuda)[0] is True
        assert train.resolve_compile(cfg.compile, cpu)[0] is False
        off = parse_config(train.TrainConfig, [f"--preset={preset}", "--compile=false"], presets=train.TRAIN_PRESETS)
        on, why = train.resolve_compile(off.compile, cuda)
        assert on is False and "--compile=false" in why
    bare = parse_config(train.TrainConfig, ["--compile"], presets=train.TRAIN_PRESETS)
    assert train.resolve_compile(bare.compile, cpu)[0] is True


def test_cpu_compiles_by_default_only_runs_long_enough_to_pay_it_back():
    """On the CPU, auto compiles a run of at least CPU_COMPILE_MIN_TOKENS planned tokens (the demo) and keeps
    shorter ones (the tiny presets, a short demo) eager; explicit flags win either way."""
    import train
    from config import parse_config
    cpu = torch.device("cpu")

    def auto(*flags):
        cfg = parse_config(train.TrainConfig, list(flags), presets=train.TRAIN_PRESETS)
        return train.resolve_compile(cfg.compile, cpu, train.planned_tokens(cfg))

    demo = parse_config(train.TrainConfig, [], presets=train.TRAIN_PRESETS)
    assert train.planned_tokens(demo) == demo.max_steps * demo.global_batch_size * demo.seq_len
    assert train.planned_tokens(demo) >= train.CPU_COMPILE_MIN_TOKENS
    on, why = auto()
    assert on is True and "--compile=false" in why
    assert auto("--compile=false")[0] is False
    assert auto("--preset=mosaic-bert-tiny")[0] is False
    short = train.CPU_COMPILE_MIN_TOKENS // (demo.global_batch_size * demo.seq_len) - 1
    on, why = auto(f"--max_steps={short}")
    assert on is False and "--compile=true" in why
    assert auto(f"--max_steps={short}", "--compile=true")[0] is True


def test_startup_log_says_whether_it_compiles(tmp_path, capsys):
    import train
    train.main(["--preset=mosaic-bert-tiny", "--device=cpu", "--seq_len=32", "--global_batch_size=4",
                "--micro_batch_size=4", "--max_steps=1", "--eval_every=0", "--save_every=0",
                f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "compile: off (default on the CPU for runs under 1M planned tokens, this one 0.00M; " \
           "--compile=true to compile)" in out


# ---------------------------------------------------------------------------- FlexAttention forward and backward

import contextlib  # noqa: E402
from unittest import mock  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import kernels as K  # noqa: E402

BLOCK_NNZ = [1, 127, 128, 129, 255, 257]  # one token; partial, full and wrapping 128-token blocks
# (H, D) of the flex tests: 3 heads use the interleaved ALiBi slopes; CUDA's flex kernel needs D >= 16.
# One shape for every flex test, so that on CUDA they share each compiled kernel (one per ALiBi x dtype).
FLEX_HEADS = (3, 16)


@contextlib.contextmanager
def flex_cpu_backward():
    """Lift torch's CPU check on flex gradients (torch.nn.attention.flex_attention._validate_device), in tests
    only: eager flex then runs its dense reference forward and backward on the CPU."""
    import torch.nn.attention.flex_attention as flex_module
    with mock.patch.object(flex_module, "_validate_device", lambda *qkv: None):
        yield


@st.composite
def packed_masks(draw, nnz_choices=tuple(BLOCK_NNZ)):
    """A [B, S] attention mask holding nnz real tokens: documents of random lengths (one-token ones
    included), one per row (0/1 mask) or two per row (document ids 1, 2), plus empty rows."""
    nnz = draw(st.sampled_from(nnz_choices))
    cuts = sorted(draw(st.sets(st.integers(1, nnz - 1), max_size=6))) if nnz > 1 else []
    if nnz > 1 and draw(st.booleans()):
        cuts = sorted(set(cuts) | {1})  # a one-token document first
    bounds = [0, *cuts, nnz]
    docs = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    packed = draw(st.booleans())
    per_row = 2 if packed else 1
    rows = [docs[i:i + per_row] for i in range(0, len(docs), per_row)]
    for _ in range(draw(st.integers(0, 2))):
        rows.insert(draw(st.integers(0, len(rows))), [])  # empty rows
    return mask_from_rows(rows, extra_pad=draw(st.integers(0, 3)))


def mask_from_rows(rows: list[list[int]], extra_pad: int = 0) -> torch.Tensor:
    """Document-id mask [B, S] from each row's document lengths: ids 1, 2, ... in order, 0 for padding."""
    S = max(sum(r) for r in rows) + extra_pad
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        at = 0
        for doc_id, n in enumerate(r, start=1):
            mask[b, at:at + n] = doc_id
            at += n
    return mask


def flex_vs_naive(mask, H, D, alibi, dtype, device, seed=0):
    """Flex and naive on the same packed batch: forward outputs, and q/k/v gradients for one random
    upstream gradient. On the CPU flex runs eagerly (its dense path); on CUDA through the compiled kernel."""
    g = torch.Generator().manual_seed(seed)
    _, _, cu, _ = K.unpad(torch.zeros(*mask.shape, 1), mask)
    nnz, L = int(cu[-1]), mask.shape[1]
    qkv = torch.randn(nnz, 3, H, D, generator=g)
    cu, slopes = cu.to(device), K.alibi_slopes(H) if alibi else None
    q_ref = qkv.to(device).clone().requires_grad_()  # the reference in fp32
    q_flex = qkv.to(device, dtype).clone().requires_grad_()
    ref = K.attention(q_ref, cu, L, slopes, "naive")
    plan = K.plan_attention(cu, L, slopes, "flex", (H, D), dtype)
    if device.type == "cpu":
        plan.flex_fn = K._flex_call  # eager flex: its compiled CPU backward does not build in this torch
    out = K.attend(q_flex, plan)
    grad = torch.randn(ref.shape, generator=g).to(device)
    ref.backward(grad)
    out.backward(grad.to(dtype))
    return (out.float(), ref), (q_flex.grad.float(), q_ref.grad)


TOL = {torch.float32: (dict(atol=2e-6, rtol=2e-5), dict(atol=2e-5, rtol=2e-4)),
       torch.bfloat16: (dict(atol=3e-2, rtol=3e-2), dict(atol=6e-2, rtol=6e-2))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])  # `device`: stateless
@given(mask=packed_masks(), alibi=st.booleans())
def test_flex_matches_naive_forward_and_gradients(device, dtype, mask, alibi):
    """FlexAttention (document block mask from cu_seqlens, ALiBi score_mod) equals the naive reference in
    forward and in the gradients of q, k and v: fp32 tight, bf16 loose; nnz at the 128-token block
    boundaries; 0/1 masks and packed document ids; one-token documents and empty rows."""
    with flex_cpu_backward():
        (out, ref), (g_flex, g_ref) = flex_vs_naive(mask, *FLEX_HEADS, alibi, dtype, device)
    fwd_tol, grad_tol = TOL[dtype]
    torch.testing.assert_close(out, ref, **fwd_tol)
    torch.testing.assert_close(g_flex, g_ref, **grad_tol)


def test_flex_training_on_cpu_keeps_its_clear_error():
    """Production (no lifted check): asking flex for CPU gradients names the backend to use instead."""
    mask = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="attn_backend='sdpa'"):
        flex_vs_naive(mask, *FLEX_HEADS, True, torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------------------- host syncs per forward

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# aten ops whose output (shape or value) the host must wait for
# (bincount sizes its output from the input's max, as nonzero and unique size theirs from the data)
SYNC_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::masked_select",
            "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim", "aten::unique_dim_consecutive",
            "aten::allclose", "aten::bincount", "aten::argwhere", "aten::nonzero_numpy"}


class SyncCounter(TorchDispatchMode):
    """Counts the host-syncing calls made inside it: the aten ops above, repeat_interleave without an
    output_size, and Tensor.tolist (which on the CPU reads memory without any aten op)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS or (name == "aten::repeat_interleave" and kwargs.get("output_size") is None
                                and (len(args) < 4 or args[3] is None)):
            self.calls.append(name)
        return func(*args, **kwargs)

    def __enter__(self):
        real, calls = torch.Tensor.tolist, self.calls

        def tolist(t):
            calls.append("Tensor.tolist")
            return real(t)
        self._patch = mock.patch.object(torch.Tensor, "tolist", tolist)
        self._patch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)
        return super().__exit__(*exc)


def sync_batch(B=4, S=24):
    """A batch with padding, an empty-ish short row and a packed row (document ids 1, 2)."""
    from test_model import batch
    ids, mask, labels, types = batch(B, S, lengths=[S, 5, 17, 1])
    mask[2, 9:17] = 2
    return ids, mask, labels, types


@pytest.mark.parametrize("preset,backend", [("mosaic-bert-tiny", "sdpa"), ("bert-tiny", "sdpa")])
def test_mlm_forward_makes_one_host_sync(preset, backend):
    """One host sync per micro-step: an MLM forward (unpadding, packed documents, sparse prediction) reads
    the device once; a new .item(), int(), nonzero or bool-mask index in the forward makes this fail."""
    net = M.build(M.ModelConfig.preset(preset, vocab_size=300, attn_backend=backend, sparse_prediction=True))
    ids, mask, labels, _ = sync_batch()
    with SyncCounter() as c:
        out = net(ids, mask, labels)
    assert c.calls == ["Tensor.tolist"], c.calls
    dense = net.logits(ids, mask)[labels != -100]  # the picked rows are the masked tokens
    assert out.n_masked.item() == dense.shape[0]


def test_classifier_forward_and_flex_plan_make_one_host_sync():
    """The GLUE classifier's forward ([CLS] rows found without a nonzero) and the flex plan (block mask
    built from cu_seqlens and the known nnz) add no sync of their own."""
    cfg = M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300, pooling="mean")  # mean_pool: no bincount
    clf = M.SequenceClassifier(cfg, 3)
    ids, mask, _, types = sync_batch()
    with SyncCounter() as c:
        logits, loss = clf(ids, mask, types, labels=torch.tensor([0, 1, 2, 0]))
    assert c.calls == ["Tensor.tolist"], c.calls
    flex = M.Bert(M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300, attn_backend="flex")).eval()
    with SyncCounter() as c:
        lay = flex.layout(mask, torch.float32)
    assert c.calls == ["Tensor.tolist"], c.calls
    ref = K.document_block_mask(lay.cu_seqlens)  # nnz read from cu_seqlens: the same mask
    assert torch.equal(lay.attn.block_mask.to_dense(), ref.to_dense())


@pytest.mark.parametrize("preset", ["mosaic-bert-tiny", "bert-tiny"])
def test_mlm_forward_given_the_cpu_counts_makes_no_host_sync(preset):
    """The loader reads the layout's counts from the CPU batch (layout_counts) before it goes to the device;
    given them, the forward never waits on the device, and computes what it computes without them."""
    net = M.build(M.ModelConfig.preset(preset, vocab_size=300, sparse_prediction=True)).eval()
    ids, mask, labels, _ = sync_batch()
    counts = net.layout_counts(mask, labels)
    with SyncCounter() as c:
        out = net(ids, mask, labels, counts=counts)
    assert c.calls == [], c.calls
    assert counts.nnz == int((mask != 0).sum()) and counts.n_inner == 1
    assert counts.n_counted == int((labels != -100).sum()) == out.n_masked.item()
    ref = net(ids, mask, labels)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, atol=0, rtol=0)


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it (views included)."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,bound", [("flex", 80), ("sdpa", 75)])
def test_layout_given_its_counts_dispatches_few_ops(backend, bound):
    """Bert.layout runs eagerly once per micro-step while the GPU waits: each op costs a launch. With the
    counts given and the flex block mask built without transposes, it takes about 70 ops (it took 158)."""
    net = M.build(M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300, attn_backend=backend,
                                       sparse_prediction=True)).eval()
    _, mask, labels, _ = sync_batch()
    counts = net.layout_counts(mask, labels)
    with OpCounter() as c, SyncCounter() as s:
        lay = net.bert.layout(mask, torch.float32, labels != -100, counts)
    assert 0 < c.n <= bound and s.calls == [], (c.n, s.calls)
    assert lay.n_counted == counts.n_counted and lay.real_indices.numel() == counts.nnz


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_mlm_forward_makes_one_host_sync_on_cuda():
    """The same count from CUDA itself: torch.cuda.set_sync_debug_mode warns on every synchronizing call."""
    import warnings
    net = M.build(M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300)).cuda()
    ids, mask, labels, _ = (t.cuda() for t in sync_batch())
    net(ids, mask, labels)  # warm-up: compile the flex kernel, allocate
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            net(ids, mask, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(x.message)[:200] for x in w if "synchroniz" in str(x.message)]
    assert len(syncs) <= 1, syncs


def test_compiled_flex_regions_do_not_recompile_as_nnz_changes():
    """model.compile_model with FlexAttention: one graph per region (encoder layer, MLM head) over batches of
    different real-token counts. Dynamo's guards do not depend on the backend, so the "eager" backend counts
    the same graphs inductor would build (on CUDA, tests/test_cuda.py counts them with inductor, training)."""
    from torch._dynamo.utils import counters

    from test_cuda import tiny_batch
    torch._dynamo.reset()
    counters.clear()
    net = M.build(M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300, attn_backend="flex")).eval()
    M.compile_model(net, backend="eager")
    with torch.no_grad():
        for seed in range(4):
            net(*tiny_batch("cpu", B=8, S=128, seed=seed))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()
