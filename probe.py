"""Linear probes: what pretraining left in the encoder for the sentiment demo, and what its unlabelled text allows.

    python probe.py                                  # out/demo (train.py's checkpoint) vs random init, and ceilings
    python probe.py --ckpt=out/x --labels=250 --json=out/probe.json
    python probe.py --ckpt=                          # random init and the classical rows only

The demo (`python train.py && python glue.py`) asks whether pretraining buys the classifier anything. Fine-tuning
answers with one number; a linear probe (Alain and Bengio, 2016) says where: logistic regression on frozen
features, fitted on the demo's labelled sentences, scored on the dev set. Rows, each fitted and scored alike:

    random init, layer l   mean over real tokens of the hidden states after layer l (0: the embeddings) of a
                           randomly initialised encoder of the checkpoint's architecture: glue.py's control,
                           seed for seed (glue.finetune seeds the same way)
    pretrained, layer l    the same for the checkpoint's encoder
    bag-of-words           which GPT-2 BPE tokens a sentence holds (binary): the linear classifier a model
                           can learn from the labels alone
    LSA                    latent semantic analysis (Deerwester et al., 1990): a truncated SVD of the tf-idf
                           sentence x token matrix of all the training sentences, labels dropped (the in-domain
                           text train.py's demo pretrains on; never the dev sentences); a sentence is the mean of
                           its tokens' vectors. A classical unsupervised method, computed in full on the same text:
                           what that text tells about the task without labels, with no compute limit
    bag-of-words + LSA     both: what the unlabelled text adds to what the labels give

The labelled sentences are glue.py's label budget (glue.label_subset: the demo's fixed 1,000 by default). Features
are standardized on them; the L2 strength is chosen by k-fold cross-validation on them, never on the dev set.

Two more views of why a checkpoint may start fine-tuning behind a random init:

    embedding geometry     the word embeddings of the tokens seen --min_count times or more in the unlabelled
                           training text: their top singular values, how well the top direction's projection
                           follows the tokens' log counts, and the cosine of sentiment word pairs (" good"/" bad",
                           " good"/" great", ...), centred, before and after removing that direction
                           (all-but-the-top, Mu and Viswanath 2018). At random init the pairs are near 0.
    --parts                fine-tune (glue.finetune, the demo's recipe) from the pretrained embeddings alone and
                           from the pretrained layers alone, the rest at the control's own init for that seed,
                           beside all-pretrained and the control: which part costs or buys the points (minutes)
"""

import collections
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import glue
import model
from config import ConfigError, config_dict, main_guard, parse_config, print_config

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # penalty on the mean loss: l2 * |W|^2


@dataclass
class ProbeConfig:
    ckpt: str = "out/demo"     # a train.py checkpoint or its out_dir; empty: random init and classical rows only
    model: str = "mosaic-bert-small"  # the architecture probed at random init when there is no --ckpt
    labels: int = 1000         # label budget: glue.label_subset of the training sentences (-1: all)
    seeds: int = 3             # random initialisations probed (seeds 0..seeds-1, as glue.py's control)
    lsa_dims: int = 100        # LSA vector size
    folds: int = 5             # cross-validation folds for the L2 strength
    max_len: int = 128
    batch_size: int = 64
    min_count: int = 5         # embedding geometry: tokens seen at least this often in the unlabelled text
    parts: bool = False        # also fine-tune from each pretrained part alone (embeddings, layers), --seeds seeds
    max_steps: int = 0         # --parts: cap on fine-tuning steps per run (smoke runs), 0: the recipe's
    json: str = ""             # also write the rows here


# --------------------------------------------------------------------------------------------------------------
# the probe: L2-regularised logistic regression, standardized features, L2 chosen by cross-validation


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> torch.Tensor:
    """Minimise mean cross-entropy + l2 * |W|^2 over W [f + 1, C] (the last row a bias, not penalised) with
    L-BFGS. x [n, f] float64 (standardized), y [n] class ids. The problem is convex: the minimum is unique."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (n, f + 1)
    w = torch.zeros(xb.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Scale every feature to mean 0, std 1 on `train` (a constant feature stays 0); apply the same to `others`."""
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [torch.from_numpy((a - mu) / sd) for a in (train, *others)]


def probe(x_train: np.ndarray, y_train: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray, folds: int) -> dict:
    """Dev accuracy of the probe on features x, with the L2 strength of L2_GRID that cross-validates best on the
    training rows (ties: the stronger penalty). -> {"dev_acc", "cv_acc", "l2"}."""
    x_train, x_dev = np.asarray(x_train, np.float64), np.asarray(x_dev, np.float64)
    n, n_classes = len(y_train), int(max(y_train.max(), y_dev.max())) + 1
    fold_of = np.random.default_rng(0).permutation(n) % folds
    cv = {}
    for l2 in L2_GRID:
        right = 0
        for k in range(folds):
            tr, va = fold_of != k, fold_of == k
            xt, xv = _standardize(x_train[tr], x_train[va])
            w = fit_logistic(xt, torch.from_numpy(y_train[tr]), n_classes, l2)
            right += int((predict(w, xv).numpy() == y_train[va]).sum())
        cv[l2] = right / n
    best = max(L2_GRID, key=lambda l2: (cv[l2], l2))
    xt, xd = _standardize(x_train, x_dev)
    w = fit_logistic(xt, torch.from_numpy(y_train), n_classes, best)
    return {"dev_acc": float((predict(w, xd).numpy() == y_dev).mean()), "cv_acc": cv[best], "l2": best}


# --------------------------------------------------------------------------------------------------------------
# features


@torch.no_grad()
def layer_features(bert: model.Bert, enc: glue.Encoded, pad_id: int, batch_size: int) -> list[np.ndarray]:
    """Each sentence's mean hidden state over its real tokens after the embeddings and after every layer:
    a list of n_layers + 1 arrays [n, d]. Read with forward hooks, so the model's own forward runs."""
    outs, feats = [], [[] for _ in range(len(bert.layers) + 1)]
    device = next(bert.parameters()).device
    hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out))
             for m in (bert.embeddings, *bert.layers)]
    try:
        bert.eval()
        for i in range(0, len(enc), batch_size):
            b = glue.collate(enc, list(range(i, min(i + batch_size, len(enc)))), pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            outs.clear()
            _, lay = bert(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            for layer, h in enumerate(outs):  # (nnz, d) unpadded or (B, S, d) -> (B, d)
                feats[layer].append(model.mean_pool(h, lay).float().cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(f) for f in feats]


def index_in(sorted_ids: np.ndarray, tokens) -> np.ndarray:
    """The positions in sorted_ids of those tokens it holds; the other tokens are left out."""
    t = np.asarray(tokens, np.int64)
    j = np.searchsorted(sorted_ids, t)
    return j[(j < len(sorted_ids)) & (sorted_ids[np.minimum(j, len(sorted_ids) - 1)] == t)]


def bag_of_words(tokens: list, vocab: np.ndarray) -> np.ndarray:
    """[n, len(vocab)]: 1 where the sentence holds the token. vocab: sorted token ids."""
    out = np.zeros((len(tokens), len(vocab)))
    for i, t in enumerate(tokens):
        out[i, index_in(vocab, t)] = 1.0
    return out


def lsa_vectors(tokens: list, dims: int, min_df: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """LSA on the sentences `tokens`: (terms [m] sorted token ids occurring in >= min_df sentences,
    vectors [m, dims]). tf-idf with binary tf and idf = log(n / df); a randomized truncated SVD
    (torch.svd_lowrank, seeded) of the sparse [n, m] matrix; a term's vector is its right singular
    vector scaled by the singular values."""
    sets = [np.unique(np.asarray(t, np.int64)) for t in tokens]
    ids, df = np.unique(np.concatenate(sets), return_counts=True)
    terms = ids[df >= min_df]
    if len(terms) <= dims or len(tokens) <= dims:
        raise ConfigError(f"--lsa_dims={dims} needs more than {dims} sentences and terms; have {len(tokens)} "
                          f"sentences and {len(terms)} terms in >= {min_df} of them. Lower --lsa_dims.")
    idf = np.log(len(tokens) / df[df >= min_df])
    rows, cols = [], []
    for i, s in enumerate(sets):
        j = index_in(terms, s)
        rows.append(np.full(len(j), i)), cols.append(j)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    x = torch.sparse_coo_tensor(np.stack([rows, cols]), idf[cols], (len(tokens), len(terms)),
                                check_invariants=True)  # [n, m]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    _, s, v = torch.svd_lowrank(x, q=dims, niter=6)  # v: [m, dims]
    torch.random.set_rng_state(gen_state)
    return terms, (v * s).numpy()


def lsa_features(tokens: list, terms: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """[n, dims]: each sentence's mean LSA vector over its tokens that have one (zeros if none does)."""
    out = np.zeros((len(tokens), vectors.shape[1]))
    for i, t in enumerate(tokens):
        j = index_in(terms, t)
        if len(j):
            out[i] = vectors[j].mean(0)
    return out


# --------------------------------------------------------------------------------------------------------------
# embedding geometry and fine-tuning from each pretrained part

SENTIMENT_PAIRS = ((" good", " bad"), (" best", " worst"), (" funny", " boring"), (" good", " great"),
                   (" bad", " terrible"))


def remove_top_directions(x: np.ndarray, k: int) -> np.ndarray:
    """All-but-the-top (Mu and Viswanath, 2018): the rows x [n, d] minus their mean and minus their projection
    on the top-k principal directions (right singular vectors of the centred rows)."""
    xc = x - x.mean(0)
    if k == 0:
        return xc
    _, _, vt = np.linalg.svd(xc, full_matrices=False)  # vt: [min(n, d), d]
    return xc - (xc @ vt[:k].T) @ vt[:k]


def embedding_geometry(emb: np.ndarray, counts: dict, tok, min_count: int) -> dict:
    """What the word embeddings emb [V, d] hold about the tokens seen >= min_count times (counts: id -> count):
    the top singular values of those rows (centred), the correlation of each row's projection on the top direction
    with its log count, and the centred cosine of SENTIMENT_PAIRS (those single tokens among the rows) before
    and after removing the top direction."""
    ids = np.array(sorted(i for i, n in counts.items() if n >= min_count), np.int64)
    if len(ids) < 3:
        raise ConfigError(f"--min_count={min_count}: only {len(ids)} tokens are seen that often; lower it")
    x = np.asarray(emb[ids], np.float64)
    xc = x - x.mean(0)
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    log_count = np.log([counts[int(i)] for i in ids])
    row = {int(t): j for j, t in enumerate(ids)}
    found = {f"{a.strip()}/{b.strip()}": (row[ta[0]], row[tb[0]]) for a, b in SENTIMENT_PAIRS
             for ta, tb in [(tok.encode(a), tok.encode(b))]
             if len(ta) == len(tb) == 1 and ta[0] in row and tb[0] in row}  # pair -> (row, row)
    pairs = {p: {} for p in found}
    for k, name in ((0, "cosine"), (1, "cosine_without_top")):
        y = remove_top_directions(x, k)
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        for p, (i, j) in found.items():
            pairs[p][name] = float(y[i] @ y[j])
    return {"rows": len(ids), "singular_values": [float(v) for v in sv[:4]],
            "top_vs_log_count": float(np.corrcoef(xc @ vt[0], log_count)[0, 1]), "pairs": pairs}


def encoder(start, seed: int, weights: dict | None = None) -> model.Bert:
    """glue.finetune's encoder for `seed`, dropout off: the control's own init (glue.finetune seeds, then builds
    the classifier, encoder first), or `weights` loaded over it."""
    torch.manual_seed(seed)
    bert = model.SequenceClassifier(replace(start.model_config, hidden_dropout=0.0), 2).bert
    if weights is not None:
        bert.load_state_dict(weights)
    return bert


def part_weights(pretrained: dict, fresh: dict, part: str) -> dict:
    """An encoder state dict: `part` ('all', 'embeddings', 'layers') from the pretrained weights, the rest fresh."""
    take = {"all": lambda n: True, "embeddings": lambda n: n.startswith("embeddings."),
            "layers": lambda n: not n.startswith("embeddings.")}[part]
    return {n: (pretrained[n] if take(n) else fresh[n]) for n in fresh}


def finetune_parts(cfg: ProbeConfig, start, task, labelled, dev) -> list:
    """glue.finetune on the label budget from all-pretrained, each pretrained part alone, and the control (random
    init), seeds 0..seeds-1; the fresh part of a seed is the control's own init for that seed."""
    gcfg = glue.GlueConfig(tasks="sentiment", max_train_examples=cfg.labels, max_len=cfg.max_len,
                           max_steps=cfg.max_steps, log_interval=10 ** 9)
    dist = glue.setup_distributed("cpu")
    enc_train, evals = glue.encode_examples(labelled, start.tokenizer, cfg.max_len), {
        "dev": glue.encode_examples(dev, start.tokenizer, cfg.max_len)}
    rows = []
    for part in ("all", "embeddings", "layers", "none"):
        accs = []
        for seed in range(cfg.seeds):
            fresh = encoder(start, seed).state_dict()
            w = None if part == "none" else {"bert": part_weights(start.weights["bert"], fresh, part)}
            out = glue.finetune(gcfg, task, start, w, seed, enc_train, evals, dist)
            accs.append(out["metrics"]["accuracy"])
        rows.append({"pretrained": part, "dev_acc": accs})
        print(f"  fine-tuned, pretrained part {part:<10}: dev {np.median(accs) * 100:5.1f}% median "
              f"({', '.join(f'{a * 100:.1f}' for a in accs)})", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# the run


def run(cfg: ProbeConfig) -> dict:
    if cfg.labels == 0 or cfg.seeds < 0 or cfg.folds < 2 or cfg.lsa_dims < 1 or cfg.batch_size < 1:
        raise ConfigError("--labels must be a count or -1 (all), --seeds >= 0, --folds >= 2, --lsa_dims >= 1, "
                          "--batch_size >= 1")
    task = glue.TASKS["sentiment"]
    splits = glue.load_task(task, "")
    labelled = glue.label_subset(splits["train"], cfg.labels)
    if cfg.parts and not cfg.ckpt:
        raise ConfigError("--parts fine-tunes from the parts of a checkpoint: pass --ckpt (train.py's out_dir)")
    if len(labelled.a) < 2 * cfg.folds:
        raise ConfigError(f"--labels={cfg.labels}: need at least {2 * cfg.folds} sentences for {cfg.folds}-fold "
                          f"cross-validation")
    gcfg = glue.GlueConfig(ckpt=cfg.ckpt, model=cfg.model, max_len=cfg.max_len)
    start = glue.load_start(gcfg, "ckpt" if cfg.ckpt else "scratch")
    tok = start.tokenizer
    enc_train, enc_dev = (glue.encode_examples(e, tok, cfg.max_len) for e in (labelled, splits["dev"]))
    y_train, y_dev = labelled.labels, splits["dev"].labels
    print(f"probing on {len(y_train):,} labelled training sentences (glue.label_subset), {len(y_dev):,} dev "
          f"sentences; majority class {max(np.mean(y_dev == c) for c in np.unique(y_dev)) * 100:.1f}%; "
          f"L2 from {cfg.folds}-fold cross-validation over {L2_GRID}")
    rows = []

    def add(features: str, layer, seed, x_train, x_dev):
        r = {"features": features, "layer": layer, "seed": seed, "dim": int(x_train.shape[1]),
             **probe(x_train, y_train, x_dev, y_dev, cfg.folds)}
        rows.append(r)
        print(f"  {features:<20} layer {'-' if layer is None else layer!s:<3} seed {'-' if seed is None else seed!s:<3}"
              f" dim {r['dim']:>5}: dev {r['dev_acc'] * 100:5.1f}%  (cv {r['cv_acc'] * 100:5.1f}%, l2 {r['l2']:g})",
              flush=True)

    pretrained = [("pretrained", None, start.weights["bert"])] if start.weights is not None else []
    for name, seed, weights in pretrained + [("random init", s, None) for s in range(cfg.seeds)]:
        bert = encoder(start, seed or 0, weights)
        for layer, (xt, xd) in enumerate(zip(layer_features(bert, enc_train, tok.pad_id, cfg.batch_size),
                                             layer_features(bert, enc_dev, tok.pad_id, cfg.batch_size))):
            add(name, layer, seed, xt, xd)

    # classical rows: GPT-2 BPE ids of the sentences, no [CLS]/[SEP]
    words = lambda e: [ids[1:-1] for ids in e.ids]  # noqa: E731
    tok_train, tok_dev = words(enc_train), words(enc_dev)
    vocab = np.unique(np.concatenate(tok_train))  # tokens the labelled sentences hold: the only ones a weight can learn
    bow_train, bow_dev = bag_of_words(tok_train, vocab), bag_of_words(tok_dev, vocab)
    add("bag-of-words", None, None, bow_train, bow_dev)
    unlabelled = [ids[1:-1] for ids in glue.encode_examples(splits["train"], tok, cfg.max_len).ids]
    terms, vectors = lsa_vectors(unlabelled, cfg.lsa_dims)
    lsa_train, lsa_dev = lsa_features(tok_train, terms, vectors), lsa_features(tok_dev, terms, vectors)
    add("LSA", None, None, lsa_train, lsa_dev)
    add("bag-of-words + LSA", None, None, np.hstack([bow_train, lsa_train]), np.hstack([bow_dev, lsa_dev]))

    counts = collections.Counter(int(t) for ids in unlabelled for t in ids)
    geometry = []
    for name, seed, weights in pretrained + [("random init", 0, None)]:  # the control's init for seed 0
        emb = encoder(start, seed or 0, weights).embeddings.word_embeddings.weight.detach().float().numpy()
        geometry.append({"encoder": name, "seed": seed, **embedding_geometry(emb, counts, tok, cfg.min_count)})

    out = {"config": config_dict(cfg), "source": start.source, "n_train": len(y_train), "n_dev": len(y_dev),
           "rows": rows, "geometry": geometry}
    if cfg.parts:
        out["parts"] = finetune_parts(cfg, start, task, labelled, splits["dev"])
    print("\n" + markdown(out))
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        glue.atomic_write_json(out, Path(cfg.json))
        print(f"wrote {cfg.json}")
    return out


def markdown(out: dict) -> str:
    """One line per feature set and layer; random init as the median over seeds with the range."""
    lines = [f"Linear probes, sentiment dev accuracy (%), {out['n_train']:,} labelled sentences:", "",
             "| features | layer | dim | dev accuracy | seeds |", "|---|---:|---:|---:|---|"]
    keys = list(dict.fromkeys((r["features"], r["layer"]) for r in out["rows"]))
    for feats, layer in keys:
        same = [r for r in out["rows"] if (r["features"], r["layer"]) == (feats, layer)]
        accs = [r["dev_acc"] * 100 for r in same]
        spread = f"{min(accs):.1f}-{max(accs):.1f} over {len(accs)}" if len(accs) > 1 else ""
        lines.append(f"| {feats} | {'' if layer is None else layer} | {same[0]['dim']} | "
                     f"{float(np.median(accs)):.1f} | {spread} |")
    g = out["geometry"]
    pairs = list(dict.fromkeys(p for r in g for p in r["pairs"]))
    lines += ["", f"Word embeddings of the {g[0]['rows']:,} tokens seen >= {out['config']['min_count']} times in "
              f"the unlabelled training text; centred cosines, before -> after removing the top direction:", "",
              "| encoder | top singular values | r(top direction, log count) | " + " | ".join(pairs) + " |",
              "|---|---|---:|" + "---:|" * len(pairs)]
    for r in g:
        cos = [r["pairs"].get(p) for p in pairs]
        lines.append(f"| {r['encoder']} | {', '.join(f'{v:.2f}' for v in r['singular_values'])} | "
                     f"{r['top_vs_log_count']:+.2f} | " + " | ".join(
                         f"{c['cosine']:+.2f} -> {c['cosine_without_top']:+.2f}" if c else "" for c in cos) + " |")
    if "parts" in out:
        lines += ["", "Fine-tuned (glue.py's recipe) from each pretrained part, the rest at the control's init:", "",
                  "| pretrained part | dev accuracy (median) | seeds |", "|---|---:|---|"]
        for r in out["parts"]:
            lines.append(f"| {r['pretrained']} | {float(np.median(r['dev_acc'])) * 100:.1f} | "
                         f"{', '.join(f'{a * 100:.1f}' for a in r['dev_acc'])} |")
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_config(ProbeConfig, sys.argv[1:] if argv is None else argv)
    print_config(cfg)
    try:
        return run(cfg)
    except glue.GlueError as e:  # no checkpoint at --ckpt, or one glue.py cannot read: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
