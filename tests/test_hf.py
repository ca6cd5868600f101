"""hf.py: HF BERT import; MosaicML's published MosaicBERT layout against a forward pass written from its equations;
WordPiece; the export (round trip, logits against transformers, AutoModel / sequence classification), the
tokenizer.json against data.Tokenizer on the embedded corpus, and the fill-mask pipeline against fillmask.top_k.
Everything offline: transformers never reaches the hub here."""
import gzip
import importlib
import json
import math
import os
import sys
import types as types_module
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import checkpoint  # noqa: E402
import data  # noqa: E402
import fillmask  # noqa: E402
import hf  # noqa: E402
import model as M  # noqa: E402
from conftest import require_transformers  # noqa: E402
from test_model import batch  # noqa: E402

transformers = require_transformers()  # test-only dependency, in requirements.txt


# ---------------------------------------------------------------------------- HF BERT import (moved from model.py)
@pytest.mark.parametrize("hf_class", ["BertModel", "BertForMaskedLM"])
def test_hf_bert_parity(tmp_path, hf_class):
    """from_hf_bert reproduces HF's last hidden states (and MLM logits) to 1e-4 in fp32."""
    torch.manual_seed(0)
    hc = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=40)
    theirs = getattr(transformers, hf_class)(hc).eval()
    theirs.save_pretrained(tmp_path)
    ours = hf.from_hf_bert(str(tmp_path)).eval()
    assert ours.config.padded_vocab_size == 128 and ours.config.position == "learned"
    ids, mask, _, types = batch(3, 17, vocab=99)
    core = theirs if hf_class == "BertModel" else theirs.bert
    with torch.no_grad():
        ref = core(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        h = ours.encode(ids, mask, types)
        real = mask.bool()
        assert (h[real] - ref[real]).abs().max() < 1e-4
        if hf_class == "BertForMaskedLM":
            ref_logits = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            assert (ours.logits(ids, mask, types)[real][:, :99] - ref_logits[real]).abs().max() < 1e-4
        if hf_class == "BertModel":  # the pretrained pooler is kept for fine-tuning
            clf = M.SequenceClassifier.from_mlm(ours, 2)
            torch.testing.assert_close(clf.pooler.weight, theirs.pooler.dense.weight)


def test_hf_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 10, "num_hidden_layers": 1, "hidden_size": 8, '
                                          '"num_attention_heads": 2, "intermediate_size": 8, '
                                          '"max_position_embeddings": 8}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.from_hf_bert(str(tmp_path))
    assert os.path.exists(tmp_path / "config.json")


# ---------------------------------------------------------------------------- MosaicML's published MosaicBERT

MOSAIC = dict(vocab=300, d=48, heads=6, layers=2, d_ff=40)  # 6 heads: ALiBi's non-power-of-2 slopes


def _mosaicml_state_dict(seed=0) -> dict:
    """Random weights in the layout of MosaicML's bert_layers.BertForMaskedLM, key for key."""
    g = torch.Generator().manual_seed(seed)
    V, d, L, f = 320, MOSAIC["d"], MOSAIC["layers"], MOSAIC["d_ff"]  # 300 real tokens padded to 320 rows
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    ln = lambda: (1 + r(d), r(d))  # noqa: E731
    sd = {"bert.embeddings.word_embeddings.weight": r(V, d), "bert.embeddings.token_type_embeddings.weight": r(2, d)}
    sd["bert.embeddings.LayerNorm.weight"], sd["bert.embeddings.LayerNorm.bias"] = ln()
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        sd[p + "attention.self.Wqkv.weight"], sd[p + "attention.self.Wqkv.bias"] = r(3 * d, d), r(3 * d)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = r(d, d), r(d)
        sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"] = ln()
        sd[p + "mlp.gated_layers.weight"] = r(2 * f, d)
        sd[p + "mlp.wo.weight"], sd[p + "mlp.wo.bias"] = r(d, f), r(d)
        sd[p + "mlp.layernorm.weight"], sd[p + "mlp.layernorm.bias"] = ln()
    sd["cls.predictions.transform.dense.weight"], sd["cls.predictions.transform.dense.bias"] = r(d, d), r(d)
    sd["cls.predictions.transform.LayerNorm.weight"], sd["cls.predictions.transform.LayerNorm.bias"] = ln()
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    sd["cls.predictions.decoder.bias"] = r(V)
    return sd


def _save_mosaicml_folder(folder, sd):
    """As save_pretrained writes it: config.json (MosaicML's BertConfig), pytorch_model.bin, vocab.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "alibi_starting_size": 512,
              "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
              "hidden_size": MOSAIC["d"], "intermediate_size": MOSAIC["d_ff"], "layer_norm_eps": 1e-12,
              "num_attention_heads": MOSAIC["heads"], "num_hidden_layers": MOSAIC["layers"], "type_vocab_size": 2,
              "vocab_size": 320, "auto_map": {"AutoConfig": "configuration_bert.BertConfig",
                                              "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(sd, folder / "pytorch_model.bin")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(MOSAIC["vocab"] - 5)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")


def _published_slopes(n):
    """bert_layers._get_alibi_head_slopes, from its equations: start = ratio = 2^(-2^-(log2(n) - 3)) for a power
    of two; otherwise the closest lower power of two's slopes, then every other slope of twice that many."""
    if math.log2(n).is_integer():
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return _published_slopes(p) + _published_slopes(2 * p)[0::2][:n - p]


def _published_forward(sd, ids, mask, types):
    """MosaicBERT's MLM logits [B, S, V] from the published equations, padded, one explicit op at a time."""
    d, H, f = MOSAIC["d"], MOSAIC["heads"], MOSAIC["d_ff"]
    D = d // H
    ln = lambda x, p: F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], 1e-12)  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + (sd[p + ".bias"] if p + ".bias" in sd else 0)  # noqa: E731
    emb = sd["bert.embeddings.word_embeddings.weight"][ids] + sd["bert.embeddings.token_type_embeddings.weight"][types]
    x = ln(emb, "bert.embeddings.LayerNorm")  # [B, S, d]
    B, S = ids.shape
    pos = torch.arange(S)
    alibi = -torch.tensor(_published_slopes(H))[:, None, None] * (pos[None, :] - pos[:, None]).abs()  # [H, S, S]
    bias = alibi[None] + (1.0 - mask[:, None, None, :].float()) * -10000.0  # [B, H, S, S]
    for i in range(MOSAIC["layers"]):
        p = f"bert.encoder.layer.{i}."
        qkv = lin(x, p + "attention.self.Wqkv").view(B, S, 3, H, D)  # (t h d)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # [B, H, S, D]
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, dim=-1)
        a = (probs @ v).transpose(1, 2).reshape(B, S, d)
        x = ln(lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        g = lin(x, p + "mlp.gated_layers")
        x = ln(lin(F.gelu(g[..., :f]) * g[..., f:], p + "mlp.wo") + x, p + "mlp.layernorm")
    t = ln(F.gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    return t @ sd["cls.predictions.decoder.weight"].T + sd["cls.predictions.decoder.bias"]


def test_from_mosaicml_matches_the_published_equations(tmp_path):
    sd = _mosaicml_state_dict()
    _save_mosaicml_folder(tmp_path, sd)
    ours = hf.from_mosaicml(tmp_path).eval()
    c = ours.config
    assert (c.position, c.ffn, c.vocab_size, c.padded_vocab_size, c.n_heads) == ("alibi", "geglu", 300, 320, 6)
    ids, mask, _, types = batch(3, 19, lengths=[19, 11, 4], vocab=300)
    with torch.no_grad():
        ref = _published_forward(sd, ids, mask, types)
        for backend in ("sdpa", "naive"):
            ours.bert.config.attn_backend = backend
            got = ours.logits(ids, mask, types)
            real = mask.bool()
            assert (got[real] - ref[real]).abs().max() < 1e-5, backend


def test_from_mosaicml_refuses_what_it_cannot_map(tmp_path):
    good = _mosaicml_state_dict()
    cases = {
        "extra": ({**good, "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(3)}, r"rotary.*no place"),
        "shape": ({**good, "bert.encoder.layer.1.mlp.wo.bias": torch.zeros(7)}, r"mlp.wo.bias has shape \(7,\)"),
        "missing": ({k: v for k, v in good.items() if "layer.1.mlp.layernorm.weight" not in k}, r"lacks.*mlp_norm"),
        "untied": ({**good, "cls.predictions.decoder.weight": good["cls.predictions.decoder.weight"] + 1}, "tied"),
        "classifier": ({**good, "classifier.weight": torch.zeros(2, 48)}, r"classifier.weight has no place"),
    }
    for name, (sd, msg) in cases.items():
        _save_mosaicml_folder(tmp_path / name, sd)
        with pytest.raises(ValueError, match=msg):
            hf.from_mosaicml(tmp_path / name)


def test_glue_fine_tunes_a_mosaicml_folder(tmp_path):
    import glue
    from test_glue import FIX
    _save_mosaicml_folder(tmp_path / "mosaic", _mosaicml_state_dict())
    cfg = glue.GlueConfig(tasks="rte", glue_dir=str(FIX), hf=str(tmp_path / "mosaic"), out_dir=str(tmp_path / "o"),
                          seeds=1, max_steps=2, log_interval=1000)
    start = glue.load_start(cfg, "mosaicml")
    assert isinstance(start.tokenizer, hf.WordPiece) and start.model_config.position == "alibi"
    torch.testing.assert_close(start.weights["bert"]["layers.0.Wqkv.weight"],
                               _mosaicml_state_dict()["bert.encoder.layer.0.attention.self.Wqkv.weight"])
    res = glue.run(cfg)  # --init=auto recognises MosaicML's folder
    assert res["source"]["init"] == "mosaicml" and 0.0 <= res["tasks"]["rte"]["mean"]["accuracy"] <= 1.0


# ---------------------------------------------------------------------------- export

EXPORT_CONFIGS = {
    "mosaic": M.ModelConfig.preset("mosaic-bert-tiny", hidden_dropout=0.0),
    "bert": M.ModelConfig.preset("bert-tiny", hidden_dropout=0.0, attn_dropout=0.0, max_positions=64),
}


def _trained_like(cfg, seed=0):
    """A random model whose weights are not at their init values (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    m = M.build(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module", params=list(EXPORT_CONFIGS))
def exported(request, tmp_path_factory):
    ours = _trained_like(EXPORT_CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    checkpoint.atomic_save({"model": ours.state_dict(), "model_config": asdict(ours.config), "step": 1},
                           folder / "ckpt_0000001.pt")
    hf.export(folder, folder / "hf")
    return request.param, ours, folder / "hf"


def test_export_round_trip_gives_identical_weights(exported, tmp_path):
    """ours -> export -> transformers (from_pretrained, then its own save_pretrained) -> ours: identical weights."""
    kind, ours, folder = exported
    conf = json.loads((folder / "config.json").read_text())
    assert conf["model_type"] == ("bert" if kind == "bert" else "mosaicbert")
    assert ("auto_map" in conf) == (kind == "mosaic")
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=kind == "mosaic")
    theirs.save_pretrained(tmp_path)
    back, tok = hf.load_folder(tmp_path)
    assert back.config == ours.config and isinstance(tok, data.Tokenizer)
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.head.decoder_weight is back.bert.embeddings.word_embeddings.weight


def test_export_logits_match_transformers(exported):
    """AutoModelForMaskedLM on the folder vs ours: fp32, padded batch of varying lengths, <= 1e-4 at real tokens.
    The BERT config loads as transformers' own BertForMaskedLM, without remote code."""
    kind, ours, folder = exported
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=kind == "mosaic").eval()
    assert type(theirs).__name__ == ("BertForMaskedLM" if kind == "bert" else "MosaicBertForMaskedLM")
    if kind == "bert":
        assert type(theirs).__module__.startswith("transformers.models.bert")
    ids, mask, _, types = batch(4, 23, lengths=[23, 17, 9, 2], vocab=data.N_TOKENS)
    with torch.no_grad():
        ref = ours.logits(ids, mask, types)
        got = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        real = mask.bool()
        assert (got[real] - ref[real]).abs().max() < 1e-4
        if kind == "mosaic":  # AutoModel: the encoder's hidden states
            enc = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            h = enc(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            assert (h[real] - ours.encode(ids, mask, types)[real]).abs().max() < 1e-4



def _import_hf_modeling(monkeypatch):
    """hf_modeling.py imported from the repository, with the repository as its package (its imports are relative,
    as inside an export): a stand-in package whose path is the repository root; removed again afterwards."""
    pkg = types_module.ModuleType("_repo")
    pkg.__path__ = [str(hf.ROOT)]
    monkeypatch.setitem(sys.modules, "_repo", pkg)
    for name in ("_repo.hf_modeling", "_repo.model", "_repo.kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    mod = importlib.import_module("_repo.hf_modeling")
    for name in ("_repo.hf_modeling", "_repo.model", "_repo.kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return mod


def test_hf_modeling_is_real_code_and_the_export_copies_it_byte_for_byte(exported, monkeypatch):
    """hf_modeling.py (a file of the repository, not a string) imports; the classes config.json's auto_map names are
    in it; built from our config and given our weights, its MaskedLM gives our logits; and the export holds it,
    byte for byte, as modeling_mosaicbert.py (BERT-shaped exports hold no modelling code at all)."""
    kind, ours, folder = exported
    if kind == "bert":
        assert not (folder / "modeling_mosaicbert.py").exists() and not (folder / "model.py").exists()
        return
    assert (folder / "modeling_mosaicbert.py").read_bytes() == (hf.ROOT / "hf_modeling.py").read_bytes()
    mod = _import_hf_modeling(monkeypatch)
    assert Path(mod.__file__).resolve() == hf.ROOT / "hf_modeling.py"
    for ref in json.loads((folder / "config.json").read_text())["auto_map"].values():
        file, cls = ref.split(".")
        assert file == "modeling_mosaicbert" and isinstance(getattr(mod, cls), type), ref
    wrapped = mod.MosaicBertForMaskedLM(mod.MosaicBertConfig(model_config=asdict(ours.config))).eval()
    wrapped.load_state_dict(ours.state_dict())
    ids, mask, _, types = batch(3, 11, lengths=[11, 6, 1], vocab=data.N_TOKENS)
    with torch.no_grad():
        real = mask.bool()
        got = wrapped(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert (got[real] - ours.logits(ids, mask, types)[real]).abs().max() < 1e-5

def test_export_sequence_classifier(tmp_path):
    """A fine-tuned classifier loads with AutoModelForSequenceClassification and gives our logits; a pretrained
    export loads into it too, with its encoder and a new classifier."""
    mlm = _trained_like(EXPORT_CONFIGS["mosaic"])
    clf = M.SequenceClassifier.from_mlm(mlm, 3).eval()
    with torch.no_grad():
        clf.classifier.weight.normal_()
    hf.export_model(clf, tmp_path / "clf")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", trust_remote_code=True)
    ids, mask, _, types = batch(3, 15, lengths=[15, 6, 2], vocab=data.N_TOKENS)
    with torch.no_grad():
        got = theirs.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert (got - clf(ids, mask, types)[0]).abs().max() < 1e-4
    hf.export_model(mlm, tmp_path / "mlm", tokenizer=False)
    new = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm", trust_remote_code=True,
                                                                          num_labels=2)
    torch.testing.assert_close(new.bert.layers[1].Wqkv.weight, mlm.bert.layers[1].Wqkv.weight, rtol=0, atol=0)
    assert new.classifier.weight.shape == (2, 128) and new.classifier.weight.std() > 0


def test_tokenizer_json_gives_data_tokenizer_ids_on_the_embedded_corpus(tmp_path):
    """AutoTokenizer on an export == [CLS] + data.Tokenizer.encode + [SEP], on all 106 articles and the whole
    sentiment sample (batch encoding: a few seconds); pairs get [SEP] between and token types 0 then 1."""
    hf._write_tokenizer(tmp_path, hf.gpt2_tokenizer_json(), 512)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = data.get_tokenizer()
    with gzip.open(data.ASSETS / "enwiki_sample.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    for name in ("rotten_tomatoes_train.tsv.gz", "rotten_tomatoes_dev.tsv.gz"):
        with gzip.open(data.ASSETS / name, "rt") as f:
            texts += [line.rstrip("\n").split("\t")[0] for line in f]
    assert len(texts) > 12_000 and not any(s in t for t in texts for s in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"))
    texts = [t for t in texts if "<|endoftext|>" not in t]
    want = [[data.CLS_ID, *ids, data.SEP_ID] for ids in ours.encode_batch(texts)]
    assert theirs(texts, add_special_tokens=True)["input_ids"] == want
    pair = theirs("One sentence.", "And another.")
    assert pair["input_ids"] == [data.CLS_ID, *ours.encode("One sentence."), data.SEP_ID,
                                 *ours.encode("And another."), data.SEP_ID]
    assert pair["token_type_ids"] == [0] * 5 + [1] * 4
    text = "The capital of France is [MASK]. And [MASK]!"
    assert theirs(text)["input_ids"] == fillmask.encode_masked(ours, text)
    assert theirs.decode(want[0][1:-1]) == texts[0]


def test_fill_mask_pipeline_top5_equals_ours(exported):
    kind, ours, folder = exported
    pipe = transformers.pipeline("fill-mask", model=str(folder), trust_remote_code=kind == "mosaic", top_k=5)
    tok = data.get_tokenizer()
    for text in ("The capital of France is [MASK].", "He played the [MASK] in a band and sang."):
        mine = fillmask.top_k(ours, tok, text, k=5)[0]
        theirs = pipe(text)
        assert [r["token"] for r in theirs] == [_id(tok, t) for t, _ in mine]
        # their softmax also spans the 43 rows that only pad the vocabulary to a multiple of 64
        for r, (_, p) in zip(theirs, mine):
            assert r["score"] == pytest.approx(p, rel=5e-3)


def _id(tok, piece: str) -> int:
    (i,) = tok.encode(piece)
    return i


def test_export_cli_prints_the_folder_and_the_loading_line(exported, capsys):
    kind, ours, folder = exported
    ckpt_dir = folder.parent
    hf.main([f"--ckpt={ckpt_dir}", f"--out={ckpt_dir / 'cli'}"])
    out = capsys.readouterr().out
    assert str((ckpt_dir / "cli").resolve()) in out and "AutoModelForMaskedLM.from_pretrained(" in out
    line = out.strip().splitlines()[-1].strip()  # the printed line runs
    scope = {}
    exec(line, scope)
    assert type(scope["model"]).__name__ == ("BertForMaskedLM" if kind == "bert" else "MosaicBertForMaskedLM")
    assert ("trust_remote_code=True" in out) == (kind == "mosaic")


def test_fillmask_cli_on_folders(exported, tmp_path, capsys):
    """fillmask.py --hf=FOLDER: an export of ours (GPT-2 tokenizer) prints our top_k; a MosaicML folder runs with
    its WordPiece vocabulary."""
    kind, ours, folder = exported
    text = "The capital of France is [MASK]."
    fillmask.main([f"--hf={folder}", "--k=3", text])
    want = fillmask.format_predictions(text, fillmask.top_k(ours, data.get_tokenizer(), text, k=3))
    assert want in capsys.readouterr().out
    _save_mosaicml_folder(tmp_path / "mosaic", _mosaicml_state_dict())
    fillmask.main([f"--hf={tmp_path / 'mosaic'}", "--k=2", "w1 w2 [MASK] w3"])
    assert "[MASK] #1: w" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["mosaic", "bert"])
def test_export_glue_mnli_classifier(tmp_path, kind):
    """glue.py's mnli_encoder.pt (now with its classifier) exports as a 3-label classifier: transformers' own
    BertForSequenceClassification for BERT configs, ours (remote code) for MosaicBERT; same logits as ours."""
    import glue
    from test_glue import FIX
    preset = "mosaic-bert-tiny" if kind == "mosaic" else "bert-tiny"
    cfg = glue.GlueConfig(tasks="mnli", glue_dir=str(FIX), init="scratch", ckpt="", model=preset,
                          out_dir=str(tmp_path / "o"), seeds=1, max_steps=1, log_interval=1000, eval_batch_size=4)
    glue.run(cfg)
    path = glue.mnli_encoder_path(tmp_path / "o")
    hf.main([f"--ckpt={path}", f"--out={tmp_path / 'hf'}"])
    ck = torch.load(path, weights_only=True)
    ours, tok = hf._glue_classifier(ck, path)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf",
                                                                             trust_remote_code=kind == "mosaic")
    assert theirs.config.num_labels == 3
    if kind == "bert":
        assert type(theirs).__module__.startswith("transformers.models.bert")
    enc = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(["A premise.", "Short"], ["A hypothesis here.",
                                                                      "one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = theirs.eval()(**enc).logits
        ref = ours.eval()(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0]
    assert (got - ref).abs().max() < 1e-4 and enc["attention_mask"][1].sum() < enc["attention_mask"][0].sum()
    with pytest.raises(ValueError, match="no MLM head"):  # fill-mask refuses it rather than invent a head
        hf.load_folder(tmp_path / "hf")


def test_wordpiece_tokenizer_json_matches_wordpiece(tmp_path):
    """The tokenizer.json written for models fine-tuned from a HF / MosaicML folder: AutoTokenizer gives
    [CLS] + hf.WordPiece ids + [SEP], and pairs as glue.encode_examples builds them."""
    import glue
    from test_glue import SENTENCES, _make_vocab
    _make_vocab(tmp_path / "v", SENTENCES, lower=True)
    wp = hf.WordPiece.from_folder(tmp_path / "v")
    hf._write_tokenizer(tmp_path, hf.wordpiece_tokenizer_json(wp), 128, unk=True)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(SENTENCES)["input_ids"] == [[wp.cls_id, *ids, wp.sep_id] for ids in wp.encode_batch(SENTENCES)]
    import numpy as np
    ex = glue.Examples(SENTENCES[:-1], SENTENCES[1:], np.zeros(len(SENTENCES) - 1, np.int64), "t")
    enc = glue.encode_examples(ex, wp, max_len=512)
    assert theirs(ex.a, ex.b)["input_ids"] == [x.tolist() for x in enc.ids]
