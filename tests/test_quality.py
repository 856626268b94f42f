"""Quality gate: the package, tests and benchmarks pass ruff (pyflakes and bugbear rules),
and no engine code tests a 28-digit value for null through the struct's own methods."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "dpm_vec", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


# an F28 column (named ``*_f`` or ``*_f28`` by convention) tested, filled or coalesced as a
# struct: after a join Polars can leave a missing value as null fields under a valid
# struct, which these miss (dec28.is_null / fill_null / coalesce read the exponent)
_STRUCT_NULL_TESTS = re.compile(
    r"""pl\.col\("[^"]*_f(28)?"\)\.(is_null|is_not_null|fill_null)\("""
    r"""|\.fill_null\((f28|f|dec28)\.(zero|one)\(\)\)"""
    r"""|pl\.coalesce\("[^"]*_f(28)?","""
)


def test_no_struct_null_tests_of_28_digit_values():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "dpm_vec").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _STRUCT_NULL_TESTS.search(line)
    ]
    assert found == []
