"""train.py: the command-line interface, distributed and accumulation exactness, exact resume,
atomic checkpoints, and clear errors on bad input. CPU only, tiny model, a few steps each.

Most tests run train.py as a subprocess, because the interface (flags, exit status, stderr,
out_dir/metrics.jsonl, checkpoints) is what they check.
"""

import dataclasses
import datetime
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import fillmask  # noqa: E402
import train  # noqa: E402

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# A 2-layer d=128 MosaicBERT on 32-token rows of the embedded sample; no evaluation unless asked.
TINY = ["--preset=mosaic-bert-tiny", "--device=cpu", "--seq_len=32", "--global_batch_size=8",
        "--micro_batch_size=4", "--log_every=1", "--eval_every=0", "--save_every=0"]
FP32 = ["--dtype=float32"]


def run(args, out_dir, nproc=1, timeout=300, script="train.py", env=None):
    """Run train.py (or `script`; under torchrun when nproc > 1) and return the CompletedProcess."""
    launcher = [sys.executable, script]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    script]
    return subprocess.run(launcher + args + [f"--out_dir={out_dir}"], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def rows(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in rows(out_dir) if "loss" in r]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def ckpts(out_dir):
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def assert_state_close(a: dict, b: dict, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------------------
# Exactness


def direct_first_step(args):
    """Step 1 of a train.py run computed directly, without train.py's loop: the same initial weights and first
    global batch, dense logits, the mean CE over every masked token of the global batch, autograd.
    Returns (loss, grad_norm, masked count of each 2-row micro-batch)."""
    cfg = train.parse_config(train.TrainConfig, args, presets=train.TRAIN_PRESETS)
    batch = train.data.PretrainStream(cfg.data, split="train", seq_len=cfg.seq_len, mode=cfg.data_mode,
                                      mask_prob=cfg.mask_prob, seed=cfg.seed,
                                      global_batch_size=cfg.global_batch_size).next_batch()
    torch.manual_seed(cfg.seed)
    m = train.modeling.build(train.model_config(cfg))
    labels = batch["labels"]
    logits = m.logits(batch["input_ids"], batch["attention_mask"])  # (B, S, V)
    loss = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    loss.backward()
    norm = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).norm()
    per_micro = (labels != -100).sum(1).view(-1, cfg.micro_batch_size).sum(1).tolist()
    return loss.item(), norm.item(), per_micro


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path):
    """torchrun x2 (gloo, 2 micro-steps per rank) == 1 process with 4 micro-steps: same losses and weights.

    Holds only if the loss is normalised by the global masked count and gradients are synced once per step.
    Both runs share that code, so step 1's logged loss and gradient norm (clipping acts after the norm is
    taken) are also checked against a direct computation on the whole global batch, whose micro-batches
    hold different numbers of masked tokens.
    """
    # documents of 3 to 39 words, one row each (truncate mode): rows, hence masked counts, differ in length
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(f"w{j % 50}" for j in range(3 + 7 * i % 37))}) + "\n"
                            for i in range(80)))
    args = TINY + FP32 + ["--dropout=0", "--micro_batch_size=2", "--max_steps=3", f"--data={docs}",
                          "--data_mode=truncate"]
    two = run(args, tmp_path / "ddp", nproc=2)
    ok(two)
    assert "micro 2 x 2 accumulation steps x 2 ranks" in two.stdout
    one = ok(run(args, tmp_path / "one"))
    assert "micro 2 x 4 accumulation steps x 1 rank" in one.stdout
    l2, l1 = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _ in l1] == [1, 2, 3] and [s for s, _ in l2] == [1, 2, 3]
    for (_, a), (_, b) in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-5)
    assert_state_close(load(ckpts(tmp_path / "one")[-1])["model"], load(ckpts(tmp_path / "ddp")[-1])["model"], 1e-5)
    loss, norm, per_micro = direct_first_step(args)
    assert len(set(per_micro)) > 1 and sum(per_micro[:2]) != sum(per_micro[2:]), per_micro  # uneven counts
    for out in ("one", "ddp"):
        first = rows(tmp_path / out)[0]
        assert first["step"] == 1
        assert first["loss"] == pytest.approx(loss, rel=1e-5), out
        assert first["grad_norm"] == pytest.approx(norm, rel=1e-4), out


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_node_rendezvous_equals_one_process(tmp_path):
    """Multi-node as users launch it: two torchrun launchers ("nodes" of one rank each, both LOCAL_RANK 0) meet
    through a c10d rendezvous on loopback. Data shards by the global rank, logs and checkpoints come from global
    rank 0 only, so the final weights equal a 1-process run's with twice the accumulation. Sharding or electing
    the writer by the node-local rank would give both nodes the same data, or two writers."""
    args = TINY + FP32 + ["--dropout=0", "--micro_batch_size=2", "--max_steps=2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=two-node-test",
                "--local_addr=127.0.0.1", "train.py"]
    nodes = [subprocess.Popen(launcher + args + [f"--out_dir={tmp_path / 'nodes'}"], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert sum("step 2/2" in out for out, _ in outs) == 1  # one node logs: the one holding global rank 0
    assert "x 2 ranks" in "".join(out for out, _ in outs)
    ok(run(args, tmp_path / "one"))
    assert [s for s, _ in losses(tmp_path / "nodes")] == [1, 2]
    for (_, a), (_, b) in zip(losses(tmp_path / "one"), losses(tmp_path / "nodes")):
        assert a == pytest.approx(b, rel=1e-5)
    assert_state_close(load(ckpts(tmp_path / "one")[-1])["model"], load(ckpts(tmp_path / "nodes")[-1])["model"], 1e-5)


# Tiny in-process models for the exact-gradient tests: 8 rows of 12 tokens, as 4 micro-batches of 2 rows (1 process)
# or 2 ranks x 2 micro-batches. Masked tokens per micro-batch: 1, 0, 13, 3 (per rank: 1 and 16). Row 7 is all padding.
GRAD_CFG = dict(vocab_size=300, hidden_dropout=0.0, attn_dropout=0.0, attn_backend="sdpa")


@pytest.fixture
def one_thread():
    """Tiny shapes: one thread (two OpenMP threads on a shared 2-core machine stall each other, see test_glue.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def uneven_batch():
    g = torch.Generator().manual_seed(0)
    B, S = 8, 12
    ids = torch.randint(0, 300, (B, S), generator=g)
    lengths = torch.tensor([12, 5, 9, 3, 12, 11, 4, 0])
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    mask[4, 6:] = 2  # row 4 packs two documents
    labels = torch.full((B, S), -100)
    labels[0, 3] = ids[0, 3]                                          # micro-batch 0: 1 masked
    #                                                                   micro-batch 1 (rows 2, 3): none
    labels[4, :8] = ids[4, :8]
    labels[5, 2:7] = ids[5, 2:7]                                      # micro-batch 2: 13 masked
    labels[6, 1:4] = ids[6, 1:4]                                      # micro-batch 3: 3 (row 7: all pad)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def global_batch_gradient(m, batch):
    """Autograd of sum(CE over the masked tokens) / N_global on the whole batch at once (dense logits)."""
    labels = batch["labels"]
    picked = labels != -100
    logits = m.logits(batch["input_ids"], batch["attention_mask"])  # (B, S, V)
    loss = torch.nn.functional.cross_entropy(logits[picked], labels[picked], reduction="sum") / picked.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def grad_models():
    torch.manual_seed(0)
    m = train.modeling.build(train.modeling.ModelConfig.preset("mosaic-bert-tiny", **GRAD_CFG))
    with torch.no_grad():  # away from init, so that no gradient is trivially small
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = train.modeling.build(m.config)
    ref.load_state_dict(m.state_dict())
    return m, ref


def sum_order_atol(grad: torch.Tensor, batch: dict) -> float:
    """The float32 rounding a gradient can pick up from summing its per-token terms in another order (micro-batches,
    ranks, another CPU's kernels): epsilon x the reduction length (the batch's token positions) x its largest entry.
    Any mistake in the normalisation moves a gradient by a fraction of itself, orders of magnitude more."""
    return torch.finfo(torch.float32).eps * batch["attention_mask"].numel() * grad.abs().max().item()


@pytest.mark.parametrize("unpad", [True, False])
def test_accumulated_gradient_is_the_global_masked_mean(unpad, one_thread):
    """train.mlm_step (1 process, 4 micro-batches with 1, 0, 13 and 3 masked tokens, an all-pad row,
    clipping off) leaves exactly the gradient of sum(CE over masked) / N_global on the whole batch, and the
    loss it reports for logging is that same mean. A per-micro-batch mean, or a loss not divided by N_global,
    fails here."""
    m, ref = grad_models()
    if not unpad:
        state = m.state_dict()
        m, ref = (train.modeling.build(train.modeling.replace(x.config, unpad=False)) for x in (m, ref))
        m.load_state_dict(state)
        ref.load_state_dict(state)
    batch = uneven_batch()
    stats = train.mlm_step(m, train.micro_batches(batch, 2), world=1)
    loss, grads = global_batch_gradient(ref, batch)
    assert stats[2].item() == 17 and torch.isfinite(stats).all()
    torch.testing.assert_close(stats[0] / stats[2], loss.double(), atol=0, rtol=1e-5)
    for n, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, grads[n], atol=sum_order_atol(grads[n], batch), rtol=1e-4,
                                   msg=lambda s: f"{n}: {s}")


class MeanLossModel(torch.nn.Module):
    """A transformers-style wrapper: keyword inputs, and .loss the mean CE over the micro-batch's masked tokens."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, labels):
        out = self.m(input_ids, attention_mask, labels)
        return dataclasses.make_dataclass("Out", ["loss"])(out.loss_sum / out.n_masked.clamp(min=1))


def test_hf_mean_loss_adapter_gives_the_global_masked_mean(one_thread):
    """train.hf_mlm_loss (bench's peer rows: the model returns a per-micro-batch mean) with micro-batches of 1, 0, 13
    and 3 masked tokens leaves the same gradient and summed loss as the model's own summed loss."""
    m, ref = grad_models()
    batch = uneven_batch()
    stats = train.mlm_step(MeanLossModel(m), train.micro_batches(batch, 2), loss_fn=train.hf_mlm_loss)
    want = train.mlm_step(ref, train.micro_batches(batch, 2))
    torch.testing.assert_close(stats[[0, 2]], want[[0, 2]], atol=0, rtol=1e-5)
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_lr_factor_matches_the_schedules_written_out():
    """lr_factor against the two schedules written out by hand: glue's (warmup, then linear decay to 0 at total)
    and the paper's (decay to final_frac); the first update already gets 1/warmup of the peak."""
    total, warmup = 1000, 60
    for step in range(total + 5):
        glue = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))
        assert train.lr_factor(step, total, warmup, 0.0) == pytest.approx(glue, abs=1e-12), step
        paper = (step + 1) / warmup if step < warmup else 0.02 + 0.98 * max(0.0, (total - step) / (total - warmup))
        assert train.lr_factor(step, total, warmup, 0.02) == pytest.approx(paper, abs=1e-12), step


def test_a_step_without_masked_tokens_has_finite_zero_gradients(one_thread):
    """A global batch with no masked token at all (and an all-pad row): finite zero loss and gradients."""
    m, _ = grad_models()
    batch = uneven_batch()
    batch["labels"].fill_(-100)
    stats = train.mlm_step(m, train.micro_batches(batch, 4), world=1)
    assert stats.tolist() == [0.0, 0.0, 0.0]
    for n, p in m.named_parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and (p.grad == 0).all()), n


def _two_rank_gradient_worker(rank, init_file, out_file):
    """One gloo rank of test_two_gloo_ranks_gradient_is_the_global_masked_mean."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m, _ = grad_models()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        mine = {k: v[4 * rank:4 * rank + 4] for k, v in uneven_batch().items()}
        stats = train.all_reduce(train.mlm_step(ddp, train.micro_batches(mine, 2), world=2))
        if rank == 0:
            torch.save({"stats": stats, "grads": {n: p.grad for n, p in m.named_parameters()}}, out_file)
        torch.distributed.barrier()  # both ranks done before either tears gloo down (else one may abort at exit)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_gloo_ranks_gradient_is_the_global_masked_mean(tmp_path, one_thread):
    """2 DDP ranks (gloo) with 1 and 16 masked tokens, 2 micro-batches each: after the step every rank holds the
    gradient of sum(CE over masked) / N_global on the whole global batch; the all-reduced logging stats give
    that loss. An average of per-rank means fails here."""
    torch.multiprocessing.spawn(_two_rank_gradient_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")),
                                nprocs=2)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    _, ref = grad_models()
    loss, grads = global_batch_gradient(ref, uneven_batch())
    assert got["stats"][2].item() == 17
    torch.testing.assert_close(got["stats"][0] / got["stats"][2], loss.double(), atol=0, rtol=1e-5)
    for n, g in got["grads"].items():
        torch.testing.assert_close(g, grads[n], atol=sum_order_atol(grads[n], uneven_batch()), rtol=1e-4,
                                   msg=lambda s: f"{n}: {s}")


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    """--stop_at_step=2 then --resume gives the same losses, weights and optimizer state as one run of 5 steps.

    Dropout stays on, so this also checks that the RNG state travels with the checkpoint.
    """
    args = TINY + FP32 + ["--max_steps=5", "--dropout=0.1"]
    ok(run(args, tmp_path / "full"))
    stopped = ok(run(args + ["--stop_at_step=2"], tmp_path / "split"))
    assert [p.name for p in ckpts(tmp_path / "split")] == ["ckpt_0000002.pt"]
    assert "--resume" in stopped.stdout
    ok(run(args + ["--resume"], tmp_path / "split"))

    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert [s for s, _ in split] == [1, 2, 3, 4, 5]  # the resumed run appended to metrics.jsonl
    for (_, a), (_, b) in zip(full, split):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    # the LR schedule followed --max_steps=5, not the stop
    assert [r["lr"] for r in rows(tmp_path / "full")] == [r["lr"] for r in rows(tmp_path / "split")]
    a, b = load(tmp_path / "full" / "ckpt_0000005.pt"), load(tmp_path / "split" / "ckpt_0000005.pt")
    assert_state_close(a["model"], b["model"], 1e-6)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_state_close(sa, sb, 1e-6)
    assert a["data"] == b["data"] and a["step"] == b["step"] == 5


def test_checkpoint_format(tmp_path):
    """The checkpoint is weights_only-loadable, holds the contract's keys and a plain state_dict."""
    ok(run(TINY + ["--max_steps=2", "--save_every=1", "--keep_checkpoints=0"], tmp_path))
    assert [p.name for p in ckpts(tmp_path)] == ["ckpt_0000001.pt", "ckpt_0000002.pt"]
    ck = load(ckpts(tmp_path)[-1])
    for key in ("model", "model_config", "train_config", "optimizer", "step", "data", "rng", "tokenizer", "schedule"):
        assert key in ck, key
    assert ck["step"] == 2 and ck["tokenizer"] == "gpt2"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert set(ck["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert ck["train_config"]["max_steps"] == 2
    model, _ = train.modeling.load_pretrained(str(tmp_path))
    assert_state_close(model.state_dict(), ck["model"], 0)


@pytest.mark.parametrize("nproc", [1, 2])
def test_preemption_signal_saves_and_resume_is_exact(tmp_path, nproc):
    """SIGTERM during step 2 (on the last rank only): every rank finishes step 2, one checkpoint is written, the
    job exits with PREEMPTED_EXIT; --resume then ends with the uninterrupted run's weights (dropout on)."""
    if nproc > 1 and not torch.distributed.is_gloo_available():
        pytest.skip("needs the gloo backend")
    args = TINY + FP32 + ["--max_steps=4", "--dropout=0.1"]
    ok(run(args, tmp_path / "full", nproc=nproc))
    cut = run(args, tmp_path / "cut", nproc=nproc, script="tests/preempt_run.py",
              env={"SIGTERM_AT_STEP": "2", "SIGTERM_RANK": str(nproc - 1)})
    out = cut.stdout + cut.stderr
    if nproc == 1:
        assert cut.returncode == train.PREEMPTED_EXIT and "preempted (SIGTERM)" in out, out[-3000:]
        assert "Traceback" not in cut.stderr
    else:  # torchrun reports a failed worker group; each worker's own status is in its report
        assert cut.returncode != 0 and f"exitcode  : {train.PREEMPTED_EXIT}" in out, out[-3000:]
        assert "preempted (a signal to another rank)" in out, out[-3000:]   # rank 0 stopped on rank 1's flag
    assert [c.name for c in ckpts(tmp_path / "cut")] == ["ckpt_0000002.pt"]
    assert (tmp_path / "cut" / train.PREEMPTED_MARKER).read_text() == "2\n"    # what a torchrun requeue checks
    ok(run(args + ["--resume"], tmp_path / "cut", nproc=nproc))
    assert not (tmp_path / "cut" / train.PREEMPTED_MARKER).exists()
    a, b = load(tmp_path / "full" / "ckpt_0000004.pt"), load(tmp_path / "cut" / "ckpt_0000004.pt")
    assert_state_close(a["model"], b["model"], 1e-6)
    assert [s for s, _ in losses(tmp_path / "cut")] == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_resume_on_more_ranks_gives_each_rank_its_own_rng(tmp_path):
    """A 1-rank checkpoint resumed on 2 gloo ranks: the ranks' RNG streams (dropout masks) differ."""
    args = TINY + FP32 + ["--max_steps=3", "--dropout=0"]            # dropout 0: training draws no random numbers
    ok(run(args + ["--stop_at_step=1"], tmp_path))
    p = ok(run(args + ["--stop_at_step=2", "--resume"], tmp_path, nproc=2))
    assert "seeded from (seed, rank, step)" in p.stdout
    rngs = load(ckpts(tmp_path)[-1])["rng_per_rank"]
    draws = []
    for state in rngs:
        checkpoint.set_rng_state(state)
        draws.append(torch.rand(8))
    assert len(draws) == 2 and not torch.equal(draws[0], draws[1])


def test_same_command_again_continues_or_skips_the_run(tmp_path):
    """Without --resume, an out_dir holding this config's checkpoints is continued (autoresume), and a finished
    run is found finished before any data is read, its checkpoints untouched."""
    args = TINY + ["--max_steps=3"]
    ok(run(args + ["--stop_at_step=2"], tmp_path))                   # an interrupted run
    p = ok(run(args, tmp_path))                                        # the same command again
    assert "autoresume" in p.stdout and "step 3/3" in p.stdout and "step 1/3" not in p.stdout, p.stdout
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]
    before = {c.name: c.read_bytes() for c in ckpts(tmp_path)}
    p = ok(run(args, tmp_path))                                        # and once more: finished
    assert "nothing to do" in p.stdout and "data:" not in p.stdout, p.stdout
    assert {c.name: c.read_bytes() for c in ckpts(tmp_path)} == before


def test_fresh_run_with_another_config_refuses_and_keeps_the_checkpoints(tmp_path):
    ok(run(TINY + ["--max_steps=2"], tmp_path))
    before = {c.name: c.read_bytes() for c in ckpts(tmp_path)}
    p = run(TINY + ["--max_steps=2", "--lr=5e-4"], tmp_path)
    assert p.returncode == 2 and "--lr: checkpoint 0.001, now 0.0005" in p.stderr, p.stderr
    assert "--resume" in p.stderr and "--out_dir" in p.stderr
    assert {c.name: c.read_bytes() for c in ckpts(tmp_path)} == before


def test_process_group_timeout_outlasts_a_slow_first_batch(monkeypatch):
    """torch's 10-minute NCCL default would kill a job whose slowest rank needs longer for its first batch."""
    seen = {}
    monkeypatch.setattr(train.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    train.init_distributed("cpu")
    assert seen.get("timeout", datetime.timedelta(minutes=10)) >= datetime.timedelta(minutes=30)


def test_cuda_process_group_is_bound_to_the_node_local_gpu(monkeypatch):
    """On CUDA each rank takes the GPU of its node-local rank (LOCAL_RANK, not the global RANK: rank 3 of a
    2-node job is GPU 1 of its node) and binds the process group to it with device_id."""
    seen = {}
    monkeypatch.setattr(train.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train.torch.cuda, "set_device", lambda d: seen.update(set_device=d))
    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    rank, world, device = train.init_distributed("cuda")
    assert (rank, world, device) == (3, 4, torch.device("cuda", 1))
    assert seen["device_id"] == torch.device("cuda", 1) and seen["set_device"] == device
    assert seen["backend"] == "nccl"


def test_ddp_keeps_constant_buffers_local_and_grads_in_buckets(tmp_path):
    """The model's only buffers are the constant ALiBi slopes: DDP must not re-broadcast them every forward.
    Gradients live in DDP's all-reduce buckets (no copy in or out)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        m = train.modeling.build(train.modeling.ModelConfig.preset("mosaic-bert-tiny", vocab_size=64))
        assert any(True for _ in m.buffers())  # there is something DDP could broadcast
        ddp = train.wrap_ddp(m, torch.device("cpu"))
        assert not ddp.will_sync_module_buffers()
        assert ddp.gradient_as_bucket_view
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Checkpoint safety


def test_crash_while_writing_checkpoint_keeps_previous_one(tmp_path, monkeypatch):
    """A failure half-way through writing checkpoint 2 leaves checkpoint 1 intact and loadable."""
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(half)
            f.flush()
        else:
            Path(f).write_bytes(half)
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train.main(TINY + ["--max_steps=3", "--save_every=1", f"--out_dir={out}"])
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpts(out)] == ["ckpt_0000001.pt"]  # no half-written ckpt_0000002.pt
    ck = load(out / "ckpt_0000001.pt")
    assert ck["step"] == 1
    model, _ = train.modeling.load_pretrained(str(out))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_stops_without_saving_nan_weights(tmp_path):
    """lr=1e30 blows the weights up: the run stops with a clear error and no checkpoint holds NaN/inf."""
    p = run(TINY + ["--max_steps=6", "--lr=1e30", "--save_every=1", "--log_every=5", "--keep_checkpoints=0"],
            tmp_path)
    assert p.returncode != 0
    assert "non-finite" in p.stderr and "Traceback" not in p.stderr
    for path in ckpts(tmp_path):
        ck = load(path)
        assert all(torch.isfinite(t).all() for t in ck["model"].values()), path.name
    assert len(ckpts(tmp_path)) < 6


# ----------------------------------------------------------------------------------------
# Learning


def test_short_run_lowers_mlm_loss(tmp_path):
    """20 steps on the sample (bf16 autocast, the default) lower the MLM loss and raise accuracy;
    the metrics file holds the training and evaluation rows the interface promises."""
    p = ok(run(["--preset=mosaic-bert-tiny", "--device=cpu", "--seq_len=64", "--max_steps=20", "--lr=3e-3",
                "--log_every=5", "--eval_every=20", "--save_every=0", "--eval_batches=2", "--samples=true"], tmp_path))
    assert "step 20/20 | loss" in p.stdout and "tok/s" in p.stdout and "mfu" in p.stdout
    # fill-mask samples before and after training: every held-out sentence, top-5 for its [MASK]
    before, after = p.stdout.split("fill-mask samples before training:")[1].split("fill-mask samples after 20 steps:")
    for part in (before, after):
        assert all(t in part for t in fillmask.SAMPLE_TEXTS) and part.count("[MASK] #1:") == len(fillmask.SAMPLE_TEXTS)
    r = rows(tmp_path)
    tr = [x for x in r if "loss" in x]
    ev = [x for x in r if "eval_loss" in x]
    for key in ("step", "loss", "mlm_acc", "lr", "tokens_per_s"):
        assert key in tr[0], key
    assert [x["step"] for x in tr] == [1, 5, 10, 15, 20]
    assert tr[-1]["loss"] < tr[0]["loss"] - 1.5, [x["loss"] for x in tr]
    assert tr[-1]["mlm_acc"] > tr[0]["mlm_acc"]
    assert len(ev) == 1 and ev[0]["step"] == 20 and "eval_mlm_acc" in ev[0]
    assert ev[0]["eval_loss"] < math.log(50304) - 1.5


# ----------------------------------------------------------------------------------------
# Bad input: clear errors, non-zero exit


@pytest.mark.parametrize("flag, expect", [
    ("--no_such_flag=1", "Valid fields"),
    ("--max_steps=many", "expected an integer"),
    ("--preset=gpt-5", "unknown preset"),
    ("--dtype=float16", "choose one of"),
])
def test_bad_flags_exit_2_with_a_message(tmp_path, flag, expect):
    p = run(TINY + [flag], tmp_path)
    assert p.returncode == 2 and expect in p.stderr, p.stderr


def test_help_lists_every_field_with_its_default_and_comment_and_runs_nothing(tmp_path):
    p = run(["--help"], tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "usage: python train.py [--field=value ...]"
    for f in dataclasses.fields(train.TrainConfig):  # every field, with the dataclass default as JSON
        assert sum(line.startswith(f"  --{f.name}={json.dumps(f.default)}  [") for line in lines) == 1, f.name
    data = next(line for line in lines if line.startswith("  --data="))
    assert "'default' (embedded Wikipedia sample)" in data and "or a local path/glob" in data  # a continued comment
    assert any(line.startswith("--preset=NAME") and "mosaic-bert-base" in line for line in lines)
    assert not (tmp_path / "metrics.jsonl").exists()  # --help trains nothing


def test_micro_batch_must_divide_the_per_rank_batch(tmp_path):
    p = run(TINY + ["--global_batch_size=8", "--micro_batch_size=3"], tmp_path)
    assert p.returncode == 2 and "--micro_batch_size=3 does not divide" in p.stderr, p.stderr


def test_resume_checks_the_model_config(tmp_path):
    """Resuming with a different model config names the differing fields; resuming nothing is an error too."""
    p = run(TINY + ["--max_steps=1", "--resume"], tmp_path)
    assert p.returncode != 0 and "no checkpoint" in p.stderr
    ok(run(TINY + ["--max_steps=1"], tmp_path))
    p = run(TINY + ["--max_steps=2", "--resume", "--model_overrides=n_layers=3"], tmp_path)
    assert p.returncode != 0 and "n_layers: checkpoint 2, now 3" in p.stderr, p.stderr
    assert [c.name for c in ckpts(tmp_path)] == ["ckpt_0000001.pt"]


def test_bad_data_is_a_clear_error(tmp_path):
    """A missing path and an empty corpus exit 1 with data.py's message (no traceback, no checkpoint)."""
    p = run(TINY + [f"--data={tmp_path / 'missing.jsonl'}"], tmp_path / "a")
    assert p.returncode == 1 and p.stderr.startswith("error: --data=") and "Traceback" not in p.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run(TINY + [f"--data={empty}"], tmp_path / "b")
    assert p.returncode == 1 and "error:" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not ckpts(tmp_path / "a") and not ckpts(tmp_path / "b")


# ----------------------------------------------------------------------------------------
# Pieces (in-process)


def test_schedule_and_decoupled_weight_decay():
    """6% linear warmup, linear decay to 0.02x; AdamW's weight_decay is wd/peak_lr (MosaicML's decoupled decay)."""
    cfg = train.TrainConfig(lr=5e-4, max_steps=1000, warmup_frac=0.06, final_lr_frac=0.02, weight_decay=1e-5)
    assert train.lr_at(0, cfg) == pytest.approx(5e-4 / 60)
    assert train.lr_at(59, cfg) == pytest.approx(5e-4)
    assert train.lr_at(1000, cfg) == pytest.approx(0.02 * 5e-4)
    lrs = [train.lr_at(s, cfg) for s in range(60, 1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = train.build_optimizer(model, cfg.lr, cfg.weight_decay)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == pytest.approx(1e-5 / 5e-4) and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0 and len(no_decay["params"]) == 3  # bias, LN weight, LN bias


def test_presets_resolve():
    """Every preset builds a valid config; the paper's recipe has the paper's numbers."""
    for name in train.TRAIN_PRESETS:
        cfg = train.parse_config(train.TrainConfig, [f"--preset={name}"], presets=train.TRAIN_PRESETS)
        train.model_config(cfg)
    base = train.parse_config(train.TrainConfig, ["--preset=mosaic-bert-base"], presets=train.TRAIN_PRESETS)
    assert (base.global_batch_size, base.micro_batch_size, base.max_steps, base.seq_len) == (4096, 128, 70_000, 128)
    assert (base.lr, base.beta2, base.eps, base.weight_decay, base.mask_prob) == (5e-4, 0.98, 1e-6, 1e-5, 0.3)
    assert train.check_config(base, world_size=8) == 4
    bert = train.parse_config(train.TrainConfig, ["--preset=bert-base"], presets=train.TRAIN_PRESETS)
    assert bert.mask_prob == 0.15 and train.model_config(bert).position == "learned"
    demo = train.parse_config(train.TrainConfig, [], presets=train.TRAIN_PRESETS)
    assert demo.preset == "demo" and demo.data == "default+sentiment"
    off = train.model_config(train.parse_config(train.TrainConfig, ["--dropout=0"]))
    assert off.hidden_dropout == 0 and off.attn_dropout == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faulting_reallocations():
    """perf.keep_freed_memory: big tensors freed by one "step" are reused by the next instead of
    being unmapped and page-faulted back in. Measured in fresh processes (mallopt is process-wide):
    minor page faults of steps 3..10 of a loop that allocates, uses and frees ~140 MiB per step."""
    probe = ("import resource, sys, torch, perf\n"
             "if sys.argv[1] == 'on': assert perf.keep_freed_memory()\n"
             "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for step in range(10):\n"
             "    if step == 2: f0 = faults()\n"
             "    a = torch.ones(16 * 2**20); b = a * 2; c = torch.randn(3 * 2**20); del a, b, c\n"
             "print(faults() - f0)\n")
    counts = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", probe, mode], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[mode] = int(proc.stdout.split()[-1])
    pages_per_step = (2 * 64 + 12) * 2**20 // 4096
    assert counts["off"] > 4 * pages_per_step and counts["on"] < counts["off"] / 4, counts


def test_bounded_heap_trims_kept_memory_past_its_bound():
    """perf.BoundedHeap: freed memory stays resident (kept for reuse) until the resident set passes
    growth x its level after the warm-up steps; then the heap is trimmed and the resident set falls back."""
    probe = ("import torch, perf\n"
             "heap = perf.BoundedHeap(True, growth=1.2, warmup=2)\n"
             "assert heap.active\n"
             "small = lambda: torch.ones(8 * 2**20).sum()\n"  # a 32 MiB working set
             "for _ in range(2): small(); heap.after_step()\n"
             "limit = heap.limit\n"
             "big = torch.ones(256 * 2**20); del big\n"  # 1 GiB, freed but kept by glibc
             "kept = perf.resident_bytes()\n"
             "heap.after_step()\n"
             "print(kept > limit, heap.trims, perf.resident_bytes() < limit)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "1", "True"], proc.stdout
