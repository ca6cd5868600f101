"""Hugging Face interop, both directions. model.py knows nothing of Hugging Face; everything that does is here.

    python hf.py --ckpt=out/demo --out=hf_demo          # export a train.py checkpoint as a transformers folder
    python fillmask.py --hf=hf_demo "The capital of France is [MASK]."
    python glue.py --init=hf --hf=path/to/bert-base-uncased           # fine-tune a HF BERT folder here
    python glue.py --init=mosaicml --hf=path/to/mosaic-bert-base      # ... or MosaicML's published MosaicBERT

Top to bottom: from_hf_bert (a HF BERT folder -> our BertForMaskedLM), from_mosaicml (MosaicML's MosaicBERT ->
ours), WordPiece (BERT's tokenizer for their vocab.txt), gpt2_tokenizer_json (data.Tokenizer as a tokenizer.json),
export (a checkpoint -> a folder transformers loads offline: plain BERT for BERT-shaped configs, else hf_modeling.py
+ copies of model.py and kernels.py), load_folder (any of those folders back, fillmask.py --hf). transformers is
needed only to load an export (and by the tests), never to import one.
"""

import functools
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import model
from config import main_guard, parse_config, print_config
from model import BertForMaskedLM, ModelConfig

ROOT = Path(__file__).resolve().parent


def _read_folder(folder) -> tuple[dict, dict]:
    """(config.json, state_dict) of a HF folder: model.safetensors or pytorch_model.bin."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a Hugging Face model folder (save_pretrained)")
    hf = json.loads((folder / "config.json").read_text())
    st_path, bin_path = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st_path.exists():
        from safetensors.torch import load_file
        sd = load_file(str(st_path))
    elif bin_path.exists():
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    return hf, sd


def _require(ok: bool, msg: str):
    if not ok:
        raise ValueError(msg)


# ----------------------------------------------------------------------------------------
# Hugging Face BERT import

# transformers 5.25+ imports Hugging Face's `kernels` package by the name this folder's kernels.py takes.
KERNELS_CLASH = ("transformers could not import Hugging Face's `kernels` package: run from this folder, the name "
                 "`kernels` is this project's kernels.py. Install transformers<5.25 as requirements.txt pins it and "
                 "`pip uninstall kernels` (nothing here uses it), or use transformers from another folder.")


def import_transformers():
    """transformers with its BERT classes loaded (for the tests and bench.py's peer rows), or None when it is not
    installed. The name clash above is an ImportError saying what to do, not a missing-module skip."""
    try:
        import transformers  # noqa: PLC0415
        from transformers import BertForMaskedLM  # noqa: F401, PLC0415  (loads the layers that import `kernels`)
    except ModuleNotFoundError as e:
        if e.name == "transformers":
            return None
        raise
    except ImportError as e:
        if "kernels" in str(e):
            raise ImportError(KERNELS_CLASH) from e
        raise
    return transformers


# HF BERT's names (without "bert.") -> ours, by prefix: outside the layers, and inside "encoder.layer.N."
HF_BERT = [("embeddings.", "bert.embeddings."), ("pooler.dense.", "pooler."), ("cls.predictions.bias", "head.bias"),
           ("cls.predictions.transform.dense.", "head.dense."),
           ("cls.predictions.transform.LayerNorm.", "head.LayerNorm.")]
HF_BERT_LAYER = {"attention.output.dense.": "attn_out.", "attention.output.LayerNorm.": "attn_norm.",
                 "intermediate.dense.": "mlp.intermediate.", "output.dense.": "mlp.output.",
                 "output.LayerNorm.": "mlp_norm."}


def _hf_to_ours(name: str) -> str | None:
    """Map one HF BERT parameter name to ours (None: not used). q/k/v are fused separately."""
    name = name.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")
    if name.startswith("embeddings.position_ids") or "decoder" in name or "seq_relationship" in name:
        return None
    return _rename(name, HF_BERT, "encoder.layer.", HF_BERT_LAYER)


def _rename(name: str, rules: list, layer_prefix: str, layer_rules: dict, out_layer="bert.layers.") -> str | None:
    """name with its first matching prefix replaced: `rules` outside the layers, `layer_rules` inside
    `layer_prefix + "N."` (which becomes `out_layer + "N."`). None when nothing matches."""
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith(layer_prefix):
        i, rest = name[len(layer_prefix):].split(".", 1)
        for old, new in layer_rules.items():
            if rest.startswith(old):
                return f"{out_layer}{i}.{new}{rest[len(old):]}"
    return None


def from_hf_bert(folder: str) -> BertForMaskedLM:
    """A Hugging Face BERT folder (BertModel or BertForMaskedLM weights) as our model in the matching 'bert-base'-
    style config. The vocabulary is padded up to a multiple of 64 (new rows initialised as usual), the MLM head
    initialised when the folder has none. Fine-tune it with the folder's own WordPiece vocabulary (glue.py does)."""
    hf, sd = _read_folder(folder)
    act = hf.get("hidden_act", "gelu")
    _require(hf.get("position_embedding_type", "absolute") == "absolute",
             f"{folder}: only absolute position embeddings are supported")
    _require(act == "gelu", f"{folder}: hidden_act={act!r}; only the exact erf 'gelu' is supported")
    cfg = ModelConfig.preset(
        "bert-base", vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), layernorm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), pooler=any("pooler.dense" in k for k in sd))
    mlm = BertForMaskedLM(cfg)
    ours = mlm.state_dict()
    new = {}
    for name, t in sd.items():
        if ".attention.self." in name:  # query/key/value fused into one Wqkv, at the query
            if ".query." in name:
                i, kind = name.removeprefix("bert.").split(".")[2], name.rsplit(".", 1)[1]  # layer, weight | bias
                qkv = [sd[name.replace(".query.", f".{x}.")] for x in ("query", "key", "value")]
                new[f"bert.layers.{i}.Wqkv.{kind}"] = torch.cat(qkv, 0)
            continue
        if (target := _hf_to_ours(name)) is None:
            continue
        _require(target in ours, f"{folder}: cannot place HF parameter {name} (mapped to {target})")
        if target in ("bert.embeddings.word_embeddings.weight", "head.bias"):  # pad the vocabulary
            t = torch.cat([t, ours[target][t.shape[0]:]], 0)
        new[target] = t
    missing = [k for k in ours if k not in new and not k.startswith("head.")]
    _require(not missing, f"{folder}: checkpoint lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    mlm.load_state_dict(new, strict=False)
    return mlm


# ----------------------------------------------------------------------------------------
# MosaicML's published MosaicBERT import


def is_mosaicml(folder) -> bool:
    """True for a folder saved by MosaicML's bert_layers (its config has alibi_starting_size or maps to bert_layers)."""
    c = json.loads(p.read_text()) if (p := Path(folder) / "config.json").is_file() else {}
    return "alibi_starting_size" in c or any("bert_layers" in str(v) for v in c.get("auto_map", {}).values())


def _mosaicml_to_ours(name: str) -> str | None:
    """Map one key of MosaicML's bert_layers.BertForMaskedLM to ours (None: not mapped). Their layer is ours:
    LN(h + dense(attention)), LN(h + wo(GELU(gate) * value)), q/k/v fused in one Wqkv (t h d order, as ours)."""
    rules = [("bert.embeddings.", "bert.embeddings."), ("bert.pooler.dense.", "pooler."),
             ("cls.predictions.transform.dense.", "head.dense."),
             ("cls.predictions.transform.LayerNorm.", "head.LayerNorm.")]
    if name in ("cls.predictions.decoder.bias", "cls.predictions.bias"):
        return "head.bias"
    return _rename(name, rules, "bert.encoder.layer.", {
        "attention.self.Wqkv.": "Wqkv.", "attention.output.dense.": "attn_out.", "attention.output.LayerNorm.":
        "attn_norm.", "mlp.gated_layers.": "mlp.gated_layers.", "mlp.wo.": "mlp.wo.", "mlp.layernorm.": "mlp_norm."})


def _mosaicml_vocab(folder: Path, rows: int) -> tuple[int, int]:
    """(vocab_size, vocab_multiple) with padded_vocab_size == rows: the real vocabulary is vocab.txt's
    length when the folder has one (30,522 for bert-base-uncased, padded to 30,528), else every row."""
    n = sum(1 for _ in open(v, encoding="utf-8")) if (v := folder / "vocab.txt").is_file() else rows
    if n <= rows and (n + 63) // 64 * 64 == rows:
        return n, 64
    return rows, 1


def from_mosaicml(folder) -> BertForMaskedLM:
    """A folder of MosaicML's `bert_layers.BertForMaskedLM.save_pretrained` (MosaicBERT-Base/-Large, 512-2048 tokens)
    -> our BertForMaskedLM (ALiBi, GeGLU, post-LN). Every key mapped or refused, every shape checked: a folder that
    does not fit raises ValueError, never loads with random weights. A tied decoder weight must equal the word
    embedding. LayerNorm runs in fp32 under autocast (low_precision_layernorm=False), as in the published code."""
    folder = Path(folder)
    hf, sd = _read_folder(folder)
    act, eps = hf.get("hidden_act", "gelu"), hf.get("layer_norm_eps", 1e-12)
    _require(act == "gelu", f"{folder}: hidden_act={act!r}; MosaicBERT's head uses the exact erf 'gelu'")
    _require(eps == 1e-12, f"{folder}: layer_norm_eps={eps}, but the published MLM head hard-codes 1e-12 and "
                           f"our model has one eps for every LayerNorm")
    _require("bert.encoder.layer.0.attention.self.Wqkv.weight" in sd,
             f"{folder}: no bert.encoder.layer.0.attention.self.Wqkv.weight: not a MosaicBERT folder (for a "
             f"Hugging Face BERT folder use hf.from_hf_bert / glue.py --init=hf)")
    rows = sd["bert.embeddings.word_embeddings.weight"].shape[0]
    vocab_size, multiple = _mosaicml_vocab(folder, rows)
    cfg = ModelConfig.preset(
        "mosaic-bert-base", vocab_size=vocab_size, vocab_multiple=multiple, n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        max_positions=hf.get("alibi_starting_size", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        layernorm_eps=eps, hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.0), init_std=hf.get("initializer_range", 0.02),
        low_precision_layernorm=False, pooler=any(k.startswith("bert.pooler.") for k in sd))
    mlm = BertForMaskedLM(cfg)
    ours = mlm.state_dict()
    new = {}
    for name, t in sd.items():
        if name == "cls.predictions.decoder.weight":  # tied to the word embedding (.bin files hold both)
            _require(torch.equal(t, sd["bert.embeddings.word_embeddings.weight"]),
                     f"{folder}: cls.predictions.decoder.weight differs from the word embedding; ours are tied")
            continue
        target = _mosaicml_to_ours(name)
        _require(target is not None and target in ours,
                 f"{folder}: key {name} has no place in our BertForMaskedLM (mapped to {target}); refusing to load "
                 f"a partial model")
        _require(target not in new, f"{folder}: {name} and another key both map to {target}")
        _require(t.shape == ours[target].shape, f"{folder}: {name} has shape {tuple(t.shape)}, ours "
                                                f"{target} has {tuple(ours[target].shape)}")
        new[target] = t
    missing = sorted(k for k in ours if k not in new and k != "head.decoder_weight")
    _require(not missing, f"{folder}: the checkpoint lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    mlm.load_state_dict(new, strict=False)
    return mlm


# ----------------------------------------------------------------------------------------
# Tokenizers (the `tokenizers` library): WordPiece for HF checkpoints; our GPT-2 BPE as a tokenizer.json


class WordPiece:
    """BERT's tokenizer for a HF folder's vocab.txt, run by the `tokenizers` library (Rust): BertNormalizer,
    BertPreTokenizer (whitespace and punctuation), then WordPiece (greedy longest match, '##' continuations,
    [UNK] for a word it cannot cover). encode() gives ids without [CLS]/[SEP]; glue.py adds them."""

    def __init__(self, vocab_file, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True,
                 max_chars_per_word=100):
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
        with open(vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {t: i for i, t in enumerate(tokens)}
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in self.vocab]
        _require(not missing, f"{vocab_file}: no {', '.join(missing)} in the vocabulary; is it a BERT vocab.txt?")
        self.lower = do_lower_case
        self.tk = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]",
                                             max_input_chars_per_word=max_chars_per_word))
        self.tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                        strip_accents=strip_accents, lowercase=do_lower_case)
        self.tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.tk.decoder = decoders.WordPiece()
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_id, self.mask_id = self.vocab["[PAD]"], self.vocab.get("[MASK]")
        self.n_tokens = len(tokens)

    @classmethod
    def from_folder(cls, folder):
        """Settings from the folder's tokenizer_config.json (do_lower_case, strip_accents, tokenize_chinese_chars);
        without one, HF's defaults (lowercase; accents stripped when lowercasing)."""
        folder = Path(folder)
        conf = json.loads(p.read_text()) if (p := folder / "tokenizer_config.json").is_file() else {}
        if not (folder / "vocab.txt").is_file():
            raise FileNotFoundError(f"{folder / 'vocab.txt'} not found: the folder must hold its WordPiece vocab.txt "
                                    f"(save_pretrained writes one; MosaicBERT uses bert-base-uncased's).")
        return cls(folder / "vocab.txt", conf.get("do_lower_case", True), conf.get("strip_accents"),
                   conf.get("tokenize_chinese_chars", True))

    def tokenize(self, text: str) -> list[str]:
        return self.tk.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE stores tokens as such strings):
    printable Latin-1 bytes map to themselves, the other 68 to chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that created `token`: run BPE on its bytes with only the ranks below its own; two parts remain."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"gpt2.tiktoken: token {token!r} is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer_json():
    """data.Tokenizer as a `tokenizers.Tokenizer`: assets/gpt2.tiktoken's ranks as a byte-level BPE vocabulary (a
    token of rank r is the merge BPE makes with the ranks below r), data.py's special tokens and ids, and
    [CLS] a [SEP] (b [SEP]) wrapping. On purpose unlike data.Tokenizer: a literal "[MASK]" in the text is the
    special token, the space before it dropped as fillmask.encode_masked does (the fill-mask pipeline needs it)."""
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = load_tiktoken_bpe(str(data.GPT2_FILE), expected_hash=data.GPT2_SHA256)
    to_str = _bytes_to_unicode()
    text = lambda b: "".join(to_str[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    merges = [tuple(map(text, _merge_of(t, ranks))) for t, r in sorted(ranks.items(), key=lambda x: x[1]) if len(t) > 1]
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    specials = {"<|endoftext|>": data.EOT_ID, "[CLS]": data.CLS_ID, "[SEP]": data.SEP_ID, "[PAD]": data.PAD_ID,
                "[MASK]": data.MASK_ID}
    for tok, i in sorted(specials.items(), key=lambda x: x[1]):  # [MASK] takes the space before it, as fillmask.py
        tk.add_special_tokens([AddedToken(tok, special=True, normalized=False, lstrip=tok == "[MASK]")])
        _require(tk.token_to_id(tok) == i, f"tokenizer.json: {tok} got id {tk.token_to_id(tok)}, data.py says {i}")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", data.CLS_ID), ("[SEP]", data.SEP_ID)])
    return tk


def wordpiece_tokenizer_json(wp: "WordPiece"):
    """A WordPiece vocabulary (hf.WordPiece) as a tokenizer.json with BERT's [CLS] a [SEP] b [SEP] post-processor."""
    from tokenizers import AddedToken, Tokenizer, processors
    tk = Tokenizer.from_str(wp.tk.to_str())
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in wp.vocab]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=t == "[MASK]") for t in specials])
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", wp.cls_id), ("[SEP]", wp.sep_id)])
    return tk


def _write_tokenizer(folder: Path, tk, max_len: int, unk: bool = False):
    """tokenizer.json and a tokenizer_config.json that AutoTokenizer reads as a fast tokenizer."""
    tk.save(str(folder / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "pad_token": "[PAD]", "mask_token": "[MASK]", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            **({"unk_token": "[UNK]"} if unk else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


# ----------------------------------------------------------------------------------------
# Export: plain transformers BERT for BERT-shaped configs, else hf_modeling.py beside copies of model.py, kernels.py


def _ours_to_hf(name: str) -> list[str]:
    """Our parameter name -> the HF BertForMaskedLM name(s): the import's rules reversed; Wqkv splits in three."""
    if name.startswith("classifier."):  # BertForSequenceClassification's names are ours
        return [name]
    if name.startswith("bert.layers.") and ".Wqkv." in name:
        i, kind = name.split(".")[2], name.rsplit(".", 1)[1]
        return [f"bert.encoder.layer.{i}.attention.self.{x}.{kind}" for x in ("query", "key", "value")]
    hf_name = _rename(name, [(o, h) for h, o in HF_BERT], "bert.layers.", {o: h for h, o in HF_BERT_LAYER.items()},
                      "encoder.layer.")
    _require(hf_name is not None, f"no Hugging Face BERT name for our parameter {name}")
    return [hf_name if hf_name.startswith("cls.") else "bert." + hf_name]


def _export_bert(module, pad_id: int):
    """BertForMaskedLM, or a SequenceClassifier as BertForSequenceClassification."""
    cfg = module.config
    clf = isinstance(module, model.SequenceClassifier)
    _require(not clf or cfg.pooling == "cls", f"this classifier pools the {cfg.pooling} of its tokens; transformers' "
             f"BertForSequenceClassification reads the [CLS] pooler. Fine-tune with pooling='cls' to export it as BERT")
    sd = {}
    for name, t in module.state_dict().items():
        if name == "head.decoder_weight":  # tied to the word embedding: transformers re-ties it on load
            continue
        hf_names = _ours_to_hf(name)
        assert all(_hf_to_ours(n) in (name, None) for n in hf_names), name  # the import maps it back
        for n, part in zip(hf_names, t.chunk(len(hf_names), 0)):
            sd[n] = part.contiguous()
    config = {
        "architectures": ["BertForSequenceClassification" if clf else "BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.layernorm_eps, "position_embedding_type": "absolute",
        "tie_word_embeddings": True, "pad_token_id": pad_id, "model_config": asdict(cfg)}
    return sd, config


def _copy_source(name: str, folder: Path):
    """Copy model.py / kernels.py into the export; `import kernels` becomes a package-relative import."""
    src = (ROOT / name).read_text()
    if name == "model.py":
        _require("\nimport kernels\n" in src, "model.py: expected one `import kernels` line to rewrite")
        src = src.replace("\nimport kernels\n", "\nfrom . import kernels  # rewritten by hf.export\n", 1)
    (folder / name).write_text(f"# Copied from {name} of MosaicBERT in pure PyTorch by hf.export.\n" + src)


def _export_mosaic(module, folder: Path, pad_id: int):
    cfg = module.config
    sd = {k: v.contiguous() for k, v in module.state_dict().items() if k != "head.decoder_weight"}
    clf = isinstance(module, model.SequenceClassifier)
    arch = "MosaicBertForSequenceClassification" if clf else "MosaicBertForMaskedLM"
    config = {
        "architectures": [arch], "model_type": "mosaicbert", "model_config": asdict(cfg),
        "auto_map": {"AutoConfig": "modeling_mosaicbert.MosaicBertConfig",
                     "AutoModel": "modeling_mosaicbert.MosaicBertModel",
                     "AutoModelForMaskedLM": "modeling_mosaicbert.MosaicBertForMaskedLM",
                     "AutoModelForSequenceClassification": "modeling_mosaicbert.MosaicBertForSequenceClassification"},
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "tie_word_embeddings": True, "pad_token_id": pad_id}
    shutil.copyfile(ROOT / "hf_modeling.py", folder / "modeling_mosaicbert.py")  # our transformers wrappers, as is
    for name in ("model.py", "kernels.py"):
        _copy_source(name, folder)
    return sd, config


def export_model(module, folder, tokenizer=True) -> Path:
    """Write our BertForMaskedLM or SequenceClassifier as a transformers folder: config.json, model.safetensors,
    tokenizer.json and, for MosaicBERT configs, the modelling code. tokenizer: True for our GPT-2 BPE, a
    hf.WordPiece for a BERT vocabulary, False for none."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = module.config
    pad_id = tokenizer.pad_id if isinstance(tokenizer, WordPiece) else data.PAD_ID
    bert_shaped = cfg.position == "learned" and cfg.ffn == "gelu"  # HF's BERT exactly (the other switches: speed)
    sd, config = _export_bert(module, pad_id) if bert_shaped else _export_mosaic(module, folder, pad_id)
    if isinstance(module, model.SequenceClassifier):
        config["num_labels"] = module.num_labels
    save_file({k: v.detach().cpu() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    max_len = cfg.max_positions if cfg.position == "learned" else 512
    if isinstance(tokenizer, WordPiece):
        _write_tokenizer(folder, wordpiece_tokenizer_json(tokenizer), max_len, unk=True)
    elif tokenizer:
        _write_tokenizer(folder, gpt2_tokenizer_json(), max_len)
    return folder


def _glue_classifier(ck: dict, path) -> tuple:
    """glue.py's mnli_encoder.pt -> (SequenceClassifier, tokenizer): the MNLI-fine-tuned classifier and the
    tokenizer of what it was fine-tuned from (our GPT-2 BPE, or the HF / MosaicML folder's WordPiece)."""
    _require("classifier" in ck, f"{path} has no classifier (written by an older glue.py): run the MNLI "
                                 f"fine-tuning again")
    clf = model.SequenceClassifier(model.config_from_dict(ck["model_config"]), ck["classifier"]["weight"].shape[0])
    clf.bert.load_state_dict(ck["weights"]["bert"])
    if "pooler" in ck["weights"] and hasattr(clf, "pooler"):
        clf.pooler.load_state_dict(ck["weights"]["pooler"])
    clf.classifier.load_state_dict(ck["classifier"])
    source = ck.get("source", {})
    source = source.get("vocab", source)  # a scratch control of a HF run records the HF folder under "vocab"
    if source.get("init") in ("hf", "mosaicml"):
        return clf, WordPiece.from_folder(source["path"])
    return clf, True


def export(ckpt, folder) -> Path:
    """A train.py checkpoint (ckpt_*.pt or its out_dir), or glue.py's mnli_encoder.pt, -> a folder transformers loads
    offline: plain BERT for the bert-* presets; else an auto_map, modeling_mosaicbert.py (hf_modeling.py) and copies
    of model.py and kernels.py (trust_remote_code=True). Both get a tokenizer.json for AutoTokenizer."""
    p = Path(ckpt)
    if p.is_file() and not p.name.startswith("ckpt_"):  # perhaps glue.py's
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(ck.get("weights"), dict) and "bert" in ck["weights"]:
            clf, tok = _glue_classifier(ck, p)
            return export_model(clf, folder, tokenizer=tok)
    mlm, ck = model.load_pretrained(str(ckpt))
    _require(ck.get("tokenizer", "gpt2") == "gpt2", f"{ckpt} was trained with tokenizer {ck.get('tokenizer')!r}; "
             f"the export writes the GPT-2 BPE tokenizer.json of train.py checkpoints only")
    return export_model(mlm, folder)


def load_folder(folder):
    """Any masked-LM folder this file knows -> (our BertForMaskedLM, tokenizer): an export of ours (config.json
    holds our model_config; the GPT-2 tokenizer), MosaicML's MosaicBERT or a HF BERT folder (their vocab.txt).
    A folder without an MLM head (BertModel, a classifier) is refused rather than given a random head."""
    hf_cfg, sd = _read_folder(folder)
    head = ("head.dense.weight", "cls.predictions.transform.dense.weight")
    _require(any(k in sd for k in head), f"{folder} has no MLM head ({', '.join(hf_cfg.get('architectures', []))}): "
                                         f"fill-mask needs a masked-language model, not an encoder or a classifier")
    if "model_config" in hf_cfg:  # ours, exported
        mlm = BertForMaskedLM(model.config_from_dict(hf_cfg["model_config"]))
        if hf_cfg.get("model_type") == "bert":
            mlm.load_state_dict(from_hf_bert(folder).state_dict())
        else:
            mlm.load_state_dict(sd, strict=False)  # head.decoder_weight is the tied word embedding
            missing = set(mlm.state_dict()) - set(sd) - {"head.decoder_weight"}
            _require(not missing, f"{folder}: model.safetensors lacks {sorted(missing)[:5]}")
        return mlm, data.get_tokenizer()
    mlm = from_mosaicml(folder) if is_mosaicml(folder) else from_hf_bert(folder)
    return mlm, WordPiece.from_folder(folder)


def load_line(folder) -> str:
    """The one line of Python that loads an export."""
    conf = json.loads((Path(folder) / "config.json").read_text())
    auto = "AutoModelForSequenceClassification" if "SequenceClassification" in conf["architectures"][0] \
        else "AutoModelForMaskedLM"
    remote = ", trust_remote_code=True" if "auto_map" in conf else ""
    return f'from transformers import {auto}; model = {auto}.from_pretrained("{folder}"{remote})'


@dataclass
class ExportConfig:
    ckpt: str = "out/demo"    # a train.py checkpoint (.pt), its out_dir (latest checkpoint), or glue's mnli_encoder.pt
    out: str = ""             # the folder to write; empty: <ckpt's out_dir>/hf


def main(argv=None):
    cfg = parse_config(ExportConfig, sys.argv[1:] if argv is None else argv)
    print_config(cfg)
    ck = Path(cfg.ckpt)
    out = Path(cfg.out) if cfg.out else (ck if ck.is_dir() else ck.parent) / "hf"
    if not ck.exists():
        print(f"error: no checkpoint at {ck}: run `python train.py` first, or pass --ckpt=PATH", file=sys.stderr)
        sys.exit(1)
    folder = export(cfg.ckpt, out)
    print(f"wrote {folder.resolve()}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    print("load it with (tokenizer: AutoTokenizer.from_pretrained on the same folder):")
    print(f"    {load_line(folder.resolve())}")


if __name__ == "__main__":
    main_guard(main)
