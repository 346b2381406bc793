"""Run the examples in examples/ as a user would, with small arguments (CPU, one thread each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 240) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{out[-4000:]}"
    return out


def test_quickstart():
    out = run_example("quickstart.py", "--steps", "40", "--device", "cpu")
    m = re.search(r"mode: fused; .* loss ([\d.]+) -> ([\d.]+)", out)
    assert m and float(m.group(2)) < float(m.group(1)) - 0.2, out
    assert re.search(r"gradients held after backward\s+0\.000 MiB", out), out
    out = run_example("quickstart.py", "--steps", "10", "--device", "cpu", "--classic", "--clip", "1.0")
    assert "mode: classic" in out


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    out_dir = str(tmp_path / "hf")
    small = ["--output-dir", out_dir, "--batch-size", "4", "--hidden", "32", "--save-steps", "3"]
    out = run_example("hf_trainer.py", *small, "--max-steps", "6", "--clip", "1.0")
    assert "done: 6 steps" in out and "grad_norm" in out
    assert (tmp_path / "hf" / "checkpoint-6" / "optimizer.pt").is_file()
    out = run_example("hf_trainer.py", *small, "--max-steps", "8", "--clip", "1.0", "--resume",
                      "--gradient-checkpointing")
    assert "done: 8 steps" in out
    # classic mode with gradient accumulation
    out = run_example("hf_trainer.py", "--output-dir", str(tmp_path / "classic"), "--batch-size", "2",
                      "--hidden", "32", "--max-steps", "2", "--classic", "--grad-accum", "2", "--optimizer", "lomo")
    assert "done: 2 steps" in out


def test_accelerate_train_resumes_exactly(tmp_path):
    pytest.importorskip("accelerate")
    common = ["--steps", "10", "--save-every", "4", "--batch-size", "4", "--clip", "1.0"]
    run_example("accelerate_train.py", "--output-dir", str(tmp_path / "full"), *common)
    run_example("accelerate_train.py", "--output-dir", str(tmp_path / "cut"), *common, "--stop-at", "6")
    out = run_example("accelerate_train.py", "--output-dir", str(tmp_path / "cut"), *common, "--resume")
    assert "resumed at step 4" in out and "done: 10 steps" in out
    full = torch.load(tmp_path / "full" / "final_weights.pt")
    cut = torch.load(tmp_path / "cut" / "final_weights.pt")
    assert max((full[k] - cut[k]).abs().max().item() for k in full) == 0.0
