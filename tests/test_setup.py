"""The test setup itself (conftest.py): a broken optional dependency skips the tests that need it, with the
reason, and the rest of the suite still runs."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# transformers >= 5.25 with Hugging Face's `kernels` package installed: `import transformers` works (lazily), its
# BERT classes fail on `import kernels`, which finds this project's kernels.py. This stand-in fails the same way.
CLASHING_TRANSFORMERS = '''
def __getattr__(name):
    raise ImportError("cannot import name 'get_kernel' from 'kernels' (kernels.py)")
'''


def test_a_transformers_kernels_clash_skips_only_the_tests_needing_transformers(tmp_path):
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text(CLASHING_TRANSFORMERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    tests = ["tests/test_hf.py", "tests/test_glue.py::test_wordpiece_matches_transformers",
             "tests/test_glue.py::test_accuracy_and_f1_hand_worked"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "1 passed" in out and "skipped" in out, out[-3000:]
    assert "SKIPPED" in out and "pip uninstall kernels" in out, out[-3000:]  # the reason says what to do
