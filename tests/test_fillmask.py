"""fillmask.py: [MASK] placement, top-k against a direct softmax of the dense logits, and the command line."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import checkpoint
import data
import fillmask
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = M.ModelConfig.preset("mosaic-bert-tiny", hidden_dropout=0.0)  # full GPT-2 vocabulary: decode() must work


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer()


def test_encode_masked_places_mask_ids_and_gives_the_space_to_the_masked_token(tok):
    ids = fillmask.encode_masked(tok, "The capital of France is [MASK].")
    assert ids == [tok.cls_id] + tok.encode("The capital of France is") + [tok.mask_id] + tok.encode(".") + \
        [tok.sep_id]
    two = fillmask.encode_masked(tok, "[MASK] and [MASK]")
    assert two == [tok.cls_id, tok.mask_id] + tok.encode(" and") + [tok.mask_id, tok.sep_id]
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        fillmask.encode_masked(tok, "nothing to predict")


def test_top_k_equals_softmax_of_dense_logits_at_each_mask(tok):
    """Independent computation: softmax over the real vocabulary of model.logits at the mask positions, sorted.
    The decoder bias is pushed up on one padding row (id >= vocab_size): it must never be predicted."""
    torch.manual_seed(0)
    net = M.build(CFG).train()  # top_k must switch dropout off and restore the mode
    with torch.no_grad():
        net.head.bias[CFG.vocab_size + 1] = 1e4
    text = "A [MASK] film about [MASK] people."
    preds = fillmask.top_k(net, tok, text, k=4)
    assert net.training
    ids = torch.tensor([fillmask.encode_masked(tok, text)])
    net.eval()
    with torch.no_grad():
        logits = net.logits(ids, torch.ones_like(ids))[0, :, : CFG.vocab_size].float()
    at = [i for i, t in enumerate(ids[0].tolist()) if t == tok.mask_id]
    assert len(preds) == len(at) == 2
    for row, pos in zip(preds, at):
        probs = torch.softmax(logits[pos], -1)
        best = torch.argsort(probs, descending=True)[:4]
        assert [t for t, _ in row] == [tok.decode([int(i)]) for i in best]
        assert [p for _, p in row] == pytest.approx(probs[best].tolist(), rel=1e-5)


def test_command_line_prints_predictions_for_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = M.build(CFG)
    checkpoint.atomic_save({"model": net.state_dict(), "model_config": asdict(CFG)}, str(tmp_path / "ckpt_0000001.pt"))
    run = subprocess.run([sys.executable, "fillmask.py", f"--ckpt={tmp_path}", "--k=3", "I [MASK] it."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    line = [ln for ln in run.stdout.splitlines() if "[MASK] #1:" in ln]
    assert len(line) == 1 and line[0].count("|") == 2
    bad = subprocess.run([sys.executable, "fillmask.py", f"--ckpt={tmp_path / 'missing'}", "x [MASK]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ckpt=" in bad.stderr


def test_format_predictions_tells_apart_tokens_that_differ_only_in_spaces():
    """GPT-2 BPE has " It" (a new word) and "It" (glued to the text before): printed stripped, both would read
    `It`, so such tokens, and whitespace-only ones, print quoted; everything else prints bare."""
    line = fillmask.format_predictions("x [MASK]", [[(" the", 0.5), (" It", 0.2), ("It", 0.1), ("\n", 0.05)]])
    assert line.splitlines()[1] == "  [MASK] #1: the (0.50) | ' It' (0.20) | 'It' (0.10) | '\\n' (0.05)"
