"""The code in README.md and docs/*.md runs as it is shown.

Every fenced ```python block is extracted and run in its own subprocess (CPU, one thread, offline), from an empty
directory. A block may be preceded by one marker comment:

    <!-- run: torchrun --nproc-per-node 2 -->   run under torch.distributed.run with that many processes (gloo on CPU)
    <!-- not run: needs CUDA -->               skipped without a GPU, run where there is one

Every ``adalomo ...`` command line of a shell block must parse: ``adalomo experiment`` and ``adalomo memory`` are
parsed by the real command with the work itself replaced by a no-op.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(run|not run):\s*(.*?)\s*-->$")
TORCHRUN = re.compile(r"^torchrun --nproc-per-node (\d+)$")
SHELLS = {"", "bash", "sh", "shell", "console"}
OPTIONAL = ("transformers", "accelerate", "triton")  # extras a block may import
# (page, first line of the block): blocks known not to run yet, each with the reason. Strict: once such a block
# runs, its test fails until the entry is removed.
PENDING: dict = {}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: tuple[str, str] | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def extract(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, each with the marker comment on the line before its fence."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        prev = lines[start - 1].strip() if start > 0 else ""
        marker = MARKER.match(prev)
        out.append(Block(str(path.relative_to(ROOT)), start + 1, lang, "\n".join(body) + "\n",
                         (marker.group(1), marker.group(2)) if marker else None))
        i += 1
    return out


BLOCKS = [b for page in PAGES for b in extract(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def commands(block: Block) -> list[list[str]]:
    """The ``adalomo ...`` invocations of a shell block (continued lines joined, ``&&``/``;``/``|`` split). In a
    plain or console block, which may show output, only the lines after a ``$`` prompt."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    found = []
    for line in text.splitlines():
        line = line.strip()
        if block.lang in ("", "console"):
            if not line.startswith("$ "):
                continue
            line = line[2:]
        for part in re.split(r"&&|;|\|", line):
            try:
                argv = shlex.split(part, comments=True)
            except ValueError:
                continue
            if argv[:1] == ["adalomo"]:
                found.append(argv[1:])
    return found


CLI = [(b, argv) for b in BLOCKS if b.lang in SHELLS for argv in commands(b)]


def _env(cuda: bool) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_every_page_has_its_blocks_found():
    """The extractor sees the README's blocks (a broken fence pattern would make every test below vacuous)."""
    readme = [b for b in BLOCKS if b.page == "README.md"]
    assert sum(b.lang == "python" for b in readme) >= 3  # quick start, Trainer, FSDP2
    assert any(argv[:1] == ["experiment"] for b, argv in CLI if b.page == "README.md")
    for b in BLOCKS:
        if b.marker:
            kind, what = b.marker
            assert b.lang == "python", f"{b.id}: a marker before a {b.lang or 'plain'} block"
            assert (kind == "run" and TORCHRUN.match(what)) or (kind == "not run" and what == "needs CUDA"), (
                f"{b.id}: unknown marker <!-- {kind}: {what} --> (allowed: 'run: torchrun --nproc-per-node N', "
                "'not run: needs CUDA')")


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path, request):
    pending = PENDING.get((block.page, block.code.split("\n", 1)[0]))
    if pending:
        request.applymarker(pytest.mark.xfail(reason=pending, strict=True))
    for mod in OPTIONAL:
        if re.search(rf"^\s*(from|import) {mod}\b", block.code, re.M) and importlib.util.find_spec(mod) is None:
            pytest.skip(f"needs {mod}")
    cuda = block.marker == ("not run", "needs CUDA")
    if cuda and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    cmd = [sys.executable, str(script)]
    if block.marker and block.marker[0] == "run":
        if TorchVersion(torch.__version__) < (2, 9):
            pytest.skip("FSDP2 on gloo needs torch >= 2.9")
        n = TORCHRUN.match(block.marker[1]).group(1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(cuda), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{block.id} failed:\n{block.code}\n{(proc.stdout + proc.stderr)[-4000:]}"


@pytest.mark.parametrize("block,argv", CLI, ids=[f"{b.id}:{' '.join(a)[:60]}" for b, a in CLI])
def test_cli_line_parses(block: Block, argv: list[str], monkeypatch, capsys):
    import adalomo.experiments
    import adalomo.experiments.finetune
    import adalomo.memory
    from adalomo import cli

    ran = []
    for module, name in ((adalomo.experiments, "run_experiment"), (adalomo.experiments.finetune, "run_finetune"),
                         (adalomo.memory, "run")):
        assert hasattr(module, name), f"{module.__name__}.{name} is gone: update this test"
        monkeypatch.setattr(module, name, lambda *a, **k: ran.append(a) or 0)
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # --help, --version
        rc = e.code
    assert rc in (0, None), f"{block.id}: `adalomo {shlex.join(argv)}` does not parse: {capsys.readouterr().err}"
    assert ran or {"-h", "--help", "--version"} & set(argv), f"{block.id}: nothing was parsed"
