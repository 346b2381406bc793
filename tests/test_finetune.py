"""``adalomo experiment finetune``: the pretrained base (saved, loaded, transformers directories), the two tasks,
the lr sweep and its summary, the budget guard, and bad arguments as one-line errors. Tiny models, few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adalomo.cli import main
from adalomo.experiments import ExperimentError
from adalomo.experiments.finetune import Budget, FinetuneConfig, SFTTask, plan_runs, sweep_lrs
from adalomo.experiments.finetune_report import good_band, summarize
from adalomo.experiments.models import GPT, GPTConfig
from adalomo.experiments.pretrained import FORMAT, Base, WordTokenizer, load_base, save_base

OPTIMIZERS = "adalomo,adamw,lomo-clip,adafactor,adapm"  # the five
TINY = ["--batch-size", "4", "--sft-batch-size", "8", "--seq-len", "32", "--data-limit", "200", "--eval-pairs", "12",
        "--quiet"]


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("ADALOMO_DATA_DIR", raising=False)


def _finetune(argv, out) -> dict:
    assert main(["experiment", "finetune", *argv, *TINY, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The whole command once: pretrain on the embedded docs, save, load, fine-tune the five optimizers on
    both tasks; the later tests reuse its saved base."""
    out = tmp_path_factory.mktemp("finetune")
    return out, _finetune(["--pretrain-steps", "60", "--max-steps", "3", "--optimizers", OPTIMIZERS], out)


def test_end_to_end_pretrain_save_load_finetune_both_tasks(pretrained):
    out, res = pretrained
    assert res["base"]["format"] == FORMAT and res["base"]["pretraining"]["steps"] == 60
    assert res["base"]["pretraining"]["corpus"] == "embedded-pydoc-language"
    assert {p.name for p in (out / "base").iterdir()} == {"config.json", "model.safetensors", "vocab.json"}
    assert res["tasks"]["domain"]["target_corpus"] == "embedded-pydoc-library"
    for name in ("domain", "sft"):
        task = res["tasks"][name]
        assert sorted(r["optimizer"] for r in task["runs"].values()) == sorted(OPTIMIZERS.split(","))
        firsts = set()
        for r in task["runs"].values():
            assert r["is_default"] and r["steps"] == 3 and not r["diverged"] and math.isfinite(r["score"])
            assert r["memory"]["parameters"] > 0 and r["time_per_step_s"] > 0
            firsts.add(r["loss_curve"]["loss"][0])
        assert len(firsts) == 1  # same weights, same first batch for every optimizer
        assert set(task["summary"]) == set(OPTIMIZERS.split(","))
        for plot in ("lr", "loss", "memory"):
            assert (out / f"{plot}_{name}.png").stat().st_size > 1000
    runs = res["tasks"]["domain"]["runs"]
    assert runs["adalomo@0.03"]["score"] == pytest.approx(runs["adafactor@0.03"]["score"], rel=1e-5)
    assert {"target_ppl", "source_ppl"} <= set(runs["adamw@0.0005"])
    sft = res["tasks"]["sft"]["runs"]["adalomo@0.016"]
    assert sft["bleu"] is not None and sft["samples"] and sft["answer_ppl"] == sft["score"]
    assert res["tasks"]["sft"]["eval_pairs"] == 12
    md = (out / "results.md").read_text()
    assert "## domain:" in md and "## sft:" in md and "good band" in md and "lr_sft.png" in md


def test_saved_base_is_reloaded_and_swept(pretrained, tmp_path):
    base_dir = pretrained[0] / "base"
    res = _finetune(["--base", str(base_dir), "--task", "domain", "--max-steps", "2", "--optimizers",
                     "adalomo,adamw", "--lr-sweep", "3"], tmp_path)
    task = res["tasks"]["domain"]
    # the same base and data as the pretraining run: the same score before fine-tuning
    assert task["before"]["score"] == pytest.approx(pretrained[1]["tasks"]["domain"]["before"]["score"])
    assert sorted(task["runs"]) == sorted(["adalomo@0.0095", "adalomo@0.03", "adalomo@0.095", "adamw@0.00016",
                                           "adamw@0.0005", "adamw@0.0016"])
    s = task["summary"]["adalomo"]
    assert s["lrs"] == [0.0095, 0.03, 0.095] and s["default_lr"] == 0.03 and s["band"]["sweep_points"] == 3
    assert s["best_score"] == min(s["scores"]) and s["default_vs_reference_best"] is not None


def test_base_roundtrip_keeps_weights_and_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, max_seq=32))
    tok = WordTokenizer([*WordTokenizer.SPECIALS, "a", "b"])
    save_base(model, tok, tmp_path, {"corpus": "x"})
    base = load_base(tmp_path)
    assert base.format == FORMAT and base.pretraining == {"corpus": "x"} and len(base.tokenizer) == 5
    copy = base.new_model(torch.float32)
    assert copy.lm_head.weight is copy.tok_emb.weight  # still tied after the round trip
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(base.logits(copy, x), model(x), rtol=0, atol=0)


def _hf_word_tokenizer():
    """A transformers tokenizer made offline: one id per word of the embedded docs' first lines."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from adalomo.experiments.data import embedded_text_lines, simple_tokenize

    words = ["<unk>", "</s>", "=>"]
    for line in embedded_text_lines("library")[:200]:
        words += [w for w in dict.fromkeys(simple_tokenize(line)) if w not in words]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_transformers_llama_directory_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = _hf_word_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    res = _finetune(["--base", str(tmp_path / "llama"), "--max-steps", "2", "--optimizers", "adalomo"],
                    tmp_path / "out")
    assert res["base"]["format"] == "transformers" and res["base"]["tokenizer"]["type"] == "transformers"
    assert res["base"]["model"]["type"] == "transformers LlamaForCausalLM" and not res["base"]["notes"]
    for task in res["tasks"].values():
        assert all(math.isfinite(r["score"]) for r in task["runs"].values())
    vocab = len(tok) + 5
    # the perplexity of a model that has seen nothing is about its vocabulary size
    assert 0.8 * vocab < res["tasks"]["domain"]["before"]["score"] < 1.5 * vocab


def test_transformers_gpt2_directory_without_tokenizer_gets_a_word_vocabulary(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=3000, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    res = _finetune(["--base", str(tmp_path / "gpt2"), "--task", "sft", "--max-steps", "2", "--optimizers",
                     "adalomo"], tmp_path / "out")
    base = res["base"]
    assert base["tokenizer"]["type"] == "word" and base["tokenizer"]["size"] <= 3000
    assert "has no tokenizer" in base["notes"][0]
    assert res["tasks"]["sft"]["runs"]["adalomo@0.016"]["steps"] == 2


# ----------------------------------------------------------------------------- pieces


def test_sft_loss_is_on_the_answer_only():
    tok = WordTokenizer([*WordTokenizer.SPECIALS, "a", "b", "c", "d"])
    task = SFTTask.__new__(SFTTask)
    task.tok, task.device = tok, torch.device("cpu")
    x, y, ntok = task._collate([([3, 4, tok.sep_id], [5, 6, tok.eos_id]), ([3, tok.sep_id], [6, tok.eos_id])])
    assert x.tolist() == [[3, 4, 2, 5, 6], [3, 2, 6, 1, 1]]  # inputs, padded with <eos>
    assert y.tolist() == [[-100, -100, 5, 6, 1], [-100, 6, 1, -100, -100]]  # targets: the answers only
    assert ntok == 5 + 3


class _Parrot(torch.nn.Module):
    """Logits that make greedy decoding answer the prompt's words in reverse, then <eos>."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        out = torch.full((*idx.shape, self.vocab), -1.0)
        for b, row in enumerate(idx.tolist()):
            sep = row.index(2)
            prompt, made = row[:sep], row[sep + 1:]
            nxt = prompt[::-1][len(made)] if len(made) < len(prompt) else 1
            out[b, -1, nxt] = 1.0
        return out + self.w


def test_greedy_answers_batched_by_prompt_length():
    tok = WordTokenizer([*WordTokenizer.SPECIALS, "a", "b", "c", "d"])
    base = Base(_Parrot(10), tok, FORMAT, "-", 64, {})
    task = SFTTask.__new__(SFTTask)
    task.cfg, task.base, task.tok, task.device = FinetuneConfig(sft_batch_size=1), base, tok, torch.device("cpu")
    task.autocast = SFTTask.autocast
    task.test_items = [(tok.prompt_ids(s), []) for s in ("a b c", "d a", "c", "b b d a")]
    task.max_new = 6
    assert task.answers(base.model) == ["c b a", "a d", "c", "a d b b"]


def test_sweep_points_and_the_run_order():
    assert sweep_lrs(1e-3, 5) == [1e-4, 3.2e-4, 1e-3, 3.2e-3, 1e-2]
    assert sweep_lrs(5e-5, 3) == [1.6e-5, 5e-5, 1.6e-4]
    cfg = FinetuneConfig(task="domain,sft", pretrain_steps=1, optimizers="adalomo,adamw@1e-4", lr_sweep=5).resolve()
    plan = plan_runs(cfg)
    assert len(plan) == 2 * 2 * 5
    assert [(p.task, p.run.label) for p in plan[:4]] == [("domain", "adalomo@0.03"), ("domain", "adamw@0.0001"),
                                                         ("sft", "adalomo@0.016"), ("sft", "adamw@0.0001")]
    assert [p.distance for p in plan] == sorted(p.distance for p in plan) and all(p.is_default for p in plan[:4])


def test_good_band_definition():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    band = good_band(lrs, [130.0, 104.0, 100.0, 105.0, math.inf])
    assert band == {"lr_min": 3e-4, "lr_max": 3e-3, "ratio": pytest.approx(10), "points": 3, "sweep_points": 5,
                    "open_low": False, "open_high": False}
    # contiguous: a good point beyond a bad one is not in the band; reaching an end marks it open
    band = good_band(lrs, [101.0, 120.0, 100.0, 102.0, 103.0])
    assert (band["lr_min"], band["lr_max"], band["open_low"], band["open_high"]) == (1e-3, 1e-2, False, True)
    assert good_band(lrs[:2], [1.0, 1.0]) is None and good_band(lrs[:3], [math.inf] * 3) is None


def test_summary_against_the_reference_best():
    def run(opt, lr, score, default=False):
        return {"optimizer": opt, "lr": lr, "score": score, "is_default": default, "memory": {},
                "time_per_step_s": 0.1, "tokens_per_s": 1.0}

    runs = {f"{o}@{lr}": run(o, lr, s, d) for o, lr, s, d in [
        ("adamw", 1e-5, 120.0, False), ("adamw", 3e-5, 100.0, True), ("adamw", 1e-4, 110.0, False),
        ("adalomo", 3e-4, 104.0, False), ("adalomo", 1e-3, 102.0, True), ("adalomo", 3e-3, None, False)]}
    s = summarize(runs)
    assert s["adalomo"]["best_lr"] == 1e-3 and s["adalomo"]["scores"] == [104.0, 102.0, None]
    assert s["adalomo"]["default_vs_reference_best"] == pytest.approx(0.02)
    assert s["adalomo"]["band"]["points"] == 2 and s["adamw"]["band"]["points"] == 1


def test_budget_starts_only_runs_that_fit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("adalomo.experiments.finetune.time.perf_counter", lambda: now[0])
    budget = Budget(1.0, start=100.0)  # deadline at 160
    assert budget.fits("domain", "adamw")  # nothing measured yet
    budget.record("domain", "adamw", 20.0)
    now[0] = 135.0
    assert budget.fits("domain", "adamw") and budget.fits("sft", "adapm")  # 155, 155 <= 160
    now[0] = 145.0
    assert not budget.fits("domain", "adamw") and not budget.fits("domain", "adapm")
    budget.record("sft", "adamw", 5.0)
    assert budget.fits("sft", "adamw") and not budget.fits("domain", "adalomo")
    assert Budget(None, 0.0).fits("domain", "x")


def test_budget_exhausted_still_writes_a_report(pretrained, tmp_path):
    res = _finetune(["--base", str(pretrained[0] / "base"), "--task", "sft", "--optimizers", "adalomo",
                     "--lr-sweep", "3", "--max-steps", "2", "--budget-minutes", "1e-6"], tmp_path)
    assert res["skipped"] == ["sft: adalomo@0.016", "sft: adalomo@0.0051", "sft: adalomo@0.051"]
    assert res["tasks"]["sft"]["runs"] == {} and "not run" in (tmp_path / "results.md").read_text()


# ----------------------------------------------------------------------------- bad arguments


def _one_line_error(capsys, argv, match):
    rc = main(["experiment", "finetune", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("adalomo: error: "), err
    assert match in err[0], err[0]


@pytest.mark.parametrize("argv, match", [
    ([], "give either --base DIR"),
    (["--base", "x", "--pretrain-steps", "3"], "not both"),
    (["--pretrain-steps", "3", "--task", "translate"], "unknown --task translate"),
    (["--pretrain-steps", "3", "--lr-sweep", "4"], "odd number of points"),
    (["--pretrain-steps", "3", "--optimizers", "adalomo,adalomo@1e-3"], "list each optimizer once"),
    (["--pretrain-steps", "3", "--optimizers", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--pretrain-steps", "3", "--target-corpus", "embedded"], "overlaps the base's corpus"),
    (["--pretrain-steps", "3", "--target-corpus", "tinyshakespeare"], "needs a data directory"),
    (["--pretrain-steps", "0"], "--pretrain-steps must be positive"),
    (["--pretrain-steps", "3", "--size", "huge"], "unknown --size"),
    (["--pretrain-steps", "3", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_one_line(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, argv, match)
    assert not (tmp_path / "runs").exists()  # nothing written before the settings are checked


def test_bad_base_directories_one_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    for d in ("empty", "bad_json", "other", "ours_without_weights"):
        (tmp_path / d).mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{not json")
    (tmp_path / "other" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "ours_without_weights" / "config.json").write_text(json.dumps({"format": FORMAT, "format_version": 1}))
    for name, match in [("missing", "does not exist"), ("afile", "is a file"), ("empty", "has no config.json"),
                        ("bad_json", "not valid JSON"), ("other", "neither an adalomo-gpt-lm config nor"),
                        ("ours_without_weights", "lacks model.safetensors")]:
        _one_line_error(capsys, ["--base", str(tmp_path / name), "--out", str(tmp_path / "o"), "--quiet"], match)


def test_finetune_help_and_options_before_the_task(capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "finetune", "--help"])
    assert e.value.code == 0 and "--pretrain-steps" in capsys.readouterr().out
    assert main(["experiment", "--quiet", "finetune"]) == 2
    assert "write them after it" in capsys.readouterr().err


def test_config_errors_are_experiment_errors(monkeypatch):
    from adalomo.experiments.train import OPTIMIZERS, OptimizerSpec

    with pytest.raises(ExperimentError, match="--eval-pairs must be positive"):
        FinetuneConfig(pretrain_steps=1, eval_pairs=0).resolve()
    monkeypatch.setitem(OPTIMIZERS, "mine", OptimizerSpec("mine", None, {"gpt-lm": 1.0}, False, ""))
    with pytest.raises(ExperimentError, match="no default lr for sft; give one: mine@LR"):
        plan_runs(FinetuneConfig(task="sft", pretrain_steps=1, optimizers="mine").resolve())
