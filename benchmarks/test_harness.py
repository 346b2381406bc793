"""benchmarks/bench_gpu.py's bookkeeping: the order of rows per round, the ratios to the floors of the same round,
the summary over rounds, and a dry run of the whole harness on the CPU (tiny model, two rounds)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu as B  # noqa: E402


def test_round_order_rotates_the_rows_between_the_floors():
    names = ["floor", "a", "b", "c", "floor"]
    orders = [B._round_order(names, k) for k in range(4)]
    assert orders[0] == names
    assert orders[1] == ["floor", "b", "c", "a", "floor"]
    assert orders[3] == orders[0]
    for o in orders:
        assert o[0] == o[-1] == "floor" and sorted(o[1:-1]) == ["a", "b", "c"]
    assert {o[1] for o in orders[:3]} == {"a", "b", "c"}  # each row goes first once
    assert B._round_order(["floor"], 2) == ["floor"]


def test_ratios_use_the_mean_of_the_rounds_floors():
    rows = [{"name": "floor", "step_ms": 100.0, "peak_GB": 10.0}, {"name": "x", "step_ms": 115.0, "peak_GB": 12.0},
            {"name": "floor", "step_ms": 110.0, "peak_GB": 10.0}, {"name": "bad", "error": "out of memory"}]
    B._ratios(rows)
    assert rows[1]["time_vs_floor"] == round(115 / 105, 3) and rows[1]["mem_vs_floor"] == 1.2
    assert "time_vs_floor" not in rows[3]


def test_summary_takes_medians_and_spread_over_rounds():
    def rnd(floor_ms, x_ms):
        rows = [{"name": "floor", "step_ms": floor_ms, "peak_GB": 1.0, "tokens_per_s": 10},
                {"name": "x", "step_ms": x_ms, "peak_GB": 1.1, "tokens_per_s": 9}]
        B._ratios(rows)
        return rows
    rounds = [rnd(100, 110), rnd(120, 126), rnd(100, 130)]  # ratios 1.10, 1.05, 1.30
    x = {r["name"]: r for r in B._summarise(rounds, ["floor", "x", "floor"])}["x"]
    assert x["time_vs_floor"] == 1.1 and x["time_vs_floor_min"] == 1.05 and x["time_vs_floor_max"] == 1.3
    assert x["step_ms"] == 126 and x["rounds"] == 3


def test_fastest_step_ratio_against_the_floors_fastest():
    rows = [{"name": "floor", "step_ms": 104.0, "step_ms_min": 100.0, "peak_GB": 1.0},
            {"name": "x", "step_ms": 130.0, "step_ms_min": 111.0, "peak_GB": 1.0},
            {"name": "floor", "step_ms": 120.0, "step_ms_min": 102.0, "peak_GB": 1.0}]
    B._ratios(rows)
    assert rows[1]["fastest_vs_floor"] == round(111 / 101, 3) and rows[1]["time_vs_floor"] == round(130 / 112, 3)


def test_summarise_reprints_a_stored_file(tmp_path, capsys):
    rounds = [[{"name": "floor", "step_ms": 100.0, "step_ms_min": 99.0, "peak_GB": 1.0, "tokens_per_s": 10},
               {"name": "x", "step_ms": 110.0, "step_ms_min": 104.0, "peak_GB": 1.2, "tokens_per_s": 9}],
              [{"name": "floor", "step_ms": 120.0, "step_ms_min": 99.0, "peak_GB": 1.0, "tokens_per_s": 8},
               {"name": "x", "step_ms": 126.0, "step_ms_min": 109.0, "peak_GB": 1.2, "tokens_per_s": 8}]]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"device": "test", "rounds": rounds, "rows": []}))
    x = {r["name"]: r for r in B.resummarise(str(path))}["x"]
    assert x["time_vs_floor"] == round((1.1 + 1.05) / 2, 3)
    assert x["fastest_vs_floor"] == round((104 / 99 + 109 / 99) / 2, 3)
    assert "x " in capsys.readouterr().out


def _dry_run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """bench_gpu.py on the tiny config on the CPU: (the finished process, its results file)."""
    out = tmp_path / "b.json"
    env = dict(os.environ, BENCH_DEVICE="cpu", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--config", "tiny", *args,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_dry_run_on_cpu_with_rounds(tmp_path):
    proc, res = _dry_run(tmp_path, "--only", "floor,lomo_fused_timed,floor", "--rounds", "2")
    assert len(res["rounds"]) == 2 and [r["name"] for r in res["rows"]] == ["floor", "lomo_fused_timed"]
    lomo = res["rows"][1]
    assert lomo["rounds"] == 2 and lomo["time_vs_floor_min"] <= lomo["time_vs_floor"] <= lomo["time_vs_floor_max"]
    assert "median over 2 rounds" in proc.stdout
    raw = res["rounds"][0][1]
    assert len(raw["counters"]["gc"]) == 3 and raw["counters"]["threads"] >= 1
    assert raw["counters"]["host_hook_ms_per_step"] > 0  # _timed: the host time inside the hooks, per step
    assert "host_hook_ms_per_step" not in res["rounds"][0][0]["counters"]  # the floor has no hooks of ours


def test_row_suffixes_pick_kernel_settings():
    assert B.kernel_settings(["fused"]) == {}
    assert B.kernel_settings(["fused", "r3"]) == {"pipeline_depth": 3}
    assert B.kernel_settings(["fused", "b256", "three"]) == {"one_read": False}
    assert B.kernel_settings(["fused", "r2", "three"]) == {"pipeline_depth": 2, "one_read": False}
    from adalomo.kernels.config import CONFIG  # every setting a suffix names exists
    assert set(B.kernel_settings(["r2", "three"])) <= set(CONFIG)


def test_rows_finished_before_a_kill_are_kept(tmp_path, monkeypatch):
    """A device call's time limit kills the run mid-way: the rows it finished must be on disk, readable."""
    out = tmp_path / "b.json"
    done = []

    def fake_child(row, cfg, timeout):
        if len(done) == 3:
            raise KeyboardInterrupt  # stands for the SIGKILL of `timeout`
        done.append(row)
        return {"name": row, "step_ms": 100.0 + len(done), "step_ms_min": 99.0, "peak_GB": 1.0, "tokens_per_s": 9}

    monkeypatch.setattr(B, "_run_child", fake_child)
    monkeypatch.setattr(B, "_versions", lambda: {})
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--config", "tiny", "--only", "floor,a,b,floor",
                                      "--rounds", "2", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        B.main()
    res = json.loads(out.read_text())
    assert res["complete"] is False and [r["name"] for r in res["rounds"][0]] == ["floor", "a", "b"]
    rows = {r["name"]: r for r in B.resummarise(str(out))}
    assert rows["a"]["time_vs_floor"] == round(102 / 101, 3)
    assert not list(tmp_path.glob("*.tmp"))


def test_paired_dry_run_on_cpu(tmp_path):
    """--paired: each row against the floor in one process, alternating blocks; the child checks that the floor
    blocks leave the weights alone and that ours count every step (no hooks of the other mode left behind)."""
    proc, res = _dry_run(tmp_path, "--only", "floor,adalomo_fused,lomo_classic", "--paired", "3")
    assert res["complete"] and [r["name"] for r in res["rows"]] == ["adalomo_fused", "lomo_classic"]
    for r in res["rows"]:
        assert "error" not in r, r
        assert len(r["block_ratios"]) == 3 and len(r["steps_ms"]) == len(r["floor_steps_ms"]) == 3 * 2
        # the ratio of the medians of the steps listed (these rounded to 0.1 ms)
        assert abs(r["time_vs_floor"] - statistics.median(r["steps_ms"]) / statistics.median(r["floor_steps_ms"])) \
            < 0.03
    assert "per block" in proc.stdout
    assert [c["block"] for c in res["rows"][0]["counters"]] == ["floor", "adalomo_fused", "adalomo_fused", "floor",
                                                                 "floor", "adalomo_fused"]  # ABBA order


def test_paired_together_dry_run_on_cpu(tmp_path):
    """--paired --together: the floor and every row in one process, rounds in rotated orders closed by a floor;
    each round's ratio against the mean of the floors around it."""
    import importlib.util
    peer = importlib.util.find_spec("lomo_optim") is None  # a missing peer is skipped, the other rows still run
    proc, res = _dry_run(tmp_path, "--only", "floor,adalomo_fused,adalomo_fused_b0,lomo_classic"
                         + (",lomo_optim_adalomo" if peer else ""), "--paired", "2", "--together")
    rows = res["rows"]
    if peer:
        assert rows[-1] == {"name": "lomo_optim_adalomo", "skipped": "lomo_optim is not installed"}
        rows = rows[:-1]
    assert res["complete"] and [r["name"] for r in rows] == ["adalomo_fused", "adalomo_fused_b0", "lomo_classic"]
    for r in rows:
        assert "error" not in r, r
        assert len(r["block_ratios"]) == 2 and len(r["steps_ms"]) == 2 * 2 and len(r["floor_steps_ms"]) == 3 * 2
        assert r["time_vs_floor"] == round(statistics.median(r["block_ratios"]), 3) or \
            abs(r["time_vs_floor"] - statistics.median(r["block_ratios"])) < 2e-3
    # one process: the floor blocks are shared; round 2 starts with the second row
    blocks = [c["block"] for c in rows[0]["counters"]]
    assert blocks == ["floor", "adalomo_fused", "floor", "adalomo_fused", "floor"], blocks
    assert "one process" in proc.stdout


def test_hooks_of_a_peer_are_removed_by_its_undo():
    """A peer that registers tensor hooks and keeps no handle (lomo-optim) is undone through the handles captured
    while it was built; the paired runs check that no block leaves a hook behind."""
    import torch
    p = torch.nn.Parameter(torch.ones(3))
    with B._hooks_registered() as handles:
        p.register_hook(lambda g: g * 2)
    assert len(handles) == 1 and B._left_hooks([p]) == 1
    (p * 1).sum().backward()
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    for h in handles:
        h.remove()
    assert B._left_hooks([p]) == 0
    h = p.register_post_accumulate_grad_hook(lambda q: None)
    assert B._left_hooks([p]) == 1
    h.remove()
    assert B._left_hooks([p]) == 0


def test_row_settings_end_with_its_block():
    """A row's kernel settings (suffixes ``_r2``, ``_three``) hold for its own block only: in one process
    (``--together``) the rows after it run with the defaults."""
    pytest.importorskip("triton")
    import torch

    from adalomo.kernels.config import CONFIG
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    before = dict(CONFIG)
    opt, fused, _, undo = B._optimizer("adalomo_fused_r2_three", model, params, cuda=False)
    assert fused and CONFIG["pipeline_depth"] == 2 and CONFIG["one_read"] is False
    undo()
    assert CONFIG == before
    assert not B._left_hooks(params)


def test_adapm_rows():
    """``adapm_*`` rows: the second moment from the name, suffixes as for the other rows, names for the policy."""
    import torch
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(8, 8), "o_proj": torch.nn.Linear(8, 8)})
    params = list(model.parameters())
    for row, second, fused in (("adapm_fused", "factored", True), ("adapm_adam_classic", "adam", False),
                               ("adapm_adam_fused_b0", "adam", True)):
        opt, is_fused, note, undo = B._optimizer(row, model, params, cuda=False)
        assert is_fused == fused and opt.param_groups[0]["second_moment"] == second
        assert opt.momentum_kind(model["q_proj"].weight) == "low_rank" and "low_rank=" in note
        assert row != "adapm_adam_fused_b0" or opt.bucket_cap_mb == 0
        undo()
        assert not B._left_hooks(params)


def test_adapm_bytes_per_param():
    """bench_adapm_kernels.py's byte count per element (bf16 p and g, fp32 state) is the one docs/adapm.md quotes."""
    import bench_adapm_kernels as K
    got = {(s, k): K.bytes_per_element(k, s) for s in K.SECONDS for k in K.KINDS}
    assert got == {("adam", "none"): 16, ("adam", "full"): 24, ("adam", "low_rank"): 26,
                   ("factored", "none"): 10, ("factored", "full"): 20, ("factored", "low_rank"): 24}


def test_adapm_host_benchmark_runs_the_kernel_path_on_cpu(tmp_path):
    """``bench_adapm_host.py --device cpu`` times AdaPM's kernel path (every tensor of its layers through
    ``kernels.adapm_update_many_``, launches stubbed), counts its launches, GEMMs and copies and writes its table."""
    pytest.importorskip("triton")
    out = tmp_path / "host.json"
    env = dict(os.environ, ADALOMO_TRITON_INTERPRET="1", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("ADALOMO_DISABLE_TRITON", None)
    script = str(ROOT / "benchmarks" / "bench_adapm_host.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--small", "--layers", "1", "--steps", "2",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["second_moment"] for r in rows] == ["factored", "adam"]
    assert all(r["kernel_updates"] == r["tensors"] == 9 and r["host_ms_per_step"] > 0 for r in rows), rows
    assert all(r["launches"] > 0 and r["gemms"] > 0 and r["copies"] > 0 for r in rows), rows
