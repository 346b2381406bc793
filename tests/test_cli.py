"""The ``adalomo`` command line: bad arguments give one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

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
    (["experiment"], "required: TASK"),
    ([], "missing command"),
    (["train"], "invalid choice"),
])
def test_bad_arguments_one_line(capsys, argv, match):
    _one_line_error(capsys, argv, match)


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
    try:
        import adalomo.memory  # noqa: F401
    except ImportError:
        _one_line_error(capsys, ["memory"], "memory command is not available")
    else:
        with pytest.raises(SystemExit) as e:
            main(["memory", "--help"])
        assert e.value.code == 0


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("ADALOMO_DATA_DIR", None)
    p = subprocess.run([sys.executable, "-m", "adalomo.cli", "experiment", "lstm-lm", "--optimizers", "adamm",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("adalomo: error: unknown optimizer 'adamm' (known: "
                                + p.stderr.split("(known: ")[1].strip())
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
