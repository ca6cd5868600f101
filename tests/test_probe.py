"""probe.py: the logistic-regression probe solves its objective, never looks at the dev labels to pick L2, the
feature builders agree with naive references, LSA finds what unlabelled text holds, and the CLI runs end to end."""
import json

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import glue
import model
import probe
from config import ConfigError, config_dict


def test_fit_logistic_reaches_the_objectives_minimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(200, generator=g, dtype=torch.float64) > 0).long()
    for l2 in (1e-3, 1e-1):
        w = probe.fit_logistic(x, y, 2, l2).requires_grad_()
        xb = torch.cat([x, torch.ones(200, 1, dtype=x.dtype)], 1)
        loss = F.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        assert grad.abs().max() < 1e-6  # convex: a zero gradient is the minimum
    assert (probe.predict(probe.fit_logistic(x, y, 2, 1e-4), x) == y).float().mean() > 0.9


def test_probe_picks_l2_without_the_dev_labels():
    rng = np.random.default_rng(0)
    x, xd = rng.normal(size=(60, 8)), rng.normal(size=(40, 8))
    y, yd = (x[:, 0] > 0).astype(np.int64), (xd[:, 0] > 0).astype(np.int64)
    a = probe.probe(x, y, xd, yd, folds=3)
    b = probe.probe(x, y, xd, 1 - yd, folds=3)  # other dev labels: same choice, complementary accuracy
    assert (a["l2"], a["cv_acc"]) == (b["l2"], b["cv_acc"]) and a["l2"] in probe.L2_GRID
    assert a["dev_acc"] == pytest.approx(1 - b["dev_acc"]) and a["dev_acc"] > 0.8


token_lists = st.lists(st.lists(st.integers(0, 30), max_size=12), min_size=1, max_size=8)


@settings(max_examples=50, deadline=None)
@given(token_lists, st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True))
def test_bag_of_words_matches_a_naive_loop(tokens, vocab):
    vocab = np.array(sorted(vocab))
    naive = np.array([[float(v in set(t)) for v in vocab] for t in tokens])
    assert np.array_equal(probe.bag_of_words(tokens, vocab), naive)


@settings(max_examples=50, deadline=None)
@given(token_lists, st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True))
def test_lsa_features_match_a_naive_loop(tokens, terms):
    terms = np.array(sorted(terms))
    vectors = np.random.default_rng(len(tokens)).normal(size=(len(terms), 3))
    row = {int(t): i for i, t in enumerate(terms)}
    naive = np.array([np.mean([vectors[row[i]] for i in t if i in row], 0) if any(i in row for i in t)
                      else np.zeros(3) for t in tokens])
    assert np.allclose(probe.lsa_features(tokens, terms, vectors), naive)


def test_lsa_finds_what_unlabelled_text_holds():
    """Two topics with disjoint vocabularies (0-59, 60-119). Six labelled sentences hold few of the words, so
    bag-of-words cannot place most dev words; LSA, fitted on 600 unlabelled sentences, puts each topic's words
    together and separates the dev sentences."""
    rng = np.random.default_rng(0)
    def sentences(topics):  # noqa: E306
        return [list(rng.integers(0, 60, 4) + 60 * t) for t in topics], np.asarray(topics)
    unlabelled, _ = sentences(rng.integers(0, 2, 600))
    lab, y = sentences([0, 1] * 3)
    dev, yd = sentences(rng.integers(0, 2, 200))
    terms, vectors = probe.lsa_vectors(unlabelled, dims=4)
    assert list(terms) == list(range(120)) and vectors.shape == (120, 4)
    lsa = probe.probe(probe.lsa_features(lab, terms, vectors), y, probe.lsa_features(dev, terms, vectors), yd, 2)
    vocab = np.unique(np.concatenate(lab))
    bow = probe.probe(probe.bag_of_words(lab, vocab), y, probe.bag_of_words(dev, vocab), yd, 2)
    assert lsa["dev_acc"] > 0.95 and lsa["dev_acc"] > bow["dev_acc"] + 0.2


@pytest.mark.parametrize("preset", ["mosaic-bert-tiny", "bert-tiny"])  # unpadded and padded layouts
def test_layer_features_are_each_layers_mean_over_real_tokens(preset):
    torch.manual_seed(0)
    cfg = model.ModelConfig.preset(preset, hidden_dropout=0.0, attn_dropout=0.0)
    bert = model.Bert(cfg).eval()
    model.init_weights(bert, cfg.init_std)
    enc = glue.Encoded([np.array(r, np.int32) for r in ([5, 6, 7], [8, 9], [10, 11, 12, 13, 14])],
                       np.array([3, 2, 5]), np.zeros(3, np.int64))
    feats = probe.layer_features(bert, enc, pad_id=0, batch_size=2)  # two batches, padded differently
    assert len(feats) == cfg.n_layers + 1 and all(f.shape == (3, cfg.d_model) for f in feats)
    for i, ids in enumerate(enc.ids):  # naive: one sentence alone, no padding, the final hidden states
        h, _ = bert(torch.tensor(ids[None], dtype=torch.long), torch.ones(1, len(ids), dtype=torch.long))
        h = h.reshape(len(ids), -1)
        assert np.allclose(feats[-1][i], h.mean(0).detach().numpy(), atol=1e-5)
        if cfg.position == "alibi":  # the embeddings alone: no position table to feed
            e = bert.embeddings(torch.tensor(ids, dtype=torch.long), torch.zeros(len(ids), dtype=torch.long), None)
            assert np.allclose(feats[0][i], e.mean(0).detach().numpy(), atol=1e-5)


def test_cli_probes_a_checkpoint_and_random_init(tmp_path, capsys):
    cfg = model.ModelConfig.preset("mosaic-bert-tiny")
    ck = {"model": model.build(cfg).state_dict(), "model_config": config_dict(cfg), "step": 3,
          "tokenizer": "gpt2"}
    (tmp_path / "run").mkdir()
    model.atomic_save(ck, str(tmp_path / "run" / "ckpt_0000003.pt"))
    out = tmp_path / "probe.json"
    probe.main([f"--ckpt={tmp_path / 'run'}", "--labels=40", "--seeds=1", "--lsa_dims=8", "--folds=2",
                "--parts=true", "--max_steps=2", f"--json={out}"])
    res = json.loads(out.read_text())
    assert [g["encoder"] for g in res["geometry"]] == ["pretrained", "random init"]
    assert all(g["rows"] > 100 and len(g["singular_values"]) == 4 for g in res["geometry"])
    assert [r["pretrained"] for r in res["parts"]] == ["all", "embeddings", "layers", "none"]
    assert all(len(r["dev_acc"]) == 1 and 0 <= r["dev_acc"][0] <= 1 for r in res["parts"])
    feats = [(r["features"], r["layer"]) for r in res["rows"]]
    layers = range(cfg.n_layers + 1)
    assert feats == ([("pretrained", i) for i in layers] + [("random init", i) for i in layers]
                     + [("bag-of-words", None), ("LSA", None), ("bag-of-words + LSA", None)])
    assert res["n_train"] == 40 and all(0 <= r["dev_acc"] <= 1 and r["l2"] in probe.L2_GRID for r in res["rows"])
    assert "| bag-of-words + LSA |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        probe.main([f"--ckpt={tmp_path / 'nowhere'}", "--labels=40"])
    assert e.value.code == 1 and "no pretrained checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--labels must be a count"):
        probe.main(["--labels=0"])
    with pytest.raises(ConfigError, match="--parts fine-tunes from the parts of a checkpoint"):
        probe.main(["--ckpt=", "--parts=true"])


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 3), st.integers(0, 10 ** 6))
def test_remove_top_directions_is_centred_and_orthogonal_to_what_it_removes(d, k, seed):
    x = np.random.default_rng(seed).normal(size=(3 * d, d)) * np.arange(1, d + 1)  # distinct variances
    y = probe.remove_top_directions(x, k)
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc)
    assert np.allclose(y.mean(0), 0) and np.allclose(y @ vt[:k].T, 0)
    assert np.allclose(y @ vt[k:].T, xc @ vt[k:].T)  # the other directions untouched: y = x's projection on them


def test_embedding_geometry_finds_a_planted_frequency_direction():
    """Embeddings = noise + log(count) along one direction u: the top direction follows the log counts, and it is
    what makes " good" and " bad" (both frequent) look alike; without it their cosine is the noise's."""
    tok = glue.load_start(glue.GlueConfig(ckpt=""), "scratch").tokenizer
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.05, size=(1000, 16))
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    counts = {i: int(rng.integers(1, 1000)) for i in range(300, 1000)}
    good, bad = tok.encode(" good")[0], tok.encode(" bad")[0]
    big = np.zeros((max(good, bad) + 1, 16))
    big[:1000] = emb
    big[[good, bad]] = rng.normal(0, 0.05, size=(2, 16))
    counts.update({good: 5000, bad: 5000})
    big += np.log([counts.get(i, 1) for i in range(len(big))])[:, None] * u
    g = probe.embedding_geometry(big, counts, tok, min_count=2)
    assert g["rows"] == len([c for c in counts.values() if c >= 2])
    assert abs(g["top_vs_log_count"]) > 0.99 and g["singular_values"][0] > 10 * g["singular_values"][1]
    cos = g["pairs"]["good/bad"]
    assert cos["cosine"] > 0.95 and abs(cos["cosine_without_top"]) < 0.3
    y = big[[good, bad]] - big[sorted(i for i, c in counts.items() if c >= 2)].mean(0)
    assert cos["cosine"] == pytest.approx(float(y[0] @ y[1] / np.linalg.norm(y, axis=1).prod()))


def test_part_weights_takes_each_part_from_where_it_says():
    pre = {"embeddings.word_embeddings.weight": 1, "layers.0.Wqkv.weight": 2}
    fresh = {"embeddings.word_embeddings.weight": -1, "layers.0.Wqkv.weight": -2}
    assert probe.part_weights(pre, fresh, "all") == pre
    assert probe.part_weights(pre, fresh, "embeddings") == {"embeddings.word_embeddings.weight": 1,
                                                            "layers.0.Wqkv.weight": -2}
    assert probe.part_weights(pre, fresh, "layers") == {"embeddings.word_embeddings.weight": -1,
                                                        "layers.0.Wqkv.weight": 2}
