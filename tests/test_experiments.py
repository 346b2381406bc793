"""Experiments: data, models, optimizer registry, training loop, reports (tiny models, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adalomo.experiments import ExperimentConfig, ExperimentError, run_experiment
from adalomo.experiments import data as D
from adalomo.experiments.models import GPT, LSTMLM, GPTConfig, Seq2Seq, gpt_param_count
from adalomo.experiments.train import (
    OPTIMIZERS,
    MemoryMeter,
    lr_lambda,
    parse_lr_overrides,
    parse_runs,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "wikitext-2" / "train.txt").is_file(),
                                  reason="../shared/data not present")

RUN_FIELDS = {"optimizer", "lr", "fused", "steps", "tokens", "final_train_loss", "eval_loss", "eval_ppl",
              "wall_time_s", "time_per_step_s", "tokens_per_s", "memory", "loss_curve", "diverged"}
MEM_FIELDS = {"parameters", "gradients", "optimizer_state", "activations_saved", "activations_and_other",
              "peak_total"}
TINY = {"lstm-lm": dict(size="tiny", batch_size=8, seq_len=16), "gpt-lm": dict(size="tiny", batch_size=4, seq_len=32),
        "seq2seq": dict(size="tiny", batch_size=16)}
LIMIT = 300  # lines / pairs of training data (30 for valid and test): keeps the evaluation short


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("ADALOMO_DATA_DIR", raising=False)


# ----------------------------------------------------------------------------- models


def test_gpt_presets_param_counts():
    assert gpt_param_count("tiny") < 1_000_000
    assert 110e6 < gpt_param_count("125m") < 140e6
    assert 0.90e9 < gpt_param_count("1b") < 0.98e9  # dim 2048, 16 layers, ffn 5504, vocab 32000


def test_gpt_meta_build_then_init():
    cfg = GPTConfig.preset("tiny", vocab_size=128, max_seq=32)
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters()) and not list(model.buffers())
    model.to_empty(device="cpu")
    model.init_weights()
    std = model.layers[0].attn.wq.weight.std().item()
    assert 0.015 < std < 0.025 and torch.all(model.norm.weight == 1)
    x = torch.randint(0, 128, (2, 16))
    logits, loss = model(x, x)
    assert logits.shape == (2, 16, 128) and math.isfinite(loss.item())


def test_gpt_grad_checkpointing_matches():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, max_seq=16))
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.cfg.gradient_checkpointing = True
    model(x, x)[1].backward()
    for a, p in zip(g, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_lstm_and_seq2seq_shapes():
    lm = LSTMLM(50, 16, 16, 2, 0.0, tie_weights=True)
    assert lm.decoder.weight is lm.encoder.weight
    out, hidden = lm(torch.randint(0, 50, (3, 7)))
    assert out.shape == (3, 7, 50) and hidden[0].shape == (2, 3, 16)
    s2s = Seq2Seq(30, 40, 16)
    src = torch.randint(4, 30, (3, 6))
    src[0, 4:] = 0
    lens = torch.tensor([4, 6, 6])
    assert s2s(src, lens, torch.randint(0, 40, (3, 5))).shape == (3, 5, 40)
    assert s2s.greedy(src, lens, 1, 2, max_len=7).shape[0] == 3


# ----------------------------------------------------------------------------- data


def test_embedded_corpora():
    lm = D.load_embedded_lm()
    assert lm.train.numel() > 50_000 and "<unk>" in lm.vocab.stoi and "<eos>" in lm.vocab.stoi
    assert "EMBEDDED" in lm.description and "wikitext-2" in lm.notes[0].lower()
    pairs = D.load_embedded_pairs(seed=0)
    assert len(pairs.train) > 1000
    src, tgt = pairs.train[0]
    assert tgt.split() == src.split()[::-1]
    assert D.load_embedded_pairs(seed=0).test == pairs.test


def test_normalize_sentence_non_breaking_spaces():
    assert D.normalize_sentence("Qu'est-ce que c'est\u202f?") == "qu est ce que c est ?"
    assert D.normalize_sentence("Allez\u00a0!  Vite.") == "allez ! vite ."
    assert D.normalize_sentence("Été\u202f!", accents=True) == "été !"
    assert D.normalize_sentence("Été\u202f!") == "ete !"


def test_resolve_data_dir(tmp_path, monkeypatch):
    assert D.resolve_data_dir(None) is None
    with pytest.raises(ExperimentError, match="does not exist"):
        D.resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("ADALOMO_DATA_DIR", str(tmp_path))
    assert D.resolve_data_dir(None) == tmp_path
    with pytest.raises(ExperimentError, match="wikitext-2"):
        D.load_lm_corpus("auto", tmp_path)


@needs_shared
def test_shared_data_slices():
    wt = D.load_wikitext2(SHARED, limit=300)
    assert wt.train.numel() > 1000 and wt.vocab.stoi["<eos>"] >= 0
    ef = D.load_eng_fra(SHARED, seed=3, limit=500)
    assert len(ef.train) == 500 and all(len(f.split()) <= 10 for _, f in ef.train)
    assert not {s for s, _ in ef.test} & {s for s, _ in ef.train}  # split by English sentence
    assert D.load_eng_fra(SHARED, seed=3, limit=500).test == ef.test


# ----------------------------------------------------------------------------- registry / schedule


def test_registry_and_lr_parsing():
    for name in ("adalomo", "adalomo-classic", "lomo", "adafactor", "adapm", "adapm-factored", "adam", "adamw",
                 "sgd"):
        assert name in OPTIMIZERS
        assert set(OPTIMIZERS[name].default_lr) >= {"lstm-lm", "seq2seq", "gpt-lm"}
    runs = parse_runs("adalomo,adam,adalomo@1e-2", "adam=3e-4", "lstm-lm")
    assert [(r.label, r.lr) for r in runs] == [
        ("adalomo", OPTIMIZERS["adalomo"].default_lr["lstm-lm"]), ("adam", 3e-4), ("adalomo@1e-2", 1e-2)]
    assert parse_lr_overrides("0.5", ["sgd", "adam"]) == {"sgd": 0.5, "adam": 0.5}
    for bad in ("adam:1e-3", "adam=abc", "foo=1", "adam=-1", "=1"):
        with pytest.raises(ExperimentError):
            parse_lr_overrides(bad, ["adam"])
    with pytest.raises(ExperimentError, match="unknown optimizer"):
        parse_runs("adam,rmsprop", None, "lstm-lm")


def test_adapm_missing_is_a_clear_error(monkeypatch):
    import adalomo

    monkeypatch.delattr(adalomo, "AdaPM", raising=False)
    with pytest.raises(ExperimentError, match="AdaPM is not available"):
        run_experiment(ExperimentConfig(task="lstm-lm", optimizers="adapm", max_steps=1, quiet=True,
                                        out="/nonexistent-never-created"))


def test_lr_schedule():
    f = lr_lambda(10, 100, "cosine", 0.1)
    assert f(0) == pytest.approx(1 / 11) and f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55)
    assert lr_lambda(0, 100, "constant", 0.1)(50) == 1.0


def test_memory_meter_sees_fused_gradient_freeing():
    from adalomo import AdaLomo

    sizes = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        meter = MemoryMeter(model)
        opt = AdaLomo(model.parameters(), lr=1e-2, fused=fused)
        with meter.forward(1):
            loss = model(torch.randn(4, 32)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.close()
        sizes[fused] = meter.max_grad_bytes
        assert meter.param_bytes == sum(p.numel() * 4 for p in model.parameters())
        assert meter.max_saved_bytes > 0
    assert sizes[False] == (32 * 64 + 64 + 64 * 8 + 8) * 4
    assert sizes[True] == 32 * 64 * 4  # only the largest gradient is ever alive


# ----------------------------------------------------------------------------- end to end


def _check_results(out: Path, task: str, labels):
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == task and list(res["runs"]) == list(labels)
    assert {"name", "description"} <= set(res["corpus"])
    for label in labels:
        r = res["runs"][label]
        assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
        assert MEM_FIELDS <= set(r["memory"])
        assert r["memory"]["parameters"] > 0 and r["steps"] == len(r["loss_curve"]["loss"]) > 0
        assert math.isfinite(r["final_train_loss"]) and math.isfinite(r["eval_loss"])
        if task == "seq2seq":
            assert "bleu" in r and r["samples"]
    md = (out / "results.md").read_text()
    assert "| optimizer |" in md and "loss.png" in md
    assert (out / "loss.png").stat().st_size > 1000 and (out / "memory.png").stat().st_size > 1000
    return res


@pytest.mark.parametrize("task", ["lstm-lm", "gpt-lm", "seq2seq"])
def test_end_to_end_embedded(task, tmp_path):
    out = tmp_path / task
    cfg = ExperimentConfig(task=task, optimizers="adalomo,adam,sgd", max_steps=3, quiet=True, out=str(out),
                           data_limit=LIMIT, **TINY[task])
    run_experiment(cfg, log=lambda *a: None)
    res = _check_results(out, task, ["adalomo", "adam", "sgd"])
    assert res["corpus"]["name"].startswith("embedded")
    runs = res["runs"]
    assert runs["adalomo"]["fused"] and not runs["adam"]["fused"]
    assert runs["adalomo"]["memory"]["gradients"] < runs["adam"]["memory"]["gradients"]
    assert runs["adalomo"]["memory"]["optimizer_state"] < runs["adam"]["memory"]["optimizer_state"]
    assert runs["sgd"]["memory"]["optimizer_state"] == 0


@needs_shared
@pytest.mark.parametrize("task", ["lstm-lm", "gpt-lm", "seq2seq"])
def test_end_to_end_shared_data_slice(task, tmp_path):
    out = tmp_path / task
    cfg = ExperimentConfig(task=task, optimizers="adalomo,adam", max_steps=2, quiet=True, out=str(out),
                           data_dir=str(SHARED), data_limit=LIMIT, **TINY[task])
    run_experiment(cfg, log=lambda *a: None)
    res = _check_results(out, task, ["adalomo", "adam"])
    assert res["corpus"]["name"] == ("eng-fra" if task == "seq2seq" else "wikitext-2")


def test_fused_and_classic_follow_the_same_trajectory(tmp_path):
    """Same seed and data order for every run: fused AdaLomo == classic AdaLomo, step for step."""
    cfg = ExperimentConfig(task="gpt-lm", optimizers="adalomo,adalomo-classic,adalomo@0.01", max_steps=4,
                           quiet=True, out=str(tmp_path), data_limit=LIMIT, **TINY["gpt-lm"])
    runs = run_experiment(cfg, log=lambda *a: None)["runs"]
    a, b = runs["adalomo"]["loss_curve"]["loss"], runs["adalomo-classic"]["loss_curve"]["loss"]
    assert a == pytest.approx(b, rel=1e-4)
    assert runs["adalomo@0.01"]["lr"] == 0.01 and runs["adalomo@0.01"]["loss_curve"]["loss"][0] == a[0]


def test_adapm_entries_run_when_available(tmp_path):
    import adalomo

    if not hasattr(adalomo, "AdaPM"):
        pytest.skip("adalomo.AdaPM not in this version")
    cfg = ExperimentConfig(task="gpt-lm", optimizers="adapm,adapm-factored", max_steps=2, quiet=True,
                           out=str(tmp_path), data_limit=LIMIT, **TINY["gpt-lm"])
    runs = run_experiment(cfg, log=lambda *a: None)["runs"]
    assert runs["adapm"]["fused"] and math.isfinite(runs["adapm-factored"]["final_train_loss"])


def test_merge_results_of_split_runs(tmp_path):
    """An experiment split over two invocations (same settings) joins into one report; other settings refuse."""
    from adalomo.experiments import report

    kw = dict(task="gpt-lm", max_steps=2, quiet=True, data_limit=LIMIT, **TINY["gpt-lm"])
    a = run_experiment(ExperimentConfig(optimizers="adalomo", out=str(tmp_path / "a"), **kw), log=lambda *x: None)
    b = run_experiment(ExperimentConfig(optimizers="adam", out=str(tmp_path / "b"), **kw), log=lambda *x: None)
    merged = report.merge_results([a, b], ["a", "b"], ["a note"])
    assert list(merged["runs"]) == ["adalomo", "adam"]
    assert merged["runs"]["adam"]["loss_curve"] == b["runs"]["adam"]["loss_curve"]
    assert merged["notes"][-1] == "a note" and any("adam" in n for n in merged["notes"])
    paths = report.write_all(merged, tmp_path / "m")
    md = Path(paths["md"]).read_text()
    assert "| adalomo (fused) |" in md and "| adam |" in md and "- a note" in md
    other = run_experiment(ExperimentConfig(optimizers="sgd", out=str(tmp_path / "c"), **{**kw, "seq_len": 16}),
                           log=lambda *x: None)
    with pytest.raises(ValueError, match="seq_len"):
        report.merge_results([a, other])
    with pytest.raises(ValueError, match="twice"):
        report.merge_results([a, a])


# ----------------------------------------------------------------------------- speed numbers


def test_cpu_runs_use_one_thread_unless_asked_and_leave_the_callers_setting(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        kw = dict(task="gpt-lm", optimizers="sgd", max_steps=1, quiet=True, data_limit=LIMIT, device="cpu",
                  **TINY["gpt-lm"])
        res = run_experiment(ExperimentConfig(out=str(tmp_path / "a"), **kw), log=lambda *a: None)
        assert res["environment"]["threads"] == 1 and torch.get_num_threads() == 3
        res = run_experiment(ExperimentConfig(out=str(tmp_path / "b"), threads=2, **kw), log=lambda *a: None)
        assert res["environment"]["threads"] == 2 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_step_time_is_the_median_so_a_stall_does_not_count(tmp_path, monkeypatch):
    """Another job's burst on a shared CPU stalls a few steps of whichever optimizer runs then; the reported
    per-step time (which compares optimizers) must not charge it to that optimizer."""
    import time

    from adalomo.experiments.train import OptimizerSpec

    class StallingSGD(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            StallingSGD.calls += 1
            if StallingSGD.calls in (15, 20, 25):
                time.sleep(0.5)
            return super().step(closure)

    spec = OptimizerSpec("stalling-sgd", lambda params, lr, task, weight_decay=None: StallingSGD(params, lr=lr),
                         {"gpt-lm": 0.05}, False, "torch.optim.SGD that sleeps in three steps")
    monkeypatch.setitem(OPTIMIZERS, "stalling-sgd", spec)
    cfg = ExperimentConfig(task="gpt-lm", optimizers="stalling-sgd", max_steps=30, quiet=True, out=str(tmp_path),
                           data_limit=LIMIT, **TINY["gpt-lm"])
    r = run_experiment(cfg, log=lambda *a: None)["runs"]["stalling-sgd"]
    assert r["timing_skipped_steps"] == 6 and r["wall_time_s"] > 1.5
    steady = r["steps"] - r["timing_skipped_steps"]
    assert r["time_per_step_s"] * steady < r["wall_time_s"] - 1.2
    assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["time_per_step_s"])


def test_time_to_target_interpolates_between_evaluations():
    """The wall time to reach AdamW's final validation loss: linear between the two evaluations around it."""
    from adalomo.experiments.report import time_to_target, time_to_target_table

    def run(opt, curve):
        return {"optimizer": opt, "eval_curve": [[10 * (i + 1), t, loss] for i, (t, loss) in enumerate(curve)]}

    res = {"runs": {"adamw": run("adamw", [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]),
                    "adalomo": run("adalomo", [(1.0, 4.0), (2.0, 2.0), (3.0, 1.0)]),
                    "early": run("lomo", [(0.5, 2.5), (1.0, 2.0)]),
                    "slow": run("sgd", [(1.0, 6.0), (2.0, 3.5)]),
                    "no-curve": {"optimizer": "adam", "eval_curve": []}}}
    t = time_to_target(res)
    assert t["reference"] == "adamw" and t["target_valid_loss"] == 3.0
    assert t["runs"]["adamw"]["time_s"] == pytest.approx(4.0)
    assert t["runs"]["adalomo"]["time_s"] == pytest.approx(1.5)  # 4.0 at 1 s, 2.0 at 2 s: 3.0 at 1.5 s
    assert t["runs"]["adalomo"]["vs_reference"] == pytest.approx(1.5 / 4.0)
    assert t["runs"]["early"]["time_s"] == pytest.approx(0.5)  # below the target at its first evaluation
    assert t["runs"]["slow"]["time_s"] is None and t["runs"]["slow"]["vs_reference"] is None
    assert "no-curve" not in t["runs"]
    table = time_to_target_table(t)
    assert "| adalomo | 1.0000 | 1.5 | 0.38 |" in table and "| slow | 3.5000 | not reached | – |" in table
    assert time_to_target({"runs": {"adalomo": res["runs"]["adalomo"]}}) is None


def test_time_to_target_in_the_report(tmp_path):
    cfg = ExperimentConfig(task="gpt-lm", optimizers="adamw,adalomo", max_steps=4, eval_every=2, eval_batches=1,
                           quiet=True, out=str(tmp_path), data_limit=LIMIT, **TINY["gpt-lm"])
    run_experiment(cfg, log=lambda *a: None)
    res = json.loads((tmp_path / "results.json").read_text())
    assert [e[0] for e in res["runs"]["adamw"]["eval_curve"]] == [2, 4]  # the last step is evaluated too
    ttt = res["time_to_target"]
    assert ttt["reference"] == "adamw" and ttt["target_valid_loss"] == res["runs"]["adamw"]["eval_curve"][-1][2]
    assert "Time to adamw's final validation loss" in (tmp_path / "results.md").read_text()
