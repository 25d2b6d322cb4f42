"""The README's demo table is what ``carbonsr demo`` prints now (it cannot drift silently).

Runs the whole demo (about 30 s on 2 quiet CPU cores with the default ``prior`` model). The
table itself is written by ``python benchmarks/readme_demo.py``; this test runs that script's
``--check`` (numbers equal within 2 %: rounding and thread order).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def test_readme_has_a_generated_demo_table() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- demo-table -->")[1].split("<!-- /demo-table -->")[0]
    assert "benchmarks/readme_demo.py" in block and "model" in block and "fitted" in block


def test_demo_reproduces_the_readme_table() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_demo.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
