"""Shared test setup: import the project's flat modules, never wait on the network, and the `device`
parameter (the CPU always; CUDA when torch sees a GPU, else skipped with a reason naming it), and
require_transformers: the tests that need transformers skip, saying why, when it is missing or unusable here."""
import functools
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


@functools.lru_cache(maxsize=None)
def transformers_status() -> tuple:
    """(transformers, None) when it imports; (None, why) when it is not installed or cannot be used here."""
    import hf  # noqa: PLC0415
    try:
        module = hf.import_transformers()
    except ImportError as e:  # a name clash (hf.KERNELS_CLASH): its message says what to do
        return None, str(e)
    return module, None if module is not None else "transformers is not installed (requirements.txt lists it)"


def require_transformers():
    """transformers, for a test (or module) that needs it; otherwise that test skips, saying why."""
    module, why = transformers_status()
    if module is None:
        pytest.skip(why, allow_module_level=True)
    return module


def skip_if_transformers_clash():
    """Skip a test that runs with or without transformers but cannot run when it is installed and unusable."""
    module, why = transformers_status()
    if module is None and "not installed" not in why:
        pytest.skip(why)


def pytest_configure(config):
    _, why = transformers_status()
    if why and "not installed" not in why:  # the other tests still run; the ones needing transformers skip
        config.issue_config_time_warning(pytest.PytestConfigWarning(f"tests needing transformers skip: {why}"), 2)
    config.addinivalue_line("markers", "cuda: runs only on a CUDA GPU (gpu_check.py runs them: pytest -m cuda)")
