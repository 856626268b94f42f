"""The engine core stays light: importing it must not pull in the service or cluster stacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("fastapi", "duckdb", "dask", "uvicorn", "distributed")


def test_engine_import_does_not_load_heavy_dependencies():
    code = (
        "import json, sys\n"
        "import dpm_vec.pipeline, dpm_vec.simulate\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"engine import pulled in {loaded}"


def test_check_detects_a_heavy_import():
    """Guard against a vacuous test: the same probe sees duckdb when it is imported."""
    code = "import sys, duckdb\nprint('duckdb' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
