"""Running a test module's kernel cases: in this process on a device, or in a subprocess under Triton's interpreter.

A kernel test module keeps ``CASES`` {name: fn(device)} and, as a script (``python tests/test_X.py [cuda]``), prints
``json.dumps(run_cases(device, CASES))``; its pytest fixture calls :func:`interpreter_results` on its own file, so
that every case compiles once in one interpreter process instead of once per test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cases(device: str, cases: dict[str, Callable[[str], None]]) -> dict[str, str]:
    """Every case, each reported (a verdict and its seconds)."""
    results = {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        try:
            fn(device)
            results[name] = "ok"
        except Exception as e:  # report every case, keep going
            results[name] = f"{type(e).__name__}: {e}"[:500]
        results[name + ":seconds"] = f"{time.perf_counter() - t0:.2f}"
    return results


def interpreter_results(script: str, timeout: float) -> dict[str, str]:
    """``script`` run as a program under Triton's interpreter (CPU): the verdicts of its cases."""
    env = dict(os.environ, ADALOMO_TRITON_INTERPRET="1", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("ADALOMO_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, os.path.abspath(script)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])
