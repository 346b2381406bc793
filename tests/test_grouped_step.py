"""The optimizers' classic step() through the grouped Triton kernels, on CPU via the Triton interpreter."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_grouped_classic_step_matches_torch_path():
    env = {**os.environ, "ADALOMO_TRITON_INTERPRET": "1", "TRITON_INTERPRET": "1"}
    script = os.path.join(os.path.dirname(__file__), "scripts", "grouped_step_check.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("grouped vs torch") == 3
