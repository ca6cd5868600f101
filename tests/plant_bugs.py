"""Planted bugs: does the test suite catch them? (Not collected by pytest; run it by hand.)

    python tests/plant_bugs.py            # every bug, one at a time (~15 min on 2 busy cores)
    python tests/plant_bugs.py --list     # names only
    python tests/plant_bugs.py alibi_sign_bias mcc_pred_marginal_twice   # some of them
    python tests/plant_bugs.py --baseline # first run each selection without a bug: it must pass

Each bug is a textual patch: one exact string of one file replaced by another. The project (its tracked and
untracked, not ignored files) is copied to a temporary folder once; for each bug the patch is applied there,
the tests that should catch it run, and the file is restored. A bug whose tests still pass is a *survivor*:
the suite cannot see that bug, so a test is missing. A patch whose text is no longer in the file is an error
(the code moved: update the bug here), never silently skipped. Exit status: 0 when every bug was caught.

Run it after any change to formulas, normalisations, masks, signs or resume state, and add
a bug here for each new thing a test should catch.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, exact text, replacement, pytest arguments that must fail)
BUGS = [
    # --- formulas: GLUE metrics
    ("f1_counts_tn_as_fn", "glue_tasks.py",
     "fn = int(np.sum((pred != 1) & (label == 1)))", "fn = int(np.sum(pred != 1))",
     ["tests/test_glue.py", "-k", "formulas or sklearn or hand_worked"]),
    ("mcc_pred_marginal_twice", "glue_tasks.py",
     "(s * s - p_sum @ p_sum) * (s * s - t_sum @ t_sum)", "(s * s - p_sum @ p_sum) * (s * s - p_sum @ p_sum)",
     ["tests/test_glue.py", "-k", "formulas or covariance or sklearn or hand_worked"]),
    ("spearman_ties_get_min_rank", "glue_tasks.py",
     "np.repeat((starts + ends + 1) / 2.0, ends - starts)", "np.repeat(starts + 1.0, ends - starts)",
     ["tests/test_glue.py", "-k", "correlations or scipy"]),
    # --- normalisations: the MLM loss under accumulation and DDP, GLUE under uneven DDP splits
    ("loss_not_divided_by_global_count", "train.py",
     "loss_scale = world / n_masked.clamp(min=1)", "loss_scale = world",
     ["tests/test_train.py", "-k", "global_masked_mean"]),
    ("per_micro_batch_mean_loss", "train.py",
     "(loss_sum * loss_scale).backward()", "(loss_sum / n.clamp(min=1) / len(micro)).backward()",
     ["tests/test_train.py", "-k", "global_masked_mean"]),
    ("logged_loss_times_world", "train.py",
     "loss, acc = loss_sum / max(n_masked_sum, 1),", "loss, acc = world * loss_sum / max(n_masked_sum, 1),",
     ["tests/test_train.py", "-k", "two_ranks_equal_one_process"]),
    ("glue_grad_mean_of_rank_means", "glue.py",
     "(loss * (len(mine) * dist.world / n_global)).backward()", "loss.backward()",
     ["tests/test_glue.py", "-k", "torchrun"]),
    ("glue_logged_loss_mean_of_rank_means", "glue.py",
     "loss_acc += loss.detach() * (len(mine) / n_global)", "loss_acc += loss.detach() / dist.world",
     ["tests/test_glue.py", "-k", "torchrun"]),
    ("dropout_scale_missing", "model.py",
     "torch.where(keep, x * (65536 / (65536 - drop)), 0)", "torch.where(keep, x, 0)",
     ["tests/test_model.py", "-k", "dropout"]),
    ("attention_dropout_in_eval", "model.py",
     "p = self.attn_dropout if self.training else 0.0", "p = self.attn_dropout",
     ["tests/test_model.py", "-k", "attention_dropout"]),
    # --- masks and layouts
    ("sparse_head_gets_pad_rows", "model.py",
     "h, labels = h[picked], labels[picked]  # (M, d), (M,)",
     "picked = picked if lay.unpadded else torch.cat([picked, torch.nonzero(attention_mask.reshape(-1) == 0)"
     ".flatten()]); h, labels = h[picked], labels[picked]",
     ["tests/test_model.py", "-k", "head_sees"]),
    ("padded_mask_ignores_documents", "kernels.py",
     "allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] != 0)",
     "allowed = (ids[:, :, None] != 0) & (ids[:, None, :] != 0)",
     ["tests/test_kernels.py", "tests/test_model.py", "-k", "documents or alibi_attention or unpadded_forward"]),
    ("unpad_ignores_documents", "kernels.py",
     "    if inner.numel() == 0:\n        return row_starts.to(torch.int32)",
     "    if True:\n        return row_starts.to(torch.int32)",
     ["tests/test_kernels.py", "-k", "pad_unpad or packed_rows"]),
    ("sdpa_attends_one_pad_key", "kernels.py",
     "key_is_real = torch.arange(L, device=cu_seqlens.device)[None, :] < seqlens[:, None]",
     "key_is_real = torch.arange(L, device=cu_seqlens.device)[None, :] <= seqlens[:, None]",
     ["tests/test_kernels.py", "-k", "sdpa"]),
    ("cls_is_last_token", "model.py",
     "idx = torch.searchsorted(row_of, rows)  # (B,)", "idx = torch.searchsorted(row_of, rows, right=True) - 1  # (B,)",
     ["tests/test_glue.py", "-k", "hf_bert_folder"]),
    # --- fast paths: invariants once pinned only on a reference, planted in the path that training runs
    ("fused_top1_counts_ties", "kernels.py",
     "n_correct += ((top1.squeeze(1) == y) & valid).sum()",
     "n_correct += ((z_label.squeeze(1) == mx.squeeze(1)) & valid).sum()",
     ["tests/test_invariants.py", "-k", "top1 or tied"]),
    ("fused_top1_last_index_on_ties", "kernels.py",
     "mx, top1 = z.max(-1, keepdim=True)  # (n, 1), (n, 1)",
     "mx, top1 = z.max(-1, keepdim=True); top1 = z.shape[1] - 1 - z.flip(-1).argmax(-1, keepdim=True)",
     ["tests/test_invariants.py", "-k", "top1 or tied"]),
    ("fused_ignored_rows_in_loss", "kernels.py",
     "loss += ((lse - z_label).squeeze(1) * valid).sum()", "loss += (lse - z_label).squeeze(1).sum()",
     ["tests/test_invariants.py", "-k", "degenerate or ignored"]),
    ("fused_ignored_rows_in_grad", "kernels.py",
     "g.mul_(valid[:, None] / total)", "g.mul_(1 / total)",
     ["tests/test_invariants.py", "-k", "degenerate or ignored"]),
    ("fused_loss_per_chunk_mean", "kernels.py",
     "loss += ((lse - z_label).squeeze(1) * valid).sum()",
     "loss += ((lse - z_label).squeeze(1) * valid).sum() / valid.sum().clamp(min=1)",
     ["tests/test_invariants.py", "-k", "global_masked_mean"]),
    ("fused_backward_ignores_loss_scale", "kernels.py",
     "gw = ((G.t() @ xc).float() * grad_loss).to(w_dtype)", "gw = (G.t() @ xc).float().to(w_dtype)",
     ["tests/test_invariants.py", "-k", "global_masked_mean"]),
    ("flex_block_range_misses_last_token", "kernels.py",
     "ends = (starts + (block - 1)).clamp_(max=nnz - 1)", "ends = (starts + (block - 1)).clamp_(max=nnz - 2)",
     ["tests/test_invariants.py", "-k", "block_boundaries"]),
    ("mean_pool_all_pad_row_divides_by_zero", "model.py",
     "return (sums[:, :-1] / sums[:, -1:].clamp(min=1)).to(h.dtype)",
     "return (sums[:, :-1] / sums[:, -1:]).to(h.dtype)",
     ["tests/test_invariants.py", "-k", "all_pad_and_one_token"]),
    ("cls_all_pad_row_reads_a_neighbour", "model.py",
     "cls = h.reshape(-1, h.shape[-1])[rows] * has_token[:, None]", "cls = h.reshape(-1, h.shape[-1])[rows]",
     ["tests/test_invariants.py", "-k", "all_pad_and_one_token"]),
    # --- signs
    ("alibi_sign_bias", "kernels.py",
     "return -slopes.to(device=device, dtype=torch.float32)[:, None, None] * dist",
     "return slopes.to(device=device, dtype=torch.float32)[:, None, None] * dist",
     ["tests/test_model.py", "-k", "alibi_attention"]),
    ("alibi_sign_flex", "kernels.py",
     "return score - slopes[h] * (q_idx - kv_idx).abs()", "return score + slopes[h] * (q_idx - kv_idx).abs()",
     ["tests/test_model.py", "-k", "alibi_attention"]),
    ("alibi_slopes_wrong_interleave", "kernels.py",
     "slopes += power_of_2_slopes(2 * p)[0::2][: n_heads - p]", "slopes += power_of_2_slopes(2 * p)[1::2][: n_heads - p]",
     ["tests/test_model.py", "-k", "alibi_attention"]),
    # --- resume state
    ("resume_skips_data_position", "data.py",
     "        self.position = int(state[\"position\"])", "        self.position = 0",
     ["tests/test_train.py", "-k", "stop_and_resume"]),
    ("resume_skips_optimizer_state", "train.py",
     "optimizer.load_state_dict(ckpt[\"optimizer\"])", "pass",
     ["tests/test_train.py", "-k", "stop_and_resume"]),
    ("resume_skips_torch_rng", "checkpoint.py",
     "    torch.set_rng_state(s[\"torch\"])\n", "    torch.get_rng_state()\n",
     ["tests/test_train.py", "-k", "stop_and_resume"]),
]


def copy_project(dest: Path):
    """The working tree's tracked and untracked, not ignored files (what git would commit)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def pytest(work: Path, args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1200)


def plant(work: Path, name, file, old, new, args) -> str:
    """Apply one bug, run its tests, restore the file. Returns 'caught', 'SURVIVED' or an error."""
    path = work / file
    original = path.read_text()
    if original.count(old) != 1:
        return f"ERROR: the text to replace occurs {original.count(old)} times in {file} (the code moved: update it)"
    path.write_text(original.replace(old, new))
    try:
        proc = pytest(work, args)
    finally:
        path.write_text(original)
    if proc.returncode == 1:
        return "caught"
    if proc.returncode == 0:
        return "SURVIVED"
    if proc.returncode == 5:
        return "ERROR: the selection collected no test"
    return f"ERROR: pytest exit {proc.returncode}: {proc.stdout[-500:]}"


def main(argv):
    if "--list" in argv:
        print("\n".join(b[0] for b in BUGS))
        return 0
    baseline = "--baseline" in argv  # first check that every selection passes without a bug (else "caught" means nothing)
    argv = [a for a in argv if a != "--baseline"]
    unknown = set(argv) - {b[0] for b in BUGS}
    if unknown:
        print(f"unknown bug(s) {sorted(unknown)}; --list shows them", file=sys.stderr)
        return 2
    bugs = [b for b in BUGS if not argv or b[0] in argv]
    results = {}
    with tempfile.TemporaryDirectory(prefix="plant_bugs_") as tmp:
        work = Path(tmp)
        copy_project(work)
        if baseline:
            for args in dict.fromkeys(tuple(b[4]) for b in bugs):
                proc = pytest(work, list(args))
                print(f"baseline {'ok    ' if proc.returncode == 0 else 'FAILED'} ({' '.join(args)})", flush=True)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:])
                    return 1
        for bug in bugs:
            t0 = time.perf_counter()
            results[bug[0]] = plant(work, *bug)
            print(f"{bug[0]:<40} {results[bug[0]]:<10} {time.perf_counter() - t0:5.0f} s   "
                  f"({' '.join(bug[4])})", flush=True)
    bad = {n: r for n, r in results.items() if r != "caught"}
    print(f"\n{len(results) - len(bad)}/{len(results)} planted bugs caught; "
          f"{sum(r == 'SURVIVED' for r in bad.values())} survivors, "
          f"{sum(r.startswith('ERROR') for r in bad.values())} errors")
    for n, r in bad.items():
        print(f"  {n}: {r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
