"""Issue 9: what would break or crawl at the paper's scale, checked on the CPU.

Evaluation through the compiled flex function, FlexAttention's backward against naive, host syncs
per forward, the datasheet peak table, exact MLM accuracy, and compile-by-default on CUDA.
"""

import pytest
import torch

import model as M

# ---------------------------------------------------------------------------- MLM accuracy (exact top-1)


def test_mlm_accuracy_is_exact_top1_and_ties_are_wrong():
    """A label whose logit only ties another token's maximum is not a correct prediction (bf16 logits
    tie often); argmax picks the first maximal token, and -100 rows never count."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],    # label 2 ties token 1's max: wrong (argmax is 1)
                           [1.0, 3.0, 3.0, 0.0],    # label 1 is the argmax: right
                           [0.0, 0.0, 5.0, 5.0],    # label 3 ties: wrong
                           [0.0, 9.0, 0.0, 0.0],    # not masked
                           [2.0, 2.0, 2.0, 2.0]],   # all tied, label 0 = argmax: right
                          dtype=torch.bfloat16)
    labels = torch.tensor([2, 1, 3, -100, 0])
    out = M.BertForMaskedLM._loss(logits, labels)
    assert out.n_correct.item() == 2 and out.n_masked.item() == 4
