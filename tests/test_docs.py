"""docs/usage.md's runnable examples run as written and print what the docs say they print.

Every ```python block that calls `init_distributed()` is a script for
`torchrun --nproc-per-node 2`; the plain ``` block right after it is its documented output.
Numbers of the form 1.4e-06 (errors against a reference) must stay below 1e-4; every other
character of every line must match, in any rank order.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
_ERR = re.compile(r"\d\.\de-\d\d")


def _blocks() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", USAGE.read_text(), flags=re.S | re.M)


def _scripts() -> list[tuple[str, str]]:
    blocks = _blocks()
    return [(body, blocks[i + 1][1]) for i, (lang, body) in enumerate(blocks)
            if lang == "python" and "init_distributed()" in body and i + 1 < len(blocks)
            and blocks[i + 1][0] == ""]


def _masked(lines: str) -> list[str]:
    return sorted(_ERR.sub("<err>", line) for line in lines.strip().splitlines())


def test_the_docs_have_runnable_examples():
    assert len(_scripts()) >= 2


@pytest.mark.parametrize("index", range(len(_scripts())))
def test_usage_example_runs_as_written(index, tmp_path):
    script, expected = _scripts()[index]
    if "import transformers" in script and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (the hf extra)")
    path = tmp_path / "example.py"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Two ranks share one stdout: a line of one may land right after the other's last text.
    got = re.findall(r"rank \d+: [^\n]*?(?=rank \d+: |\n|$)", proc.stdout)
    assert _masked("\n".join(got)) == _masked(expected), proc.stdout
    for line in got:
        for err in _ERR.findall(line):
            assert float(err) < 1e-4, line


def test_select_example_prints_what_its_comment_says():
    (body,) = [b for lang, b in _blocks() if lang == "python" and "select(config, h100x8" in b]
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    comment = next(line for line in body.splitlines() if line.startswith("print(sel.name"))
    assert proc.stdout.splitlines()[0] == comment.split("# ", 1)[1]
