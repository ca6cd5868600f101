"""The GPU layer: model and training checks on every device (the CPU always, CUDA when there is one), and the
cases only a GPU can run (skipped on CPU-only machines with a reason naming the missing device).

`python gpu_check.py` runs the CUDA ones (pytest -m cuda) with bench.py --quick and a 50-step
mosaic-bert-base run. See also tests/test_scale.py's device-parametrized flex forward/backward test.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
from conftest import NO_CUDA
from test_scale import FLEX_HEADS, flex_vs_naive, mask_from_rows

ROOT = Path(__file__).resolve().parents[1]


def tiny_batch(device, B=4, S=40, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (B, S), generator=g) * mask
    labels = torch.where((torch.rand(B, S, generator=g) < 0.3) & (mask > 0), ids, -100)
    labels[:, 0] = ids[:, 0]
    return ids.to(device), mask.to(device), labels.to(device)


# ---------------------------------------------------------------------------- every device


def test_unpadded_model_matches_padded_on_device(device):
    """The MosaicBERT stack (unpadded, the device's default attention: sdpa on CPU, flex on CUDA) gives the
    padded model's hidden states and MLM loss, in inference."""
    cfg = M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300, hidden_dropout=0.0)
    net = M.build(cfg).to(device).eval()
    ref = M.build(M.ModelConfig(**{**cfg.__dict__, "unpad": False, "attn_backend": "sdpa"})).to(device).eval()
    ref.load_state_dict(net.state_dict())
    ids, mask, labels = tiny_batch(device)
    with torch.no_grad():
        torch.testing.assert_close(net.encode(ids, mask), ref.encode(ids, mask), atol=2e-5, rtol=2e-5)
        a, b = net(ids, mask, labels), ref(ids, mask, labels)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, atol=1e-3, rtol=1e-5)


def test_short_training_run_lowers_the_loss(device, tmp_path):
    """train.py on the device: the MLM loss falls. CPU: mosaic-bert-tiny, 12 steps. CUDA: mosaic-bert-base
    (compiled, the CUDA default), 30 steps of 64 x 128 on the embedded sample."""
    import train
    common = ["--data=default", "--data_mode=chunk", "--eval_every=0", "--save_every=0", "--log_every=1",
              f"--device={device.type}", f"--out_dir={tmp_path}"]
    if device.type == "cuda":
        args = ["--preset=mosaic-bert-base", "--global_batch_size=64", "--micro_batch_size=64", "--max_steps=30",
                "--num_workers=0"] + common
    else:
        args = ["--preset=mosaic-bert-tiny", "--seq_len=32", "--global_batch_size=8", "--micro_batch_size=8",
                "--max_steps=12", "--lr=3e-3"] + common
    train.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if line.strip()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert all(math.isfinite(x) for x in loss) and sum(loss[-3:]) / 3 < loss[0] - 0.5, loss


# ---------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("nnz", [127, 128, 129, 255, 256, 257, 16383, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "no-alibi"])
def test_flex_compiled_matches_naive_at_block_boundaries_cuda(nnz, dtype, alibi):
    """Compiled FlexAttention forward and backward on CUDA equal naive at nnz around the 128-token blocks and
    at 16,383/16,384 (documents of up to 512 tokens, a one-token document, a packed row and an empty row)."""
    docs, left = [1], nnz - 1
    while left > 0:
        n = min(left, 512 if nnz > 1000 else 100)
        docs.append(n)
        left -= n
    rows = [docs[:2], []] + [[d] for d in docs[2:]]
    mask = mask_from_rows(rows)
    (out, ref), (g_flex, g_ref) = flex_vs_naive(mask, *FLEX_HEADS, alibi, dtype, torch.device("cuda"))
    # fp32: loose enough for TF32 inside the kernel; a wrong mask or bias is off by O(1)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(g_flex, g_ref, **{k: 2 * v for k, v in tol.items()})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_at_most_two_graphs_per_compiled_region_over_varying_nnz_cuda():
    """model.compile_model on CUDA (flex attention): 20 training batches of different real-token counts, then
    evaluation, compile each region (encoder layer, MLM head) at most twice (training and no_grad)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    net = M.compile_model(M.build(M.ModelConfig.preset("mosaic-bert-tiny", vocab_size=300)).cuda())
    for seed in range(20):
        ids, mask, labels = tiny_batch("cuda", B=8, S=128, seed=seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(ids, mask, labels).loss_sum.backward()
    net.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        net(*tiny_batch("cuda", B=8, S=128, seed=99))
    n_regions = 2  # every encoder layer shares one code object; the head is the other
    assert counters["stats"]["unique_graphs"] <= 2 * n_regions, dict(counters["stats"])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs for NCCL DDP "
                    f"(this machine has {torch.cuda.device_count()})")
def test_nccl_two_ranks_equal_one_process_cuda(tmp_path):
    """torchrun x2 over NCCL == 1 process with twice the accumulation: same losses and weights (fp32)."""
    args = ["--preset=mosaic-bert-tiny", "--device=cuda", "--seq_len=32", "--global_batch_size=8",
            "--micro_batch_size=2", "--log_every=1", "--eval_every=0", "--save_every=0", "--dtype=float32",
            "--dropout=0", "--max_steps=3", "--compile=false"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    out = {}
    for name, launcher in (("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "train.py"]), ("one", [sys.executable, "train.py"])):
        p = subprocess.run(launcher + args + [f"--out_dir={tmp_path / name}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if line.strip()]
    for a, b in zip(out["one"], out["ddp"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    ckpt = {n: torch.load(sorted((tmp_path / n).glob("ckpt_*.pt"))[-1], weights_only=True)["model"] for n in out}
    for k in ckpt["one"]:
        torch.testing.assert_close(ckpt["one"][k], ckpt["ddp"][k], atol=1e-4, rtol=0)
