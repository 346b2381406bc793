"""The ``adalomo`` command line: bad arguments give one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adalomo.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("ADALOMO_DATA_DIR", raising=False)


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adalomo: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, match", [
    (["experiment", "translation"], "invalid choice"),
    (["experiment", "lstm-lm", "--optimizers", "adam,rmsprop"], "unknown optimizer 'rmsprop'"),
    (["experiment", "lstm-lm", "--lr", "adam:1e-3"], "bad --lr"),
    (["experiment", "lstm-lm", "--lr", "adam=fast"], "not a number"),
    (["experiment", "lstm-lm", "--lr", "nadam=1e-3"], "unknown optimizer 'nadam'"),
    (["experiment", "lstm-lm", "--optimizers", "adam@x"], "not a number"),
    (["experiment", "lstm-lm", "--size", "huge"], "unknown --size"),
    (["experiment", "lstm-lm", "--max-steps", "0"], "must be positive"),
    (["experiment", "lstm-lm", "--max-steps", "ten"], "invalid int value"),
    (["experiment", "lstm-lm", "--dtype", "fp8"], "invalid choice"),
    (["experiment", "lstm-lm", "--bogus"], "unrecognized arguments"),
    (["experiment", "lstm-lm", "--n-layers", "0"], "--n-layers must be positive"),
    (["experiment", "gpt-lm", "--dim", "0"], "--dim must be positive"),
    (["experiment", "lstm-lm", "--dropout", "2"], "--dropout must be in [0, 1)"),
    (["experiment", "lstm-lm", "--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["experiment", "lstm-lm", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["experiment", "lstm-lm", "--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1]"),
    (["experiment", "lstm-lm", "--threads", "0"], "--threads must be positive"),
    (["experiment", "lstm-lm", "--tie", "--adaptive-softmax"], "cannot be combined"),
    (["experiment", "gpt-lm", "--dim", "30", "--n-heads", "4", "--data-limit", "50"], "not divisible"),
    (["experiment", "lstm-lm", "--corpus", "wikitext-2"], "needs a data directory"),
    (["experiment", "lstm-lm", "--device", "tpu"], "unknown --device"),
    (["memory", "--bogus"], "unrecognized arguments"),
    (["memory", "llama-7b", "--seq-len", "abc"], "invalid int value"),
    (["experiment"], "required: TASK"),
    ([], "missing command"),
    (["train"], "invalid choice"),
])
def test_bad_arguments_one_line(capsys, argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, argv, match)
    assert not (tmp_path / "runs").exists()  # nothing written before the settings are checked


@pytest.mark.parametrize("argv, match", [
    (["memory", "no-such-model"], "unknown preset 'no-such-model'"),
    (["memory", "llama-7b", "--optimizers", "rmsprop"], "unknown optimizer(s) rmsprop"),
    (["memory"], "give exactly one model"),
])
def test_memory_errors_one_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adalomo memory: error: ") and match in err[0], err


def test_unwritable_output_dir(capsys, tmp_path):
    (tmp_path / "afile").touch()
    _one_line_error(capsys, ["experiment", "lstm-lm", "--data-limit", "50", "--out", str(tmp_path / "afile" / "x")],
                    "cannot create output directory")


def test_missing_data_dir(capsys, tmp_path):
    _one_line_error(capsys, ["experiment", "lstm-lm", "--data-dir", str(tmp_path / "nope")], "does not exist")
    _one_line_error(capsys, ["experiment", "seq2seq", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                    "eng-fra.txt")


def test_missing_data_dir_from_env(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ADALOMO_DATA_DIR", str(tmp_path / "gone"))
    _one_line_error(capsys, ["experiment", "lstm-lm"], "ADALOMO_DATA_DIR")


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--optimizers" in out and "--data-dir" in out and "lstm-lm" in out


def test_memory_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as e:
        main(["memory", "--help"])
    assert e.value.code == 0 and "--gradient-checkpointing" in capsys.readouterr().out


def test_version_is_the_package_version(capsys):
    import adalomo

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"adalomo {adalomo.__version__}"


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "adalomo.__version__"}


def _parser(command: str) -> argparse.ArgumentParser:
    from adalomo import cli, memory

    p = argparse.ArgumentParser(prog=f"adalomo {command}")
    (memory.add_arguments if command == "memory" else cli.add_experiment_arguments)(p)
    return p


def test_checkpointing_flag_has_one_name(capsys):
    exp, mem = _parser("experiment"), _parser("memory")
    assert exp.parse_args(["gpt-lm", "--gradient-checkpointing"]).gradient_checkpointing is True
    assert exp.parse_args(["gpt-lm"]).gradient_checkpointing is False
    assert mem.parse_args(["llama-7b", "--gradient-checkpointing"]).grad_ckpt is True
    assert mem.parse_args(["llama-7b", "--no-gradient-checkpointing"]).grad_ckpt is False
    assert mem.parse_args(["llama-7b"]).grad_ckpt is False
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command, argv, new, value", [
    ("experiment", ["gpt-lm", "--grad-checkpointing"], "--gradient-checkpointing", True),
    ("memory", ["llama-7b", "--grad-ckpt"], "--gradient-checkpointing", True),
    ("memory", ["llama-7b", "--gradient-checkpointing", "--no-grad-ckpt"], "--no-gradient-checkpointing", False),
])
def test_old_checkpointing_flags_warn_for_one_release(capsys, command, argv, new, value):
    p = _parser(command)
    args = p.parse_args(argv)
    assert (args.grad_ckpt if command == "memory" else args.gradient_checkpointing) is value
    assert capsys.readouterr().err == (f"adalomo {command}: warning: {argv[-1]} is deprecated and will be removed "
                                       f"in the next release; use {new}\n")
    assert argv[-1] not in p.format_help()


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("ADALOMO_DATA_DIR", None)
    return env


@pytest.mark.parametrize("argv", [
    ["memory", "llama-7b", "--json"],
    ["memory", "--help"],
    ["--version"],
    ["experiment", "gpt-lm", "--optimizers", "sgd", "--max-steps", "1", "--batch-size", "2", "--seq-len", "8",
     "--data-limit", "50", "--quiet"],
])
def test_closed_pipe_ends_quietly(tmp_path, argv):
    """``adalomo memory --json | head -1``: the reader is gone before the first write."""
    if argv[0] == "experiment":
        argv = [*argv, "--out", str(tmp_path)]
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, "-m", "adalomo.cli", *argv], stdout=write, stderr=subprocess.PIPE,
                           text=True, env=_env(), timeout=300)
    finally:
        os.close(write)
    # argparse ignores an error writing --help/--version itself: exit 0 when unbuffered (PYTHONUNBUFFERED)
    argparse_output = argv[0] == "--version" or "--help" in argv
    assert p.stderr == "" and p.returncode in ((0, 141) if argparse_output else (141,)), p.stderr


# as if not installed: `import tqdm` raises ModuleNotFoundError and importlib.util.find_spec("tqdm") is None
BLOCK_EXPERIMENT_PACKAGES = """
import sys
sys.modules.update(tqdm=None, matplotlib=None, sacrebleu=None)
"""


def _run_without_experiment_packages(code: str, tmp_path):
    return subprocess.run([sys.executable, "-c", BLOCK_EXPERIMENT_PACKAGES + code], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=300)


def test_optimizers_and_planner_need_torch_only(tmp_path):
    p = _run_without_experiment_packages("""
import torch, adalomo
from adalomo.cli import main
for make in (lambda ps: adalomo.AdaLomo(ps, lr=1e-2, fused=True), lambda ps: adalomo.Lomo(ps, lr=1e-2, fused=True),
             lambda ps: adalomo.Adafactor(ps, fused=True)):
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    opt = make(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    assert not torch.equal(before, model.weight)
assert main(["memory", "gpt2", "--json"]) == 0
loaded = [m for m in sys.modules if m.partition(".")[0] in ("tqdm", "matplotlib", "sacrebleu") and sys.modules[m]]
assert not loaded, loaded
print("ok")
""", tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr


def test_experiment_without_its_packages_says_what_to_install(tmp_path):
    p = _run_without_experiment_packages("""
from adalomo.cli import main
sys.exit(main(["experiment", "lstm-lm", "--max-steps", "1", "--quiet"]))
""", tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ('adalomo: error: the experiments need tqdm, matplotlib, not installed: '
                                'pip install "adalomo[experiments]"')
    assert not (tmp_path / "runs").exists()


def test_small_run_writes_report(capsys, tmp_path):
    out = tmp_path / "run"
    rc = main(["experiment", "gpt-lm", "--optimizers", "adalomo,sgd", "--max-steps", "2", "--batch-size", "2",
               "--seq-len", "16", "--data-limit", "100", "--quiet", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "EMBEDDED" in stdout and "--data-dir" in stdout  # says which corpus and how to use WikiText-2
    res = json.loads((out / "results.json").read_text())
    assert list(res["runs"]) == ["adalomo", "sgd"] and res["command"].startswith("adalomo experiment gpt-lm")
    assert (out / "results.md").exists() and (out / "loss.png").exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "adalomo.cli", "experiment", "lstm-lm", "--optimizers", "adamm",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("adalomo: error: unknown optimizer 'adamm' (known: "
                                + p.stderr.split("(known: ")[1].strip())
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
