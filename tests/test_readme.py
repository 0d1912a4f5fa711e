"""The README's tour runs as written (its code blocks, in order, in one fresh process)."""

import re
from pathlib import Path

import pytest

from helpers import run_python

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_tour_runs():
    pytest.importorskip("torch")
    text = README.read_text()
    tour = text[text.index("## A tour") : text.index("## Benchmark")]
    blocks = re.findall(r"```python\n(.*?)```", tour, re.S)
    assert len(blocks) >= 2
    run_python("\n".join(blocks))
