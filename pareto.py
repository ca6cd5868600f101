"""Time-to-quality: MosaicBERT against a BERT baseline of the same size, at equal pretraining wall-clock.

    python pareto.py --quick --out_dir=out/pareto     # CPU: small size, 2 x 4 min of pretraining (< 25 min in all)
    python pareto.py --size=base --budget_s=3600      # GPU: the paper's question at base size, an hour per arm
    python pareto.py --quick --resume                 # continue an interrupted run where its last point left off

The paper's Figure 1 is about accuracy per second of pretraining. Arm `mosaic` (every MosaicBERT trick, 30%
masking) and arm `bert` (the same shape, every trick off, 15% masking) train interleaved, in alternating slices,
on one data stream and one time-based schedule; only training steps are timed. Each arm is evaluated at n_points
budget fractions and fine-tuned (glue.run) at t = 0 and `downstream_at`. Outputs in out_dir: pareto.json, .md,
.png, state.pt (resume), ckpt/, glue/. Headline: when each arm reaches the other's final eval MLM accuracy.
"""

import dataclasses
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import data
import glue
import model as modeling
import perf
import train
from checkpoint import atomic_save, atomic_write_json
from config import ConfigError, config_dict, main_guard, parse_config, print_config

ARMS = ("mosaic", "bert")
COUNTS = ("train_s", "tokens", "steps", "points")  # an arm's progress, saved in state.pt


# --- config

@dataclass
class ParetoConfig:
    quick: bool = False            # CPU mode: small size, short budget, cheap fine-tuning (< 25 min on 2 cores)
    size: str = ""                 # tiny | small | base | large; empty: small with --quick, else base
    budget_s: float = 0.0          # pretraining seconds per arm; 0: 240 with --quick, else 3600
    n_points: int = 8              # evaluations at budget fractions 1/n .. n/n (plus t = 0)
    slices_per_point: int = 2      # interleaving: each arm trains in 2 * n_points alternating slices
    downstream_at: str = "2,4,8"   # which points (1..n_points) are fine-tuned, besides t = 0; empty: none
    seeds: int = 3                 # fine-tuning seeds per point (median reported)
    # the pretraining recipe (train.py's fields; the same for both arms)
    data: str = ""                 # empty: 'default+sentiment' with --quick (the demo's), else 'c4' (train.py's --data)
    num_workers: int = 0           # DataLoader workers per arm for streamed data (c4)
    data_mode: str = "chunk"       # chunk: short windows padded, so the bert arm pays for padding | truncate (c4)
    seq_len: int = 128
    batch_size: int = 0            # sequences per step; 0: 32 with --quick, else 256
    lr: float = 0.0                # peak lr; 0: 1e-3 with --quick (the demo's), else 5e-4 (the paper's)
    weight_decay: float = 1e-5
    warmup_frac: float = 0.06      # of the time budget
    final_lr_frac: float = 0.02
    grad_clip: float = 1.0
    mosaic_mask: float = 0.3
    bert_mask: float = 0.15
    eval_batches: int = 8
    eval_batch_size: int = 32
    # the fine-tuning recipe (glue.py's fields; 0: the sentiment task's recipe)
    ft_examples: int = 0           # labelled training sentences; 0: the recipe's label budget (1,000), -1: all
    ft_epochs: float = 0.0         # 0: 2 with --quick, else the recipe's (5)
    ft_lr: float = 0.0             # 0: the recipe's (2e-4)
    # system
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto (bf16 where this device runs it fast, else float32) | bfloat16 | float32
    compile: str = "auto"          # auto | on | off (auto: CUDA only; a quick CPU run cannot spare the compile)
    seed: int = 0
    out_dir: str = "out/pareto"
    resume: bool = False           # continue from out_dir/state.pt (the run's config must match)


def resolve(cfg: ParetoConfig) -> ParetoConfig:
    """Fill the mode-dependent defaults (0 / empty fields) and check the choices."""
    q = cfg.quick
    cfg = dataclasses.replace(
        cfg, size=cfg.size or ("small" if q else "base"), data=cfg.data or ("default+sentiment" if q else "c4"),
        budget_s=cfg.budget_s or (240.0 if q else 3600.0), batch_size=cfg.batch_size or (32 if q else 256),
        lr=cfg.lr or (1e-3 if q else 5e-4), ft_epochs=cfg.ft_epochs or (2.0 if q else 0.0))
    if f"mosaic-bert-{cfg.size}" not in modeling.PRESETS:
        sizes = [p.removeprefix("mosaic-bert-") for p in modeling.PRESETS if p.startswith("mosaic-bert-")]
        raise ConfigError(f"--size={cfg.size}: choose one of {', '.join(sizes)}")
    for key, allowed in (("dtype", perf.DTYPES), ("compile", ("auto", "on", "off"))):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(allowed)}")
    if cfg.n_points < 1 or cfg.slices_per_point < 1 or cfg.seeds < 1 or cfg.budget_s <= 0:
        raise ConfigError("--n_points, --slices_per_point, --seeds and --budget_s must be positive")
    if any(not 1 <= k <= cfg.n_points for k in downstream_points(cfg)):
        raise ConfigError(f"--downstream_at={cfg.downstream_at}: points are 1..{cfg.n_points} (t = 0 is always done)")
    return cfg


def downstream_points(cfg: ParetoConfig) -> list[int]:
    return sorted({int(k) for k in cfg.downstream_at.split(",") if k.strip()})


def arm_model_config(size: str, arm: str) -> modeling.ModelConfig:
    """`mosaic`: the mosaic-bert-{size} preset; `bert`: its shape with every MosaicBERT switch off (model._BERT)."""
    base = modeling.ModelConfig.preset(f"mosaic-bert-{size}")
    return base if arm == "mosaic" else dataclasses.replace(base, **modeling._BERT)


def lr_at(t: float, cfg: ParetoConfig, ticks: int = 10_000) -> float:
    """train.lr_factor on elapsed training time t (seconds) instead of steps: the budget counts as `ticks` steps."""
    f = min(t / cfg.budget_s, 1.0)
    return cfg.lr * train.lr_factor(f * ticks, ticks, cfg.warmup_frac * ticks, cfg.final_lr_frac)


# --- one arm: model, optimizer, stream, clock

class Arm:
    """One pretraining run that can be advanced slice by slice: only its training steps are timed."""

    def __init__(self, name: str, cfg: ParetoConfig, device: torch.device):
        self.name, self.cfg, self.device = name, cfg, device
        self.mcfg = arm_model_config(cfg.size, name)
        self.mask_prob = cfg.mosaic_mask if name == "mosaic" else cfg.bert_mask
        self.stream = data.PretrainStream(cfg.data, "train", cfg.seq_len, cfg.data_mode, self.mask_prob, cfg.seed,
                                          cfg.batch_size, num_workers=cfg.num_workers)
        torch.manual_seed(cfg.seed)  # the same initial-weight draw for both arms (their shapes differ)
        self.model = modeling.build(self.mcfg).to(device)
        self.optimizer = train.build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
        self.train_s, self.tokens, self.steps, self.points, self.warmup_s = 0.0, 0, 0, [], 0.0
        self.rng = torch.Generator().manual_seed(cfg.seed + 1)  # dropout stream, saved and restored with the arm
        self.amp = partial(perf.autocast, device, cfg.dtype)

    def _forward_backward(self, batch: dict):
        train.mlm_step(self.model, [{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}], amp=self.amp)

    def warm_up(self):
        """Compile (if on) and touch every buffer with one forward/backward on another stream's batch (not counted)."""
        if self.compiled:
            modeling.compile_model(self.model)
        other = data.PretrainStream(self.cfg.data, "train", self.cfg.seq_len, self.cfg.data_mode, self.mask_prob,
                                    self.cfg.seed + 12345, self.cfg.batch_size)
        t0 = time.perf_counter()
        self._forward_backward(other.next_batch())
        perf.sync(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.warmup_s += time.perf_counter() - t0

    def train_until(self, t_end: float):
        """Train until this arm's counted training time reaches t_end seconds (the step that crosses it finishes).
        Within the budget a slice takes at least one step; past it none: an arm overshoots by at most one step."""
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng.get_state())
            first = self.train_s < self.cfg.budget_s
            while first or self.train_s < t_end:
                first = False
                batch = self.stream.next_batch()  # building the batch counts: the data pipeline is training
                t0 = time.perf_counter()
                for g in self.optimizer.param_groups:
                    g["lr"] = lr_at(self.train_s, self.cfg)
                self._forward_backward(batch)
                train.clip_gradients(self.model, self.cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                perf.sync(self.device)
                self.train_s += time.perf_counter() - t0
                self.tokens += int((batch["attention_mask"] != 0).sum())
                self.steps += 1
            self.rng.set_state(torch.get_rng_state())

    def evaluate(self, batches) -> tuple[float, float]:
        return train.evaluate(self.model, batches, self.device, self.amp, 0, 1)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": self.rng.get_state(),
                "stream": self.stream.state_dict(), **{k: getattr(self, k) for k in COUNTS}}

    def load(self, s: dict):
        for k in ("model", "optimizer", "stream"):
            getattr(self, k).load_state_dict(s[k])
        self.train_s, self.tokens, self.steps, self.points = (s[k] for k in COUNTS)
        self.rng.set_state(s["rng"])


# --- the interleaved run

def run_pretraining(cfg: ParetoConfig, device: torch.device, out: Path) -> tuple[dict, dict]:
    """Both arms through the whole budget in alternating slices; returns (arms, excluded-time report)."""
    arms = {name: Arm(name, cfg, device) for name in ARMS}
    evals = data.eval_batches(cfg.data, cfg.seq_len, cfg.data_mode, cfg.eval_batch_size, cfg.eval_batches,
                              mask_prob=0.15, seed=cfg.seed)
    excluded = load_state(cfg, arms, out) or {"warmup_s": {}, "eval_s": 0.0, "checkpoint_s": 0.0}
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    done = all(len(a.points) == cfg.n_points + 1 for a in arms.values())
    for a in [] if done else arms.values():  # a finished run resumed for its fine-tuning: no warm-up
        a.warm_up()
        excluded["warmup_s"][a.name] = excluded["warmup_s"].get(a.name, 0.0) + a.warmup_s
        print(f"{a.name:6s} {modeling.n_params(a.model) / 1e6:.1f}M parameters | mask {a.mask_prob:.0%} | "
              f"compile {'on' if a.compiled else 'off'} | warm-up {a.warmup_s:.1f} s (not counted)", flush=True)
        if not a.points:
            record(cfg, a, 0, evals, out, excluded)
    if not cfg.resume or not (out / "state.pt").exists():
        save_state(cfg, arms, out, excluded)
    m = cfg.slices_per_point
    for k in range(len(arms["mosaic"].points), cfg.n_points + 1):
        for j in range(m):
            t_end = cfg.budget_s * ((k - 1) * m + j + 1) / (cfg.n_points * m)
            order = ARMS if ((k - 1) * m + j) % 2 == 0 else ARMS[::-1]  # A B, then B A: neither always goes first
            for name in order:
                arms[name].train_until(t_end)
        for a in arms.values():
            record(cfg, a, k, evals, out, excluded)
        save_state(cfg, arms, out, excluded)
    return arms, excluded


def load_state(cfg: ParetoConfig, arms: dict, out: Path) -> Optional[dict]:
    """With --resume, the arms from out/state.pt (the pretraining config must match); returns its excluded times."""
    state_path = out / "state.pt"
    if cfg.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["config"] != pretrain_identity(cfg):
            raise ConfigError(f"--resume: {state_path} was written by another configuration:\n  {st['config']}\n"
                              f"now:\n  {pretrain_identity(cfg)}\nuse the same flags, or another --out_dir")
        for name, a in arms.items():
            a.load(st["arms"][name])
        print(f"resuming from {state_path}: {len(arms['mosaic'].points) - 1} of {cfg.n_points} points done")
        return st["excluded"]
    if state_path.exists() and not cfg.resume:
        print(f"warning: starting over in {out}: its state.pt is replaced (use --resume to continue it)")
    return None


def record(cfg: ParetoConfig, a: Arm, k: int, evals, out: Path, excluded: dict):
    """Point k of arm a: evaluate, and save a train.py-style checkpoint when the point is fine-tuned later."""
    t0 = time.perf_counter()
    loss, acc = a.evaluate(evals)
    excluded["eval_s"] += time.perf_counter() - t0
    a.points.append(dict(wall_s=round(a.train_s, 3), tokens=a.tokens, steps=a.steps, eval_loss=loss,
                         eval_mlm_acc=acc, downstream_acc=None))
    print(f"{a.name:6s} point {k}/{cfg.n_points} | wall {a.train_s:7.1f} s | {a.steps:5d} steps | "
          f"{a.tokens:,} tokens | eval_loss {loss:.4f} | eval_mlm_acc {acc:.4f}", flush=True)
    if k == 0 or k in downstream_points(cfg):
        t0 = time.perf_counter()
        atomic_save({"model": a.model.state_dict(), "model_config": config_dict(a.mcfg), "step": a.steps,
                     "tokenizer": "gpt2"}, str(out / "ckpt" / f"{a.name}_{k}.pt"))
        excluded["checkpoint_s"] += time.perf_counter() - t0


def save_state(cfg: ParetoConfig, arms: dict, out: Path, excluded: dict):
    t0 = time.perf_counter()
    atomic_save({"config": pretrain_identity(cfg), "excluded": excluded,
                 "arms": {n: a.state() for n, a in arms.items()}}, str(out / "state.pt"))
    excluded["checkpoint_s"] += time.perf_counter() - t0


def pretrain_identity(cfg: ParetoConfig) -> dict:
    """The fields a resumed run must share with the original (the fine-tuning ones may change)."""
    free = ("quick", "num_workers", "seeds", "ft_examples", "ft_epochs", "ft_lr", "device", "dtype", "out_dir",
            "resume")
    return {k: v for k, v in config_dict(cfg).items() if k not in free}


# --- downstream: glue.py's sentiment task from the saved checkpoints

def downstream(cfg: ParetoConfig, arms: dict, out: Path, excluded: dict, write_outputs):
    """Fine-tune every saved checkpoint (t = 0 and downstream_at) with glue.run (which resumes from its results.json);
    fills downstream_acc with the median over seeds and rewrites the outputs after each point."""
    dist = glue.setup_distributed(cfg.device)
    for a in arms.values():
        for k, p in enumerate(a.points):
            if not (k == 0 or k in downstream_points(cfg)):
                continue
            gcfg = glue.GlueConfig(tasks="sentiment", ckpt=str(out / "ckpt" / f"{a.name}_{k}.pt"),
                                   out_dir=str(out / "glue" / f"{a.name}_{k}"), seeds=cfg.seeds, seed=cfg.seed,
                                   epochs=cfg.ft_epochs, lr=cfg.ft_lr, max_train_examples=cfg.ft_examples,
                                   device=cfg.device, dtype=cfg.dtype, log_interval=10**9)
            print(f"--- fine-tuning {a.name} point {k} (pretrained {p['wall_s']:.0f} s), {cfg.seeds} seeds", flush=True)
            t0 = time.perf_counter()
            res = glue.run(gcfg, init="ckpt", dist=dist)
            tr = res["tasks"]["sentiment"]
            accs = [s["accuracy"] for s in tr["seeds"].values()]
            p.update(downstream_acc=float(np.median(accs)), downstream_accs=accs, majority=tr["majority"]["accuracy"])
            excluded["downstream_s"] += time.perf_counter() - t0
            write_outputs()


# --- the headline, the frontier, the outputs

def time_to_reach(points: list[dict], target: float) -> Optional[float]:
    """First wall-clock at which eval_mlm_acc reaches target, linearly interpolated between points; None if never."""
    for prev, p in zip([None] + points, points):
        if p["eval_mlm_acc"] >= target:
            if prev is None:
                return p["wall_s"]
            f = (target - prev["eval_mlm_acc"]) / max(p["eval_mlm_acc"] - prev["eval_mlm_acc"], 1e-12)
            return prev["wall_s"] + f * (p["wall_s"] - prev["wall_s"])
    return None


def headline(arms: dict, budget_s: float) -> dict:
    """The paper's "a third of the time": when each arm reaches the other's final eval MLM accuracy."""
    fm, fb = arms["mosaic"][-1]["eval_mlm_acc"], arms["bert"][-1]["eval_mlm_acc"]
    tm, tb = time_to_reach(arms["mosaic"], fb), time_to_reach(arms["bert"], fm)
    h = {"mosaic_final_acc": fm, "bert_final_acc": fb, "mosaic_s_to_bert_final": tm, "bert_s_to_mosaic_final": tb,
         "mosaic_fraction_to_bert_final": None if tm is None else tm / budget_s,
         "bert_fraction_to_mosaic_final": None if tb is None else tb / budget_s}
    if tm is not None and fm >= fb:
        h["summary"] = (f"MosaicBERT reached BERT's final eval MLM accuracy ({fb:.3f}) after {tm:.0f} s of training, "
                        f"{tm / budget_s:.2f}x the {budget_s:.0f} s budget BERT trained for")
    elif tb is not None:
        h["summary"] = (f"BERT reached MosaicBERT's final eval MLM accuracy ({fm:.3f}) after {tb:.0f} s of training, "
                        f"{tb / budget_s:.2f}x the {budget_s:.0f} s budget: the baseline wins at this budget")
    else:
        h["summary"] = "neither arm reached the other's final accuracy"
    return h


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (time, quality) pairs: True where no other pair is at least as fast and at least as good (one strictly)."""
    return [not any((t2 <= t and q2 >= q) and (t2 < t or q2 > q) for t2, q2 in points) for t, q in points]


def markdown(res: dict) -> str:
    all_pts = [(a, p) for a in ARMS for p in res["arms"][a]]
    front = pareto_front([(p["wall_s"], p["eval_mlm_acc"]) for _, p in all_pts])
    lines = [f"Device: {res['device']} | torch {res['torch']} | size {res['size']} | budget {res['budget_s']:.0f} s "
             f"of training per arm", "",
             "| arm | wall s | steps | tokens | eval loss | eval MLM acc | downstream acc (median) | frontier |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for (a, p), f in zip(all_pts, front):
        ds = "" if p["downstream_acc"] is None else f"{p['downstream_acc'] * 100:.1f}"
        lines.append(f"| {a} | {p['wall_s']:.0f} | {p.get('steps', '')} | {p['tokens']:,} | {p['eval_loss']:.3f} | "
                     f"{p['eval_mlm_acc']:.3f} | {ds} | {'*' if f else ''} |")
    ex = res["excluded"]
    lines += ["", f"**Headline:** {res['headline']['summary']}.", "",
              "Not counted: warm-up (compile) " + ", ".join(f"{a} {t:.0f} s" for a, t in ex["warmup_s"].items())
              + f", evaluation {ex['eval_s']:.0f} s, checkpoints {ex['checkpoint_s']:.0f} s, "
              f"fine-tuning {ex['downstream_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Two panels: eval MLM accuracy vs wall-clock, downstream accuracy vs pretraining wall-clock; frontier marked."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no pareto.png (pip install matplotlib)")
        return False
    plt.switch_backend("Agg")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "eval_mlm_acc", "eval MLM accuracy (15% masking)"),
                           (axes[1], "downstream_acc", "sentiment dev accuracy (median of seeds)")):
        pts = [(a, p["wall_s"], p[key]) for a in ARMS for p in res["arms"][a] if p[key] is not None]
        for a, color, label in (("mosaic", "tab:blue", "MosaicBERT"), ("bert", "tab:orange", "BERT")):
            ax.plot([x for b, x, _ in pts if b == a], [y for b, _, y in pts if b == a], "o-", color=color, label=label)
        front = sorted((x, y) for (_, x, y), f in zip(pts, pareto_front([(x, y) for _, x, y in pts])) if f)
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], "k--", where="post", lw=1, label="Pareto frontier")
        if key == "downstream_acc" and res["arms"]["mosaic"][0].get("majority") is not None:
            ax.axhline(res["arms"]["mosaic"][0]["majority"], color="gray", lw=0.8, ls=":", label="majority class")
        ax.set_xlabel("pretraining wall-clock (s, training only)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['size']} size, {res['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    cfg = resolve(parse_config(ParetoConfig, sys.argv[1:] if argv is None else argv))
    dist = glue.setup_distributed(cfg.device)
    cfg, device = glue.resolve_dtype(cfg, dist, say=True), dist.device  # both arms run in cfg.dtype
    print_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    arms, excluded = run_pretraining(cfg, device, out)
    excluded.setdefault("downstream_s", 0.0)

    def write_outputs() -> str:
        """pareto.json, .md, .png from what is done so far (downstream_acc null where not fine-tuned yet)."""
        res = {"device": perf.device_name(device), "torch": torch.__version__, "size": cfg.size,
               "budget_s": cfg.budget_s, "config": config_dict(cfg), "arms": {n: a.points for n, a in arms.items()},
               "headline": headline({n: a.points for n, a in arms.items()}, cfg.budget_s),
               "excluded": excluded, "total_s": time.perf_counter() - t_all}
        atomic_write_json(res, out / "pareto.json")
        table = markdown(res)
        (out / "pareto.md").write_text(table)
        png = f", {out / 'pareto.png'}" if plot(res, out / "pareto.png") else ""
        return table + f"\nwrote {out / 'pareto.json'}, {out / 'pareto.md'}{png}"

    write_outputs()  # the pretraining results, before the (slower) fine-tuning
    downstream(cfg, arms, out, excluded, write_outputs)
    print("\n" + write_outputs() + f" in {(time.perf_counter() - t_all) / 60:.1f} min")


if __name__ == "__main__":
    main_guard(main)
