"""Fill-mask: the top-k tokens a checkpoint predicts for each [MASK] in a sentence (nanoGPT's sample.py, for BERT).

    python fillmask.py --ckpt=out/demo "The capital of France is [MASK]." "He played the [MASK] in a band."
    python fillmask.py --hf=path/to/folder "Paris is the [MASK] of France."   # an export, MosaicBERT or HF BERT

`top_k` also gives train.py's before/after samples (print_samples) and checks the Hugging Face export. The tokenizer is any object
with encode, decode, cls_id, sep_id and mask_id (data.Tokenizer, hf.WordPiece).
"""

import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

import data
import model as modeling
from config import HELP_FLAGS, ConfigError, main_guard, parse_config, print_config

MASK = "[MASK]"


def encode_masked(tok, text: str) -> list[int]:
    """[CLS] text [SEP] as ids, each "[MASK]" as tok.mask_id (ValueError without one). With GPT-2's byte-level BPE
    the space before a word belongs to the word (" Paris"), so the space before each [MASK] goes to the mask."""
    pieces = re.split(r" ?\[MASK\]", text)
    if len(pieces) < 2:
        raise ValueError(f"no {MASK} in {text!r}: write the word to predict as {MASK}")
    ids = [tok.cls_id]
    for i, piece in enumerate(pieces):
        ids += ([tok.mask_id] if i else []) + (tok.encode(piece) if piece else [])
    return ids + [tok.sep_id]


@torch.no_grad()
def top_k(model, tok, text: str, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in text, in order, the k most likely tokens as (decoded token, probability). The softmax
    runs over the real vocabulary: the rows that pad the embedding to a multiple of 64 are never predicted."""
    ids = encode_masked(tok, text)
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)  # [1, S]
    was_training = model.training
    model.eval()
    try:
        logits = model.logits(input_ids, torch.ones_like(input_ids))[0]  # [S, V_padded]
    finally:
        model.train(was_training)
    logits = logits[:, : model.config.vocab_size].float()       # [S, V]
    at = (input_ids[0] == tok.mask_id).nonzero().flatten()      # [n_masks]
    probs = logits[at].softmax(-1)                              # [n_masks, V]
    p, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)        # [n_masks, k]
    return [[(tok.decode([int(i)]), float(q)) for q, i in zip(pr, ix)] for pr, ix in zip(p, idx)]


def format_predictions(text: str, preds: list[list[tuple[str, float]]]) -> str:
    """The sentence, then per [MASK] `[MASK] #n: token (p) | ...`, tokens stripped of spaces; quoted where that would
    hide them: whitespace-only tokens, and tokens only their spaces tell apart (GPT-2 BPE's " It" and "It")."""
    lines = [text]
    for n, row in enumerate(preds, 1):
        stripped = Counter(t.strip() for t, _ in row)
        shown = [repr(t) if not t.strip() or stripped[t.strip()] > 1 else t.strip() for t, _ in row]
        lines.append(f"  {MASK} #{n}: " + " | ".join(f"{t} ({p:.2f})" for t, (_, p) in zip(shown, row)))
    return "\n".join(lines)


# Held-out sentences (in neither corpus) for train.py's samples: noise at step 0, fitting the context after the demo.
SAMPLE_TEXTS = (
    "The city is the [MASK] of the province and its largest city.",
    "It is one of the [MASK] films of the year.",
    "The acting is fine, but the [MASK] is a mess.",
)


def print_samples(model, when: str):
    """train.py's top-5 predictions for SAMPLE_TEXTS (before and after training), eager and in eval mode."""
    print(f"fill-mask samples {when}:", flush=True)
    with torch.compiler.set_stance("force_eager"):
        for text in SAMPLE_TEXTS:
            print(format_predictions(text, top_k(model, data.get_tokenizer(), text, k=5)), flush=True)


# --- command line

@dataclass
class FillMaskConfig:
    ckpt: str = "out/demo"          # a train.py checkpoint (.pt) or the out_dir holding them
    hf: str = ""                    # or a model folder: an hf.py export, MosaicML's MosaicBERT, a HF BERT folder
    k: int = 5                      # predictions per [MASK]


def main(argv: Optional[list[str]] = None):
    argv = sys.argv[1:] if argv is None else argv
    flags = [a for a in argv if a.startswith("--") or a in HELP_FLAGS]
    texts = [a for a in argv if a not in flags]
    cfg = parse_config(FillMaskConfig, flags)
    if not texts:
        raise ConfigError(f'give one or more sentences with {MASK}, e.g. python fillmask.py "The capital of France '
                          f'is {MASK}."')
    print_config(cfg)
    if cfg.hf:  # the folder's own tokenizer: GPT-2 BPE for our exports, its vocab.txt (WordPiece) otherwise
        import hf
        try:
            net, tok = hf.load_folder(cfg.hf)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--hf={cfg.hf}: {type(e).__name__}: {e}") from None
        if tok.mask_id is None:
            raise ConfigError(f"--hf={cfg.hf}: its vocabulary has no [MASK] token")
    else:
        try:
            net, _ = modeling.load_pretrained(cfg.ckpt)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--ckpt={cfg.ckpt}: {e}") from None
        tok = data.get_tokenizer()
    for text in texts:
        print(format_predictions(text, top_k(net, tok, text, cfg.k)))


if __name__ == "__main__":
    main_guard(main)
