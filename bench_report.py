"""bench.py's reporting: each row's tokens/s, MFU and memory, the targets, the projection, Markdown, chart, JSON."""

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import checkpoint
import data
import perf

# The paper's recipe (mosaicml/examples v0.0.4 mosaic-bert-base-uncased.yaml; see train.py): the projection's run
PAPER_STEPS, PAPER_BATCH, PAPER_SEQ_LEN = 70_000, 4096, 128


@dataclass
class BatchStats:
    """What the rows' numbers are normalized by, computed from the batches themselves."""
    n_real: list           # real tokens per batch
    n_masked: list         # masked tokens per batch
    pad_frac: float        # padded positions / all positions
    context: float         # average context a real token attends to: sum(len^2) / sum(len)
    mask_frac: float       # masked / real tokens (the sparse head's share)
    shape: str             # e.g. "4 x 128" or "16 x 41..47"

    @classmethod
    def of(cls, batches: list[dict]) -> "BatchStats":
        sums = [data.attention_context(b["attention_mask"]) for b in batches]  # per-window, packed rows too
        n_real, n_masked = [n for n, _ in sums], [int((b["labels"] != -100).sum()) for b in batches]
        cells = sum(b["attention_mask"].numel() for b in batches)
        Ss = sorted({b["attention_mask"].shape[1] for b in batches})
        S = str(Ss[0]) if len(Ss) == 1 else f"{Ss[0]}..{Ss[-1]}"
        return cls(n_real, n_masked, 1 - sum(n_real) / cells, sum(sq for _, sq in sums) / sum(n_real),
                   sum(n_masked) / sum(n_real), f"{batches[0]['attention_mask'].shape[0]} x {S}")


# --- Results: metrics, targets, projection
def row_result(r, peak: perf.MatmulPeak, sheet: Optional[dict]) -> dict:
    """bench.Row r's medians over its timed rounds, MFU against the measured (and datasheet) peak, its memory."""
    base = dict(name=r.name, workload=r.workload, note=r.note)
    if r.skipped:
        return dict(base, tokens_per_s=None, step_ms=None, mfu=None, peak_mem_bytes=None, speedup=None)
    tok_s, step_s = statistics.median(n / t for n, t in zip(r.tokens, r.times)), statistics.median(r.times)
    flops = r.flops_per_token * tok_s
    compile_s = max(0.0, sum(r.warm_times) - len(r.warm_times) * step_s) if r.compiled else None
    return dict(base, tokens_per_s=tok_s, step_ms=1000 * step_s, mfu=flops / peak.peak(r.dtype),
                peak_mem_bytes=r.peak_mem, speedup=None, dtype=r.dtype, flops_per_token=r.flops_per_token,
                compile_s=compile_s, step_ms_all=[1000 * t for t in r.times], tokens_per_step=r.tokens[0],
                step_mem_measured=r.step_mem_measured, **r.info,
                **({"mfu_datasheet": flops / sheet[r.dtype]} if sheet else {}))


def add_speedups(results: list[dict]):
    base = {x["workload"]: x["tokens_per_s"] for x in results if x["name"] == "bert-base"}  # pretrain, glue
    for x in results:
        if base.get(x["workload"]) and x["tokens_per_s"]:
            x["speedup"] = x["tokens_per_s"] / base[x["workload"]]


def targets(results: list[dict], stats: dict) -> list[dict]:
    """The speed targets, computed from this run's numbers (never hard-coded)."""
    ran, out = [x for x in results if x["tokens_per_s"]], []

    def get(w, name=None):
        return next((x for x in ran if x["workload"] == w and name in (None, x["name"])), None)

    def target(what, value, threshold, unit):
        out.append(dict(target=what, value=value, threshold=threshold,
                        met=None if value is None else bool(value >= threshold), unit=unit))

    for w, ratio in (("pretrain", 1.6), ("glue", 3.0)):
        m = get(w, "mosaic-bert-base")
        p = max((x for x in ran if x["workload"] == w and x["name"].startswith("hf-bert-base")),
                key=lambda x: x["tokens_per_s"], default=None)  # the fastest peer
        target(f"{w}: mosaic-bert-base tokens/s >= {ratio:g}x the HF peer" + (f" ({p['name']})" if p else ""),
               m["tokens_per_s"] / p["tokens_per_s"] if m and p else None, ratio, "x")
    m, d = get("pretrain", "mosaic-bert-base"), get("demo")
    target(f"pretrain: mosaic-bert-base MFU >= 75% of the measured {m['dtype'] if m else ''} matmul rate",
           m["mfu"] if m else None, 0.75, "mfu")
    if "demo" in stats:
        target(f"demo: python train.py's step MFU >= 40% of the measured {d['dtype'] if d else ''} matmul rate",
               d["mfu"] if d else None, 0.40, "mfu")
    for w in ("pretrain", "glue"):
        padded = "+bf16" if get(w, "+bf16") else "bert-base"  # in float32 the +bf16 row is skipped
        u, p = get(w, "+unpad"), get(w, padded)
        if w in stats:
            need = 0.8 / (1 - stats[w].pad_frac)
            target(f"{w}: +unpad >= 0.8 x 1/(1 - padding {stats[w].pad_frac:.1%}) = {need:.2f}x the padded "
                   f"{padded} row", u["tokens_per_s"] / p["tokens_per_s"] if u and p else None, need, "x")
    return out


def projection(results: list[dict], stats: dict, n_devices: int) -> dict:
    """The paper's recipe on n_devices like this one, from each pretrain row's tokens/s (as padded, ideal scaling)."""
    if "pretrain" not in stats:
        return {}
    real = PAPER_STEPS * PAPER_BATCH * PAPER_SEQ_LEN * (1 - stats["pretrain"].pad_frac)
    rows = {x["name"]: real / (x["tokens_per_s"] * n_devices) / 3600
            for x in results if x["workload"] == "pretrain" and x["tokens_per_s"]}
    return dict(n_devices=n_devices, steps=PAPER_STEPS, global_batch=PAPER_BATCH, seq_len=PAPER_SEQ_LEN,
                real_tokens=real, hours=rows)


# --- Outputs: Markdown tables, the chart, JSON
def fmt(x, spec: str) -> str:
    """A table cell: '-' where there is no number; spec 'mem' for bytes."""
    if x is None:
        return "-"
    return (f"{x / 2**30:.2f} GiB" if x >= 2**28 else f"{x / 2**20:.1f} MiB") if spec == "mem" else format(x, spec)


MLM_COLS = [("real tok/s", "tokens_per_s", ",.0f"), ("step ms", "step_ms", ",.0f"), ("speedup", "speedup", ".2f"),
            ("MFU", "mfu", ".1%"), ("MFU (datasheet)", "mfu_datasheet", ".1%"), ("peak mem", "peak_mem_bytes", "mem"),
            ("compile s", "compile_s", ".1f")]  # (header, result key, format)
ATTENTION_COLS = [("seq len", "seq_len", "d"), ("tok/s", "tokens_per_s", ",.0f"), ("ms", "step_ms", ",.1f"),
                  ("MFU", "mfu", ".1%"), ("peak mem", "peak_mem_bytes", "mem"), ("compile s", "compile_s", ".1f")]
SECTIONS = (("pretrain", "(a) pretraining, seq_len 128"), ("glue", "(b) GLUE-like short sentences"),
            ("demo", "(c) the demo: `python train.py`'s step"))


def md_table(title: str, head: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown section (none without rows): align is 'l' (text) or 'r' (numbers) per column."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    bar = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return [f"### {title}", "", line(head).replace("|  |", "| |"), bar, *map(line, rows), ""] if rows else []


def markdown(results: list[dict], tgts: list[dict], proj: dict, header: list[str], sheet) -> str:
    lines, mlm = header + [""], [c for c in MLM_COLS if sheet or c[1] != "mfu_datasheet"]
    cells = lambda x, cols: [fmt(x.get(key), spec) for _, key, spec in cols]  # noqa: E731
    vs = lambda v, unit, pct: "-" if v is None else format(v, pct) if unit == "mfu" else f"{v:.2f}x"  # noqa: E731
    for w, title in SECTIONS:
        rows = [[x["name"], *cells(x, mlm), x["note"]] for x in results if x["workload"] == w]
        lines += md_table(title, ["row", *(h for h, _, _ in mlm), "note"], "l" + "r" * len(mlm) + "l", rows)
    attention = sorted((x for x in results if x["workload"] == "attention"),
                       key=lambda x: (x["backend"], not x["backward"], x["seq_len"]))
    rows = [[x["backend"], "fwd+bwd" if x["backward"] else "fwd", *cells(x, ATTENTION_COLS)] for x in attention]
    lines += md_table("(d) attention alone (ALiBi, bf16)", ["backend", "pass", *(h for h, _, _ in ATTENTION_COLS)],
                      "llrrrrrr", rows)
    rows = [[t["target"], vs(t["value"], t["unit"], ".1%"), vs(t["threshold"], t["unit"], ".0%"),
             "not evaluated" if t["met"] is None else "met" if t["met"] else "NOT MET"] for t in tgts]
    lines += md_table("Targets", ["target", "measured", "needed", ""], "lrrl", rows)
    if proj:
        lines += [f"### Projection: the paper's recipe ({proj['steps']:,} steps x {proj['global_batch']:,} x "
                  f"{proj['seq_len']}, {proj['real_tokens'] / 1e9:.1f}B real tokens) on {proj['n_devices']} "
                  "such devices, perfect scaling", ""]
        lines += [f"- {name}: {h:,.1f} h ({h / 24:,.1f} days)" for name, h in proj["hours"].items()] + [""]
    return "\n".join(lines)


def chart(results: list[dict], path: str) -> str:
    """A PNG of tokens/s per row and workload; returns a note."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "chart skipped: matplotlib not installed"
    panels = {w: sel for w in dict.fromkeys(x["workload"] for x in results)  # pretrain, glue, demo, attention
              if (sel := [x for x in results if x["workload"] == w and x["tokens_per_s"]])}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (w, sel) in zip(axes[0], panels.items()):
        if w == "attention":
            for key in sorted({(x["backend"], x["backward"]) for x in sel}):
                pts = sorted((x["seq_len"], x["tokens_per_s"]) for x in sel if (x["backend"], x["backward"]) == key)
                ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {'fwd+bwd' if key[1] else 'fwd'}")
            ax.set_xscale("log", base=2)
            ax.set(yscale="log", xlabel="sequence length")
            ax.legend()
        else:
            ax.barh([x["name"] for x in sel][::-1], [x["tokens_per_s"] for x in sel][::-1])
            ax.set_xlabel("real tokens/s")
        ax.set_title(w)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"


def peak_lines(peak: perf.MatmulPeak, sheet: Optional[dict], device, status: dict) -> list[str]:
    """The header lines that say what MFU and peak memory are measured against."""
    lines = [f"matmul peak (measured, median of {len(peak.rates['float32'])} bursts of {peak.n}^3): "
             + ", ".join(f"{k} {peak.peak(k) / 1e9:,.0f} GFLOP/s" for k in peak.rates)
             + (f"; datasheet bf16 {sheet['bfloat16'] / 1e12:,.0f}, fp32 {sheet['float32'] / 1e12:,.1f} TFLOP/s"
                if sheet else ""),
             "peak mem: the row's parameters + AdamW state + the step's high-water mark above its start ("
             + ("CUDA max_memory_allocated" if device.type == "cuda" else "CPU VmHWM via /proc/self/clear_refs") + ")"]
    warn = "WARNING: torch.compile recompiled during the timed rounds (TORCH_LOGS=recompiles shows why)"
    return lines + ([warn] if status["recompiled_during_timing"] else [])


def write(out: dict, md: str, json_path: str, md_path: str = "", png_path: str = ""):
    """The JSON, and the Markdown and the chart beside it unless md_path / png_path say where."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(out, path)
    md_file = Path(md_path) if md_path else path.with_suffix(".md")
    md_file.write_text(md + "\n")
    png = chart(out["rows"], str(Path(png_path) if png_path else path.with_suffix(".png")))
    print(f"wrote {path} and {md_file}; {png}")
