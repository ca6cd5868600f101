"""transformers wrappers around this project's model.py: the modelling code of an exported MosaicBERT folder.

hf.export copies this file, byte for byte, into the folder it writes as modeling_mosaicbert.py, beside copies of
model.py and kernels.py (model.py's `import kernels` rewritten to a package-relative import): the model is model.py
itself, so there is one source of truth. The imports below are relative: this file runs inside that folder, which
transformers loads as a package (from_pretrained(folder, trust_remote_code=True)), not from the repository root
(tests/test_hf.py imports it with the repository as its package). Plain torch on the CPU and CUDA; attention uses
the same sdpa / flex paths as training (attn_backend in config.json's model_config).
"""
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .kernels import alibi_slopes  # transformers copies the files that `from .name import` lines name: kernels.py
from .model import Bert, BertForMaskedLM, MLMHead, ModelConfig, SequenceClassifier, to_padded

try:
    from transformers import initialization as init  # transformers 5: leaves the weights a checkpoint loaded alone
except ImportError:  # transformers 4 initialises before loading
    from torch.nn import init


class MosaicBertConfig(PretrainedConfig):
    model_type = "mosaicbert"

    def __init__(self, model_config=None, **kwargs):
        self.model_config = dict(model_config or {})
        super().__init__(**kwargs)


class MosaicBertPreTrainedModel(PreTrainedModel):
    config_class = MosaicBertConfig
    base_model_prefix = "bert"

    def ours(self) -> ModelConfig:
        return ModelConfig(**self.config.model_config)

    def _adopt(self, module):
        """Take over the submodules of one of our models: the state_dict keys stay ours."""
        for name, child in module.named_children():
            setattr(self, name, child)

    @torch.no_grad()
    def _init_weights(self, module):
        """BERT init (model.init_weights) for what a checkpoint does not hold (a new classifier), and the
        ALiBi slopes buffer, which is not saved (transformers builds the model on the meta device)."""
        std = self.config.model_config.get("init_std", 0.02)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, torch.nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, Bert):
            slopes = alibi_slopes(module.config.n_heads)
            init.copy_(module.alibi_slopes, slopes) if hasattr(init, "copy_") else module.alibi_slopes.copy_(slopes)


class MosaicBertModel(MosaicBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.bert = Bert(self.ours())
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h, lay = self.bert(input_ids, mask, token_type_ids)
        return BaseModelOutput(last_hidden_state=to_padded(h, lay))  # [B, S, d], zeros at pads


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    _tied_weights_keys = {"head.decoder_weight": "bert.embeddings.word_embeddings.weight"}  # noqa: RUF012
    encode, logits = BertForMaskedLM.encode, BertForMaskedLM.logits  # ours, unchanged

    def __init__(self, config):
        super().__init__(config)
        self._adopt(BertForMaskedLM(self.ours()))
        self.post_init()

    def get_input_embeddings(self):
        return self.bert.embeddings.word_embeddings

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = self.logits(input_ids, mask, token_type_ids)  # [B, S, V]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        clf = SequenceClassifier(self.ours(), config.num_labels)
        self._adopt(clf)
        self.num_labels = clf.num_labels
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits, loss = SequenceClassifier.forward(self, input_ids, mask, token_type_ids, labels)  # ours, unchanged
        return SequenceClassifierOutput(loss=loss, logits=logits)
