"""Layout rules of issue 16: small modules, packages that state their job."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("carbonsr_cli", "models")
#: Most lines of a module ("about 600").
MAX_LINES = 650
#: Modules allowed over the limit (none).
SIZE_EXCEPTIONS: set[str] = set()
#: Packages exempt from the two-line docstring rule (none).
DOC_EXCEPTIONS: set[str] = set()


def test_no_module_over_about_600_lines():
    big = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES and rel not in SIZE_EXCEPTIONS:
                big[rel] = n
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_package_states_its_job_in_two_lines():
    bad = {}
    for pkg in PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix()
            if rel in DOC_EXCEPTIONS:
                continue
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")), clean=True)
            if not doc or len(doc.strip().splitlines()) > 2:
                bad[rel] = doc
    assert not bad, f"package docstrings must be one or two lines: {sorted(bad)}"
