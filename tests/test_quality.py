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


def _readme_command(after: str) -> str:
    """The first fenced command under the README line that starts with ``after``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(after) + r"[^\n]*\s*```bash\n(.+?)\n```", text, re.S)
    assert block, f"README has no command block under {after!r}"
    return block.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command_with_its_plugins_installed():
    """CI must run what the README tells a newcomer to run, and the options pyproject adds
    to every pytest run must come from packages the test extra installs (``-n`` without
    pytest-xdist fails a fresh clone before any test runs)."""
    import tomllib

    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == _readme_command("Run the tests:")
    assert ".venv/bin/pip install --quiet -e '.[test]'" in ci  # the setup command's extra
    assert "pip install -e '.[test]'" in _readme_command("Set up and run the main job")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    addopts = project["tool"]["pytest"]["ini_options"]["addopts"].split()
    test_extra = " ".join(project["project"]["optional-dependencies"]["test"])
    if "-n" in addopts or any(opt.startswith("--dist") for opt in addopts):
        assert "pytest-xdist" in test_extra
