"""Issue 9: what would break or crawl at the paper's scale, checked on the CPU.

Evaluation through the compiled flex function, FlexAttention's backward against naive, host syncs
per forward, the datasheet peak table, exact MLM accuracy, and compile-by-default on CUDA.
"""

import pytest
import torch

import model as M

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
    out = M.BertForMaskedLM._loss(logits, labels)
    assert out.n_correct.item() == 2 and out.n_masked.item() == 4


# ---------------------------------------------------------------------------- MFU: the data-sheet peak table


@pytest.mark.parametrize("name,bf16,fp32", [
    ("NVIDIA A100-SXM4-80GB", 312, 19.5), ("NVIDIA A100-PCIE-40GB", 312, 19.5),
    ("NVIDIA H100 80GB HBM3", 989, 67), ("NVIDIA H100 PCIe", 756, 51), ("NVIDIA H100 NVL", 835, 60),
    ("NVIDIA H200", 989, 67), ("NVIDIA H200 NVL", 835, 60), ("NVIDIA GH200 480GB", 989, 67),
    ("NVIDIA L4", 121, 30.3), ("NVIDIA L40", 181, 90.5), ("NVIDIA L40S", 362, 91.6),
    ("NVIDIA B200", 2250, 75), ("NVIDIA GB200", 2500, 80),
])
def test_datasheet_peak_matches_whole_names_longest_first_per_dtype(name, bf16, fp32, monkeypatch):
    """Each data-sheet name gets its own entry ("L40" is not an "L4", "GB200" not a "B200", the NVL parts
    not the SXM figure) and float32 runs are measured against the fp32 peak (TF32 when allowed)."""
    import train
    assert train.datasheet_peak(name, "bfloat16") == bf16 * 1e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert train.datasheet_peak(name, "float32") == fp32 * 1e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert train.datasheet_peak(name, "float32") == bf16 / 2 * 1e12


def test_unknown_gpu_has_no_peak_and_train_and_bench_share_the_table(monkeypatch):
    """An unknown name (or a near miss) gives None, not a neighbour's figure; bench.py reads train.py's
    table through the same function, for the device name torch reports."""
    import bench
    import train
    for name in ("NVIDIA GeForce RTX 4090", "NVIDIA L20", "NVIDIA H20", "NVIDIA A10"):
        assert train.datasheet_peak(name, "bfloat16") is None, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert bench.datasheet_peak(torch.device("cuda")) == {"bfloat16": 362e12, "float32": train.datasheet_peak(
        "NVIDIA L40S", "float32")}
    assert train.peak_flops(torch.device("cuda"), "bfloat16") == 362e12
    assert bench.datasheet_peak(torch.device("cpu")) is None


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


def test_startup_log_says_whether_it_compiles(tmp_path, capsys):
    import train
    train.main(["--preset=mosaic-bert-tiny", "--device=cpu", "--seq_len=32", "--global_batch_size=4",
                "--micro_batch_size=4", "--max_steps=1", "--eval_every=0", "--save_every=0",
                f"--out_dir={tmp_path}"])
    assert "compile: off (default on cpu; --compile=true to compile)" in capsys.readouterr().out
