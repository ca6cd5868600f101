"""Shared test setup: import the project's flat modules, never wait on the network, and the `device`
parameter (the CPU always; CUDA when torch sees a GPU, else skipped with a reason naming it)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine (run gpu_check.py on a GPU)"
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]


@pytest.fixture(params=DEVICES)
def device(request):
    """A test taking `device` runs on the CPU and, when there is one, on CUDA."""
    return torch.device(request.param)


def pytest_configure(config):
    import hf  # noqa: PLC0415
    try:
        hf.import_transformers()  # None (not installed) skips the HF tests; a name clash stops here, saying why
    except ImportError as e:
        pytest.exit(str(e), returncode=4)
    config.addinivalue_line("markers", "cuda: runs only on a CUDA GPU (gpu_check.py runs them: pytest -m cuda)")
