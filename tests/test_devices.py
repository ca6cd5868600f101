"""Every tensor reaches the model on the model's device, at every call site that feeds a model.

On one device nothing can go wrong, so the CPU suite alone never sees a GPU's device-mismatch errors. Here each
call site runs with its model's parameters and buffers on `meta`, a second device every CPU machine has. The
model's entry points (Bert.forward, BertForMaskedLM.forward and .logits, SequenceClassifier.forward) are wrapped
for the test (torch.autocast too: it has no meta device): called on a meta model, the wrapper checks that every tensor argument is on meta, then stops the
call with Reached, so no compute runs on meta. An input built on the CPU (a bare torch.tensor(...)) fails the
test, naming the entry point and the argument. Models a call site keeps on the CPU (glue's collapse check, say)
run as usual.

How each call site gets a meta model: the scripts' own device argument where they take one (train.train,
glue.Dist, pareto.Arm, bench's rows), else the function that resolves or loads it is replaced for the test.
"""
import functools
import types
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

import bench
import checkpoint
import data
import fillmask
import glue
import model
import pareto
import perf
import train
from config import config_dict, parse_config

META = torch.device("meta")
TINY = "mosaic-bert-tiny"
ENTRY_POINTS = [(model.Bert, "forward"), (model.BertForMaskedLM, "forward"), (model.BertForMaskedLM, "logits"),
                (model.SequenceClassifier, "forward")]


class Reached(Exception):
    """A meta model was called with every tensor argument on meta: the call site passed."""


def _tensors(obj, where: str):
    """(where, tensor) for every tensor in nested args: tuples, lists, dicts."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, (tuple, list)):
        for i, x in enumerate(obj):
            yield from _tensors(x, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensors(x, f"{where}[{k!r}]")


def _checked(cls, name: str, fn):
    @functools.wraps(fn)
    def entry(self, *args, **kwargs):
        device = next(self.parameters()).device
        if device != META:
            return fn(self, *args, **kwargs)  # a model the call site keeps on the CPU: runs as usual
        buffers = {b.device for b in self.buffers()} - {device}
        assert not buffers, f"{cls.__name__} has buffers on {buffers}, its parameters on {device}"
        wrong = [f"{w} on {t.device}" for w, t in _tensors((args, kwargs), "args") if t.device != device]
        assert not wrong, f"{cls.__name__}.{name} got {', '.join(wrong)}; its parameters are on {device}"
        raise Reached(f"{cls.__name__}.{name}")
    return entry


@pytest.fixture
def meta_guard(monkeypatch):
    """The entry points wrapped (see the module docstring); no CPU matmul timing for a run whose model is on meta."""
    for cls, name in ENTRY_POINTS:
        monkeypatch.setattr(cls, name, _checked(cls, name, getattr(cls, name)))
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 1e12)
    autocast = torch.autocast  # it has no meta device: the regions it wraps run without it here
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k:
                        nullcontext() if device_type == "meta" else autocast(device_type, *a, **k))
    return monkeypatch


def meta_mlm(cfg=None) -> model.BertForMaskedLM:
    return model.build(cfg or model.ModelConfig.preset(TINY)).to(META)


def on_meta_dist(monkeypatch):
    """glue's device resolution, answered with meta (glue.main and pareto call it)."""
    monkeypatch.setattr(glue, "setup_distributed", lambda device: glue.Dist(0, 1, META))


def reached(fn, *args, **kwargs) -> str:
    with pytest.raises(Reached) as e:
        fn(*args, **kwargs)
    return str(e.value)


# ---------------------------------------------------------------------------- train.py
def train_config(tmp_path, *flags):
    return parse_config(train.TrainConfig, [f"--preset={TINY}", "--seq_len=32", "--global_batch_size=4",
                                            "--micro_batch_size=4", "--eval_every=0", "--save_every=0",
                                            "--compile=false", f"--out_dir={tmp_path}", *flags],
                        presets=train.TRAIN_PRESETS)


def test_train_samples_reach_the_model_on_its_device(meta_guard, tmp_path):
    """The fill-mask samples printed before the first step (fillmask.top_k builds its input from token ids)."""
    assert reached(train.train, train_config(tmp_path, "--samples=true"), 0, 1, META) == "BertForMaskedLM.logits"


def test_train_step_and_evaluation_reach_the_model_on_its_device(meta_guard, tmp_path):
    assert reached(train.train, train_config(tmp_path, "--samples=false"), 0, 1, META) == "BertForMaskedLM.forward"
    batches = data.eval_batches("default", 32, "chunk", 4, 1, mask_prob=0.15, seed=0)
    assert reached(train.evaluate, meta_mlm(), batches, META, nullcontext, 0, 1) == "BertForMaskedLM.forward"


# ---------------------------------------------------------------------------- glue.py
def glue_config(tmp_path, **kw):
    return glue.GlueConfig(tasks="sentiment", model=TINY, out_dir=str(tmp_path / "glue"), seeds=1, max_steps=1,
                           max_train_examples=16, eval_batch_size=8, **kw)


def test_glue_fine_tuning_and_prediction_reach_the_model_on_its_device(meta_guard, tmp_path):
    cfg = glue_config(tmp_path)
    assert reached(glue.run, cfg, init="scratch", dist=glue.Dist(0, 1, META)) == "SequenceClassifier.forward"
    start = glue.load_start(cfg, "scratch")
    task = glue.TASKS["sentiment"]
    clf = model.SequenceClassifier(start.model_config, task.num_labels).to(META)
    dev = glue.load_task(task, "")["dev"]
    enc = glue.encode_examples(glue.label_subset(dev, 8), start.tokenizer, 32)
    assert reached(glue.predict, clf, enc, cfg, start.tokenizer.pad_id, glue.Dist(0, 1, META), False) \
        == "SequenceClassifier.forward"


def test_glue_demo_control_reaches_the_model_on_its_device(meta_guard, tmp_path):
    """glue.main's from-scratch control (the main run's results stand in: it is the test above)."""
    on_meta_dist(meta_guard)
    real_run, inits = glue.run, []

    def run(cfg, init=None, dist=None):
        inits.append(init)
        return real_run(cfg, init, dist) if init == "scratch" else {"tasks": {}}

    meta_guard.setattr(glue, "run", run)
    argv = ["--tasks=sentiment", f"--model={TINY}", f"--ckpt={tmp_path / 'none'}", f"--out_dir={tmp_path / 'g'}",
            "--seeds=1", "--max_steps=1", "--max_train_examples=16"]
    assert reached(glue.main, argv) == "SequenceClassifier.forward"
    assert inits == [None, "scratch"]


# ---------------------------------------------------------------------------- fillmask.py
@pytest.mark.parametrize("flag", ["--ckpt=somewhere", "--hf=somewhere"])
def test_fillmask_cli_reaches_the_model_on_its_device(meta_guard, flag):
    """fillmask.py --ckpt and --hf with the loaded model on meta (as a caller that moved it to a GPU)."""
    import hf
    meta_guard.setattr(model, "load_pretrained", lambda path: (meta_mlm(), {}))
    meta_guard.setattr(hf, "load_folder", lambda folder: (meta_mlm(), data.get_tokenizer()))
    assert reached(fillmask.main, [flag, "The capital of France is [MASK]."]) == "BertForMaskedLM.logits"


# ---------------------------------------------------------------------------- pareto.py
def pareto_config(tmp_path):
    return pareto.resolve(pareto.ParetoConfig(quick=True, size="tiny", batch_size=4, seq_len=32, eval_batches=1,
                                              eval_batch_size=4, seeds=1, ft_examples=16, compile="off",
                                              out_dir=str(tmp_path)))


def test_pareto_training_and_evaluation_reach_the_model_on_its_device(meta_guard, tmp_path):
    cfg = pareto_config(tmp_path)
    arm = pareto.Arm("mosaic", cfg, META)
    assert reached(arm.warm_up) == "BertForMaskedLM.forward"
    evals = data.eval_batches(cfg.data, cfg.seq_len, cfg.data_mode, 4, 1, mask_prob=0.15, seed=0)
    assert reached(arm.evaluate, evals) == "BertForMaskedLM.forward"


def test_pareto_downstream_fine_tunes_reach_the_model_on_its_device(meta_guard, tmp_path):
    on_meta_dist(meta_guard)
    cfg = pareto_config(tmp_path)
    mcfg = model.ModelConfig.preset(TINY)
    (tmp_path / "ckpt").mkdir()
    checkpoint.atomic_save({"model": model.build(mcfg).state_dict(), "model_config": config_dict(mcfg), "step": 0,
                            "tokenizer": "gpt2"}, str(tmp_path / "ckpt" / "mosaic_0.pt"))
    arms = {"mosaic": types.SimpleNamespace(name="mosaic", points=[{"wall_s": 0.0}])}
    assert reached(pareto.downstream, cfg, arms, tmp_path, {"downstream_s": 0.0}, lambda: None) \
        == "SequenceClassifier.forward"


# ---------------------------------------------------------------------------- bench.py
def test_bench_rows_reach_the_model_on_their_device(meta_guard):
    """Every ladder row (each model configuration) and the demo row, with their batches moved as bench.py moves
    them (the HF peer's rows feed transformers' model, which this harness does not wrap)."""
    cfg = bench.resolve(bench.BenchConfig(quick=True, size="tiny", pretrain_batch=2, glue_batch=4, demo_batch=2,
                                          n_batches=1, compile=False, workloads="pretrain,demo"))
    cpu = {"pretrain": bench.pretrain_batches(cfg), "demo": bench.demo_batches(cfg)}
    dev = {w: bench.to_device_batches(b, META) for w, b in cpu.items()}
    stats = {w: bench.BatchStats.of(b) for w, b in cpu.items()}
    rows = bench.model_rows(cfg, META, {"pretrain": dev["pretrain"]}, stats) + bench.demo_rows(cfg, META, dev, stats)
    assert len([r for r in rows if not r.skipped]) > 2
    for r in rows:
        if not r.skipped:  # in float32 (--dtype=auto on a CPU without fast bf16) the bf16-only rows are skipped
            assert reached(r.step, 0) == "BertForMaskedLM.forward", r.name


# ---------------------------------------------------------------------------- hf.py
def test_hf_export_reaches_the_model_on_its_device(meta_guard, tmp_path):
    """The export's parity check loads it with transformers and calls it (test_hf.py): the remote code's wrappers
    (their own copy of model.py, wrapped here too) build the default attention mask on the input's device."""
    from conftest import require_transformers
    import hf
    transformers = require_transformers()
    hf.export_model(model.build(model.ModelConfig.preset(TINY)), tmp_path)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    bert_cls = type(theirs.bert)
    assert bert_cls is not model.Bert  # the export's copy: our wrappers above do not reach it
    meta_guard.setattr(bert_cls, "forward", _checked(bert_cls, "forward", bert_cls.forward))
    ids = torch.tensor([[data.CLS_ID, 464, data.MASK_ID, data.SEP_ID]], device=META)
    assert reached(theirs.to(META), input_ids=ids) == "Bert.forward"
    assert reached(meta_mlm().logits, ids, torch.ones_like(ids)) == "BertForMaskedLM.logits"  # ours, beside it


# ---------------------------------------------------------------------------- the harness itself
def test_the_harness_catches_an_input_left_on_the_cpu(meta_guard):
    """A CPU tensor given to a meta model fails with the entry point and the argument; a CPU model runs."""
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(AssertionError, match=r"BertForMaskedLM.logits got args\[0\]\[0\] on cpu"):
        meta_mlm().logits(ids, ids)
    assert model.build(model.ModelConfig.preset(TINY)).eval().logits(ids, ids).shape[:2] == (1, 4)
